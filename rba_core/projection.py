"""PCA of original and approximated final representations in one shared basis."""

from __future__ import annotations

import numpy as np


def shared_pca(original: np.ndarray, approximated: np.ndarray, components: int = 2) -> dict:
    """Fit PCA on both sets together and project each; inputs (N, D), outputs (N, components).

    Returns ``original``, ``approximated`` (coordinates) and ``explained`` (variance ratios).
    """
    both = np.concatenate([original, approximated]).astype(np.float64)
    mean = both.mean(axis=0)
    _, singular, vt = np.linalg.svd(both - mean, full_matrices=False)
    basis = vt[:components].T
    explained = singular**2 / max(np.sum(singular**2), 1e-300)
    return {
        "original": (original - mean) @ basis,
        "approximated": (approximated - mean) @ basis,
        "explained": explained[:components],
    }
