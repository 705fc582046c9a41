"""Shared-demo mode: the dashboard shown to a group without handing out the machine.

Enabled at start by ``RBA_SHARED_DEMO=1`` and/or ``RBA_SHARED_CONFIG=demo.toml`` (a TOML file, keys as below,
top level or under ``[shared_demo]``); the ``RBA_SHARED_*`` variables override the file's keys:

    models       RBA_SHARED_MODELS       comma-separated aliases, hub ids or paths; the only models offered
    datasets     RBA_SHARED_DATASETS     the same for datasets (also the second dataset of Similarity and Table)
    max_n        RBA_SHARED_MAX_N        the largest sample count n (default 1,024)
    max_eval_n   RBA_SHARED_MAX_EVAL_N   the largest evaluation sample count (default 1,024)
    max_running  RBA_SHARED_MAX_RUNNING  computations at once, over every session and process sharing the cache
                                         folder (default 1); the others wait in a queue that shows their place

Without a list, every alias the sidebar lists is offered; custom paths never are. Deleting on the Cache page is
off. A misconfiguration fails closed: every page shows its one sentence and the Cache page deletes nothing.

The queue (:class:`Queue`) lives in the cache folder, so the limit holds across the sessions of one server and
across servers sharing ``RBA_CACHE_DIR``: ``.shared-demo-queue/<number>.ticket`` files, numbered in arrival
order under an flock on a counter file. The first ``max_running`` live tickets may run. A running ticket is
held by an flock (it dies with its process) and dated 1970, so that it is stale as soon as the flock is gone; a
waiting one is live while its session renews its date (the queued notice reruns every second), so a closed tab
loses its place after :data:`EXPIRY_S`.
"""

from __future__ import annotations

import fcntl
import functools
import os
import time
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import streamlit as st

from rba_core.cache import cache_root
from rba_core.errors import RBAError

ENABLE, CONFIG = "RBA_SHARED_DEMO", "RBA_SHARED_CONFIG"
ENV = {"models": "RBA_SHARED_MODELS", "datasets": "RBA_SHARED_DATASETS", "max_n": "RBA_SHARED_MAX_N",
       "max_eval_n": "RBA_SHARED_MAX_EVAL_N", "max_running": "RBA_SHARED_MAX_RUNNING"}
LEAST = {"max_n": 2, "max_eval_n": 2, "max_running": 1}
ROOT = Path(__file__).resolve().parents[2]  # a relative RBA_SHARED_CONFIG is read from the app's folder
QUEUE = ".shared-demo-queue"
EXPIRY_S = 60.0  # a waiting ticket not renewed for this long is a closed tab's (background tabs renew slowly)
TICKET = "_shared_ticket"  # session state: this session's place in the queue
NO_DELETION = ("Deleting is turned off on this shared demo; whoever runs the server can clear the cache folder "
               "there.")
LISTED_HELP = "This shared demo offers only the {what} its operator listed."


@dataclass(frozen=True)
class Settings:
    """The operator's limits; ``models``/``datasets`` None: every alias the sidebar lists."""

    models: tuple[str, ...] | None = None
    datasets: tuple[str, ...] | None = None
    max_n: int = 1024
    max_eval_n: int = 1024
    max_running: int = 1


def active() -> bool:
    """Whether the server runs as a shared demo (also when its configuration is broken: fail closed)."""
    flag = os.environ.get(ENABLE, "").strip().lower()
    return flag not in ("", "0", "false", "no", "off") or bool(os.environ.get(CONFIG, "").strip())


def settings() -> Settings | None:
    """The shared-demo settings, None when the mode is off; a misconfiguration is an :class:`RBAError`."""
    if not active():
        return None
    return _settings(os.environ.get(CONFIG, "").strip(), tuple(os.environ.get(v) for v in ENV.values()))


