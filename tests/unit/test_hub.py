"""The hub reachability check: honours HF_HUB_OFFLINE, answers quickly either way (local servers only)."""

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from rba_core.hub import hub_status


class _Hub(BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.send_response(200 if self.path == "/" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


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
    assert hub_status() == (False, "HF_HUB_OFFLINE is set")


def test_a_server_that_answers_is_reachable(monkeypatch, local_hub):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", local_hub)
    reachable, reason = hub_status(timeout=2)
    assert reachable and local_hub in reason


def test_a_closed_port_is_unreachable_quickly(monkeypatch):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    began = time.perf_counter()
    reachable, reason = hub_status(timeout=2)
    assert not reachable and "cannot be reached" in reason
    assert time.perf_counter() - began < 2.5
