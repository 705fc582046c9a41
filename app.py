"""RBA Explorer home page: what the tool does, the shared sidebar, Compute and a summary.

Start with ``streamlit run app.py``; the other views are the classic ``pages/`` files.
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import streamlit as st  # noqa: E402

from pages._ui import shared  # noqa: E402
from pages._ui.compute import analysis
from pages._ui.show import downloads, errors  # noqa: E402
from pages._ui.selection import sidebar  # noqa: E402
from rba_core.store.plots import redundancy_bars  # noqa: E402
from rba_core.ranking import rank_ranges, suggested_removed, top_blocks  # noqa: E402

st.set_page_config(page_title="RBA Explorer", page_icon=":material/layers:", layout="wide")
st.title("RBA Explorer")
st.markdown(
    "RBA Explorer measures how much each block of a transformer (vision or text) changes its input "
    "(**Block Redundancy**) and how similar the outputs of its blocks are to each other. "
    "It replaces a range of redundant blocks by one closed-form linear map and shows what that "
    "costs in accuracy and saves in parameters and time. "
    "Pick a model and a dataset in the sidebar, press **Compute** for one pass over the sampled "
    "images or texts, then explore the pages on the left.")

with errors():
    sel = sidebar(announce=True)
    processes = 1 if shared.active() else st.number_input(  # a shared demo runs no worker processes
        "Worker processes", min_value=1, max_value=max(os.cpu_count() or 1, 8), value=1, step=1,
        key="processes", help="More than 1 runs the pass data-parallel as that many torchrun processes on this "
        "machine (one GPU each when there are GPUs), with the same result; Stop ends them all. A job run on a "
        "cluster with the same cache folder (RBA_CACHE_DIR) is picked up by Compute without running anything.")
    results = analysis(sel, key="compute-home", processes=int(processes))
    if results:
        blocks = results["num_blocks"]
        cols = st.columns(4)
        cols[0].metric("Blocks L", blocks)
        cols[1].metric("Hidden size D", results["hidden_size"])
        cols[2].metric("Samples n", results["n"])
        removed = suggested_removed(blocks)
        best = rank_ranges(results["fit_residual"], removed)
        cols[3].metric(f"Best range removing {removed} blocks",
                       f"{best[0].start}→{best[0].end}" if best else "—",
                       help="Lowest relative residual of the least-squares map (see Redundancy).")
        top = top_blocks(results["block_redundancy"], 3)
        st.markdown("Most redundant blocks (highest Block Redundancy): "
                    + ", ".join(f"**block {k}**" for k in top) + ".")
        st.plotly_chart(redundancy_bars(results["block_redundancy"], 3), key="home-br")
        for note in results.get("notes", []):
            st.warning(note)
        downloads("analysis", data=results)
    st.markdown("**Similarity**: heatmaps of cosine similarity or linear CKA between all block outputs "
                "(optionally two datasets side by side). **Redundancy**: Block Redundancy per block, the fit "
                "residual of every range i→j and the best candidate ranges. **Approximate**: replace ranges "
                "by linear maps and compare representations, parameters, latency and probe accuracy. **Table**: the "
                "paper's Tables 1–2 for this model. **Cache**: what is stored on disk, and deleting it. Every long "
                "computation has a **Stop** button; a stopped one stores nothing.")
