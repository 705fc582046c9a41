"""The real app for end-to-end tests: `streamlit run app.py` on a free local port, hub offline, a fresh cache.

A module, not a conftest.py: a second conftest would shadow tests/conftest.py, which tests import by name.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class App(str):
    """The app's URL (``http://127.0.0.1:PORT``), with ``cache``: the folder of its on-disk cache."""

    cache: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> App:
    """The app, always stopped afterwards."""
    port, tmp = _free_port(), tmp_path_factory.mktemp("e2e")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RBA_CACHE_DIR": str(tmp / "cache")}
    log = open(tmp / "streamlit.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = App(f"http://127.0.0.1:{port}")
    url.cache = tmp / "cache"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not start:\n{(tmp / 'streamlit.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=10)
        log.close()
