"""What the dashboard draws: plotly figures built from plain arrays (no Streamlit here).

Axes use the project's indexing: state 0 is ``hs[0]`` (the embedding output), state k the output
of block k; a range i→j removes blocks i+1..j.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from rba_core.ranking import removes_text, top_blocks

METRIC_NAMES = {"cosine": "cosine similarity", "cka": "linear CKA"}
#: The pooled vector of a block output, per pooling: its symbol in formulas and its name in words.
POOLED = {"first": ("cls", "the CLS (first) token"), "mean": ("mean", "the mean over real tokens"),
          "last": ("last", "the last real token")}


def br_formula(pooling: str = "first") -> str:
    """Block Redundancy written with the pooled vector the model uses, e.g. "BR(k) = −mean((last_k − last_{k−1})²)"."""
    v = POOLED[pooling][0]
    return f"BR(k) = −mean(({v}_k − {v}_{{k−1}})²)"
HIGHLIGHT, PLAIN = "#d62728", "#9aa5b1"
ORIGINAL_SYMBOL, APPROXIMATED_SYMBOL = "circle", "x"


def metric_title(metric: str) -> str:
    """"Cosine similarity", "Linear CKA": the metric's name starting a title."""
    name = METRIC_NAMES[metric]
    return name[0].upper() + name[1:]


def state_labels(num_states: int) -> list[str]:
    """Axis labels of the block outputs 0..L: "hs[0] (embeddings)", "block 1", ..., "block L"."""
    return ["hs[0] (embeddings)"] + [f"block {k}" for k in range(1, num_states)]


def _similarity_trace(matrix: np.ndarray, metric: str, **extra) -> go.Heatmap:
    labels = state_labels(len(matrix))
    return go.Heatmap(
        z=np.asarray(matrix, dtype=np.float64), x=labels, y=labels, colorscale="Viridis",
        hovertemplate=f"%{{y}} vs %{{x}}<br>{METRIC_NAMES[metric]}: %{{z:.4f}}<extra></extra>", **extra)


def _matrix_axes(fig: go.Figure, **where) -> None:
    # Row 0 on top, as in the paper's Figure 2 and in any printed matrix.
    fig.update_yaxes(autorange="reversed", title_text="block output", **where)
    fig.update_xaxes(title_text="block output", tickangle=-45, **where)


def similarity_heatmap(matrix: np.ndarray, metric: str = "cosine", title: str | None = None) -> go.Figure:
    """(L+1, L+1) similarity between every pair of block outputs; values on hover."""
    fig = go.Figure(_similarity_trace(matrix, metric, colorbar={"title": {"text": METRIC_NAMES[metric]}}))
    _matrix_axes(fig)
    fig.update_layout(title=title or f"{metric_title(metric)} between block outputs (pooled vectors)",
                      height=560)
    return fig


def short_state_labels(num_states: int) -> list[str]:
    """Compact tick text for the block outputs 0..L ("emb", "1", ..., "L"), where full labels would collide."""
    return ["emb"] + [str(k) for k in range(1, num_states)]


def similarity_side_by_side(matrices: Mapping[str, np.ndarray], metric: str = "cosine") -> go.Figure:
    """One heatmap per dataset (same model), on one shared colour scale so they compare directly.

    Two heatmaps side by side leave each half the width: ticks show block numbers ("emb" for hs[0]),
    upright, and only the left heatmap labels the shared rows; the hover keeps the full names.
    """
    names = list(matrices)
    values = np.concatenate([np.ravel(m) for m in matrices.values()])
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, horizontal_spacing=0.06, shared_yaxes=True)
    for col, name in enumerate(names, start=1):
        fig.add_trace(_similarity_trace(matrices[name], metric, coloraxis="coloraxis", name=name), row=1, col=col)
        _matrix_axes(fig, row=1, col=col)
        labels = state_labels(len(matrices[name]))
        ticks = {"tickvals": labels, "ticktext": short_state_labels(len(labels))}
        fig.update_xaxes(tickangle=0, title_text="block output (emb = hs[0])", **ticks, row=1, col=col)
        fig.update_yaxes(**ticks, showticklabels=col == 1, title_text="block output" if col == 1 else None,
                         row=1, col=col)
    fig.update_layout(coloraxis={"colorscale": "Viridis", "cmin": float(np.nanmin(values)),
                                 "cmax": float(np.nanmax(values)),
                                 "colorbar": {"title": {"text": METRIC_NAMES[metric]}}},
                      title=f"{metric_title(metric)} on each dataset, same model", height=560)
    return fig


def redundancy_bars(redundancy: np.ndarray, top_k: int = 3, pooling: str = "first") -> go.Figure:
    """Block Redundancy of blocks 1..L as bars; the ``top_k`` most redundant ones highlighted; the axis names the
    pooled vector of ``pooling`` (``first``: CLS, ``mean``, ``last``: the last real token)."""
    redundancy = np.asarray(redundancy, dtype=np.float64)
    top = set(top_blocks(redundancy, top_k))
    blocks = list(range(1, len(redundancy) + 1))
    fig = go.Figure(go.Bar(
        x=[f"block {k}" for k in blocks], y=redundancy,
        marker_color=[HIGHLIGHT if k in top else PLAIN for k in blocks],
        customdata=["most redundant" if k in top else "" for k in blocks],
        hovertemplate="%{x}<br>BR = %{y:.4g}<br>%{customdata}<extra></extra>"))
    fig.update_layout(title=f"Block Redundancy (higher = the block changes its input less; "
                            f"top {len(top)} in red)",
                      xaxis_title="block", yaxis_title=f"{br_formula(pooling)}, {POOLED[pooling][0]} = "
                      f"{POOLED[pooling][1]}", height=420)
    return fig


