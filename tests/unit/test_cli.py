"""``python -m rba_core`` writes the README's JSON contract (to a file, to stdout, or a summary), fails on
user errors with exit 2 and one sentence on stderr, never a traceback, and stops on Ctrl-C or SIGTERM with
exit 130 and one sentence, storing nothing."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rba_core.maps import fit_residual_matrix
from rba_core.cache import Cache
from rba_core.passes.extract import extract
from rba_core.measures.metrics import block_redundancy, cosine_matrix, linear_cka_matrix
from rba_core.models import load_encoder

ROOT = Path(__file__).resolve().parents[2]


def start(*args: str, launch: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start ``python -m rba_core ARGS`` offline from the repository root (``launch``: a launcher's
    module and options between ``python`` and ``-m rba_core``, e.g. torchrun's)."""
    # One thread: tiny models gain nothing from more, and spinning threads crowd a shared 2-core box.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, *launch, "-m", "rba_core", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def user_error(run: subprocess.CompletedProcess) -> str:
    """The one error sentence of a failed run (progress and stage lines may precede it)."""
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and run.stderr.rstrip().endswith(errors[0]), run.stderr
    assert errors[0].endswith(".")
    return errors[0]


@pytest.fixture(scope="module")
def runs(tiny_models, image_folder, tmp_path_factory):
    """Every CLI run of this file; independent runs go in parallel to keep the suite quick."""
    tmp = tmp_path_factory.mktemp("cli")
    common = ["--model", tiny_models["vit"], "--dataset", image_folder, "--seed", "2",
              "--cache-dir", str(tmp / "cache")]
    analyze = ["analyze", *common, "--n", "12"]
    unknown = start("analyze", "--model", "no-such-org/no-such-vit", "--dataset", image_folder, "--n", "4",
                    "--cache-dir", str(tmp / "other"), "--json", str(tmp / "unknown.json"))
    first = finish(start(*analyze, "--json", str(tmp / "first.json")))
    assert first.returncode == 0, first.stderr
    # The fit samples of these runs are the analysed ones: all reuse the cached extraction.
    second = start(*analyze, "--json", str(tmp / "second.json"))
    approx = start("approximate", *common, "--fit-n", "12", "--eval-n", "6", "--range", "1", "3",
                   "--range", "3", "4", "--probe", "--json", str(tmp / "approx.json"))
    reversed_range = start("approximate", *common, "--fit-n", "12", "--eval-n", "6", "--range", "5", "3",
                           "--json", str(tmp / "reversed.json"))
    out = {"tmp": tmp, "model": tiny_models["vit"], "dataset": image_folder,
           "unknown": finish(unknown), "reversed": finish(reversed_range)}
    for process in (second, approx):
        run = finish(process)
        assert run.returncode == 0, run.stderr
    for name in ("first", "second", "approx"):
        out[name] = json.loads((tmp / f"{name}.json").read_text())
    return out


def test_analyze_json_contract(runs):
    result, L = runs["first"], 4
    assert {"model", "dataset", "num_blocks", "hidden_size", "n", "block_redundancy", "cosine", "cka",
            "fit_residual", "cache"} <= set(result)
    assert result["num_blocks"] == L and result["hidden_size"] == 32 and result["n"] == 12
    assert len(result["block_redundancy"]) == L
    for name in ("cosine", "cka", "fit_residual"):
        assert np.array(result[name], dtype=float).shape == (L + 1, L + 1), name
    residual = result["fit_residual"]
    assert all(residual[i][j] is None for i in range(L + 1) for j in range(L + 1) if i >= j)
    assert all(0 <= residual[i][j] <= 1 for i in range(L + 1) for j in range(L + 1) if i < j)
    assert result["cache"]["hit"] is False and len(result["cache"]["key"]) == 64


def test_second_analyze_is_a_cache_hit_with_the_same_numbers(runs):
    first, second = runs["first"], runs["second"]
    assert second["cache"] == {"key": first["cache"]["key"], "hit": True}
    for name in ("block_redundancy", "cosine", "cka", "fit_residual"):
        assert second[name] == first[name]


def test_analyze_numbers_are_the_metrics_of_the_cached_extraction(runs):
    ex = extract(runs["model"], runs["dataset"], 12, seed=2, cache=Cache(runs["tmp"] / "cache"),
                 encoder=lambda: pytest.fail("not a cache hit"))
    result = runs["first"]
    np.testing.assert_allclose(result["block_redundancy"], block_redundancy(ex.pooled))
    np.testing.assert_allclose(result["cosine"], cosine_matrix(ex.pooled))
    np.testing.assert_allclose(result["cka"], linear_cka_matrix(ex.pooled))
    np.testing.assert_allclose(np.array(result["fit_residual"], dtype=float), fit_residual_matrix(ex.stats()))


