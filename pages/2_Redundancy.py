"""Redundancy page: Block Redundancy per block, fit residual of every range, ranked candidate ranges,
and a measured search that checks the cheap scores against the measured error."""

import json
from dataclasses import asdict

import pandas as pd
import streamlit as st

from pages._ui.compute import analysis, pass_meta, run_search, start_button
from pages._ui.show import dataframe, downloads, errors, matrix_table, result_part
from pages._ui.selection import BOUND, eval_samples, map_choice, sidebar
from rba_core.passes.approx import paper_notation
from rba_core.store.plots import POOLED, br_formula, redundancy_bars, residual_heatmap
from rba_core.ranking import rank_ranges, suggested_removed, top_blocks
from rba_core.measures.scores import SCORES, score_title

BUDGETS = {"blocks": "blocks to remove", "params": "parameters at most", "latency": "latency at most"}
KEPT_SEARCHES = 4  # results per session (each holds every candidate)

st.set_page_config(page_title="Redundancy · RBA Explorer", page_icon=":material/bar_chart:", layout="wide")
st.title("Which blocks are redundant")


def _budget(results: dict, blocks: int, at) -> dict:
    """The search budget from its widgets: ``blocks``, ``max_params`` or ``max_latency_ms``."""
    budget = at[0].selectbox("Budget", list(BUDGETS), format_func=BUDGETS.get, key="search_budget", **BOUND)
    if budget == "blocks":
        return {"blocks": int(at[1].number_input("Blocks to remove", min_value=1, max_value=blocks,
                                                 value=suggested_removed(blocks), key="search_blocks", **BOUND))}
    if budget == "params":
        original = pass_meta(results)["num_params"]
        share = at[1].number_input("Parameters at most, % of the original", min_value=1.0, max_value=100.0,
                                   value=75.0, step=5.0, key="search_params", **BOUND,
                                   help=f"The original model has {original:,} parameters; the maps T count.")
        return {"max_params": int(original * share / 100)}
    return {"max_latency_ms": float(at[1].number_input(
        "Latency at most, ms per image", min_value=0.0, value=100.0, format="%.4g", key="search_latency", **BOUND,
        help="Estimated from the measured time of each stage on this machine; the original model's estimate "
             "shows with the results."))}


def _plan(results: dict) -> str:
    """The token statistics a pass kept, in words: "windows of 2 blocks", "all pairs"."""
    stats = results.get("stats") or {}
    window = stats.get("window")
    return f"windows of {window} block{'s' if window != 1 else ''}" if window else "all pairs"


