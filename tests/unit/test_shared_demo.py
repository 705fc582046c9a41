"""The shared-demo mode's settings and its queue (pages/_ui/shared.py) without a page: first come first served,
at most ``limit`` at once across processes, a killed holder's or closed tab's place given back."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pages._ui import shared
from pages._ui.shared import Queue, Settings, settings
from rba_core.errors import RBAError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(monkeypatch):
    for name in (shared.ENABLE, shared.CONFIG, *shared.ENV.values()):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_settings_come_from_the_file_and_the_variables_override_it(env, tmp_path):
    assert settings() is None and not shared.active()
    env.setenv(shared.ENABLE, "1")
    assert settings() == Settings()  # every listed alias, n up to 1,024, one computation at a time
    config = tmp_path / "demo.toml"
    config.write_text('[shared_demo]\nmodels = ["digits-ViT", "/srv/models/vit"]\nmax_n = 512\nmax_running = 2\n')
    env.setenv(shared.CONFIG, str(config))
    env.setenv(shared.ENABLE, "0")  # the file alone turns the mode on
    assert shared.active()
    assert settings() == Settings(models=("digits-ViT", "/srv/models/vit"), max_n=512, max_running=2)
    env.setenv("RBA_SHARED_MODELS", "MiniLM-L6")
    env.setenv("RBA_SHARED_MAX_RUNNING", "3")
    assert settings() == Settings(models=("MiniLM-L6",), max_n=512, max_running=3)


@pytest.mark.parametrize("text, message", [
    ("max_n = 1\n", "The shared demo's max_n (RBA_SHARED_MAX_N) must be a whole number of at least 2, not 1."),
    ("max_running = true\n", "The shared demo's max_running (RBA_SHARED_MAX_RUNNING) must be a whole number of at "
                             "least 1, not True."),
    ("models = 3\n", "The shared demo's models (RBA_SHARED_MODELS) must be a list of names (comma-separated in the "
                     "variable), not 3."),
    ("max_N = 5\n", "has unknown keys max_N; it may hold models, datasets, max_n, max_eval_n, max_running."),
    ("models = [\n", "cannot be read"),
])
def test_a_misconfiguration_is_one_sentence(env, tmp_path, text, message):
    config = tmp_path / "demo.toml"
    config.write_text(text)
    env.setenv(shared.CONFIG, str(config))
    with pytest.raises(RBAError) as caught:
        settings()
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_queue_runs_the_first_k_in_arrival_order(tmp_path):
    queue = Queue(tmp_path, 2)
    names = [queue.join() for _ in range(4)]
    assert [queue.place(n) for n in names] == [0, 1, 2, 3]
    first = queue.claim(names[0])
    queue.leave(names[1])  # a tab that left the queue
    assert [queue.place(n) for n in names[2:]] == [1, 2]  # the third may run now, the fourth waits
    queue.release(first, names[0])
    assert queue.place(names[3]) == 1 and queue.place(names[0]) is None
    assert queue.join() > names[3]  # numbering goes on after the earlier tickets left


def test_a_waiting_place_not_renewed_expires_and_a_running_one_does_not(tmp_path):
    queue = Queue(tmp_path, 1, expiry_s=0.3)
    running, waiting, mine = queue.join(), queue.join(), queue.join()
    fd = queue.claim(running)
    time.sleep(0.5)
    queue.renew(mine)
    assert queue.place(mine) == 1  # the running one counts, the closed tab's place is gone
    assert not queue.renew(waiting) and queue.place(waiting) is None
    with pytest.raises(LookupError):
        queue.claim(waiting)
    queue.release(fd, running)
    assert queue.place(mine) == 0


def test_a_killed_holder_in_another_process_gives_its_slot_back(tmp_path):
    """The limit holds across processes sharing the cache folder, and a SIGKILLed holder blocks nobody."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pages._ui.shared import Queue; "
         "turn = Queue(sys.argv[1], 1).turn(); turn.__enter__(); print('holding', flush=True); time.sleep(600)",
         str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "holding"
        queue = Queue(tmp_path, 1)
        mine = queue.join()
        assert queue.place(mine) == 1
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert queue.place(mine) == 0  # the dead holder's flock went with it: the slot is free
        queue.release(queue.claim(mine), mine)
        assert not list((tmp_path / shared.QUEUE).glob("*.ticket"))  # its ticket was removed on the way
    finally:
        holder.kill()
        holder.wait()
