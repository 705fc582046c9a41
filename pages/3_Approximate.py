"""Approximate page: replace block ranges by linear maps and compare with the original model."""

import json
from dataclasses import asdict

import numpy as np
import pandas as pd
import streamlit as st

from pages._ui.compute import (approximation, may_read, num_blocks, run_approximation, run_continuation,
                               run_export, start_button, unit)
from pages._ui.selection import BOUND, Selection, eval_samples, map_choice, sidebar
from pages._ui.show import NotComputed, dataframe, downloads, errors, file_download, file_name, not_computed
from pages._ui.measures import downstream_tasks, head_metrics
from rba_core.passes.approx import paper_notation
from rba_core.maps import validate_ranges
from rba_core.latency import change, describe, measurable
from rba_core.maps import MAPS, MapParams
from rba_core.store.plots import pca_scatter
from rba_core.measures.probe import small_classes_note
from rba_core.projection import shared_pca
from rba_core.ranking import default_ranges, removes_text

MAX_RANGES = 4

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
    if res.get("perplexity"):
        ppl, top1 = res["perplexity"], res["top1_agreement"]
        lm = st.columns(3)
        lm[0].metric("Perplexity, approximated", f"{ppl['approximated']:.4g}", delta_color="inverse",
                     delta=f"{ppl['approximated'] / ppl['original'] - 1:+.1%} (was {ppl['original']:.4g})",
                     help="exp of the mean next-token loss over every position but the first of each evaluation "
                          "window, with the model's own LM head.")
        lm[1].metric("Perplexity, blocks skipped", f"{ppl['skip']:.4g}", delta_color="inverse",
                     delta=f"{ppl['skip'] / ppl['original'] - 1:+.1%}")
        lm[2].metric("Top-1 agreement with the original", f"{top1['approximated']:.1%}",
                     help=f"Share of positions whose most likely next token is the original model's; "
                          f"skipping the blocks: {top1['skip']:.1%}.")
    after, before = latency["approximated"], latency["original"]
    apart = measurable(before, after)  # else the machine's noise is larger than the difference: no arrow, no colour
    cols[3].metric("Latency after, ms per sample", f"{after['median']:.3g} ({after['low']:.3g}–{after['high']:.3g})",
                   delta_color="inverse" if apart else "off", delta_arrow="auto" if apart else "off",
                   delta=f"{change(before, after)} (was {before['median']:.3g})",
                   help="Median and, in brackets, the 25th–75th percentiles of the timed runs; when the two ranges "
                        "overlap the difference is not measurable on this machine now.")
    steady = before["converged"] and after["converged"]
    st.caption(f"Latency per sample on this machine, median (p25–p75) of runs timed after a warm-up, the original "
               f"and the approximated model taking turns on the same {before['images']} evaluation samples: "
               f"original {describe(before)}, approximated {describe(after)}. "
               + ("Both spreads are within the target of "
                  f"{before['target_spread']:.0%} of the median." if steady else
                  f"A spread stayed above the target of {before['target_spread']:.0%} of the median within the "
                  "time budget: the machine was busy, so compare the numbers with care."))


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
    if unit(sel.dataset) == "images" and not MAPS[kind].folds:  # ONNX export: image models, map modules
        choices.append(("onnx", "Build the ONNX file"))
    for what, label in choices:
        if start_button(label, key=f"export-{what}", at=buttons, help="Fits the maps from the stored statistics "
                        "and writes the files (nothing is stored in the cache)."):
            built[what] = {"spec": spec, **run_export(sel, ranges, kind, params, name, onnx=what == "onnx")}
    for what in [w for w, entry in built.items() if entry["spec"] != spec]:
        del built[what]
    if "zip" in built:
        sizes, counts = built["zip"]["sizes"], built["zip"]["record"]["params"]
        plain = "folded" in counts  # maps folded into the weights: a plain Hugging Face checkpoint
        file_download("Download the compressed model (zip)", built["zip"]["content"], f"{name}.zip", "application/zip")
        st.markdown(f"**Size on disk: {_size(sum(sizes.values()))}** ("
                    + ", ".join(f"{file} {_size(size)}" for file, size in sizes.items())
                    + f"); {counts['folded' if plain else 'compressed']:,} parameters instead of "
                    f"{counts['original']:,} (the original's float32 weights alone take {_size(4 * counts['original'])}). "
                    + (f"Unzip, then transformers' `from_pretrained(\"{name}\")`: a plain checkpoint with fewer "
                       "layers, rba_core not needed." if plain else
                       f"Unzip, then `rba_core.load_compressed(\"{name}\")`."))
    if "onnx" in built:
        size = built["onnx"]["sizes"]["model.onnx"]
        file_download("Download the ONNX file", built["onnx"]["content"], f"{name}.onnx", "application/octet-stream")
        st.markdown(f"**Size on disk: {_size(size)}** (model.onnx); input `pixel_values` (batch, 3, H, W) as "
                    "the model's image processor prepares them, output `final` (batch, D).")