def _spearman(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _show_agreement(agreement: dict) -> None:
    """Which cheap score predicts the measured ranking: Spearman ρ of each over the candidates it covers."""
    st.markdown("**Which cheap score predicts the measured ranking**: Spearman ρ between each score and the "
                "measured MSE, over the candidates the score covers (Block Influence scores one block, angular "
                "distance a window of n blocks). Every score grows with the change the removed blocks make, so ρ "
                "near 1 means it orders the candidates as measured; — : fewer than 3 candidates.")
    dataframe(pd.DataFrame([{"cheap score": score_title(name), "Spearman ρ": value["spearman"],
                             "candidates": value["candidates"]}
                            for name, value in sorted(agreement.items(), key=lambda kv: -(-2 if kv[1]["spearman"] is None else kv[1]["spearman"]))]),
              column_config={"Spearman ρ": st.column_config.NumberColumn(format="%.2f")})


def _show_search(result: dict) -> None:
    """Spearman correlations of the cheap scores with the measured MSE, then the ranked candidates."""
    cols = st.columns(3)
    scores = (("block_redundancy", "Block Redundancy"), ("fit_residual", "fit residual"))
    for col, (name, score) in zip(cols, scores):
        col.metric(f"Spearman ρ · {score}", _spearman(result["spearman"][name]),
                   help=f"Spearman correlation, over the candidates, between the {score} score and the measured MSE.")
    cols[2].metric("Candidates measured", f"{result['evaluated']} of {result['considered']}")
    st.markdown("A ρ near 1 means that cheap score, free from the one pass, already orders the candidates as the "
                "measured error does, so it is enough to choose; a lower ρ means measure before choosing "
                "(— : fewer than 3 candidates).")
    for note in result["notes"]:
        st.warning(note)
    if result.get("score_agreement"):
        _show_agreement(result["score_agreement"])
    table = pd.DataFrame([{
        "rank": rank, "range (ours)": row["range"], "paper notation": row["paper"],
        "blocks removed": row["removed_blocks"], "params": row["params"],
        "ms/image (est.)": row["latency_ms_per_image_estimate"], "final MSE": row["mse_final"],
        "BR score": row["block_redundancy_score"], "residual score": row["fit_residual_score"],
        **({"accuracy %": 100 * row["accuracy"]["approximated"]["mean"],
            "skip accuracy %": 100 * row["accuracy"]["skip"]["mean"]} if "accuracy" in row else {}),
    } for rank, row in enumerate(result["candidates"], start=1)])
    dataframe(table, column_config={
        "params": st.column_config.NumberColumn(format="localized"),
        **{name: st.column_config.NumberColumn(format="%.4g") for name in (
            "ms/image (est.)", "final MSE", "BR score", "residual score")},
        **{name: st.column_config.NumberColumn(format="%.2f") for name in ("accuracy %", "skip accuracy %")}})
    original = result["original"]
    st.caption(f"Lowest measured MSE first, on {result['eval_n']} test samples. The original model: "
               f"{original['params']:,} parameters, about {original['latency_ms_per_image_estimate']:.3g} ms per "
               "sample (estimated). BR score = −Σ BR(k) over the removed blocks (Block Redundancy); residual score = "
               "the sum of the ranges' relative fit residuals; lower is better for both.")
    downloads(f"search-{result['model']}-{result['dataset']}", table=table, data=result)


with errors():
    sel = sidebar()
    results = analysis(sel)
    if results:
        redundancy, residual, blocks = results["block_redundancy"], results["fit_residual"], results["num_blocks"]

        st.subheader("Block Redundancy")
        pooling = results.get("pooling") or "first"
        symbol, pooled = POOLED[pooling]
        st.markdown(f"{br_formula(pooling)} over samples and dimensions (the paper's Figure 3), where {symbol}_k is "
                    f"{pooled} of block k's output: the closer to zero, the less block k changes that vector.")
        top_k = st.number_input("Highlight the k most redundant blocks", min_value=1, max_value=blocks,
                                value=min(3, blocks), key="top_k", width=320, **BOUND)
        top = top_blocks(redundancy, int(top_k))
        st.plotly_chart(redundancy_bars(redundancy, int(top_k), pooling), key="br")
        downloads("block-redundancy", data=result_part(results, "block_redundancy"),
                  table=pd.DataFrame({"block": range(1, blocks + 1), "block_redundancy": redundancy,
                                      "highlighted": [k in top for k in range(1, blocks + 1)]}))

        if results.get("block_influence") is not None and results.get("pooling") == "last":  # language models
            st.subheader("Cheap scores side by side")
            st.markdown("Three cheap scores of each block from the same pass: **Block Redundancy** on the pooled "
                        "vector (above) and on every real token, **Block Influence** (ShortGPT: mean 1 − cos of "
                        "each token before and after the block; low = redundant) and **angular distance** "
                        "(PruneMe: arccos(cos)/π between block outputs l and l+n of the pooled vector; low = the "
                        "n blocks after l change little).")
            every_token = results["block_redundancy_all_tokens"]
            per_block = {score.title(): results.get(name) for name, score in SCORES.items() if not score.windowed}
            table = pd.DataFrame({"block": list(range(1, blocks + 1)),
                                  **{k: v for k, v in per_block.items() if isinstance(v, list) and len(v) == blocks}})
            dataframe(table)
            if not every_token:
                st.caption(f"Block Redundancy on every token is not computed for this pass: it needs the statistics "
                           f"of consecutive block outputs, and the pass kept {_plan(results)} (choose all pairs or "
                           "windows of 1 block under Token statistics in the sidebar).")
            for n, values in (results["angular_distance"] or {}).items():
                st.caption(f"Angular distance of windows of n = {n} blocks (output l to output l+{n}):")
                dataframe(pd.DataFrame({"window": [f"{l}→{l + int(n)}" for l in range(len(values))],
                                        "angular distance": values}))
            downloads("block-scores", table=table, data=result_part(results, "block_influence", "angular_distance"))

        st.subheader("Fit residual of every range i→j")
        st.markdown("Relative residual ‖hs[i]·T − hs[j]‖² / ‖hs[j]‖² of the least-squares map T that "
                    "replaces blocks i+1..j, from the token statistics of the same pass (no extra forward "
                    "pass). Lower is easier to approximate; blank cells are not ranges (i ≥ j).")
        st.plotly_chart(residual_heatmap(residual), key="residual")
        downloads("fit-residual", table=matrix_table(residual, corner="from \\ to"),
                  data=result_part(results, "fit_residual"))

        st.subheader("Candidate ranges")
        removed = st.number_input("Blocks removed", min_value=1, max_value=blocks, value=suggested_removed(blocks),
                                  key="removed", width=320, **BOUND)
        ranked = rank_ranges(residual, int(removed))
        table = pd.DataFrame([{
            "rank": rank, "range (ours)": f"{c.start}→{c.end}",
            "removed blocks": ", ".join(map(str, c.removed_blocks)),
            "paper notation": paper_notation((c.start, c.end)), "fit residual": c.residual,
        } for rank, c in enumerate(ranked, start=1)])
        dataframe(table, column_config={"fit residual": st.column_config.NumberColumn(format="%.4g")})
        window = (results.get("stats") or {}).get("window")
        if not ranked and window and window != int(removed):
            st.info(f"No candidate ranges: this pass kept {_plan(results)}, which give a fit residual only for "
                    f"ranges removing {window} blocks; set Blocks removed to {window}, or choose all pairs under "
                    "Token statistics in the sidebar.")
        st.caption("Ours: range i→j removes blocks i+1..j; the paper's tables write the same range as "
                   "\"i−1 j−1\" in 0-indexed block outputs. Try one on the Approximate page.")
        downloads(f"candidates-{int(removed)}-blocks", table=table, data={
            **result_part(results), "removed_blocks": int(removed), "candidates": table.to_dict(orient="records")})

        st.subheader("Measured search")
        st.markdown("The scores above are free; this measures. Every range i→j (and, with pairs, every two ranges "
                    "with a kept block between them) that fits the budget is ranked by its **measured** "
                    "final-representation MSE on the evaluation samples: the original model runs once keeping every "
                    "block output, then each candidate runs only its map and the blocks after it.")
        cols = st.columns(4, vertical_alignment="bottom")
        budget = _budget(results, blocks, cols)
        pairs = cols[2].checkbox("Also pairs of ranges", key="search_pairs", help="Two ranges with at least one "
                                 "kept block between them; many more candidates.", **BOUND)
        probe_top = int(cols[3].number_input("Train the probe for the best k", min_value=0, max_value=20, value=3,
                                             key="search_probe", **BOUND))
        cols = st.columns(4)
        kind, params = map_choice(cols[0], cols[1])
        eval_n = eval_samples(cols[2])
        spec = json.dumps([sel.model, sel.dataset, sel.n, sel.seed, eval_n, budget, pairs, probe_top, kind, asdict(params)])
        searched = st.session_state.setdefault("_searched", {})
        if start_button("Run the measured search", key="search", type="primary", help="Reuses the stored passes; "
                        "runs the original model once over the evaluation samples, then every candidate."):
            searched[spec] = run_search(sel, eval_n, budget, pairs, probe_top, kind, params)
            while len(searched) > KEPT_SEARCHES:
                searched.pop(next(iter(searched)))
        if spec in searched:
            _show_search(searched[spec])
        else:
            st.info("Not searched yet with these settings: press Run the measured search.")
