"""Figure builders carry exactly the input data, labels and highlights; ranking matches brute force."""

import numpy as np
import pytest

from rba_core.store.plots import (APPROXIMATED_SYMBOL, HIGHLIGHT, ORIGINAL_SYMBOL, PLAIN, pca_scatter, redundancy_bars,
                            residual_heatmap, similarity_heatmap, similarity_side_by_side, state_labels)
from rba_core.ranking import default_ranges, rank_ranges, suggested_removed, top_blocks

LABELS_4 = ["hs[0] (embeddings)", "block 1", "block 2", "block 3", "block 4"]


def _symmetric(seed: int, size: int = 5) -> np.ndarray:
    x = np.random.default_rng(seed).random((size, size))
    return (x + x.T) / 2


def test_state_labels_name_the_embeddings_and_blocks():
    assert state_labels(5) == LABELS_4


@pytest.mark.parametrize("metric, name", [("cosine", "cosine similarity"), ("cka", "linear CKA")])
def test_similarity_heatmap_carries_the_matrix_and_labels(metric, name):
    matrix = _symmetric(0)
    fig = similarity_heatmap(matrix, metric)
    (trace,) = fig.data
    np.testing.assert_array_equal(np.asarray(trace.z), matrix)
    assert list(trace.x) == LABELS_4 and list(trace.y) == LABELS_4
    assert name in trace.hovertemplate and "%{z" in trace.hovertemplate
    assert fig.layout.yaxis.autorange == "reversed"  # hs[0] on top, as in the paper
    assert fig.layout.title.text.startswith(name[0].upper() + name[1:])


def test_side_by_side_shares_one_colour_scale():
    a, b = _symmetric(1), _symmetric(2) * 3
    fig = similarity_side_by_side({"MNIST": a, "CIFAR-10": b}, "cka")
    assert len(fig.data) == 2
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), a)
    np.testing.assert_array_equal(np.asarray(fig.data[1].z), b)
    assert {t.coloraxis for t in fig.data} == {"coloraxis"}
    assert fig.layout.coloraxis.cmin == pytest.approx(min(a.min(), b.min()))
    assert fig.layout.coloraxis.cmax == pytest.approx(max(a.max(), b.max()))
    assert [ann.text for ann in fig.layout.annotations] == ["MNIST", "CIFAR-10"]
    assert list(fig.data[1].x) == LABELS_4


def test_redundancy_bars_highlight_the_top_k_blocks():
    br = np.array([-0.9, -0.1, -0.5, -0.05, -0.3, -0.7])  # most redundant: blocks 4, 2, 5
    fig = redundancy_bars(br, top_k=3)
    (bar,) = fig.data
    np.testing.assert_array_equal(np.asarray(bar.y), br)
    assert list(bar.x) == [f"block {k}" for k in range(1, 7)]
    highlighted = [k + 1 for k, colour in enumerate(bar.marker.color) if colour == HIGHLIGHT]
    assert highlighted == [2, 4, 5]
    assert all(colour in (HIGHLIGHT, PLAIN) for colour in bar.marker.color)


def test_top_blocks_orders_by_redundancy_and_breaks_ties_by_block():
    assert top_blocks(np.array([-1.0, -0.2, -0.2, -0.1]), 3) == [4, 2, 3]
    assert top_blocks(np.array([-1.0, -0.2]), 0) == []
    assert top_blocks(np.array([-1.0, -0.2]), 5) == [2, 1]


def test_residual_heatmap_blanks_everything_that_is_not_a_range():
    residual = np.random.default_rng(3).random((5, 5))  # values below the diagonal must not show
    fig = residual_heatmap(residual)
    z = np.asarray(fig.data[0].z, dtype=float)
    upper = np.triu(np.ones((5, 5), bool), k=1)
    np.testing.assert_array_equal(z[upper], residual[upper])
    assert np.isnan(z[~upper]).all()
    assert fig.data[0].customdata[1][3] == "1→3 (removes blocks 2..3)"
    assert list(fig.data[0].x) == LABELS_4
    assert "start i" in fig.layout.yaxis.title.text and "end j" in fig.layout.xaxis.title.text


