"""The linear probes learn what a linear classifier can learn (the paper's reproducibly, the converged one to
the optimum of its objective); the shared PCA is PCA of both sets together."""

import numpy as np
import pytest
from sklearn.decomposition import PCA

from rba_core import RBAError
from rba_core.measures.probe import converged_probe, converged_probe_accuracy, probe_accuracy, small_classes_note
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


def _softmax_regression_by_hand(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression minimised with scipy: Σ cross-entropy + ||W||² / (2c), bias unpenalised,
    on features standardised by hand. Returns (W, b) in standardised units."""
    from scipy.optimize import minimize
    from scipy.special import logsumexp

    n, d = x.shape
    k = int(y.max()) + 1
    onehot = np.eye(k)[y]

    def objective(theta):
        w, b = theta[: d * k].reshape(d, k), theta[d * k:]
        logits = x @ w + b
        loss = np.sum(logsumexp(logits, axis=1) - np.sum(onehot * logits, axis=1)) + np.sum(w**2) / (2 * c)
        p = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
        grad_w = x.T @ (p - onehot) + w / c
        return loss, np.concatenate([grad_w.ravel(), (p - onehot).sum(0)])

    result = minimize(objective, np.zeros(d * k + k), jac=True, method="L-BFGS-B",
                      options={"maxiter": 10_000, "gtol": 1e-10, "ftol": 1e-14})
    return result.x[: d * k].reshape(d, k), result.x[d * k:]


def test_converged_probe_is_the_optimum_of_its_objective():
    """Against an independent fit of the same objective: the same predictions and probabilities."""
    x, y = separable(300, 0, d=6)
    rng = np.random.default_rng(4)
    x = x + rng.standard_normal(x.shape) * 3.0  # overlapping classes: the optimum is not trivially perfect
    tx, ty = separable(200, 1, d=6)
    tx = tx + rng.standard_normal(tx.shape) * 3.0
    result = converged_probe_accuracy(x, y, tx, ty, c=0.5)
    mean, std = x.astype(np.float64).mean(0), x.astype(np.float64).std(0)
    w, b = _softmax_regression_by_hand((x - mean) / std, y, c=0.5)
    logits = (tx - mean) / std @ w + b
    expected = float(np.mean(logits.argmax(1) == ty))
    assert 0.4 < expected < 0.95
    assert result == {"mean": pytest.approx(expected), "std": 0.0, "per_seed": [pytest.approx(expected)]}
    probabilities = converged_probe(x, y, c=0.5).predict_proba(tx)
    by_hand = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probabilities, by_hand / by_hand.sum(1, keepdims=True), atol=1e-4)


def test_converged_probe_separates_what_is_separable_and_needs_two_classes():
    x, y = separable(400, 0)
    tx, ty = separable(200, 1)
    assert converged_probe_accuracy(x, y, tx, ty)["mean"] == 1.0
    with pytest.raises(RBAError, match="two classes"):
        converged_probe_accuracy(x, np.zeros(400, int), tx, ty)


def test_small_classes_note_counts_the_rarest_class():
    labels = np.array([0] * 12 + [1] * 3 + [2] * 15)
    note = small_classes_note(labels, ["cat", "dog", "bird"])
    assert "only 3 images of class 'dog'" in note and "raise the evaluation samples" in note
    assert "only 0 images of class 'fish'" in small_classes_note(labels, ["cat", "dog", "bird", "fish"])
    assert small_classes_note(np.repeat([0, 1, 2], 10), ["a", "b", "c"]) is None
