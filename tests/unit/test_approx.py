"""Maps fitted from token statistics equal least squares on stacked tokens; the approximated
encoder computes exactly blocks 1..i, T, blocks j+1..L, final norm."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rba_core.ops.analysis import approximate
from rba_core.passes.approx import ApproximatedEncoder, approximate_encoder, count_params
from rba_core.passes.approx import LinearMap
from rba_core.maps import MapParams, fit_map, fit_residual_matrix
from rba_core.cache import Cache
from rba_core.data import open_dataset
from rba_core.passes.extract import extract
from rba_core.models import load_encoder

N = 16  # 16 images x 17 tokens = 272 token rows > D = 32: every least-squares problem is well-posed


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def fit(tiny_models, image_folder, tmp_path_factory):
    """A tiny ViT's extraction (in several batches) and the same hidden states run by hand."""
    enc = load_encoder(tiny_models["vit"], device="cpu")
    cache = Cache(tmp_path_factory.mktemp("cache"))
    ex = extract(tiny_models["vit"], image_folder, N, seed=0, batch_size=5, cache=cache, encoder=enc)
    pixels = enc.preprocess(open_dataset(image_folder, "train").items(ex.indices))
    with torch.no_grad():
        out = enc.model(**pixels, output_hidden_states=True)
    tokens = [h.reshape(-1, enc.hidden_size).double().numpy() for h in out.hidden_states]
    assert tokens[0].shape == (N * 17, 32)
    return SimpleNamespace(enc=enc, ex=ex, stats=ex.stats(), pixels=pixels, out=out, tokens=tokens,
                           model=tiny_models["vit"], cache=cache)


def test_extraction_holds_block_cls_and_final(fit):
    hs = fit.out.hidden_states
    np.testing.assert_allclose(fit.ex.pooled, torch.stack([h[:, 0] for h in hs]).numpy(), atol=1e-5)
    np.testing.assert_allclose(fit.ex.final, fit.out.last_hidden_state[:, 0].numpy(), atol=1e-5)


def test_token_statistics_are_gram_matrices_of_stacked_tokens(fit):
    x, stats = fit.tokens, fit.stats
    assert stats.count == N * 17
    for a in range(5):
        np.testing.assert_allclose(stats.sums[a], x[a].sum(0), rtol=1e-5, atol=1e-4)
        for b in range(a, 5):
            assert rel(stats.gram(a, b), x[a].T @ x[b]) < 1e-6, (a, b)


@pytest.mark.parametrize("rng", [(0, 1), (0, 4), (1, 3), (2, 4), (3, 4)])
def test_linear_map_is_least_squares(fit, rng):
    i, j = rng
    expected = np.linalg.lstsq(fit.tokens[i], fit.tokens[j], rcond=None)[0]
    linear = fit_map(fit.stats, rng, "linear")
    assert linear.kind == "linear" and linear.names == ("weight",) and linear.weight.shape == (32, 32)
    assert rel(linear.weight.double().numpy(), expected) < 1e-4


@pytest.mark.parametrize("rng", [(0, 2), (1, 4)])
def test_affine_map_is_least_squares_with_ones_column(fit, rng):
    i, j = rng
    x = np.hstack([fit.tokens[i], np.ones((len(fit.tokens[i]), 1))])
    expected = np.linalg.lstsq(x, fit.tokens[j], rcond=None)[0]
    affine = fit_map(fit.stats, rng, "affine")
    assert rel(affine.weight.double().numpy(), expected[:-1]) < 1e-4
    assert rel(affine.bias.double().numpy(), expected[-1]) < 1e-4


@pytest.mark.parametrize("lam", [1e-2, 10.0])
def test_ridge_map_is_closed_form_on_stacked_tokens(fit, lam):
    x, y = fit.tokens[1], fit.tokens[3]
    n, d = x.shape
    expected = np.linalg.solve(x.T @ x / n + lam * np.eye(d), x.T @ y / n)
    ridge = fit_map(fit.stats, (1, 3), "ridge", MapParams(ridge=lam))
    assert rel(ridge.weight.double().numpy(), expected) < 1e-4
    # Shrinkage: the ridge solution is smaller than least squares.
    linear = np.linalg.lstsq(x, y, rcond=None)[0]
    assert np.linalg.norm(expected) < np.linalg.norm(linear)