def test_pca_scatter_colours_by_class_and_marks_original_vs_approximated():
    rng = np.random.default_rng(4)
    labels = np.array([0, 2, 2, 0, 1, 2])
    original, approximated = rng.normal(size=(6, 2)), rng.normal(size=(6, 2))
    fig = pca_scatter(original, approximated, labels, ["cat", "dog", "bird"], [0.5, 0.25])
    data = [t for t in fig.data if t.meta in ("original", "approximated")]
    assert len(data) == 6  # 3 classes x (original, approximated)
    for trace in data:
        cls = ["cat", "dog", "bird"].index(trace.name)
        coords = original if trace.meta == "original" else approximated
        np.testing.assert_array_equal(trace.x, coords[labels == cls, 0])
        np.testing.assert_array_equal(trace.y, coords[labels == cls, 1])
        assert trace.marker.symbol == (ORIGINAL_SYMBOL if trace.meta == "original" else APPROXIMATED_SYMBOL)
        assert trace.legendgroup == trace.name and trace.showlegend == (trace.meta == "original")
    colours = {name: {t.marker.color for t in data if t.name == name} for name in ("cat", "dog", "bird")}
    assert all(len(c) == 1 for c in colours.values()) and len(set.union(*colours.values())) == 3
    symbols = [(t.name, t.marker.symbol) for t in fig.data if t.meta is None]
    assert symbols == [("original", ORIGINAL_SYMBOL), ("approximated", APPROXIMATED_SYMBOL)]
    assert fig.layout.xaxis.title.text == "PC1 (50.0% of variance)"


def _brute_force(residual: np.ndarray, removed: int) -> list[tuple[int, int, float]]:
    states = residual.shape[0]
    found = [(i, j, residual[i, j]) for i in range(states) for j in range(states)
             if j - i == removed and not np.isnan(residual[i, j])]
    return sorted(found, key=lambda t: (t[2], t[0]))


@pytest.mark.parametrize("removed", [1, 2, 4, 6])
def test_rank_ranges_matches_brute_force(removed):
    residual = np.random.default_rng(removed).random((7, 7))
    residual[np.tril_indices(7)] = np.nan
    ranked = rank_ranges(residual, removed)
    assert [(c.start, c.end, c.residual) for c in ranked] == _brute_force(residual, removed)
    assert all(c.removed_blocks == list(range(c.start + 1, c.end + 1)) for c in ranked)


def test_rank_ranges_handles_ties_nan_and_impossible_sizes():
    residual = np.full((5, 5), np.nan)
    residual[0, 2], residual[1, 3], residual[2, 4] = 0.3, 0.1, 0.1
    assert [(c.start, c.end) for c in rank_ranges(residual, 2)] == [(1, 3), (2, 4), (0, 2)]
    residual[1, 3] = np.nan
    assert [(c.start, c.end) for c in rank_ranges(residual, 2)] == [(2, 4), (0, 2)]
    assert rank_ranges(residual, 0) == [] and rank_ranges(residual, 5) == []
    assert rank_ranges([[None, 0.5], [None, None]], 1)[0].residual == 0.5  # JSON-style input works


def test_suggested_removed_is_a_third_of_the_blocks():
    assert [suggested_removed(L) for L in (1, 2, 4, 12, 24)] == [1, 1, 1, 4, 8]


def test_side_by_side_ticks_stay_short_and_rows_are_labelled_once():
    """Half-width heatmaps (1400 px: about 600 px each) with 13 full labels collided; block numbers do not."""
    fig = similarity_side_by_side({"MNIST": _symmetric(1, 13), "CIFAR-10": _symmetric(2, 13)})
    short = ["emb"] + [str(k) for k in range(1, 13)]
    for axis in (fig.layout.xaxis, fig.layout.xaxis2, fig.layout.yaxis, fig.layout.yaxis2):
        assert list(axis.ticktext) == short and list(axis.tickvals) == state_labels(13)
    assert fig.layout.xaxis.tickangle == 0 and fig.layout.xaxis2.tickangle == 0
    assert fig.layout.yaxis.showticklabels is True and fig.layout.yaxis2.showticklabels is False
    assert list(fig.data[1].y) == state_labels(13)  # the hover still names every block output in full


@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 6, 12, 24])
def test_default_ranges_fit_the_model(blocks):
    from rba_core.maps import validate_ranges

    ranges = default_ranges(blocks, 4)
    assert validate_ranges(ranges, blocks)  # inside 0..L and disjoint
    assert all(default_ranges(blocks, count)[0] == ranges[0] for count in (1, 2, 3))
    assert (ranges[0] == (2, 6)) == (blocks >= 12)  # the paper's range only where the paper's models are
    assert ranges[0][1] - ranges[0][0] == (4 if blocks >= 12 else suggested_removed(blocks))
