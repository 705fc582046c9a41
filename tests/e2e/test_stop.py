"""The Stop button in the real app: `streamlit run app.py` driven over Streamlit's own websocket protocol.

AppTest runs a script to its end and cannot press a button while it runs; a browser can, and so can
this client, which speaks the protocol the browser speaks (protobuf BackMsg / ForwardMsg) without
needing one. Pressing Stop during a pass must stop it within about one batch, store nothing, release
the key's lock, say how far it got, and leave the next Compute working normally.
"""

import time
from pathlib import Path

from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.proto.WidgetStates_pb2 import WidgetState
from websockets.sync.client import connect

from app_process import server  # noqa: F401  (the fixture)

N = 256  # eight batches of the demo model: long enough to stop in the middle, short enough to redo


class Session:
    """One browser tab's worth of protocol: rerun requests out, elements in."""

    def __init__(self, socket, query: str):
        self.socket, self.query = socket, query

    def rerun(self, press: str | None = None) -> None:
        """Run the page again, with the button whose widget id is ``press`` clicked."""
        message = BackMsg()
        message.rerun_script.query_string = self.query
        if press:
            message.rerun_script.widget_states.widgets.append(WidgetState(id=press, trigger_value=True))
        self.socket.send(message.SerializeToString())

    def until(self, done, timeout: float = 180) -> list:
        """New elements received until ``done(element)`` holds for one, or until the run finishes (done=None)."""
        deadline, elements = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            try:
                message = ForwardMsg.FromString(self.socket.recv(timeout=1))
            except TimeoutError:
                continue
            if message.WhichOneof("type") == "script_finished" and done is None:
                return elements
            if message.WhichOneof("type") == "delta" and message.delta.WhichOneof("type") == "new_element":
                elements.append(message.delta.new_element)
                if done is not None and done(elements[-1]):
                    return elements
        raise AssertionError(f"timed out; last elements: {elements[-5:]}")


def _buttons(elements) -> dict[str, str]:
    return {e.button.label: e.button.id for e in elements if e.WhichOneof("type") == "button"}


def _alerts(elements) -> list[str]:
    return [e.alert.body for e in elements if e.WhichOneof("type") == "alert"]


def _counting(element) -> bool:
    """A progress bar that has counted at least one batch of the pass."""
    return element.WhichOneof("type") == "progress" and f"/{N} images" in element.progress.text \
        and not element.progress.text.startswith("0/")


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) if cache.is_dir() else []


def test_stop_during_a_pass_stores_nothing_and_the_next_compute_works(server):
    url = server.replace("http://", "ws://")
    with connect(f"{url}/_stcore/stream", subprotocols=["streamlit"], max_size=None) as socket:
        _stop_and_compute_again(Session(socket, f"n={N}"), server.cache)


def _stop_and_compute_again(tab: Session, cache: Path) -> None:
    """Compute, press Stop after the first batch, check that nothing is stored, then Compute again."""
    tab.rerun()
    compute = _buttons(tab.until(None))["Compute"]
    tab.rerun(press=compute)
    running = tab.until(_counting)
    locks = cache / ".locks"
    assert [p.suffix for p in sorted(locks.iterdir())] == [".lock", ".progress"]  # the key is held

    tab.rerun(press=_buttons(running)["Stop"])
    alerts = _alerts(tab.until(None))
    stopped = [a for a in alerts if a.startswith("Stopped after")]
    assert len(stopped) == 1 and stopped[0].endswith(f" of {N} images; nothing partial was stored."), alerts
    assert any("is not computed yet: press Compute" in a for a in alerts)
    deadline = time.monotonic() + 60  # the stopped pass ends at its next progress update: one batch
    while any(locks.iterdir()):
        assert time.monotonic() < deadline, "the stopped pass still holds its key"
        time.sleep(0.2)
    assert _entries(cache) == [] and not any(p.name.startswith(".tmp-") for p in cache.iterdir())

    tab.rerun(press=compute)  # computes normally, from the start
    assert not any(a.startswith("Stopped after") for a in _alerts(tab.until(None, timeout=300)))
    assert len(_entries(cache)) == 1 and not any(locks.iterdir())
    tab.rerun()  # and a later visit reads the stored result
    shown = tab.until(None)
    assert not any("not computed yet" in a for a in _alerts(shown))
    assert any(e.WhichOneof("type") == "metric" and e.metric.label == "Samples n" for e in shown)
