"""The cache: misses then hits with identical arrays, never loads the model on a hit, detects and
recomputes damaged entries, keys on everything that changes a result, survives concurrent writers,
computes each key once across processes, stores nothing when stopped, cleans up after killed writers."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import rba_core.ops.run
import rba_core.passes.extract
from rba_core.ops.analysis import approximate
from rba_core.cache import CACHE_DIR_ENV, WAITING, Cache, make_key
from rba_core.passes.extract import extract
from rba_core.models import load_encoder
from rba_core.progress import Cancelled
from rba_core.measures.stats import StatsAccumulator


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded on a cache hit")


def assert_same(a, b) -> None:
    for name in ("pooled", "final", "labels", "indices"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    if a.token_stats is not None:
        np.testing.assert_array_equal(a.stats().sums, b.stats().sums)
        for ua, ub in zip(a.stats().upper, b.stats().upper):
            np.testing.assert_array_equal(ua, ub)
        assert a.stats().count == b.stats().count


@pytest.fixture(scope="module")
def vit(tiny_models):
    return load_encoder(tiny_models["vit"], device="cpu")


@pytest.fixture
def first(tiny_models, image_folder, cache, vit):
    ex = extract(tiny_models["vit"], image_folder, 8, seed=3, cache=cache, encoder=vit)
    assert not ex.hit and ex.notes == []
    return ex


def test_second_extract_is_a_hit_without_loading_the_model(first, tiny_models, image_folder, cache,
                                                           monkeypatch):
    monkeypatch.setattr(rba_core.passes.extract, "load_encoder", _no_model)
    calls = []
    again = extract(tiny_models["vit"], image_folder, 8, seed=3, cache=Cache(cache.root),
                    encoder=lambda: calls.append(1) or _no_model())
    assert again.hit and again.key == first.key and calls == []
    assert_same(again, first)
    # A request without statistics is served by the entry that has them.
    light = extract(tiny_models["vit"], image_folder, 8, seed=3, with_stats=False, cache=Cache(cache.root))
    assert light.hit
    np.testing.assert_array_equal(light.pooled, first.pooled)


def test_miss_without_loader_loads_the_model(tiny_models, image_folder, cache, monkeypatch):
    loaded = []

    def counting_loader(name, device=None, max_length=128):
        loaded.append(name)
        return load_encoder(name, device, max_length)

    monkeypatch.setattr(rba_core.passes.extract, "load_encoder", counting_loader)
    extract(tiny_models["deit"], image_folder, 4, seed=0, cache=cache, device="cpu")
    extract(tiny_models["deit"], image_folder, 4, seed=0, cache=cache, device="cpu")
    assert loaded == [tiny_models["deit"]]


def _entry(cache: Cache, key: str) -> Path:
    folder = cache.root / key
    assert (folder / "meta.json").is_file()
    return folder


@pytest.mark.parametrize("damage", ["truncate reps", "flip stats", "garbage meta", "delete reps"])
def test_damaged_entry_is_reported_and_recomputed(first, tiny_models, image_folder, cache, vit, damage):
    folder = _entry(cache, first.key)
    if damage == "truncate reps":
        path = folder / "reps.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "flip stats":
        path = folder / "stats.safetensors"
        data = bytearray(path.read_bytes())
        data[-100] ^= 0xFF  # inside the arrays, same length: only the checksum can tell
        path.write_bytes(bytes(data))
    elif damage == "garbage meta":
        (folder / "meta.json").write_text("{not json")
    else:
        (folder / "reps.safetensors").unlink()
    loads = []
    again = extract(tiny_models["vit"], image_folder, 8, seed=3, cache=Cache(cache.root),
                    encoder=lambda: loads.append(1) or vit)
    assert not again.hit and loads == [1]
    assert len(again.notes) == 1 and "damaged" in again.notes[0] and first.key[:12] in again.notes[0]
    assert_same(again, first)
    # The recomputed entry is whole again.
    third = extract(tiny_models["vit"], image_folder, 8, seed=3, cache=Cache(cache.root), encoder=_no_model)
    assert third.hit and third.notes == []
    assert_same(third, first)


def test_notes_belong_to_one_extraction(first, tiny_models, image_folder, cache, vit):
    """One long-lived Cache (as the app keeps) reports a damaged entry once, not on every later hit."""
    (cache.root / first.key / "meta.json").write_text("garbage")
    shared = Cache(cache.root)
    recomputed = extract(tiny_models["vit"], image_folder, 8, seed=3, cache=shared, encoder=vit)
    assert len(recomputed.notes) == 1
    later = extract(tiny_models["vit"], image_folder, 8, seed=3, cache=shared, encoder=_no_model)
    assert later.hit and later.notes == []


def test_keys_change_with_everything_that_changes_the_result(first, tiny_models, image_folder, cache,
                                                             vit):
    model, data = tiny_models["vit"], image_folder
    same = extract(model, data, 8, seed=3, cache=cache, encoder=_no_model)
    assert same.key == first.key
    others = [
        extract(model, data, 8, seed=4, cache=cache, encoder=vit),
        extract(model, data, 9, seed=3, cache=cache, encoder=vit),
        extract(model, data, 8, seed=3, split="test", cache=cache, encoder=vit),
        extract(model, data, 8, seed=3, token_fraction=0.5, cache=cache, encoder=vit),
        extract(tiny_models["dinov2"], data, 8, seed=3, cache=cache, device="cpu"),
    ]
    keys = {first.key} | {ex.key for ex in others}
    assert len(keys) == 6 and not any(ex.hit for ex in others)
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in keys)
    assert not np.array_equal(others[0].indices, first.indices)


def test_changed_weights_in_the_same_folder_change_the_key(tiny_models, image_folder, cache, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["vit"], folder)
    before = extract(str(folder), image_folder, 4, seed=0, with_stats=False, cache=cache, device="cpu")
    enc = load_encoder(str(folder), device="cpu")
    with torch.no_grad():
        for p in enc.blocks[0].parameters():
            p.mul_(2.0)
    enc.model.save_pretrained(folder)
    after = extract(str(folder), image_folder, 4, seed=0, with_stats=False, cache=cache, device="cpu")
    assert after.key != before.key and not after.hit
    assert not np.allclose(after.pooled[1], before.pooled[1])


def test_make_key_is_order_independent_and_content_sensitive():
    assert make_key({"a": 1, "b": [1, 2]}) == make_key({"b": [1, 2], "a": 1})
    assert make_key({"a": 1, "b": [1, 2]}) != make_key({"a": 1, "b": [2, 1]})


def test_cache_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "elsewhere"))
    assert Cache().root == tmp_path / "elsewhere"


def test_concurrent_put_of_one_key_leaves_one_valid_entry(tmp_path):
    cache = Cache(tmp_path)
    rng = np.random.default_rng(0)
    writers = 4
    for round_ in range(10):
        key = make_key({"round": round_})
        arrays = [rng.standard_normal((64, 64)).astype(np.float32) for _ in range(writers)]
        barrier = threading.Barrier(writers)
        errors = []

        def write(k: int) -> None:
            try:
                barrier.wait()
                cache.put(key, {"g": {"x": arrays[k]}}, {"writer": k})
            except Exception as exc:  # noqa: BLE001 - any failure of a writer fails the test
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(k,)) for k in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        entry = cache.get(key)
        writer = entry.meta["writer"]
        np.testing.assert_array_equal(cache.load(key, "g")["x"], arrays[writer])
        assert json.loads((tmp_path / key / "meta.json").read_text())["writer"] == writer
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(make_key({"round": r}) for r in range(10))
    assert cache.damaged == []


def test_statistics_memory_does_not_grow_with_samples(tiny_models, image_folder, cache, vit):
    d, states = 32, 5
    acc = StatsAccumulator(states, d, "cpu")
    shapes = [tuple(u.shape) for u in acc.upper]
    for batch in (1, 7, 30):
        acc.add([torch.randn(batch, 17, d) for _ in range(states)])
        assert [tuple(u.shape) for u in acc.upper] == shapes
    assert shapes == [(d, (states - a) * d) for a in range(states)]
    assert acc.count == 38 * 17
    small = extract(tiny_models["vit"], image_folder, 4, seed=0, cache=cache, encoder=vit).stats()
    large = extract(tiny_models["vit"], image_folder, 20, seed=0, cache=cache, encoder=vit).stats()
    assert [u.shape for u in small.upper] == [u.shape for u in large.upper] == shapes
    assert small.sums.shape == large.sums.shape == (states, d)
    assert large.count == 20 * 17


def test_approximate_on_a_full_cache_hit_never_loads_the_model(tiny_models, image_folder, cache, vit,
                                                               monkeypatch):
    args = (tiny_models["vit"], image_folder, 8, 4, 0, [(1, 3)], "linear")
    first = approximate(*args, probe=True, cache=cache, encoder=vit)
    monkeypatch.setattr(rba_core.ops.run, "load_encoder", _no_model)
    monkeypatch.setattr(rba_core.passes.extract, "load_encoder", _no_model)
    again = approximate(*args, probe=True, cache=Cache(cache.root))
    assert again["mse_final"] == first["mse_final"]
    assert again["accuracy"] == first["accuracy"]
    assert again["params"] == first["params"]
    np.testing.assert_array_equal(again["final"]["approximated"], first["final"]["approximated"])


# One computation per key, crash-safe temporary folders, stops, listing and deleting (issue 10).

ROOT = Path(__file__).resolve().parents[2]

TWIN = """
import hashlib, json, os, sys, time
from pathlib import Path
from rba_core.cache import Cache
from rba_core.passes.extract import extract
from rba_core.models import load_encoder
from rba_core.progress import Cancelled
model, data, root, me, go = sys.argv[1:6]
waits, seen, loads = [], [], []

