"""PCA of original and approximated final representations in one shared basis."""

from __future__ import annotations

import numpy as np


def shared_pca(original: np.ndarray, approximated: np.ndarray, components: int = 2) -> dict:
    """Fit scikit-learn's PCA on both sets together and project each; inputs (N, D), outputs (N, components).

    One basis for both sets means a shift between them shows up as a shift in the coordinates.
    Returns ``original``, ``approximated`` (coordinates) and ``explained`` (variance ratios).
    """
    from sklearn.decomposition import PCA

    both = np.concatenate([original, approximated]).astype(np.float64)
    pca = PCA(n_components=min(components, *both.shape)).fit(both)
    return {
        "original": pca.transform(np.asarray(original, np.float64)),
        "approximated": pca.transform(np.asarray(approximated, np.float64)),
        "explained": pca.explained_variance_ratio_,
    }