def test_approximate_json_contract(runs, tiny_models):
    result = runs["approx"]
    assert "final" not in result
    assert result["ranges"] == [
        {"start": 1, "end": 3, "removed_blocks": [2, 3], "paper": "0 2"},
        {"start": 3, "end": 4, "removed_blocks": [4], "paper": "2 3"},
    ]
    assert result["map"] == "linear"
    assert isinstance(result["mse_final"], float) and result["mse_final"] > 0
    enc, d = load_encoder(tiny_models["vit"], device="cpu"), 32
    # three blocks removed, two 32x32 maps added
    assert result["params"] == {"original": enc.num_params(),
                                "approximated": enc.num_params() - 3 * enc.block_params(1) + 2 * d * d}
    latency = result["latency_ms_per_image"]
    assert set(latency) == {"original", "approximated"}
    for m in latency.values():
        assert 0 < m["low"] <= m["median"] <= m["high"] and m["repeats"] >= 5
    for key in ("accuracy", "accuracy_converged"):
        assert set(result[key]) == {"original", "approximated", "skip"}
        for scores in result[key].values():
            assert {"mean", "std", "per_seed"} <= set(scores) and 0 <= scores["mean"] <= 1 and scores["std"] >= 0
    assert all(s["std"] == 0 and len(s["per_seed"]) == 1 for s in result["accuracy_converged"].values())


def test_reversed_range_exits_2_with_one_sentence(runs):
    assert "5→3" in user_error(runs["reversed"])
    assert not (runs["tmp"] / "reversed.json").exists()


def test_unknown_model_exits_2_with_one_sentence(runs):
    assert "no-such-org/no-such-vit" in user_error(runs["unknown"])
    assert not (runs["tmp"] / "unknown.json").exists()


def test_json_dash_writes_the_json_to_stdout_and_progress_stays_on_stderr(runs):
    args = ["analyze", "--model", runs["model"], "--dataset", runs["dataset"], "--seed", "2", "--n", "12",
            "--cache-dir", str(runs["tmp"] / "cache")]
    run = finish(start(*args, "--json", "-"))
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["cache"] == {"key": runs["first"]["cache"]["key"], "hit": True}
    assert result["block_redundancy"] == runs["first"]["block_redundancy"]
    assert "{" not in run.stderr and not (ROOT / "-").exists()


def test_without_json_a_short_summary(runs):
    run = finish(start("approximate", "--model", runs["model"], "--dataset", runs["dataset"], "--seed", "2",
                       "--cache-dir", str(runs["tmp"] / "cache"), "--fit-n", "12", "--eval-n", "6",
                       "--range", "1", "3", "--range", "3", "4", "--probe"))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].endswith("1→3 (paper: 0 2), 3→4 (paper: 2 3), linear map; blocks 4 → 1.")
    expected = runs["approx"]
    assert f"Final-representation MSE {expected['mse_final']:.4g} on 6 test images." in lines
    latency = expected["latency_ms_per_image"]["original"]  # the stored measurement, read back
    assert any(line.startswith("Latency per sample") and f"{latency['median']:.3g} ms" in line for line in lines)
    assert any(line.startswith("Probe accuracy, converged: original") for line in lines)


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_mid_run_exits_130_with_one_sentence_and_stores_nothing(tmp_path, how):
    process = start("analyze", "--model", "digits-ViT", "--dataset", "digits", "--n", "1000",
                    "--cache-dir", str(tmp_path / "cache"))
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: process.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not re.search(r"\b[1-9]\d*/1000\b", "".join(seen)):  # the pass is under way
        assert process.poll() is None and time.monotonic() < deadline, "".join(seen)
        time.sleep(0.05)
    process.send_signal(how)
    assert process.wait(timeout=60) == 130
    reader.join(timeout=10)
    last = "".join(seen).strip().splitlines()[-1]
    assert re.fullmatch(r"Stopped after \d+ of 1000 images; nothing partial was stored\.", last), last
    assert "Traceback" not in "".join(seen) and process.stdout.read() == ""
    assert not any(p for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert not any((tmp_path / "cache" / ".locks").iterdir())


@pytest.mark.parametrize("alias, hub_id", [("WikiText-2", "Salesforce/wikitext"), ("C4", "allenai/c4")])
def test_a_hub_language_model_text_offline_is_one_sentence(alias, hub_id, tmp_path):
    """The hub texts are registry entries like every dataset: offline, one sentence naming the text, where it
    comes from and how to give it locally (it crashed in the hub check before)."""
    run = finish(start("analyze", "--model", "demo-GPT", "--dataset", alias, "--n", "4",
                       "--cache-dir", str(tmp_path)))
    error = user_error(run)
    assert f"'{alias}' ({hub_id}) is not available offline" in error and "RBA_DATA_DIR" in error
