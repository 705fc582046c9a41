"""Token statistics that fit in memory: the estimate before the pass, windows and ranges instead of all pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rba_core.errors import RBAError
from rba_core.maps import fit_map, fit_residual_matrix
from rba_core.measures.stats import StatsAccumulator, TokenStats, check_fits, planned_pairs, stats_bytes


@pytest.mark.parametrize("window, ranges", [(None, ()), (1, ()), (3, ()), (None, [(1, 4), (2, 3)])])
def test_the_estimate_is_what_the_accumulators_allocate(window, ranges):
    states, d = 7, 24
    pairs = planned_pairs(states, window, ranges)
    acc = StatsAccumulator(states, d, "cpu", pairs)
    estimate = stats_bytes(states, d, pairs)
    assert abs(estimate - acc.allocated_bytes) <= 0.1 * acc.allocated_bytes


def _states(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 20, 8, generator=gen) for _ in range(6)]


def test_window_and_range_statistics_equal_the_all_pairs_blocks():
    full, part = StatsAccumulator(6, 8, "cpu"), StatsAccumulator(6, 8, "cpu", planned_pairs(6, 2, [(0, 5)]))
    for seed in range(2):
        full.add(_states(seed))
        part.add(_states(seed))
    everything, some = full.result(), TokenStats.from_arrays(part.result().to_arrays())
    assert set(some.pairs) == {(i, i) for i in range(6)} | {(i, i + 2) for i in range(4)} | {(0, 5)}
    for a, b in some.pairs:
        np.testing.assert_array_equal(some.gram(a, b), everything.gram(a, b))
    np.testing.assert_array_equal(some.sums, everything.sums)
    assert some.count == everything.count == 120
    np.testing.assert_allclose(fit_map(some, (1, 3)).weight.numpy(), fit_map(everything, (1, 3)).weight.numpy())
    residual, reference = fit_residual_matrix(some), fit_residual_matrix(everything)
    kept = ~np.isnan(residual)
    assert kept.sum() == 5 and kept[0, 5] and kept[1, 3]
    np.testing.assert_allclose(residual[kept], reference[kept], rtol=1e-10)
    with pytest.raises(RBAError, match=r"do not hold hs\[1\]ᵀhs\[4\]; collect them for range 1→4"):
        fit_map(some, (1, 4))


def test_a_plan_that_does_not_fit_says_what_would():
    # A 16-layer D=2048 model: the upper triangle of all pairs, diagonal included, is 5.1 GB in float64.
    need = stats_bytes(17, 2048)
    assert need == 8 * 2048 * (2048 * 17 * 18 // 2 + 17)
    assert check_fits(17, 2048, None, need) == need
    with pytest.raises(RBAError) as error:
        check_fits(17, 2048, None, 2_000_000_000)
    assert str(error.value) == ("Token statistics for all pairs need 5.1 GB, above the budget of 2.0 GB; "
                                "windows of 8 need 0.9 GB.")
    with pytest.raises(RBAError, match="even windows of 1 do not fit"):
        check_fits(17, 2048, None, 10_000_000)