@functools.lru_cache(maxsize=8)
def _settings(config: str, env: tuple[str | None, ...]) -> Settings:
    """Read once per process (per value of the variables): the file, then the variables over it."""
    raw: dict = {}
    if config:
        path = Path(config).expanduser()
        path = path if path.is_absolute() else ROOT / path
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise RBAError(f"The shared-demo configuration {path} ({CONFIG}) cannot be read: {exc}.") from None
        raw = raw.get("shared_demo", raw)
        unknown = sorted(set(raw) - set(ENV))
        if unknown:
            raise RBAError(f"The shared-demo configuration {path} has unknown keys {', '.join(unknown)}; it may "
                           f"hold {', '.join(ENV)}.")
    for key, value in zip(ENV, env):
        if value is not None and value.strip():
            raw[key] = value
    values = {}
    for key, value in raw.items():
        if key in ("models", "datasets"):
            names = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
            if not isinstance(names, list) or not all(isinstance(v, str) for v in names) or not any(names):
                raise RBAError(f"The shared demo's {key} ({ENV[key]}) must be a list of names (comma-separated in "
                               f"the variable), not {value!r}.")
            values[key] = tuple(v.strip() for v in names if v.strip())
        else:
            try:
                number = int(value)
            except (TypeError, ValueError):
                number = 0
            if number < LEAST[key] or isinstance(value, bool):
                raise RBAError(f"The shared demo's {key} ({ENV[key]}) must be a whole number of at least "
                               f"{LEAST[key]}, not {value!r}.")
            values[key] = number
    return Settings(**values)


def listed(key: str, options: list[str], names: set[str]) -> list[str] | None:
    """The options of the picker ``key`` in shared-demo mode (None when off): its entries that are no name
    (such as "(none)"), then the operator's models (key ``model``) or datasets; ``names`` are the listed aliases."""
    conf = settings()
    if conf is None:
        return None
    offered = conf.models if key == "model" else conf.datasets
    pool = [o for o in options if o in names] if offered is None else list(offered)
    return [o for o in options if o not in names] + pool


def asked(key: str) -> str | None:
    """What the URL asks the picker ``key`` for (a typed path for ``custom``), read before the picker, which drops
    a value it does not offer from the URL."""
    value = st.query_params.get(key)
    return st.query_params.get(f"{key}_path") or value if value == "custom" else value


def refuse_unlisted(asked: str | None, choice: str, what: str) -> None:
    """Say in one sentence that the URL asked for a ``what`` this shared demo does not offer (it shows ``choice``)."""
    if asked is not None and asked != choice:
        st.info(f"This shared demo offers only the {what} its operator listed, so the link's {asked!r} was "
                f"replaced by {choice}.")


def cap(high: int, which: str) -> tuple[int, str]:
    """The largest count allowed (``which``: ``max_n`` or ``max_eval_n``) and the words saying whose limit it is."""
    conf = settings()
    if conf is None or getattr(conf, which) >= high:
        return high, ""
    return getattr(conf, which), " on this shared demo"


# The queue: files in the cache folder, so that every session and process sharing it counts.

class Queue:
    """At most ``limit`` computations at once over everyone sharing ``root``, first come first served."""

    def __init__(self, root: Path | str, limit: int, expiry_s: float = EXPIRY_S):
        self.folder, self.limit, self.expiry_s = Path(root) / QUEUE, limit, expiry_s

    def join(self) -> str:
        """A new waiting ticket at the back of the queue; returns its name."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / "next", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # numbers strictly in arrival order, also across processes
            text = os.read(fd, 32).decode(errors="replace").strip()
            number = int(text) if text.isdigit() else max((int(t.stem) for t in self._tickets()), default=-1) + 1
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, str(number + 1).encode())
            name = f"{number:012d}.ticket"
            (self.folder / name).touch()
        finally:
            os.close(fd)
        return name

    def _tickets(self) -> list[Path]:
        return sorted(self.folder.glob("[0-9]*.ticket")) if self.folder.is_dir() else []

    def _live(self, path: Path) -> bool:
        """Whether ``path`` is running (its flock is held) or waiting and renewed lately; a dead one is removed."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True  # running
            if time.time() - os.fstat(fd).st_mtime < self.expiry_s:
                return True  # waiting
            path.unlink(missing_ok=True)  # while holding it: a claimer checks the file is still there
            return False
        finally:
            os.close(fd)

    def place(self, name: str) -> int | None:
        """How many live tickets are ahead of ``name`` (running or waiting); None when it is gone (expired)."""
        ahead = 0
        for path in self._tickets():
            if path.name == name:
                return ahead if path.exists() else None
            ahead += self._live(path)
        return None

    def renew(self, name: str) -> bool:
        """Mark a waiting ticket as wanted still; False when it is gone."""
        try:
            os.utime(self.folder / name)
            return True
        except FileNotFoundError:
            return False

    def leave(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)

    def claim(self, name: str) -> int:
        """Hold ``name`` (whose turn it is): an open descriptor with its flock; :class:`LookupError` when it expired."""
        path = self.folder / name
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise LookupError(name) from None
        fcntl.flock(fd, fcntl.LOCK_EX)  # at most a moment: another's liveness check holds it that long
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if not current:  # removed as expired just before
            os.close(fd)
            raise LookupError(name)
        os.utime(fd, (0, 0))  # running: once its flock goes (a killed process too), it is stale at once
        return fd

    def release(self, fd: int, name: str) -> None:
        """Leave after running: the ticket is removed before its flock goes, as the cache's locks are."""
        try:
            self.leave(name)
        finally:
            os.close(fd)

    @contextmanager
    def turn(self, waiting=lambda ahead: None, poll_s: float = 0.2) -> Iterator[None]:
        """Join, wait for the turn (``waiting(ahead)`` on each change), run the block, leave: a computation
        that holds a place from outside the dashboard (a test, a script)."""
        name, said = self.join(), None
        try:
            while (ahead := self.place(name)) is None or ahead >= self.limit:
                if ahead is None:
                    name = self.join()
                elif ahead != said:
                    waiting(said := ahead)
                self.renew(name)
                time.sleep(poll_s)
            fd = self.claim(name)
            try:
                yield
            finally:
                self.release(fd, name)
        finally:
            self.leave(name)


