"""The linear probe learns what a linear classifier can learn, reproducibly; the shared PCA is sklearn's
PCA of both sets together."""

import numpy as np
import pytest
from sklearn.decomposition import PCA

from rba_core import RBAError
from rba_core.probe import probe_accuracy
from rba_core.projection import shared_pca


def separable(n: int, seed: int, d: int = 16, classes: int = 4):
    """Gaussian clusters around well separated means: a linear classifier gets them all right."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(99).standard_normal((classes, d)) * 4.0
    y = rng.integers(0, classes, n)
    return (means[y] + rng.standard_normal((n, d)) * 0.3).astype(np.float32), y


def test_probe_separates_a_linearly_separable_problem():
    x, y = separable(2000, 0)
    tx, ty = separable(500, 1)
    result = probe_accuracy(x, y, tx, ty)
    assert result["mean"] >= 0.99 and len(result["per_seed"]) == 3
    assert result["std"] == pytest.approx(np.std(result["per_seed"]))
    assert result["mean"] == pytest.approx(np.mean(result["per_seed"]))


def test_probe_is_scored_on_the_test_labels():
    x, y = separable(2000, 0)
    tx, ty = separable(500, 1)
    # Test labels that contradict the training labels: a probe scored on the test set gets ~0.
    assert probe_accuracy(x, y, tx, (ty + 1) % 4)["mean"] < 0.05


def test_probe_on_random_labels_is_near_chance():
    x, _ = separable(2000, 0)
    tx, _ = separable(1000, 1)
    rng = np.random.default_rng(5)
    result = probe_accuracy(x, rng.integers(0, 4, 2000), tx, rng.integers(0, 4, 1000))
    assert 0.15 < result["mean"] < 0.35


def test_probe_is_reproducible_per_seed():
    x, y = separable(600, 0, d=8)
    tx, ty = separable(300, 1, d=8)
    noisy = np.random.default_rng(3).integers(0, 4, 600)  # label noise: seeds give different heads
    noisy[::2] = y[::2]
    a = probe_accuracy(x, noisy, tx, ty, seeds=(0, 1, 2))
    b = probe_accuracy(x, noisy, tx, ty, seeds=(0, 1, 2))
    assert a == b
    assert probe_accuracy(x, noisy, tx, ty, seeds=(1,))["per_seed"] == [a["per_seed"][1]]


def test_probe_needs_labels():
    x, y = separable(50, 0)
    with pytest.raises(RBAError, match="label"):
        probe_accuracy(x, np.full(50, -1), x, y)
    with pytest.raises(RBAError, match="label"):
        probe_accuracy(x, y, x, np.full(50, -1))


def test_shared_pca_is_pca_of_the_concatenation():
    rng = np.random.default_rng(0)
    original = rng.standard_normal((80, 12)) @ rng.standard_normal((12, 12)) + 3.0
    approximated = original + 0.5 * rng.standard_normal((80, 12)) + 1.0
    result = shared_pca(original.astype(np.float32), approximated.astype(np.float32), components=3)
    pca = PCA(n_components=3).fit(np.concatenate([original, approximated]))
    assert result["original"].shape == result["approximated"].shape == (80, 3)
    np.testing.assert_allclose(result["explained"], pca.explained_variance_ratio_, rtol=1e-5)
    for name, data in (("original", original), ("approximated", approximated)):
        expected = pca.transform(data)
        for c in range(3):  # each axis is defined up to its sign
            sign = np.sign(np.dot(result[name][:, c], expected[:, c]))
            np.testing.assert_allclose(sign * result[name][:, c], expected[:, c], rtol=1e-4, atol=1e-4)
    # One basis for both: the shift between the sets shows up in the coordinates.
    assert np.linalg.norm(result["approximated"].mean(0) - result["original"].mean(0)) > 0.5