def slow(done, total):  # a slow pass, so that the other process asks while this one computes
    seen.append([done, total])
    time.sleep(0.3)

Path(me).touch()  # a barrier: both processes are ready, then the test says go
while not Path(go).exists():
    time.sleep(0.01)
ex = extract(model, data, 8, seed=1, batch_size=2, cache=Cache(root, on_wait=waits.append), progress=slow,
             encoder=lambda: loads.append(1) or load_encoder(model, "cpu"))
print(json.dumps({"hit": ex.hit, "key": ex.key, "loads": len(loads), "waits": waits, "progress": seen,
                  "pooled": hashlib.sha256(ex.pooled.tobytes()).hexdigest()}))
"""


def _python(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(path: Path, process: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process is None or process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_two_processes_asking_for_one_key_run_one_pass(tiny_models, image_folder, tmp_path):
    root, go = tmp_path / "cache", tmp_path / "go"
    twins = [_python(TWIN, tiny_models["vit"], image_folder, str(root), str(tmp_path / f"ready{k}"), str(go))
             for k in range(2)]
    for k, twin in enumerate(twins):
        _wait_for(tmp_path / f"ready{k}", twin)
    go.touch()
    results = []
    for twin in twins:
        out, err = twin.communicate(timeout=300)
        assert twin.returncode == 0, err
        results.append(json.loads(out))
    computed, waited = sorted(results, key=lambda r: r["hit"])
    assert (computed["hit"], waited["hit"]) == (False, True)
    assert computed["loads"] == 1 and waited["loads"] == 0  # one pass in all
    assert computed["key"] == waited["key"] and computed["pooled"] == waited["pooled"]
    assert waited["waits"] == [WAITING]
    # The waiter showed the holder's progress while it waited.
    assert waited["progress"] and all(p in computed["progress"] for p in waited["progress"])
    assert sorted(p.name for p in root.iterdir()) == [".locks", computed["key"]]
    assert not any((root / ".locks").iterdir())  # the holder removed its lock and progress files


def test_single_flight_across_threads_computes_once(tmp_path):
    cache = Cache(tmp_path)
    calls, barrier, results = [], threading.Barrier(4), []

    def compute(progress):
        calls.append(1)
        for done in range(1, 4):
            time.sleep(0.1)
            progress(done, 3)
        return cache.put("k" * 64, {"g": {"x": np.arange(5.0)}}, {}).load("g")["x"]

    def ask():
        barrier.wait()
        results.append(cache.single_flight("k" * 64, lambda: (cache.load("k" * 64, "g") or {}).get("x"), compute))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 4
    for x in results:
        np.testing.assert_array_equal(x, np.arange(5.0))


def test_a_stop_mid_pass_stores_nothing_and_releases_the_key(tiny_models, image_folder, tmp_path, vit):
    root = tmp_path / "cache"

    def stop_after_two_batches(done, total):
        if done >= 4:
            raise Cancelled

    with pytest.raises(Cancelled):
        extract(tiny_models["vit"], image_folder, 8, seed=5, batch_size=2, cache=Cache(root), encoder=vit,
                progress=stop_after_two_batches)
    assert [p.name for p in root.iterdir()] == [".locks"] and not any((root / ".locks").iterdir())
    again = extract(tiny_models["vit"], image_folder, 8, seed=5, batch_size=2, cache=Cache(root), encoder=vit)
    assert not again.hit and again.notes == []
    fresh = extract(tiny_models["vit"], image_folder, 8, seed=5, batch_size=2, cache=Cache(tmp_path / "fresh"),
                    encoder=vit)
    assert_same(again, fresh)


WRITER = """
import sys, time
from collections.abc import Mapping
from pathlib import Path
import numpy as np
from rba_core.cache import Cache
root, writing, go = sys.argv[1:4]

