"""How well a linear classifier reads the classes off frozen final representations: the paper's probe
protocol and a converged probe.

The paper's protocol (one ``nn.Linear``, Adam, 5 epochs, batch 256, seeds 0, 1, 2) takes only about
ten optimizer steps on 512 samples, so its differences between variants often stay inside its seed
noise. The converged probe (scikit-learn's multinomial ``LogisticRegression`` with lbfgs on
standardized features, fixed ``C``) trains to the optimum of a strictly convex objective, so it is
deterministic: one run, std 0.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from rba_core.errors import RBAError

#: Inverse L2 strength of the converged probe (scikit-learn's default), on standardized features.
CONVERGED_C = 1.0
#: Fewer evaluation images than this in some class make probe accuracies too coarse to compare.
MIN_PER_CLASS = 10


def _check_labels(train_y: np.ndarray, test_y: np.ndarray) -> None:
    if (train_y < 0).any() or (test_y < 0).any():
        raise RBAError("The linear probe needs labelled samples; this dataset has no label column.")


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                   seeds=(0, 1, 2), epochs: int = 5, batch_size: int = 256, lr: float = 0.01) -> dict:
    """The paper's protocol: nn.Linear(D, C) with Adam and cross-entropy per seed; test accuracy mean and std.

    Shapes: ``train_x`` (N, D), ``train_y`` (N,). Returns ``{"mean", "std", "per_seed"}``.
    """
    _check_labels(train_y, test_y)
    classes = int(max(train_y.max(), test_y.max())) + 1
    x, y = torch.as_tensor(train_x, dtype=torch.float32), torch.as_tensor(train_y, dtype=torch.long)
    tx, ty = torch.as_tensor(test_x, dtype=torch.float32), torch.as_tensor(test_y, dtype=torch.long)
    accuracies = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        head = nn.Linear(x.shape[1], classes)
        optimizer = torch.optim.Adam(head.parameters(), lr=lr)
        for _ in range(epochs):
            for rows in torch.randperm(len(x), generator=gen).split(batch_size):
                optimizer.zero_grad()
                nn.functional.cross_entropy(head(x[rows]), y[rows]).backward()
                optimizer.step()
        with torch.no_grad():
            accuracies.append(float((head(tx).argmax(1) == ty).float().mean()))
    return {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)), "per_seed": accuracies}


def converged_probe(train_x: np.ndarray, train_y: np.ndarray, c: float = CONVERGED_C, max_iter: int = 5000):
    """The fitted converged probe: StandardScaler then multinomial LogisticRegression (lbfgs, L2, ``c``),
    to a gradient tolerance of 1e-6 (scikit-learn stops at 1e-4 by default)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_y)) < 2:
        raise RBAError("The converged probe needs at least two classes among the fit samples; raise samples n.")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, tol=1e-6, max_iter=max_iter))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # "converged" must be true
        try:
            return probe.fit(np.asarray(train_x, np.float64), train_y)
        except ConvergenceWarning:
            raise RBAError(f"The converged probe did not converge in {max_iter} lbfgs iterations; "
                           "report this with the model and dataset.") from None


def converged_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                             test_y: np.ndarray, c: float = CONVERGED_C) -> dict:
    """Test accuracy of :func:`converged_probe`, shaped like :func:`probe_accuracy`'s result: lbfgs on a
    strictly convex objective is deterministic, so there is one run (``per_seed`` has one value) and std 0."""
    _check_labels(train_y, test_y)
    probe = converged_probe(train_x, train_y, c)
    accuracy = float(np.mean(probe.predict(np.asarray(test_x, np.float64)) == test_y))
    return {"mean": accuracy, "std": 0.0, "per_seed": [accuracy]}


def small_classes_note(labels: np.ndarray, label_names: list[str] | None = None,
                       minimum: int = MIN_PER_CLASS, unit: str = "images") -> str | None:
    """A warning sentence when some class has fewer than ``minimum`` evaluation samples (``unit``: what they are
    called, "images" or "texts"), else None."""
    labels = np.asarray(labels)
    if len(labels) == 0 or (labels < 0).any():
        return None
    classes = max(int(labels.max()) + 1, len(label_names or []))
    counts = np.bincount(labels, minlength=classes)
    fewest = int(counts.argmin())
    if counts[fewest] >= minimum:
        return None
    name = label_names[fewest] if label_names and fewest < len(label_names) else str(fewest)
    what = unit.removesuffix("s") if counts[fewest] == 1 else unit
    return (f"The evaluation samples hold only {counts[fewest]} {what} of class '{name}' (fewer than {minimum} "
            f"per class), so probe accuracies move in steps of {100 / len(labels):.1f} points and mean little; "
            "raise the evaluation samples.")
