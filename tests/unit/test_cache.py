"""The cache: misses then hits with identical arrays, never loads the model on a hit, detects and
recomputes damaged entries, keys on everything that changes a result, survives concurrent writers."""

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import rba_core.analysis
import rba_core.extract
from rba_core.analysis import approximate
from rba_core.cache import CACHE_DIR_ENV, Cache, make_key
from rba_core.extract import extract
from rba_core.models import load_encoder
from rba_core.stats import StatsAccumulator


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
    monkeypatch.setattr(rba_core.extract, "load_encoder", _no_model)
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

    monkeypatch.setattr(rba_core.extract, "load_encoder", counting_loader)
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
    monkeypatch.setattr(rba_core.analysis, "load_encoder", _no_model)
    monkeypatch.setattr(rba_core.extract, "load_encoder", _no_model)
    again = approximate(*args, probe=True, cache=Cache(cache.root))
    assert again["mse_final"] == first["mse_final"]
    assert again["accuracy"] == first["accuracy"]
    assert again["params"] == first["params"]
    np.testing.assert_array_equal(again["final"]["approximated"], first["final"]["approximated"])