def _probe_table(accuracy: dict, converged: dict) -> pd.DataFrame:
    names = {"original": "original model", "approximated": "approximated (maps)", "skip": "skipped (no map)"}
    return pd.DataFrame([{"model": names[k], "accuracy mean": v["mean"], "accuracy std": v["std"],
                          "per seed (0, 1, 2)": ", ".join(f"{a:.4f}" for a in v["per_seed"]),
                          "converged probe accuracy": converged[k]["mean"]}
                         for k, v in accuracy.items()])


def _ranges(blocks: int, count: int) -> list[tuple[int, int]]:
    """The range widgets. Their defaults follow the model: when the block count changes, a range the user
    did not choose (it is not in the URL) starts again from the new model's default."""
    if st.session_state.get("_ranges_for") != blocks:
        for r in range(1, MAX_RANGES + 1):
            st.session_state.pop(f"start{r}", None)
            st.session_state.pop(f"end{r}", None)
        st.session_state["_ranges_for"] = blocks
    defaults = default_ranges(blocks, MAX_RANGES)
    picked = []
    for r in range(1, count + 1):
        default = defaults[min(r, len(defaults)) - 1]
        cols = st.columns([1, 1, 3], vertical_alignment="bottom")
        start = cols[0].number_input(f"Range {r}: start i", value=default[0], key=f"start{r}", **BOUND)
        end = cols[1].number_input(f"Range {r}: end j", value=default[1], key=f"end{r}", **BOUND)
        cols[2].markdown(f"**{start}→{end}** {removes_text((start, end))} · "
                         f"paper's notation: **{paper_notation((start, end))}**")
        picked.append((int(start), int(end)))
    return validate_ranges(picked, blocks)


