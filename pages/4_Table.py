"""Table page: the paper's Tables 1 and 2 for the sidebar's model on one or two datasets."""

from dataclasses import replace

import pandas as pd
import streamlit as st

from pages._ui.compute import may_read, num_blocks, run_plans, run_table, start_button, table_results, unit
from pages._ui.selection import BOUND, DATASET_FOLDER, DATASET_OPTIONS, eval_samples, map_choice, pick, sidebar
from pages._ui.show import NotComputed, dataframe, downloads, errors, not_computed
from rba_core.store.plots import plan_curves
from rba_core.store.results import head_columns
from rba_core.ops.table import PRESETS, parse_rows, render, row_label

CUSTOM = "custom"
NONE = "(none)"
ROW_NAMES = {"paper": "paper", "all-consecutive": "all consecutive", CUSTOM: "custom"}
ROWS_HELP = ("paper: Table 1's range 2→6 (the paper's \"1 5\") and Table 2's one-block ranges 1→2 .. L−1→L; "
             "all consecutive: every one-block range i→i+1; custom: your own rows.")

st.set_page_config(page_title="Table · RBA Explorer", page_icon=":material/table_chart:", layout="wide")
st.title("The paper's tables for this model")
st.markdown("Rows like the paper's Tables 1 and 2: the original model, then one row per set of approximated "
            "ranges with the blocks left, the parameters (T included), the final-representation MSE and the "
            "linear probes' accuracy of the approximated model and of the same blocks simply skipped. "
            "**accuracy** is the paper's probe protocol, the one its tables used (one linear layer, Adam, 5 epochs, "
            "mean ± std over seeds 0, 1, 2: about ten optimizer steps, so close rows often differ within its seed "
            "noise); **converged** is logistic regression on standardized features trained to convergence (one "
            "deterministic run), which separates close rows reliably. Each row is the Approximate page's result "
            "for the same settings and shares its cache, so adding rows computes only the new ones. A model with its "
            "own classifier head whose classes match the dataset's adds **head top1** (and top5 above 10 classes): "
            "that head's accuracy on the approximated and skipped models, beside the probes.")


def _frame(result: dict) -> pd.DataFrame:
    """The rows with numeric columns, so that sorting by a column sorts by value; accuracies in %."""
    out = []
    for row in result["rows"]:
        accuracy, skip = row["accuracy"]["approximated"], row["accuracy"]["skip"]
        converged, converged_skip = row["accuracy_converged"]["approximated"], row["accuracy_converged"]["skip"]
        out.append({"dataset": row["dataset"], "range (ours)": row["range"], "paper notation": row["paper"],
                    "blocks left": row["blocks_left"], "params": row["params"], "final MSE": row["mse_final"],
                    "accuracy %": 100 * accuracy["mean"], "accuracy std %": 100 * accuracy["std"],
                    "skip accuracy %": 100 * skip["mean"] if skip else None,
                    "skip std %": 100 * skip["std"] if skip else None,
                    "converged %": 100 * converged["mean"],
                    "converged skip %": 100 * converged_skip["mean"] if converged_skip else None,
                    **head_percent(row)})
    return pd.DataFrame(out)


def head_percent(row: dict) -> dict:
    """The model's own classifier head beside the probes (models with a head matching the dataset's classes)."""
    return {f"{name.replace('_', ' ')} %": None if value == "" else 100 * value
            for name, value in head_columns(row).items()}