def test_identity_map_is_no_map(fit):
    assert fit_map(fit.stats, (1, 3), "identity") is None


def test_fit_residual_matrix_is_relative_least_squares_residual(fit):
    got = fit_residual_matrix(fit.stats)
    assert got.shape == (5, 5)
    for i in range(5):
        for j in range(5):
            if i >= j:
                assert np.isnan(got[i, j])
                continue
            x, y = fit.tokens[i], fit.tokens[j]
            t = np.linalg.lstsq(x, y, rcond=None)[0]
            expected = np.sum((x @ t - y) ** 2) / np.sum(y**2)
            assert got[i, j] == pytest.approx(expected, rel=1e-3, abs=1e-7), (i, j)


def _by_hand(enc, pixels, plan) -> torch.Tensor:
    """``plan``: a list of ("blocks", first, last) or ("map", LinearMap) steps, then the final norm;
    run with the ViT's own modules, not through the adapter."""
    model = enc.model
    hidden = model.embeddings(pixels["pixel_values"])
    for step in plan:
        if step[0] == "blocks":
            for block in model.layers[step[1] - 1 : step[2]]:
                hidden = block(hidden)
        else:
            weight, bias = step[1].weight, getattr(step[1], "bias", None)
            hidden = hidden @ weight + (0 if bias is None else bias)
    return model.layernorm(hidden)[:, 0]


