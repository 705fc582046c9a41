"""Similarity page: cosine (or linear CKA) between the CLS tokens of every pair of block outputs."""

from dataclasses import replace

import streamlit as st

from pages._ui.compute import analysis
from pages._ui.show import downloads, errors, matrix_table, result_part
from pages._ui.selection import BOUND, DATASET_FOLDER, DATASET_OPTIONS, pick, sidebar
from rba_core.store.plots import METRIC_NAMES, metric_title, similarity_heatmap, similarity_side_by_side

NONE = "(none)"

st.set_page_config(page_title="Similarity · RBA Explorer", page_icon=":material/grid_on:", layout="wide")
st.title("Similarity between block outputs")
st.markdown("Mean similarity, over the sampled images or texts, between the pooled representations (CLS, or "
            "the mean over real tokens for sentence-transformers models) of every pair "
            "of block outputs (the paper's Figure 2). Bright squares along the diagonal are runs of "
            "blocks that barely change the representation.")


with errors():
    sel = sidebar()
    left, right = st.columns(2)
    metric = left.radio("Measure", list(METRIC_NAMES), format_func=lambda m: METRIC_NAMES[m], horizontal=True,
                        key="metric", **BOUND)
    with right:
        compare = pick("compare", "Compare with a second dataset (same model, n and seed)", [NONE, *DATASET_OPTIONS],
                       DATASET_FOLDER, "/path/to/dataset", "Another dataset, to see whether the pattern "
                       "depends on the architecture rather than on the data.")
    results = analysis(sel)
    if results:
        other = None
        if compare and compare != NONE and compare != sel.dataset:
            with errors():  # a second dataset that fails must not hide the first one
                other = analysis(replace(sel, dataset=compare), key="compute-compare", label=f"Compute {compare}")
        if other:
            fig = similarity_side_by_side({sel.dataset: results[metric], compare: other[metric]}, metric)
        else:
            fig = similarity_heatmap(results[metric], metric, f"{metric_title(metric)} · {sel.model} on {sel.dataset}")
        st.plotly_chart(fig, key="similarity")
        for dataset, shown in [(sel.dataset, results)] + ([(compare, other)] if other else []):
            downloads(f"{metric}-{dataset}", table=matrix_table(shown[metric]), data=result_part(shown, metric),
                      of=dataset if other else None)
