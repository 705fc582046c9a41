"""Block Redundancy and block-to-block similarity (cosine, linear CKA) from CLS representations.

All functions take ``cls``: (L+1, N, D), entry k being the CLS token of block output k.
"""

from __future__ import annotations

import numpy as np


def block_redundancy(cls: np.ndarray) -> np.ndarray:
    """BR(k) = -mean((cls_k - cls_{k-1})²) over samples and dimensions, for blocks k = 1..L.

    Returns (L,) float64; entry k-1 is block k. Higher means the block changes less.
    """
    x = cls.astype(np.float64)
    return -np.mean((x[1:] - x[:-1]) ** 2, axis=(1, 2))


def cosine_matrix(cls: np.ndarray) -> np.ndarray:
    """S[a, b] = mean over samples of cos(cls_a, cls_b), (L+1, L+1) float64."""
    x = cls.astype(np.float64)
    unit = x / np.maximum(np.linalg.norm(x, axis=2, keepdims=True), 1e-12)
    return np.einsum("and,bnd->ab", unit, unit) / x.shape[1]


def linear_cka_matrix(cls: np.ndarray) -> np.ndarray:
    """Linear CKA between every pair of block outputs over samples, (L+1, L+1) float64.

    CKA(X, Y) = ||YᵀX||²_F / (||XᵀX||_F ||YᵀY||_F) on column-centred X, Y; computed with the
    (N, N) kernels when N < D, else with the (D, D) feature products.
    """
    x = cls - cls.mean(axis=1, keepdims=True, dtype=np.float64).astype(cls.dtype)
    states = len(x)
    if x.shape[1] < x.shape[2]:
        kernels = np.einsum("and,amd->anm", x, x).reshape(states, -1).astype(np.float64)
        cross = kernels @ kernels.T
    else:  # float32 products (the costly part), float64 sums; symmetric, so a <= b only
        cross = np.zeros((states, states))
        for a in range(states):
            for b in range(a, states):
                cross[a, b] = cross[b, a] = np.sum(np.square(x[b].T @ x[a], dtype=np.float64))
    norms = np.sqrt(np.diag(cross))
    cka = cross / np.maximum(np.outer(norms, norms), 1e-300)
    # hs[0]'s CLS (CLS token + position embedding) is the same for every image, so its centred
    # kernel is zero; a block output is still identical to itself, so the diagonal is 1.
    np.fill_diagonal(cka, 1.0)
    return cka