@torch.no_grad()
def test_identity_range_equals_skipping_blocks(fit):
    enc, px = fit.enc, fit.pixels
    net = ApproximatedEncoder(enc, [(1, 3)], [None])
    expected = _by_hand(enc, px, [("blocks", 1, 1), ("blocks", 4, 4)])
    torch.testing.assert_close(net(**px), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(net(**px), fit.out.last_hidden_state[:, 0], atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["linear", "affine"])
def test_linear_range_equals_hand_run(fit, kind):
    enc, px = fit.enc, fit.pixels
    net = approximate_encoder(enc, fit.stats, [(1, 3)], kind)
    linear = fit_map(fit.stats, (1, 3), kind)
    expected = _by_hand(enc, px, [("blocks", 1, 1), ("map", linear), ("blocks", 4, 4)])
    torch.testing.assert_close(net(**px), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_several_disjoint_and_adjacent_ranges(fit):
    enc, px = fit.enc, fit.pixels
    maps = {rng: fit_map(fit.stats, rng) for rng in [(0, 1), (2, 4), (1, 2)]}
    net = ApproximatedEncoder(enc, [(0, 1), (2, 4)], [maps[0, 1], maps[2, 4]])
    expected = _by_hand(enc, px, [("map", maps[0, 1]), ("blocks", 2, 2), ("map", maps[2, 4])])
    torch.testing.assert_close(net(**px), expected, rtol=1e-5, atol=1e-5)
    # Adjacent ranges 0→1 and 1→2 remove blocks 1 and 2; identity on 2→4 skips 3 and 4.
    net = ApproximatedEncoder(enc, [(0, 1), (1, 2), (2, 4)], [maps[0, 1], maps[1, 2], None])
    expected = _by_hand(enc, px, [("map", maps[0, 1]), ("map", maps[1, 2])])
    torch.testing.assert_close(net(**px), expected, rtol=1e-5, atol=1e-5)


def test_linear_map_predicts_the_skipped_blocks_on_fit_tokens(fit):
    # The map fitted on all tokens beats skipping (identity) at predicting hs[3] from hs[1].
    x, y = fit.tokens[1], fit.tokens[3]
    weight = fit_map(fit.stats, (1, 3)).weight.double().numpy()
    assert np.sum((x @ weight - y) ** 2) < np.sum((x - y) ** 2)


def test_count_params(fit):
    enc, d = fit.enc, fit.enc.hidden_size
    original = count_params(enc.model)
    block = enc.block_params(1)
    assert count_params(approximate_encoder(enc, fit.stats, [(1, 3)], "linear")) == original - 2 * block + d * d
    assert count_params(approximate_encoder(enc, fit.stats, [(1, 3)], "affine")) == original - 2 * block + d * d + d
    assert count_params(approximate_encoder(enc, fit.stats, [(1, 3)], "identity")) == original - 2 * block
    two = approximate_encoder(enc, fit.stats, [(0, 1), (2, 4)], "ridge")
    assert count_params(two) == original - 3 * block + 2 * d * d
    assert count_params(LinearMap(np.eye(d), np.zeros(d))) == d * d + d


def test_approximate_reports_what_the_hand_run_model_computes(fit, image_folder):
    result = approximate(fit.model, image_folder, N, 6, 0, [(1, 3)], "linear", cache=fit.cache,
                         encoder=fit.enc)
    # the maps come from the ranges' own float64 statistics, which every map kind of the same ranges shares
    assert result["cache"]["fit"] != fit.ex.key
    again = approximate(fit.model, image_folder, N, 6, 0, [(1, 3)], "affine", cache=fit.cache, encoder=fit.enc)
    assert again["cache"]["fit"] == result["cache"]["fit"]
    assert result["conditioning"][0]["statistics_precision"] == "float64"
    test = open_dataset(image_folder, "test")
    ev = extract(fit.model, image_folder, 6, 0, "test", with_stats=False, cache=fit.cache)
    assert ev.hit and result["cache"]["eval"] == ev.key
    with torch.no_grad():
        pixels = fit.enc.preprocess(test.items(ev.indices))
        original = fit.enc.model(**pixels).last_hidden_state[:, 0].numpy()
        exact = np.linalg.lstsq(fit.tokens[1], fit.tokens[3], rcond=None)[0]  # float64, on the stacked tokens
        approximated = _by_hand(fit.enc, pixels, [("blocks", 1, 1), ("map", LinearMap(exact)),
                                                  ("blocks", 4, 4)]).numpy()
    np.testing.assert_allclose(result["final"]["original"], original, atol=1e-5)
    np.testing.assert_allclose(result["final"]["approximated"], approximated, atol=1e-5)
    np.testing.assert_array_equal(result["final"]["labels"], test.labels[ev.indices])
    assert result["mse_final"] == pytest.approx(np.mean((approximated - original) ** 2), rel=1e-4)
    assert result["ranges"] == [{"start": 1, "end": 3, "removed_blocks": [2, 3], "paper": "0 2"}]
    assert result["blocks"] == {"original": 4, "approximated": 2}
    d, block = fit.enc.hidden_size, fit.enc.block_params(2)
    assert result["params"] == {"original": fit.enc.num_params(),
                                "approximated": fit.enc.num_params() - 2 * block + d * d}
    assert all(0 < m["low"] <= m["median"] <= m["high"] for m in result["latency_ms_per_image"].values())


def test_singular_gram_gives_the_minimum_norm_least_squares_map():
    """Tokens spanning fewer dimensions than D (a byte vocabulary's embeddings, a constant channel): the
    Gram has no Cholesky factor and the map is numpy's minimum-norm lstsq solution on the tokens."""
    from rba_core.maps import solve_spd

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5)) @ rng.standard_normal((5, 12))  # rank 5 in 12 dimensions
    y = rng.standard_normal((200, 12))
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(x.T @ x)
    expected = np.linalg.lstsq(x, y, rcond=None)[0]
    np.testing.assert_allclose(solve_spd(x.T @ x, x.T @ y), expected, rtol=1e-7, atol=1e-9)


def test_captured_outputs_ignore_other_threads_forwards():
    """The dashboard's sessions share one model: a forward from another thread while a folded map's
    hook is on must not replace this thread's captured MLP output."""
    import threading

    from rba_core.passes.approx import FoldedMap, captured

    layer = torch.nn.Linear(4, 4)
    mine, theirs = torch.randn(1, 4), torch.randn(2, 4)
    with captured({1: layer}) as outputs:
        expected = layer(mine)
        other = threading.Thread(target=lambda: layer(theirs))
        other.start()
        other.join()
    torch.testing.assert_close(outputs[1], expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="needs that block's MLP output"):
        FoldedMap(np.eye(4), start=2)(torch.randn(1, 4))
