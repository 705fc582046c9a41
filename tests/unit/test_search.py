"""The measured search: every candidate's MSE is the approximated model's, ranked lowest first."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from rba_core.ops.analysis import analyze, approximate
from rba_core.passes.approx import approximate_encoder, count_params
from rba_core.cache import Cache
from rba_core.cli import main
from rba_core.errors import RBAError
from rba_core.passes.extract import extract
from rba_core.models import load_encoder
from rba_core.ops.search import (SearchPlan, _select, candidate_ranges, chunk_size, confidence_interval, sample_rounds, search,
                             still_in_race)

FIT_N, EVAL_N = 40, 12


@pytest.fixture(scope="module")
def searched(tiny_models, image_folder, tmp_path_factory):
    cache = Cache(tmp_path_factory.mktemp("search-cache"))
    return search(tiny_models["vit"], image_folder, FIT_N, EVAL_N, 0, pairs=True, cache=cache, exhaustive=True), cache


def test_candidates_are_every_range_and_every_separated_pair():
    singles = candidate_ranges(4)
    assert len(singles) == 10 and singles[0] == ((0, 1),) and ((0, 4),) in singles
    everything = candidate_ranges(4, pairs=True)
    # Independent count: choose i1 < j1 < i2 < j2 from 0..4 (a kept block between the ranges).
    expected = sum(1 for i1 in range(5) for j1 in range(i1 + 1, 5) for i2 in range(j1 + 1, 5) for j2 in range(i2 + 1, 5))
    assert len(everything) == 10 + expected
    assert ((0, 1), (2, 4)) in everything and ((0, 1), (1, 2)) not in everything


def test_ranked_by_measured_mse_equal_to_approximate(searched, tiny_models, image_folder, tmp_path):
    result, _ = searched
    rows = result["candidates"]
    assert result["evaluated"] == result["considered"] == len(candidate_ranges(4, pairs=True))
    mse = [r["mse_final"] for r in rows]
    assert mse == sorted(mse) and mse[0] > 0
    fresh = Cache(tmp_path / "fresh")  # approximate recomputes everything through ApproximatedEncoder
    pair = next(r for r in rows if len(r["ranges"]) == 2)
    for row in (rows[0], pair, rows[-1]):
        expected = approximate(tiny_models["vit"], image_folder, FIT_N, EVAL_N, 0, row["ranges"], cache=fresh)
        assert row["mse_final"] == pytest.approx(expected["mse_final"], rel=1e-5)
        assert row["params"] == expected["params"]["approximated"]


def test_cheap_scores_and_their_spearman(searched, tiny_models, image_folder):
    result, cache = searched
    analysis = analyze(tiny_models["vit"], image_folder, FIT_N, 0, cache=cache)
    redundancy, residual = np.array(analysis["block_redundancy"]), analysis["fit_residual"]
    for row in result["candidates"]:
        removed = [k for i, j in row["ranges"] for k in range(i + 1, j + 1)]
        assert row["removed_blocks"] == len(removed)
        assert row["block_redundancy_score"] == pytest.approx(-redundancy[np.array(removed) - 1].sum())
        assert row["fit_residual_score"] == pytest.approx(sum(residual[i][j] for i, j in row["ranges"]))
    mse = [r["mse_final"] for r in result["candidates"]]
    for name, key in (("block_redundancy", "block_redundancy_score"), ("fit_residual", "fit_residual_score")):
        expected = spearmanr([r[key] for r in result["candidates"]], mse).statistic
        assert result["spearman"][name] == pytest.approx(expected)


def test_chunks_give_the_same_ranking(searched, tiny_models, image_folder):
    result, cache = searched
    assert result["chunk_size"] == EVAL_N  # everything fits in memory
    chunked = search(tiny_models["vit"], image_folder, FIT_N, EVAL_N, 0, pairs=True, cache=cache, memory_bytes=1,
                     exhaustive=True)
    assert chunked["chunk_size"] == 1
    assert [r["range"] for r in chunked["candidates"]] == [r["range"] for r in result["candidates"]]
    for a, b in zip(chunked["candidates"], result["candidates"]):
        assert a["mse_final"] == pytest.approx(b["mse_final"], rel=1e-5)
    assert chunk_size(256, 197, 384, 13, 6, False, 2 << 30) == 256  # ViT-S, 256 images: about 1 GB
    assert chunk_size(256, 197, 384, 13, 6, True, 1 << 30) < 256


def test_budgets(searched, tiny_models, image_folder):
    result, cache = searched
    model = tiny_models["vit"]
    two = search(model, image_folder, FIT_N, EVAL_N, 0, blocks=2, pairs=True, cache=cache)
    assert {r["removed_blocks"] for r in two["candidates"]} == {2}
    assert {r["range"] for r in two["candidates"]} == {r["range"] for r in result["candidates"] if r["removed_blocks"] == 2}
    # Parameter counts are those of the approximated encoder itself.
    encoder = load_encoder(model, device="cpu")
    stats = extract(model, image_folder, FIT_N, 0, cache=cache).stats()
    for row in two["candidates"][:3]:
        assert row["params"] == count_params(approximate_encoder(encoder, stats, row["ranges"]))
    cap = sorted(r["params"] for r in result["candidates"])[5]
    capped = search(model, image_folder, FIT_N, EVAL_N, 0, max_params=cap, pairs=True, cache=cache)
    assert capped["evaluated"] >= 6 and all(r["params"] <= cap for r in capped["candidates"])
    everything = search(model, image_folder, FIT_N, EVAL_N, 0, max_latency_ms=1e9, cache=cache)
    assert everything["evaluated"] == 10
    timing = everything["timing_ms_per_image"]  # measured stage times; the estimate adds up what runs
    for row in everything["candidates"]:
        removed = {k for i, j in row["ranges"] for k in range(i + 1, j + 1)}
        kept = sum(t for k, t in enumerate(timing["blocks"], start=1) if k not in removed)
        assert row["latency_ms_per_image_estimate"] == pytest.approx(
            timing["embed"] + kept + timing["map"] * len(row["ranges"]) + timing["norm"])
    # The latency budget on fixed stage times (measured ones vary from run to run on a shared CPU).
    timing = {"embed": 1.0, "blocks": [10.0, 20.0, 30.0, 40.0], "norm": 0.5, "map": 2.0}
    fit = extract(model, image_folder, FIT_N, 0, cache=cache)
    chosen = _select(candidate_ranges(4), fit, timing, SearchPlan(max_latency_ms=63.5))
    kept = {((i, j),): 100 - sum(timing["blocks"][i:j]) for i in range(4) for j in range(i + 1, 5)}
    assert set(chosen) == {c for c, ms in kept.items() if 1.0 + ms + 2.0 + 0.5 <= 63.5}
    assert ((2, 4),) in chosen and ((0, 2),) not in chosen
    with pytest.raises(RBAError, match="No range fits"):
        search(model, image_folder, FIT_N, EVAL_N, 0, max_params=10, cache=cache)
    with pytest.raises(RBAError, match="Cannot remove 5 blocks"):
        search(model, image_folder, FIT_N, EVAL_N, 0, blocks=5, cache=cache)


def test_cli_search_probes_the_best(searched, tiny_models, image_folder, tmp_path):
    _, cache = searched
    out = tmp_path / "search.json"
    assert main(["search", "--model", tiny_models["vit"], "--dataset", image_folder, "--fit-n", str(FIT_N),
                 "--eval-n", str(EVAL_N), "--blocks", "1", "--probe-top", "2", "--json", str(out),
                 "--cache-dir", str(cache.root)]) == 0
    result = json.loads(out.read_text())
    rows = result["candidates"]
    assert len(rows) == 4 and [r["removed_blocks"] for r in rows] == [1] * 4
    assert "accuracy" in rows[0] and "accuracy" in rows[1] and "accuracy" not in rows[2]
    expected = approximate(tiny_models["vit"], image_folder, FIT_N, EVAL_N, 0, rows[0]["ranges"], probe=True,
                           cache=cache)
    assert rows[0]["accuracy"]["approximated"] == expected["accuracy"]["approximated"]
    assert result["original"]["accuracy"] == expected["accuracy"]["original"]


def test_the_race_finds_the_exhaustive_top_5_measuring_fewer_candidates(tmp_path):
    """8 blocks, 36 ranges, 64 digits: the race drops candidates and still ends with the exhaustive top 5."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from conftest import TINY

    torch.manual_seed(0)
    folder = tmp_path / "vit8"
    ViTModel(ViTConfig(**{**TINY, "num_hidden_layers": 8}), add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    cache, n = Cache(tmp_path / "cache"), 64
    interim = []
    race = search(str(folder), "digits", 64, n, 0, cache=cache, on_round=lambda rows, s: interim.append((rows, s)))
    full = search(str(folder), "digits", 64, n, 0, cache=cache, exhaustive=True)
    assert [r["samples"] for r in race["rounds"]] == sample_rounds(n) == [8, 16, 32, 64]
    assert full["rounds"] == [dict(full["rounds"][0], samples=n, candidates=36, kept=36)]
    assert race["rounds"][-1]["candidates"] < 36  # some left the race early
    assert [r["range"] for r in race["candidates"][:5]] == [r["range"] for r in full["candidates"][:5]]
    assert [r["mse_final"] for r in race["candidates"][:5]] == pytest.approx(
        [r["mse_final"] for r in full["candidates"][:5]], rel=1e-12)  # the same errors, summed in another order
    assert all(r["samples"] == n for r in race["candidates"][:5])
    left = [r for r in race["candidates"] if r["samples"] < n]
    assert left and {r["samples"] for r in left} <= {8, 16, 32}
    # Each interim ranking is sorted and covers every candidate; the first one came after 8 samples.
    assert [s["round"] for _, s in interim] == [1, 2, 3, 4] and len(interim[0][0]) == 36
    assert all([r["mse_final"] for r in rows] == sorted(r["mse_final"] for r in rows) for rows, _ in interim)


def test_confidence_interval_and_who_stays_in_the_race():
    from scipy.stats import t

    errors = np.array([1.0, 2.0, 3.0, 4.0])
    low, high = confidence_interval(errors)
    half = t.ppf(0.9995, 3) * np.std(errors, ddof=1) / 2
    assert (low, high) == pytest.approx((max(0.0, 2.5 - half), 2.5 + half))
    tight = {((0, 1),): np.full(20, 1.0) + np.linspace(0, 0.01, 20), ((1, 2),): np.full(20, 1.1),
             ((2, 3),): np.full(20, 5.0) + np.linspace(0, 0.01, 20)}
    assert still_in_race(tight, 1) == [((0, 1),)]  # 1.1 is surely worse than the interval around 1.005
    assert still_in_race(tight, 2) == [((0, 1),), ((1, 2),)]