def residual_heatmap(residual: np.ndarray) -> go.Figure:
    """Relative fit residual of the least-squares map of every range i→j; blank (NaN) where i >= j."""
    residual = np.array(residual, dtype=np.float64)
    states = len(residual)
    rows, cols = np.indices(residual.shape)
    residual[rows >= cols] = np.nan  # only i < j is a range
    ranges = [[f"{i}→{j} ({removes_text((i, j))})" if i < j else "" for j in range(states)]
              for i in range(states)]
    labels = state_labels(states)
    fig = go.Figure(go.Heatmap(
        z=residual, x=labels, y=labels, customdata=ranges, colorscale="Viridis_r",
        colorbar={"title": {"text": "relative residual"}},
        hovertemplate="range %{customdata}<br>residual: %{z:.4g}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title_text="start i (map input hs[i])")
    fig.update_xaxes(title_text="end j (replaced output hs[j])", tickangle=-45)
    fig.update_layout(title="Fit residual ‖hs[i]·T − hs[j]‖² / ‖hs[j]‖² of every range i→j", height=560)
    return fig


def pca_scatter(original: np.ndarray, approximated: np.ndarray, labels: Sequence[int],
                label_names: Sequence[str] = (), explained: Sequence[float] = ()) -> go.Figure:
    """Original (circles) and approximated (crosses) final representations in one 2-D PCA basis,
    coloured by class. Inputs are coordinates (N, 2), e.g. from :func:`rba_core.projection.shared_pca`.

    One legend entry per class toggles both of its traces; each data trace's ``meta`` says which
    model it shows ("original" or "approximated"); two legend-only traces explain the symbols.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    palette = qualitative.Plotly if len(classes) <= 10 else qualitative.Dark24
    fig = go.Figure()
    for n_class, cls in enumerate(classes):
        rows = labels == cls
        name = label_names[cls] if 0 <= cls < len(label_names) else str(cls)
        colour = palette[n_class % len(palette)]
        for kind, coords, symbol in (("original", original, ORIGINAL_SYMBOL),
                                     ("approximated", approximated, APPROXIMATED_SYMBOL)):
            fig.add_trace(go.Scatter(
                x=coords[rows, 0], y=coords[rows, 1], mode="markers", name=str(name), meta=kind,
                legendgroup=str(name), showlegend=kind == "original",
                marker={"color": colour, "symbol": symbol, "size": 7, "opacity": 0.8},
                hovertemplate=f"class {name} ({kind})<br>PC1 %{{x:.3f}}, PC2 %{{y:.3f}}<extra></extra>"))
    for kind, symbol in (("original", ORIGINAL_SYMBOL), ("approximated", APPROXIMATED_SYMBOL)):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=kind, legendgroup="_symbols",
                                 marker={"color": "#555", "symbol": symbol, "size": 8}))
    axis = [f"PC{k + 1}" + (f" ({explained[k]:.1%} of variance)" if k < len(explained) else "") for k in range(2)]
    fig.update_layout(title="Final representations: original (●) vs approximated (×), shared PCA basis",
                      xaxis_title=axis[0], yaxis_title=axis[1], height=560,
                      legend={"itemsizing": "constant", "title": {"text": "class"}})
    return fig


def plan_curves(plans: Mapping[str, dict]) -> go.Figure:
    """Compression plans as curves: the metric (with its interval) against the blocks removed after each step, one
    line per plan (``{name: plan JSON}``, from :func:`rba_core.ops.plan.plan_run`), starting at the original model."""
    fig = go.Figure()
    for colour, (name, plan) in zip(qualitative.Plotly * 4, plans.items()):
        points = [({"blocks_removed": 0, "range_label": "original"} | plan["original"])] + list(plan["steps"])
        fig.add_trace(go.Scatter(
            x=[p["blocks_removed"] for p in points], y=[p["metric"] for p in points], mode="lines+markers",
            name=name, line={"color": colour}, customdata=[p["range_label"] for p in points],
            error_y={"type": "data", "symmetric": False,
                     "array": [p["interval"][1] - p["metric"] for p in points],
                     "arrayminus": [p["metric"] - p["interval"][0] for p in points]},
            hovertemplate=f"{name}<br>%{{x}} blocks removed (%{{customdata}})<br>%{{y:.4g}}<extra></extra>"))
    metric = next(iter(plans.values()))["metric"] if plans else "metric"
    fig.update_layout(title=f"{metric} against blocks removed, one line per strategy (95% bootstrap intervals)",
                      xaxis_title="blocks removed", yaxis_title=metric, xaxis={"dtick": 1}, height=460)
    return fig
