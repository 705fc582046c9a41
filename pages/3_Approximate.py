"""Approximate page: replace block ranges by linear maps and compare with the original model."""

import json
from dataclasses import asdict

import pandas as pd
import streamlit as st

from pages._ui.compute import NotComputed, approximation, may_read, num_blocks, run_approximation, run_export, unit
from pages._ui.selection import BOUND, Selection, eval_samples, map_choice, sidebar
from pages._ui.show import downloads, errors, file_download, file_name
from rba_core.approx import paper_notation, validate_ranges
from rba_core.latency import describe
from rba_core.maps import MapParams
from rba_core.plots import pca_scatter
from rba_core.projection import shared_pca

MAX_RANGES = 4
DEFAULT_RANGES = [(2, 6), (7, 9), (9, 10), (10, 11)]  # the first is the paper's Table 1 range "1 5"

st.set_page_config(page_title="Approximate · RBA Explorer", page_icon=":material/compress:", layout="wide")
st.title("Approximate block ranges with linear maps")
st.markdown("A range **i→j** removes blocks i+1..j and maps the output of block i to that of block j with "
            "one linear map T shared by all (real) tokens, fitted in closed form on the sidebar's n train "
            "images or texts. The approximated model is then run on test samples and compared with the original.")


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
    after, before = latency["approximated"], latency["original"]
    cols[3].metric("Latency after, ms per sample", f"{after['median']:.3g}", delta_color="inverse",
                   delta=f"{after['median'] / before['median'] - 1:+.1%} (was {before['median']:.3g})",
                   help="Median of interleaved timed runs of both models on the same evaluation samples, "
                        "on this machine; the spread is the 25th–75th percentile.")
    st.caption(f"Latency per sample: original {describe(before)}, approximated {describe(after)}.")


def _size(count: int) -> str:
    return f"{count / 1e6:.2f} MB" if count >= 1e5 else f"{count / 1e3:.1f} kB"


def _export(sel: Selection, ranges: list[tuple[int, int]], kind: str, params: MapParams) -> None:
    """Build buttons for the compressed folder (as a zip) and the ONNX file, then their downloads and sizes.

    Built files stay in this session until the settings change (they can be large: one copy each).
    """
    name = file_name(f"{sel.model}-{'_'.join(f'{i}-{j}' for i, j in ranges)}-{kind}")
    spec = json.dumps([sel.model, sel.dataset, sel.n, sel.seed, ranges, kind, asdict(params)])
    built = st.session_state.setdefault("_exports", {})
    buttons = st.container(horizontal=True)
    choices = [("zip", "Build the compressed model")]
    if unit(sel.dataset) == "images":  # ONNX export covers image models
        choices.append(("onnx", "Build the ONNX file"))
    for what, label in choices:
        if buttons.button(label, key=f"export-{what}"):
            built[what] = {"spec": spec, **run_export(sel, ranges, kind, params, name, onnx=what == "onnx")}
    for what in [w for w, entry in built.items() if entry["spec"] != spec]:
        del built[what]
    if "zip" in built:
        sizes, counts = built["zip"]["sizes"], built["zip"]["record"]["params"]
        file_download("Download the compressed model (zip)", built["zip"]["content"], f"{name}.zip", "application/zip")
        st.markdown(f"**Size on disk: {_size(sum(sizes.values()))}** ("
                    + ", ".join(f"{file} {_size(size)}" for file, size in sizes.items())
                    + f"); {counts['compressed']:,} parameters instead of {counts['original']:,} (the original's "
                    f"float32 weights alone take {_size(4 * counts['original'])}). Unzip, then "
                    f"`rba_core.load_compressed(\"{name}\")`.")
    if "onnx" in built:
        size = built["onnx"]["sizes"]["model.onnx"]
        file_download("Download the ONNX file", built["onnx"]["content"], f"{name}.onnx", "application/octet-stream")
        st.markdown(f"**Size on disk: {_size(size)}** (model.onnx); input `pixel_values` (batch, 3, H, W) as "
                    "the model's image processor prepares them, output `final` (batch, D).")


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
    kind, params = map_choice(cols[1], cols[2])
    eval_n = eval_samples(cols[3])
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

    if st.button("Approximate", key="approximate", type="primary", help="Fits T from the stored token "
                 "statistics (one pass if missing) and runs the approximated model on the evaluation samples."):
        run_approximation(sel, int(eval_n), ranges, kind, params, probe=False)
    try:
        if not may_read(sel):
            raise NotComputed
        res = approximation(sel, int(eval_n), ranges, kind, params, probe=False)
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
        summary = res.to_json()
        downloads("approximation", data=summary, table=pd.DataFrame({
            "label": final["labels"], "pc1 original": pca["original"][:, 0], "pc2 original": pca["original"][:, 1],
            "pc1 approximated": pca["approximated"][:, 0], "pc2 approximated": pca["approximated"][:, 1]}))

        st.subheader("Linear probe accuracy")
        st.markdown(f"One linear layer trained on the final representations of the n train {unit(sel.dataset)} "
                    f"(Adam, 5 epochs, seeds 0, 1, 2) and tested on the evaluation {unit(sel.dataset)}, for the original model, "
                    "the approximated one and the same ranges simply skipped (the paper's Tables 1–2).")
        spec = json.dumps([sel.model, sel.dataset, sel.n, sel.seed, int(eval_n), ranges, kind, asdict(params)])
        probed = st.session_state.setdefault("_probed", [])
        if st.button("Train the linear probe", key="probe"):
            run_approximation(sel, int(eval_n), ranges, kind, params, probe=True)
            probed.append(spec)
        if spec in probed:
            accuracy = approximation(sel, int(eval_n), ranges, kind, params, probe=True)["accuracy"]
            table = _probe_table(accuracy)
            st.dataframe(table, hide_index=True, column_config={
                "accuracy mean": st.column_config.NumberColumn(format="%.4f"),
                "accuracy std": st.column_config.NumberColumn(format="%.4f")})
            downloads("probe-accuracy", table=table, data={**{k: v for k, v in summary.items() if k != "cache"},
                                                           "accuracy": accuracy})

        st.subheader("Export")
        st.markdown("Take this approximated model away: a folder with the kept blocks and the maps as safetensors, "
                    "the config, the image processor or tokenizer and a record of the ranges and maps (`rba.json`), which "
                    "`rba_core.load_compressed(folder)` rebuilds as a plain PyTorch module without ever loading "
                    "pickled code; or the same forward pass as one ONNX file for other runtimes.")
        with errors():  # a failed export must not hide the results above
            _export(sel, ranges, kind, params)
