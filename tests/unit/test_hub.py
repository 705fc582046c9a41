"""The hub: honours HF_HUB_OFFLINE, is probed once per process and quickly, and when it cannot be reached
every later hub call fails at once with one sentence and the real reason (local servers only)."""

import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

import rba_core.hub
from rba_core.hub import UNREACHABLE, USER_OFFLINE, hub_status

ROOT = Path(__file__).resolve().parents[2]


class _Hub(BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.send_response(200 if self.path == "/" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    """Each test starts as a new process would: nothing probed yet."""
    monkeypatch.setattr(rba_core.hub, "_status", {})


def _closed_port() -> int:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def local_hub():
    server = HTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_offline_flag_means_unreachable_without_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # would fail too, but must not be tried
    assert hub_status() == (False, USER_OFFLINE) == (False, "HF_HUB_OFFLINE is set")


def test_a_server_that_answers_is_reachable(monkeypatch, local_hub):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", local_hub)
    reachable, reason = hub_status(timeout=2)
    assert reachable and local_hub in reason


def test_a_closed_port_is_unreachable_quickly_and_the_reason_stays_true(monkeypatch):
    port = _closed_port()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    began = time.perf_counter()
    reachable, reason = hub_status(timeout=2)
    assert not reachable and reason.startswith(UNREACHABLE) and str(port) in reason
    assert time.perf_counter() - began < 2.5
    # The probe made the process offline; asked again, the reason is still the probe, not our own flag.
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert hub_status() == (False, reason)


def test_the_hub_is_probed_once_per_process(monkeypatch, local_hub):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", local_hub)
    first = hub_status(timeout=2)
    assert first[0]
    calls = []
    monkeypatch.setattr(rba_core.hub, "probe", lambda *args: calls.append(args) or (False, "probed again"))
    assert hub_status() == first and calls == []


OFFLINE_MISS = """
import sys, time
from transformers import AutoConfig, AutoImageProcessor, ViTModel  # imports cost the same online: untimed
from rba_core.errors import RBAError
from rba_core.data import open_dataset
from rba_core.models import load_encoder
for call, arg in ((load_encoder, "no-such-org/no-such-vit"), (open_dataset, "MNIST")):
    began = time.perf_counter()
    try:
        call(arg)
    except RBAError as exc:
        print(f"{time.perf_counter() - began:.3f} {exc}")
"""


@pytest.mark.parametrize("how", ["cli model", "cli dataset", "python"])
def test_a_hub_miss_with_the_hub_unreachable_fails_fast_in_one_sentence(tmp_path, how):
    """No HF_HUB_OFFLINE: the hub simply cannot be reached (a closed local port), nothing cached."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if how == "python":
        command = [sys.executable, "-c", OFFLINE_MISS]
    else:
        pair = ["no-such-org/no-such-vit", "digits"] if how == "cli model" else ["digits-ViT", "MNIST"]
        command = [sys.executable, "-m", "rba_core", "analyze", "--model", pair[0], "--dataset", pair[1],
                   "--n", "4", "--cache-dir", str(tmp_path / "cache")]
    began = time.perf_counter()
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - began
    if how == "python":  # timed inside, after the imports
        assert run.returncode == 0 and run.stderr == "", run.stderr
        lines = run.stdout.splitlines()
        assert len(lines) == 2 and all(float(line.split()[0]) < 3 for line in lines), lines
        assert "no-such-org/no-such-vit" in lines[0] and "MNIST" in lines[1]
        assert all(UNREACHABLE in line and "HF_HUB_OFFLINE" not in line for line in lines)
        return
    assert took < 3, f"{how} took {took:.1f} s"  # the whole process: it fails before the heavy imports
    assert run.returncode == 2 and run.stdout == ""
    (line,) = run.stderr.splitlines()  # one sentence, no library noise
    assert line.startswith("error: ") and UNREACHABLE in line and line.endswith(".")
    assert ("local folder" if how == "cli model" else "RBA_DATA_DIR") in line


def test_an_unused_head_is_not_reported_but_missing_weights_are(tmp_path):
    import logging

    from safetensors.torch import load_file, save_file

    from conftest import save_tiny_model
    from rba_core.models import load_encoder
    from rba_core.quiet import LOAD_REPORT_LOGGER, UnusedHeadReport, silence_library_noise

    reports = []
    collect = logging.Handler()
    collect.emit = lambda record: reports.append(record.getMessage())
    logger = logging.getLogger(LOAD_REPORT_LOGGER)  # a handler sees only what the logger's filters let through
    logger.addHandler(collect)
    try:
        for quiet in [f for f in logger.filters if isinstance(f, UnusedHeadReport)]:
            logger.removeFilter(quiet)
        from transformers import ViTModel

        from rba_core.registry import DEMO_MODEL_DIR

        # transformers alone reports a classification checkpoint's classifier as UNEXPECTED ...
        ViTModel.from_pretrained(DEMO_MODEL_DIR, add_pooling_layer=False)
        assert [r for r in reports if "LOAD REPORT" in r and "UNEXPECTED" in r and "classifier" in r]
        reports.clear()
        load_encoder("digits-ViT", "cpu")  # ... the tool's own load does not
        silence_library_noise()  # idempotent
        assert sum(isinstance(f, UnusedHeadReport) for f in logger.filters) == 1
        assert not [r for r in reports if "LOAD REPORT" in r]
        folder = save_tiny_model(tmp_path / "vit", "vit")
        weights = load_file(folder / "model.safetensors")
        del weights["layernorm.weight"]
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        load_encoder(str(folder), "cpu")
        (report,) = [r for r in reports if "LOAD REPORT" in r]
        assert "MISSING" in report and "layernorm.weight" in report
    finally:
        logger.removeHandler(collect)