class Blocking(Mapping):
    '''Metadata that blocks when read: the writer stops inside Cache.put, after its arrays are written.'''

    def __getitem__(self, key):
        return 1

    def __len__(self):
        return 1

    def __iter__(self):
        Path(writing).touch()
        while not Path(go).exists():
            time.sleep(0.05)
        return iter(["x"])

Cache(root).put("k" * 64, {"g": {"a": np.arange(1000, dtype=np.float32)}}, Blocking())
"""


def _temporaries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp-"))


@pytest.mark.parametrize("writer", ["killed", "alive"])
def test_temporary_folders_of_dead_writers_are_removed_on_open(tmp_path, writer):
    root, writing, go = tmp_path / "cache", tmp_path / "writing", tmp_path / "go"
    process = _python(WRITER, str(root), str(writing), str(go))
    _wait_for(writing, process)
    left = _temporaries(root)
    assert len(left) == 2 and left[1] == left[0] + ".lock"
    assert (root / left[0] / "g.safetensors").is_file()  # caught in the middle of the write
    if writer == "killed":
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        Cache(root)  # the next open
        assert _temporaries(root) == []
        return
    Cache(root)
    assert _temporaries(root) == left  # a live writer's folder is never touched
    go.touch()
    assert process.wait(timeout=60) == 0, process.communicate()
    assert _temporaries(root) == []
    np.testing.assert_array_equal(Cache(root).load("k" * 64, "g")["a"], np.arange(1000, dtype=np.float32))


def test_temporary_folders_without_a_lock_are_removed_after_a_day(tmp_path):
    old, young = tmp_path / ".tmp-old", tmp_path / ".tmp-young"
    for folder in (old, young):
        folder.mkdir()
        (folder / "g.safetensors").write_bytes(b"partial")
    day_ago = time.time() - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    Cache(tmp_path)
    assert _temporaries(tmp_path) == [".tmp-young"]


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_entries_get_the_permissions_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        entry = Cache(tmp_path).put("k" * 64, {"g": {"x": np.zeros(3)}, "h": {"y": np.ones(2)}}, {})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(entry.folder.stat().st_mode) == 0o777 & ~umask
    for path in entry.folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_entries_are_listed_and_deleted(tiny_models, image_folder, tmp_path, vit):
    cache = Cache(tmp_path)
    result = approximate(tiny_models["vit"], image_folder, 8, 4, 0, [(1, 3)], cache=cache, encoder=vit)
    entries = {e.key: e for e in cache.entries()}
    assert set(entries) == {result["cache"]["fit"], result["cache"]["eval"],
                            *(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))}
    assert sorted(e.kind for e in entries.values()) == ["approximated run", "pass", "range-statistics"]
    fit = entries[result["cache"]["fit"]]
    assert (fit.model, fit.dataset, fit.split, fit.n) == (tiny_models["vit"], image_folder, "train", 8)
    run = next(e for e in entries.values() if e.kind == "approximated run")
    assert (run.model, run.split, run.n) == (tiny_models["vit"], "test", 4)
    for e in entries.values():
        assert e.size == sum(p.stat().st_size for p in (tmp_path / e.key).iterdir())
        assert abs(e.created - time.time()) < 600
    assert cache.delete(fit.key) and not (tmp_path / fit.key).exists()
    assert not cache.delete(fit.key)
    assert cache.clear() == 2 and cache.entries() == [] and _temporaries(tmp_path) == []
