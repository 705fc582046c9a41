"""``folded``: ReplaceMe's map, exact. For range i→j, T minimises ||m·T − (hs[j] − r)||² where hs[i] = r + m,
m being block i's MLP output (for i = 0, m = hs[0] and r = 0), from the fold statistics of the range
(:class:`FoldStats`, collected by :mod:`rba_core.passes.range_pass`). Folded into that layer (``W ← W·T``,
:mod:`rba_core.passes.fold`), it adds no parameter and leaves a plain checkpoint with fewer layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from rba_core.errors import RBAError
from rba_core.maps.base import (Conditioning, Fitted, FitData, MapKind, MissingStatistics, Range, solve_spd_conditioned,
                                validate_ranges)


@dataclass
class FoldStats:
    """Fold statistics of one range i→j over real tokens, float64 (D, D) each."""

    mm: np.ndarray  # MᵀM
    md: np.ndarray  # Mᵀ(H_j - H_i)
    count: int

    def solve(self, ridge: float = 0.0) -> tuple[np.ndarray, Conditioning]:
        """T (D, D) minimising ||M T - (H_j - H_i + M)||² + ridge·count·||T||² (λ per token, as the ridge
        map's), and how well MᵀM determined it. The sums come from float64 products."""
        gram = self.mm + ridge * self.count * np.eye(self.mm.shape[0])
        return solve_spd_conditioned(gram, self.md + self.mm, "float64")

    def fit(self, ridge: float = 0.0) -> np.ndarray:
        """T alone (see :meth:`solve`)."""
        return self.solve(ridge)[0]


def fit(data: FitData, rng: Range, params) -> Fitted:
    stats = data.require("fold")
    if rng not in stats:
        raise MissingStatistics(f"The fold statistics of this pass do not hold range {rng[0]}→{rng[1]}; collect them first.")
    weight, conditioning = stats[rng].solve()
    return Fitted({"weight": weight}, conditioning)


def apply(folded_map, hidden, m):
    """``hs[i] − m + m·T``: what block i computes once T is folded into its MLP output layer (``hs[0]·T`` at 0)."""
    if m is None:
        return hidden @ folded_map.weight
    return hidden - m + m @ folded_map.weight


def check_fold_set(ranges: Sequence[Sequence[int]], num_blocks: int) -> list[Range]:
    """The checks of one set of ranges that need no model: valid, disjoint, none folding into a block that
    another removes, at least one layer kept."""
    checked = validate_ranges(ranges, num_blocks)
    for (_, j1), (i2, j2) in zip(checked, checked[1:]):
        if i2 == j1:
            raise RBAError(f"Range {i2}→{j2} would fold into block {i2}, which range ending at {j1} removes; "
                           "merge the two ranges into one.")
    if sum(j - i for i, j in checked) >= num_blocks:
        raise RBAError("These ranges would remove every layer; keep at least one.")
    return checked


def check_foldable(encoder, ranges: Sequence[Sequence[int]]) -> list[Range]:
    """Checked ranges whose start (block i, or the embeddings for i = 0) can take the map and is kept;
    one sentence for a model (an :class:`rba_core.models.Encoder`) or range that cannot fold."""
    instead = "use --map linear, affine or ridge instead (a map module, not folded)"
    if encoder.mlp_out is None and not encoder.linear_stem:
        raise RBAError(f"A map cannot be folded into this '{encoder.family}' model: {encoder.no_fold_reason}; "
                       f"{instead}.")
    checked = validate_ranges(ranges, encoder.num_blocks)
    for i, j in checked:
        if i == 0 and not encoder.folds_at(0):
            raise RBAError(f"Range 0→{j} cannot be folded into this '{encoder.family}' model's embeddings: "
                           f"{encoder.no_stem_fold_reason}; start the range at block 1 or later, or {instead}.")
        if i > 0 and not encoder.folds_at(i):
            raise RBAError(f"Range {i}→{j} cannot be folded into block {i} of this '{encoder.family}' model: "
                           f"{encoder.no_fold_reason}; start the range at 0 (the embeddings), or {instead}.")
    check_fold_set(checked, encoder.num_blocks)
    return checked


KIND = MapKind("folded", "folded: fitted on block i's MLP output and folded into its last linear layer (ReplaceMe, "
               "exact); no added parameters", fit, lambda d: {"weight": (d, d)}, apply, statistics=("fold",),
               needs_mlp_output=True, folds=lambda fitted: fitted.weight.double().cpu().numpy(),
               check_ranges=check_fold_set, check_encoder=check_foldable)
