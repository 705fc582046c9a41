"""Statistics that feed a solve carry the precision the solve assumes, and the solve says what it could resolve.

The regression: demo-GPT's block 5 MLP output spans few directions (MᵀM has a condition number of 1e10), so
its fold statistics formed from float32 products had negative eigenvalues and the folded 5→7 map broke the
model (perplexity 86 against 28). Float64 range statistics fold every two-block range as well as the linear
map does; a rank-deficient system gets the minimum-norm solution and reports its rank.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from rba_core.ops.run import lm_dataset
from rba_core.passes.approx import ApproximatedEncoder
from rba_core.cache import Cache
from rba_core.cli import main
from rba_core.data import open_sample
from rba_core.maps import fit_map, solve_spd_conditioned
from rba_core.models import load_encoder
from rba_core.passes.perplexity import lm_scores
from rba_core.passes.range_pass import range_statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_folded_5_7_at_128_tokens_matches_linear(tmp_path, capsys):
    """The issue's command: folded within 1% of linear perplexity, and the map's conditioning reported."""
    common = ["--model", "demo-GPT", "--dataset", "demo-text", "--fit-n", "64", "--eval-n", "32", "--seed", "0",
              "--seq-len", "128", "--range", "5", "7", "--no-latency", "--cache-dir", str(tmp_path / "cache")]
    out = {}
    for kind in ("linear", "folded"):
        assert main(["approximate", *common, "--map", kind, "--json", str(tmp_path / f"{kind}.json")]) == 0
        out[kind] = json.loads((tmp_path / f"{kind}.json").read_text())
    folded, linear = out["folded"]["perplexity"]["approximated"], out["linear"]["perplexity"]["approximated"]
    assert abs(folded / linear - 1) < 0.01, (folded, linear)
    assert out["folded"]["mse_final"] < 1e-3  # it was 0.434 with the float32 fold statistics
    (conditioning,) = out["folded"]["conditioning"]
    assert conditioning["range"] == [5, 7] and conditioning["statistics_precision"] == "float64"
    assert conditioning["condition_number"] > 1e8 and conditioning["rank"] == conditioning["dimension"] == 64


@pytest.mark.parametrize("seq_len", [64, 128, 256])
def test_every_two_block_range_of_demo_gpt_folds_as_well_as_linear(seq_len, tmp_path):
    """Folded within 1% of linear perplexity on every two-block range, both fitted from one float64 pass."""
    encoder = load_encoder("demo-GPT", device="cpu")
    data = lm_dataset("demo-GPT", "demo-text", seq_len)
    ranges = [(i, i + 2) for i in range(encoder.num_blocks - 1)]
    fit = range_statistics("demo-GPT", data, 64, 0, ranges, cache=Cache(tmp_path), encoder=encoder)
    assert set(fit.fold) == set(ranges)  # GPT-2 folds into every block and into its embeddings
    nets = {(kind, rng): ApproximatedEncoder(encoder, [rng], [fit_map(stats, rng, kind)]).eval()
            for kind, stats in (("linear", fit.tokens), ("folded", fit.fold)) for rng in ranges}
    source, indices = open_sample(data, "test", 32, 0)
    scores = lm_scores(encoder, {f"{k} {i}-{j}": net for (k, (i, j)), net in nets.items()}, source.items(indices))
    perplexity = scores["perplexity"]
    for i, j in ranges:
        folded, linear = perplexity[f"folded {i}-{j}"], perplexity[f"linear {i}-{j}"]
        assert abs(folded / linear - 1) < 0.01, (seq_len, (i, j), folded, linear)


def test_folded_map_in_memory_equals_the_folded_checkpoint_on_a_later_range(tmp_path):
    """Two folded ranges: the second map's m is the approximated model's own block output, also when the
    evaluation runs the approximation from its first range on (resume) instead of from the embeddings."""
    from rba_core.passes.fold import folded_encoder

    encoder = load_encoder("demo-GPT", device="cpu")
    data = lm_dataset("demo-GPT", "demo-text", 64)
    ranges = [(1, 3), (4, 6)]
    fit = range_statistics("demo-GPT", data, 16, 0, ranges, cache=Cache(tmp_path), encoder=encoder)
    net = ApproximatedEncoder(encoder, ranges, [fit_map(fit.fold, rng, "folded") for rng in ranges]).eval()
    folded = folded_encoder(encoder, {rng: fit.fold[rng].fit() for rng in ranges})
    source, indices = open_sample(data, "test", 4, 0)
    ours = lm_scores(encoder, {"net": net}, source.items(indices))["perplexity"]["net"]
    plain = lm_scores(folded, {}, source.items(indices))["perplexity"]["original"]
    assert ours == pytest.approx(plain, rel=1e-4)


def test_rank_deficient_system_gets_the_minimum_norm_solution_and_says_its_rank():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 16))  # rank 6 in 16 dimensions
    x[:, 3] *= 1e3  # one channel far larger than the others, as residual streams have
    y = rng.standard_normal((500, 16))
    expected = np.linalg.lstsq(x, y, rcond=None)[0]  # numpy's minimum-norm solution, on the rows
    solution, conditioning = solve_spd_conditioned(x.T @ x, x.T @ y, "float64")
    np.testing.assert_allclose(solution, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
    assert conditioning.rank == 6 and conditioning.dropped == 10 and conditioning.condition == float("inf")
    assert conditioning.to_json()["condition_number"] is None


def test_float32_statistics_drop_what_their_products_cannot_resolve():
    """A Gram formed from float32 products resolves eigenvalues down to ~1e-7 of the largest: a direction
    below that is dropped, not inverted as noise (the fold bug's 7.9e5-norm map)."""
    rng = np.random.default_rng(2)
    basis = np.linalg.qr(rng.standard_normal((24, 24)))[0]
    scales = np.logspace(0, -6, 24)  # singular values 1 .. 1e-6: Gram eigenvalues 1 .. 1e-12
    x = rng.standard_normal((4000, 24)) @ np.diag(scales) @ basis.T
    y = x @ rng.standard_normal((24, 24))
    x32 = torch.from_numpy(x.astype(np.float32))
    gram32 = (x32.T @ x32).double().numpy()
    cross32 = (x32.T @ torch.from_numpy(y.astype(np.float32))).double().numpy()
    t32, c32 = solve_spd_conditioned(gram32, cross32, "float32")
    t64, c64 = solve_spd_conditioned(x.T @ x, x.T @ y, "float64")
    assert c64.rank == 24 and 8 < c32.rank < 24  # float32 products resolve only the larger directions
    exact = np.linalg.lstsq(x, y, rcond=None)[0]
    # normal equations square the condition (1e12 here): T agrees to cond(XᵀX)·eps, the fit to the data exactly
    np.testing.assert_allclose(t64, exact, rtol=0, atol=1e-3 * np.abs(exact).max())
    assert np.linalg.norm(x @ t64 - y) / np.linalg.norm(y) < 1e-8
    # the truncated float32 map stays bounded and still fits the data (no inverted noise)
    assert np.linalg.norm(t32) <= 1.01 * np.linalg.norm(exact)
    assert np.linalg.norm(x @ t32 - y) / np.linalg.norm(y) < 1e-2
