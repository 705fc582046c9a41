"""Redundancy page: Block Redundancy per block, fit residual of every range, ranked candidate ranges."""

import pandas as pd
import streamlit as st

from pages._ui.compute import analysis
from pages._ui.show import downloads, errors, matrix_table, result_part
from pages._ui.selection import BOUND, sidebar
from rba_core.approx import paper_notation
from rba_core.plots import redundancy_bars, residual_heatmap
from rba_core.ranking import rank_ranges, suggested_removed, top_blocks

st.set_page_config(page_title="Redundancy · RBA Explorer", page_icon=":material/bar_chart:", layout="wide")
st.title("Which blocks are redundant")

with errors():
    sel = sidebar()
    results = analysis(sel)
    if results:
        redundancy, residual, blocks = results["block_redundancy"], results["fit_residual"], results["num_blocks"]

        st.subheader("Block Redundancy")
        st.markdown("BR(k) = −mean((cls_k − cls_{k−1})²) over samples and dimensions (the paper's Figure 3): "
                    "the closer to zero, the less block k changes the CLS representation.")
        top_k = st.number_input("Highlight the k most redundant blocks", min_value=1, max_value=blocks,
                                value=min(3, blocks), key="top_k", width=320, **BOUND)
        top = top_blocks(redundancy, int(top_k))
        st.plotly_chart(redundancy_bars(redundancy, int(top_k)), key="br")
        downloads("block-redundancy", data=result_part(results, "block_redundancy"),
                  table=pd.DataFrame({"block": range(1, blocks + 1), "block_redundancy": redundancy,
                                      "highlighted": [k in top for k in range(1, blocks + 1)]}))

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
        st.dataframe(table, hide_index=True, column_config={
            "fit residual": st.column_config.NumberColumn(format="%.4g")})
        st.caption("Ours: range i→j removes blocks i+1..j; the paper's tables write the same range as "
                   "\"i−1 j−1\" in 0-indexed block outputs. Try one on the Approximate page.")
        downloads(f"candidates-{int(removed)}-blocks", table=table, data={
            **result_part(results), "removed_blocks": int(removed), "candidates": table.to_dict(orient="records")})