def _queue() -> Queue:
    return Queue(cache_root(), settings().max_running)


def queued_sentence(ahead: int, limit: int) -> str:
    return (f"Queued: {ahead} ahead of you (this shared demo runs at most {limit} computation"
            f"{'s' if limit != 1 else ''} at a time); yours starts by itself when its turn comes.")


def gate(key: str, clicked: bool) -> bool:
    """Whether the start button ``key`` starts its work in this run. Outside shared-demo mode: ``clicked``. In it,
    a click takes a place in the queue; the work starts (now, or on a later run, by itself) when the place is
    among the first ``max_running``, and until then the page says how many are ahead."""
    if not active():
        return clicked
    queue, ticket = _queue(), st.session_state.get(TICKET)
    if ticket and ticket.get("granted"):  # given its turn on an earlier run that did not start it: free the place
        queue.leave(ticket["name"])
        ticket = st.session_state[TICKET] = None
    if not clicked and (ticket is None or ticket["by"] != key):
        return False
    if ticket is None or not queue.renew(ticket["name"]):  # a first click, or a place that expired
        ticket = {"name": queue.join()}
    ticket["by"] = key
    st.session_state[TICKET] = ticket
    if (queue.place(ticket["name"]) or 0) < queue.limit:
        ticket["granted"] = True
        return True
    _waiting()
    return False


def _leave() -> None:
    ticket = st.session_state.pop(TICKET, None)
    if ticket:
        _queue().leave(ticket["name"])


@st.fragment(run_every=1.0)
def _waiting() -> None:
    """The queued notice: renews this session's place each second, and reruns the page when its turn comes."""
    ticket = st.session_state.get(TICKET)
    if not ticket:
        return
    queue = _queue()
    ahead = queue.place(ticket["name"]) if queue.renew(ticket["name"]) else None
    if ahead is None or ahead < queue.limit:
        st.rerun()  # the start button's gate starts the work (or takes a new place)
    st.info(queued_sentence(ahead, queue.limit))
    st.button("Leave the queue", key="shared-leave", on_click=_leave, icon=":material/logout:")


@contextmanager
def turn(status=None) -> Iterator[None]:
    """Around one computation: outside shared-demo mode nothing; in it, this session's place whose turn came
    (:func:`gate`), held while the work runs. Work that did not come through a start button waits here."""
    if not active():
        yield
        return
    queue, ticket = _queue(), st.session_state.pop(TICKET, None)
    fd = None
    if ticket and ticket.get("granted"):
        try:
            fd = queue.claim(ticket["name"])
        except LookupError:
            pass  # expired between the gate and now: wait for a new place below
    if fd is None:
        label = (lambda ahead: None) if status is None else (
            lambda ahead: status.update(label=queued_sentence(ahead, queue.limit)))
        with queue.turn(label):
            yield
        return
    try:
        yield
    finally:
        queue.release(fd, ticket["name"])
