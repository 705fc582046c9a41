"""Per-block redundancy scores: Block Redundancy, block-to-block similarity (cosine, linear CKA),
ShortGPT's Block Influence and PruneMe's angular distance.

Functions on pooled vectors take ``cls``: (L+1, N, D), entry k being the pooled vector (CLS, mean,
or a decoder's last real token) of block output k; ``tokens``: (L+1, N, D) with rows = real tokens.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rba_core.measures.stats import TokenStats


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


def block_redundancy_all_tokens(stats: TokenStats) -> np.ndarray:
    """BR(k) = -mean((hs[k] - hs[k-1])²) over every real token and dimension, from the Gram
    statistics alone: ||X_k - X_{k-1}||² = tr G_kk - 2 tr G_{k-1,k} + tr G_{k-1,k-1}. (L,) float64."""
    trace = lambda a, b: float(np.trace(stats.gram(a, b)))  # noqa: E731
    return np.array([-(trace(k, k) - 2 * trace(k - 1, k) + trace(k - 1, k - 1)) / (stats.count * stats.hidden_size)
                     for k in range(1, stats.num_blocks + 1)])


def _row_cosines(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """cos of each row pair of (..., N, D) arrays, float64, (..., N)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    norms = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
    return np.sum(x * y, axis=-1) / np.maximum(norms, 1e-300)


def influence_sums(states: Sequence[torch.Tensor]) -> np.ndarray:
    """Σ over rows of 1 - cos(states[k-1], states[k]) for k = 1..L, in float64; ``states``: L+1
    tensors (R, D), rows = real tokens. Sums over batches add up to Block Influence × tokens."""
    return np.array([float((1 - F.cosine_similarity(a.double(), b.to(a.device).double(), dim=-1, eps=1e-300)).sum())
                     for a, b in zip(states, states[1:])])


def block_influence(tokens: np.ndarray) -> np.ndarray:
    """ShortGPT's Block Influence BI(k) = 1 - mean over rows of cos(hs[k-1], hs[k]), blocks k = 1..L.

    ``tokens``: (L+1, N, D), rows = every real token. Returns (L,) float64; entry k-1 is block k.
    Lower means the block changes its input's direction less.
    """
    return influence_sums([torch.from_numpy(np.ascontiguousarray(t)) for t in tokens]) / tokens.shape[1]


def angular_distance(cls: np.ndarray, n: int) -> np.ndarray:
    """PruneMe's angular distance between block outputs l and l + n: mean over samples of
    arccos(cos(cls_l, cls_{l+n})) / π, for l = 0..L-n. (L+1-n,) float64; lower = more redundant window."""
    states = cls.shape[0]
    if not 1 <= n < states:
        raise ValueError(f"window n must be in 1..{states - 1}, got {n}")
    cosines = np.clip(_row_cosines(cls[:-n], cls[n:]), -1.0, 1.0)
    return (np.arccos(cosines) / np.pi).mean(axis=1)