with errors():
    sel = sidebar()
    blocks = num_blocks(sel.model)
    cols = st.columns([2, 3], vertical_alignment="bottom")
    preset = cols[0].radio("Rows", [*PRESETS, CUSTOM], format_func=ROW_NAMES.get, horizontal=True,
                           key="table_rows", help=ROWS_HELP, **BOUND)
    spec = preset
    if preset == CUSTOM:
        spec = (cols[1].text_input("Custom rows", key="table_custom", placeholder="2:6,8:10+3:4",
                                   help="I:J removes blocks I+1..J; '+' joins ranges approximated in one model; "
                                        "',' separates rows; the presets may be mixed in (paper,1:3).",
                                   **BOUND) or "").strip()
        if not spec:  # nothing typed yet is not a mistake: say what to type, then wait for it
            st.info("Type the custom rows, for example 2:6,8:10+3:4 (I:J removes blocks I+1..J).")
            st.stop()
    rows = parse_rows(spec, blocks)
    st.caption(f"{len(rows)} rows after the original model, ours (paper's): "
               + ", ".join("{} ({})".format(*row_label(row)) for row in rows) + ".")

    cols = st.columns(4)
    kind, params = map_choice(cols[0], cols[1])
    eval_n = eval_samples(cols[2])
    with cols[3]:
        also = pick("table_also", "Also on a second dataset", [NONE, *DATASET_OPTIONS], DATASET_FOLDER,
                    "/path/to/dataset", "The same rows for the same model, n and seed on another dataset.")
    datasets = [sel.dataset] + ([also] if also and also not in (NONE, sel.dataset) else [])
    st.caption(f"Maps are fitted on the sidebar's n = {sel.n} train {unit(sel.dataset)} (seed {sel.seed}) and "
               f"evaluated on {eval_n} test {unit(sel.dataset)}; {sel.model} has {blocks} blocks.")

    if start_button("Compute the table", key="table-compute", type="primary",
                    help="Every row not stored yet: fit, evaluate and probe the approximated and skipped models."):
        run_table(sel, datasets, eval_n, spec, kind, params)
    try:
        if not all(may_read(replace(sel, dataset=dataset)) for dataset in datasets):
            raise NotComputed
        result = table_results(sel, datasets, eval_n, spec, kind, params)
    except NotComputed as exc:
        result = None
        not_computed(exc, "Not computed yet for these settings: press Compute the table.")
    if result:
        dataframe(_frame(result), height="content", column_config={
            "params": st.column_config.NumberColumn(format="localized"),
            "final MSE": st.column_config.NumberColumn(format="%.4g"),
            **{name: st.column_config.NumberColumn(format="%.2f") for name in (
                "accuracy %", "accuracy std %", "skip accuracy %", "skip std %", "converged %", "converged skip %",
                "head top1 %", "skip head top1 %", "head top5 %", "skip head top5 %")}})
        st.caption("Click a column header to sort. Ours: range i→j removes blocks i+1..j; the paper writes it "
                   "\"i−1 j−1\" in 0-indexed block outputs (\"emb\" for the embedding output). The downloads "
                   "are what `python -m rba_core table` writes for the same settings.")
        downloads(f"table-{sel.model}-{'-'.join(datasets)}", table=render(result, "csv"),
                  markdown=render(result, "md"), data=result)

    st.subheader("Cutting to a budget")
    st.markdown("Compression plans for the sidebar's model: blocks removed step by step, each step measured on the "
                "evaluation samples (perplexity for a language model on its text, else the final-representation MSE "
                "against the original). **greedy** removes the block whose measured effect is smallest, then fits "
                "the next map on the cut model; **window** the best contiguous window; **shortgpt** skips the "
                "blocks of lowest Block Influence. `python -m rba_core plan` computes the same.")
    cols = st.columns(3, vertical_alignment="bottom")
    remove = int(cols[0].number_input("Blocks to remove", min_value=1, max_value=max(blocks - 1, 1),
                                      value=min(2, max(blocks - 1, 1)), key="plan_remove"))
    strategies = cols[1].multiselect("Strategies", ["greedy", "window", "shortgpt"], default=["greedy", "window",
                                     "shortgpt"], key="plan_strategies")
    if start_button("Plan", key="plan-compute", at=cols[2], help="Run every chosen strategy (the fit passes are "
                    "stored; the measurements run again)."):
        st.session_state["plan_results"] = {"for": (sel.model, sel.dataset, sel.n, sel.seed, eval_n, remove, kind),
                                            "plans": run_plans(sel, eval_n, remove, strategies, kind, params)}
    shown = st.session_state.get("plan_results")
    if shown and shown["for"] == (sel.model, sel.dataset, sel.n, sel.seed, eval_n, remove, kind):
        st.plotly_chart(plan_curves(shown["plans"]))
        dataframe(pd.DataFrame([{"strategy": name, "ranges": ", ".join(f"{i}→{j}" for i, j in p["final"]["ranges"]),
                                 p["metric"]: p["final"]["metric"], "same blocks skipped": p["final"]["skip"]["metric"]}
                                for name, p in shown["plans"].items()]), height="content")
