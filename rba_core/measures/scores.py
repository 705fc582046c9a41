"""The cheap block scores, each declared once: what it is computed from (the one pass over the fit samples) and
how it scores a candidate set of ranges. ``analyze``'s result, ``search``'s ``score_agreement`` and the
Redundancy page read :data:`SCORES`.

A score is computed from a pass (an :class:`rba_core.passes.extract.Extraction`: its pooled vectors, token statistics,
stored fit residuals and Block Influence) as ``values``: per block k = 1..L, per range (an (L+1, L+1) matrix),
or, for a windowed score, per window start l for a window size n. Its candidate score grows with the change the
removed blocks make (as the measured error does), so a Spearman ρ near 1 means it orders candidates as measured;
a score that does not cover a candidate (Block Influence: one-block ranges only) gives None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from rba_core.maps import Range, fit_residual_matrix
from rba_core.measures.metrics import angular_distance, block_redundancy, block_redundancy_all_tokens


def _removed(ranges: Sequence[Range]) -> list[int]:
    return [k for i, j in ranges for k in range(i + 1, j + 1)]


def _minus_sum_over_removed(values: np.ndarray, ranges: Sequence[Range]) -> float:
    return float(-sum(values[k - 1] for k in _removed(ranges)))


def _one_block(values: np.ndarray, ranges: Sequence[Range]) -> float | None:
    (i, j), *more = ranges
    return None if more or j != i + 1 else float(values[i])


def _window(values: np.ndarray, ranges: Sequence[Range]) -> float | None:
    (i, _), *more = ranges
    return None if more else float(values[i])


def _all_tokens(fit) -> np.ndarray | None:
    stats = fit.token_stats
    if stats is None or not all(stats.has(k - 1, k) for k in range(1, fit.num_blocks + 1)):
        return None
    return block_redundancy_all_tokens(stats)


def _fit_residual(fit) -> np.ndarray:
    return fit.fit_residual if fit.fit_residual is not None else fit_residual_matrix(fit.stats())


@dataclass(frozen=True)
class CheapScore:
    """One score. ``values(fit)`` (``values(fit, n)`` when ``windowed``) is None where the pass lacks what it
    needs; ``candidate(values, ranges)`` scores a candidate (None where it does not cover it)."""

    name: str  # the JSON key
    label: str  # what the pages call it ({n}: the window size of a windowed score)
    values: Callable[..., Any] = field(repr=False)
    candidate: Callable[[Any, Sequence[Range]], float | None] = field(repr=False)
    windowed: bool = False

    def key(self, n: int | None = None) -> str:
        """The name of this score in ``score_agreement`` (a windowed one per window size)."""
        return f"{self.name}_n{n}" if self.windowed else self.name

    def title(self, n: int | None = None) -> str:
        return self.label.format(n=n)


SCORES: dict[str, CheapScore] = {s.name: s for s in (
    CheapScore("block_redundancy", "Block Redundancy (pooled vector)", lambda fit: block_redundancy(fit.pooled),
               _minus_sum_over_removed),
    CheapScore("block_redundancy_all_tokens", "Block Redundancy (every real token)", _all_tokens,
               _minus_sum_over_removed),
    CheapScore("fit_residual", "fit residual of the least-squares map", _fit_residual,
               lambda values, ranges: float(sum(values[i, j] for i, j in ranges))),
    CheapScore("block_influence", "Block Influence (ShortGPT; one-block ranges)", lambda fit: fit.block_influence,
               _one_block),
    CheapScore("angular_distance", "angular distance (PruneMe; ranges l→l+{n})",
               lambda fit, n: angular_distance(fit.pooled, n), _window, windowed=True),
)}


def score_title(key: str) -> str:
    """The pages' name of a ``score_agreement`` key (``angular_distance_n2`` → "angular distance (PruneMe; ranges
    l→l+2)")."""
    for score in SCORES.values():
        if score.windowed and key.startswith(score.name + "_n"):
            return score.title(int(key.removeprefix(score.name + "_n")))
        if key == score.name:
            return score.title()
    return key.replace("_", " ")


def candidate_scores(fit, candidates: Sequence[Sequence[Range]]) -> dict[str, list[float | None]]:
    """Every score of every candidate, by ``score_agreement`` key: a windowed score once per window size among
    the single-range candidates; scores whose values the pass lacks are left out."""
    out: dict[str, list[float | None]] = {}
    for score in SCORES.values():
        sizes = sorted({j - i for c in candidates if len(c) == 1 for i, j in c}) if score.windowed else [None]
        for n in sizes:
            values = score.values(fit, n) if score.windowed else score.values(fit)
            if values is None:
                continue
            out[score.key(n)] = [score.candidate(values, c) if not score.windowed or c[0][1] - c[0][0] == n else None
                                 for c in candidates]
    return out
