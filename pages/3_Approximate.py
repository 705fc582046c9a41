"""Approximate page: replace block ranges by linear maps and compare with the original model."""

import json

import pandas as pd
import streamlit as st

from pages._ui.compute import NotComputed, approximation, may_read, num_blocks, run_approximation
from pages._ui.selection import BOUND, sidebar
from pages._ui.show import downloads, errors
from rba_core.approx import MAP_KINDS, paper_notation, validate_ranges
from rba_core.plots import pca_scatter
from rba_core.projection import shared_pca

MAX_RANGES = 4
DEFAULT_RANGES = [(2, 6), (7, 9), (9, 10), (10, 11)]  # the first is the paper's Table 1 range "1 5"
MAP_NAMES = {"linear": "linear: least squares, the paper's", "affine": "affine: least squares with a bias",
             "ridge": "ridge: least squares + λ", "identity": "identity: skip the blocks (the paper's ablation)"}

st.set_page_config(page_title="Approximate · RBA Explorer", page_icon=":material/compress:", layout="wide")
st.title("Approximate block ranges with linear maps")
st.markdown("A range **i→j** removes blocks i+1..j and maps the output of block i to that of block j with "
            "one linear map T shared by all tokens, fitted in closed form on the sidebar's n train images. "
            "The approximated model is then run on test images and compared with the original.")


def _metrics(res: dict) -> None:
    """MSE, then blocks, parameters and latency after approximation, each with its change from before."""
    blocks, params, latency = res["blocks"], res["params"], res["latency_ms_per_image"]
    cols = st.columns(4)
    cols[0].metric("Final-representation MSE", f"{res['mse_final']:.4g}",
                   help="Mean squared difference between original and approximated final representations.")
    cols[1].metric("Blocks after", blocks["approximated"], delta_color="inverse",
                   delta=f"{blocks['approximated'] - blocks['original']} (was {blocks['original']})")
    cols[2].metric("Parameters after (T included)", f"{params['approximated']:,}", delta_color="inverse",
                   delta=f"{params['approximated'] / params['original'] - 1:+.1%} (was {params['original']:,})")
    cols[3].metric("Latency after, ms per image", f"{latency['approximated']:.3g}", delta_color="inverse",
                   delta=f"{latency['approximated'] / latency['original'] - 1:+.1%} (was {latency['original']:.3g})",
                   help="Median of 3 timed runs on one batch of evaluation images, on this machine.")


def _probe_table(accuracy: dict) -> pd.DataFrame:
    names = {"original": "original model", "approximated": "approximated (maps)", "skip": "skipped (no map)"}
    return pd.DataFrame([{"model": names[k], "accuracy mean": v["mean"], "accuracy std": v["std"],
                          "per seed (0, 1, 2)": ", ".join(f"{a:.4f}" for a in v["per_seed"])}
                         for k, v in accuracy.items()])


with errors():
    sel = sidebar()
    blocks = num_blocks(sel.model)
    cols = st.columns(4)
    count = cols[0].number_input("Number of ranges", min_value=1, max_value=MAX_RANGES, value=1,
                                 key="n_ranges", **BOUND)
    kind = cols[1].selectbox("Map", MAP_KINDS, key="map", help="; ".join(MAP_NAMES.values()), **BOUND)
    ridge = cols[2].number_input("Ridge λ", min_value=0.0, value=0.01, format="%.4g", key="ridge",
                                 disabled=kind != "ridge", help="Only for the ridge map: (XᵀX/n + λI) T = XᵀY/n.",
                                 **BOUND)
    eval_n = cols[3].number_input("Evaluation samples (test split)", min_value=2, max_value=100_000, value=256,
                                  step=64, key="eval_n", **BOUND)
    picked = []
    for r in range(1, int(count) + 1):
        cols = st.columns([1, 1, 3], vertical_alignment="bottom")
        start = cols[0].number_input(f"Range {r}: start i", min_value=0, value=DEFAULT_RANGES[r - 1][0],
                                     key=f"start{r}", **BOUND)
        end = cols[1].number_input(f"Range {r}: end j", min_value=0, value=DEFAULT_RANGES[r - 1][1],
                                   key=f"end{r}", **BOUND)
        cols[2].markdown(f"**{start}→{end}** removes blocks {start + 1}..{end} · "
                         f"paper's notation: **{paper_notation((start, end))}**")
        picked.append((int(start), int(end)))
    ranges = validate_ranges(picked, blocks)
    st.caption(f"{sel.model} has {blocks} blocks (0 ≤ i < j ≤ {blocks}); ranges must not overlap.")

    ridge = float(ridge)
    if st.button("Approximate", key="approximate", type="primary", help="Fits T from the stored token "
                 "statistics (one pass if missing) and runs the approximated model on the evaluation images."):
        run_approximation(sel, int(eval_n), ranges, kind, ridge, probe=False)
    try:
        if not may_read(sel):
            raise NotComputed
        res = approximation(sel, int(eval_n), ranges, kind, ridge, probe=False)
    except NotComputed:
        res = None
        st.info("Not computed yet for these settings: press Approximate.")
    if res:
        st.dataframe(pd.DataFrame([{"range (ours)": f"{r['start']}→{r['end']}",
                                    "removed blocks": ", ".join(map(str, r["removed_blocks"])),
                                    "paper notation": r["paper"]} for r in res["ranges"]]), hide_index=True)
        _metrics(res)
        final = res["final"]
        pca = shared_pca(final["original"], final["approximated"])
        st.plotly_chart(pca_scatter(pca["original"], pca["approximated"], final["labels"],
                                    final["label_names"], pca["explained"]), key="pca")
        summary = {k: v for k, v in res.items() if k != "final"}
        downloads("approximation", data=summary, table=pd.DataFrame({
            "label": final["labels"], "pc1 original": pca["original"][:, 0], "pc2 original": pca["original"][:, 1],
            "pc1 approximated": pca["approximated"][:, 0], "pc2 approximated": pca["approximated"][:, 1]}))

        st.subheader("Linear probe accuracy")
        st.markdown("One linear layer trained on the final representations of the n train images (Adam, "
                    "5 epochs, seeds 0, 1, 2) and tested on the evaluation images, for the original model, "
                    "the approximated one and the same ranges simply skipped (the paper's Tables 1–2).")
        spec = json.dumps([sel.model, sel.dataset, sel.n, sel.seed, int(eval_n), ranges, kind, ridge])
        probed = st.session_state.setdefault("_probed", [])
        if st.button("Train the linear probe", key="probe"):
            run_approximation(sel, int(eval_n), ranges, kind, ridge, probe=True)
            probed.append(spec)
        if spec in probed:
            accuracy = approximation(sel, int(eval_n), ranges, kind, ridge, probe=True)["accuracy"]
            table = _probe_table(accuracy)
            st.dataframe(table, hide_index=True, column_config={
                "accuracy mean": st.column_config.NumberColumn(format="%.4f"),
                "accuracy std": st.column_config.NumberColumn(format="%.4f")})
            downloads("probe-accuracy", table=table, data={**{k: v for k, v in summary.items() if k != "cache"},
                                                           "accuracy": accuracy})
