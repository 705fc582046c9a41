"""Block Redundancy, cosine and linear CKA agree with direct hand computations on extracted CLS."""

import numpy as np
import pytest

from rba_core.cache import Cache
from rba_core.passes.extract import extract
from rba_core.measures.metrics import (angular_distance, block_influence, block_redundancy, block_redundancy_all_tokens,
                             cosine_matrix, linear_cka_matrix)


@pytest.fixture(scope="module")
def cls(tiny_models, image_folder, tmp_path_factory) -> np.ndarray:
    """(L+1, 40, D) CLS of a tiny ViT with D = 32: more samples than dimensions."""
    ex = extract(tiny_models["vit"], image_folder, 40, seed=0, with_stats=False, device="cpu",
                 cache=Cache(tmp_path_factory.mktemp("cache")))
    assert ex.pooled.shape == (5, 40, 32)
    return ex.pooled


def test_block_redundancy_is_negative_mean_squared_change(cls):
    states, n, d = cls.shape
    expected = []
    for k in range(1, states):
        total = 0.0
        for s in range(n):
            for c in range(d):
                total += (float(cls[k, s, c]) - float(cls[k - 1, s, c])) ** 2
        expected.append(-total / (n * d))
    got = block_redundancy(cls)
    assert got.shape == (states - 1,)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert np.all(got < 0)


def test_cosine_is_mean_per_sample_cosine(cls):
    states, n, _ = cls.shape
    expected = np.zeros((states, states))
    for a in range(states):
        for b in range(states):
            for s in range(n):
                u, v = cls[a, s].astype(np.float64), cls[b, s].astype(np.float64)
                expected[a, b] += np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)) / n
    got = cosine_matrix(cls)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.diag(got), 1.0, rtol=1e-12)
    np.testing.assert_allclose(got, got.T, rtol=1e-12)


def _hsic(x: np.ndarray, y: np.ndarray) -> float:
    n = len(x)
    centre = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace((x @ x.T) @ centre @ (y @ y.T) @ centre))


def _cka(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.astype(np.float64), y.astype(np.float64)
    return _hsic(x, y) / np.sqrt(_hsic(x, x) * _hsic(y, y))


@pytest.mark.parametrize("n", [12, 40], ids=["N<D", "N>D"])
def test_linear_cka_is_centred_kernel_hsic(cls, n):
    states = len(cls)
    x = cls[:, :n]
    got = linear_cka_matrix(x)
    # hs[0]'s CLS does not depend on the image: its centred kernel is zero, CKA with it is 0.
    assert np.ptp(x[0], axis=0).max() < 1e-6
    np.testing.assert_allclose(got[0, 1:], 0.0, atol=1e-6)
    np.testing.assert_allclose(got[1:, 0], 0.0, atol=1e-6)
    expected = np.array([[_cka(x[a], x[b]) for b in range(1, states)] for a in range(1, states)])
    np.testing.assert_allclose(got[1:, 1:], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.diag(got), 1.0, rtol=1e-6)
    np.testing.assert_allclose(got, got.T, rtol=1e-12)
    assert np.all(got >= 0) and np.all(got <= 1 + 1e-9)


def test_cka_ignores_offsets_and_scale_cosine_does_not(cls):
    shifted = cls.copy()
    shifted[2] = 3.0 * cls[2] + 5.0  # same representation up to offset and scale
    np.testing.assert_allclose(linear_cka_matrix(shifted), linear_cka_matrix(cls), atol=1e-6)
    assert not np.allclose(cosine_matrix(shifted)[2], cosine_matrix(cls)[2], atol=1e-3)


# --- decoder scores: ShortGPT's Block Influence, PruneMe's angular distance, BR on every token ----

def _cos(u: np.ndarray, v: np.ndarray) -> float:
    u, v = [float(a) for a in u], [float(b) for b in v]
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (sum(a * a for a in u) ** 0.5 * sum(b * b for b in v) ** 0.5)


def test_block_influence_is_one_minus_the_mean_token_cosine():
    tokens = np.random.default_rng(0).normal(size=(5, 7, 6)).astype(np.float32)
    expected = [1 - sum(_cos(tokens[k - 1, t], tokens[k, t]) for t in range(7)) / 7 for k in range(1, 5)]
    np.testing.assert_allclose(block_influence(tokens), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_angular_distance_is_arccos_over_pi_between_l_and_l_plus_n(n):
    import math

    last = np.random.default_rng(1).normal(size=(5, 9, 6)).astype(np.float32)
    expected = [sum(math.acos(max(-1.0, min(1.0, _cos(last[l, s], last[l + n, s])))) / math.pi for s in range(9)) / 9
                for l in range(5 - n)]
    got = angular_distance(last, n)
    assert got.shape == (5 - n,)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError):
        angular_distance(last, 5)


def test_block_redundancy_on_every_token_from_the_gram_statistics():
    import torch

    from rba_core.measures.stats import StatsAccumulator

    tokens = np.random.default_rng(2).normal(size=(4, 11, 6)).astype(np.float32)
    acc = StatsAccumulator(4, 6, "cpu")
    acc.add([torch.from_numpy(t[None]) for t in tokens])
    expected = [-sum((float(tokens[k, t, c]) - float(tokens[k - 1, t, c])) ** 2 for t in range(11) for c in range(6)) / 66
                for k in range(1, 4)]
    np.testing.assert_allclose(block_redundancy_all_tokens(acc.result()), expected, rtol=1e-6)  # float32 products
    np.testing.assert_allclose(block_redundancy(tokens), expected, rtol=1e-9)  # the same formula on rows