with errors():
    sel = sidebar()
    blocks = num_blocks(sel.model)
    cols = st.columns(4)
    count = cols[0].number_input("Number of ranges", min_value=1, max_value=MAX_RANGES, value=1,
                                 key="n_ranges", **BOUND)
    kind, params = map_choice(cols[1], cols[2])
    eval_n = eval_samples(cols[3])
    ranges = _ranges(blocks, int(count))
    st.caption(f"{sel.model} has {blocks} blocks (0 ≤ i < j ≤ {blocks}); ranges must not overlap.")

    if start_button("Approximate", key="approximate", type="primary", help="Fits T from the stored token "
                    "statistics (one pass if missing) and runs the approximated model on the evaluation samples."):
        run_approximation(sel, int(eval_n), ranges, kind, params, probe=False)
    try:
        if not may_read(sel):
            raise NotComputed
        res = approximation(sel, int(eval_n), ranges, kind, params, probe=False)
    except NotComputed as exc:
        res = None
        not_computed(exc, "Not computed yet for these settings: press Approximate.")
    if res:
        dataframe(pd.DataFrame([{"range (ours)": f"{r['start']}→{r['end']}",
                                 "removed blocks": ", ".join(map(str, r["removed_blocks"])),
                                 "paper notation": r["paper"]} for r in res["ranges"]]))
        for note in res["notes"]:
            st.warning(note)
        _metrics(res)
        head_metrics(res)  # the model's own classifier head (issue 17)
        final = res["final"]
        pca = shared_pca(final["original"], final["approximated"])
        st.plotly_chart(pca_scatter(pca["original"], pca["approximated"], final["labels"],
                                    final["label_names"], pca["explained"]), key="pca")
        summary = res.to_json()
        downloads("approximation", data=summary, table=pd.DataFrame({
            "label": final["labels"], "pc1 original": pca["original"][:, 0], "pc2 original": pca["original"][:, 1],
            "pc1 approximated": pca["approximated"][:, 0], "pc2 approximated": pca["approximated"][:, 1]}))

        if (np.asarray(final["labels"]) < 0).any():  # a language-model text, or a dataset without labels
            st.caption(f"No linear probes: {sel.dataset} has no labels to classify.")
        else:
            st.subheader("Linear probe accuracy")
            st.markdown(f"A linear classifier trained on the final representations of the n train {unit(sel.dataset)} and "
                        f"tested on the evaluation {unit(sel.dataset)}, for the original model, the approximated one and the same ranges "
                        "simply skipped (the paper's Tables 1–2). Two probes are trained. **The paper's protocol**, "
                        "which the paper's tables used: one linear layer, Adam, 5 epochs, batch 256, seeds 0, 1, 2 "
                        "(mean ± std). It takes only about ten optimizer steps on 512 samples, so differences between "
                        "variants often stay within its seed noise. **The converged probe**: logistic regression on "
                        "standardized features trained to convergence (scikit-learn, lbfgs, C = 1), one deterministic "
                        "run. The first compares with the paper; the second separates the variants reliably.")
            small = small_classes_note(final["labels"], final["label_names"], unit=unit(sel.dataset))
            if small:
                st.warning(small)
            spec = json.dumps([sel.model, sel.dataset, sel.n, sel.seed, int(eval_n), ranges, kind, asdict(params)])
            probed = st.session_state.setdefault("_probed", [])
            if start_button("Train the linear probes", key="probe", help="Both probes on the original, approximated "
                            "and skipped models (the approximated and skipped models also run on the n fit samples)."):
                run_approximation(sel, int(eval_n), ranges, kind, params, probe=True)
                probed.append(spec)
            if spec in probed:
                probe_res = approximation(sel, int(eval_n), ranges, kind, params, probe=True)
                accuracy, converged = probe_res["accuracy"], probe_res["accuracy_converged"]
                table = _probe_table(accuracy, converged)
                dataframe(table, column_config={name: st.column_config.NumberColumn(format="%.4f") for name in (
                    "accuracy mean", "accuracy std", "converged probe accuracy")})
                downloads("probe-accuracy", table=table, data={**{k: v for k, v in summary.items() if k != "cache"},
                                                               "accuracy": accuracy, "accuracy_converged": converged})

        if res.get("perplexity"):
            st.subheader("Continue a prompt")
            st.markdown("The same prompt continued greedily (40 tokens) by the original model, the approximated one "
                        "and the same blocks simply skipped.")
            prompt = st.text_input("Prompt", value="The package provides", key="prompt")
            if start_button("Continue the prompt", key="continue", help="Runs each model 40 times on the "
                            "growing text (a few seconds for small models)."):
                st.session_state["_continued"] = run_continuation(sel, ranges, kind, params, prompt)
            continued = st.session_state.get("_continued")
            if continued:
                for col, (name, text) in zip(st.columns(3), continued.items()):
                    col.markdown(f"**{name}**")
                    col.code(prompt + text, language=None, wrap_lines=True)
            downstream_tasks(sel, ranges, kind, params)  # lm-eval tasks (issue 17)

        st.subheader("Export")
        st.markdown("Take this approximated model away: a folder with the kept blocks and the maps as safetensors, "
                    "the config, the image processor or tokenizer and a record of the ranges and maps (`rba.json`), which "
                    "`rba_core.load_compressed(folder)` rebuilds as a plain PyTorch module without ever loading "
                    "pickled code; or the same forward pass as one ONNX file for other runtimes.")
        with errors():  # a failed export must not hide the results above
            _export(sel, ranges, kind, params)
