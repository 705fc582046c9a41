"""Cache page: what is stored on disk (passes and approximated runs), how much room it takes, and deleting it."""

import time

import pandas as pd
import streamlit as st

from pages._ui import shared
from pages._ui.selection import sidebar
from pages._ui.show import Waiting, dataframe, errors
from rba_core.cache import Cache
from rba_core.errors import RBAError

ASKED = "_cache_delete"  # session key: what the user asked to delete, until confirmed or cancelled
KINDS = {"pass": "pass (representations, statistics)", "approximated run": "approximated run",
         "scores": "scores (perplexity, next-token agreement)",
         "range-statistics": "range statistics (float64 Gram blocks and fold statistics of given ranges)",
         "trained map": "trained map (a cosine, mlp or deep-mlp map's tensors and losses)",
         "head-accuracy": "head accuracy (the model's own classifier head: original, approximated, skipped)",
         "fold-statistics": "fold statistics (folded maps: block i's MLP output against hs[i], hs[j])",
         "dequantised GGUF": "dequantised GGUF model (a float32 checkpoint read from the .gguf file once)",
         "damaged": "damaged (recomputed when next needed)"}

st.set_page_config(page_title="Cache · RBA Explorer", page_icon=":material/storage:", layout="wide")
st.title("Stored results")


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def _describe(entry) -> str:
    return f"{entry.key[:12]}… · {KINDS.get(entry.kind, entry.kind)} · {entry.model}" + (
        f" on {entry.dataset}" if entry.dataset else "")


def _confirm(cache: Cache, asked: str, entries: list) -> None:
    """The confirmation of a pending delete (one key, or "all")."""
    what = f"all {len(entries)} stored results ({_size(sum(e.size for e in entries))})" if asked == "all" else \
        f"the stored result {asked[:12]}…"
    st.warning(f"Delete {what}? Deleted results are computed again (running the model) the next time a page "
               "needs them.")
    cols = st.columns([1, 1, 4])
    if cols[0].button("Yes, delete", key="cache-confirm", type="primary"):
        removed = cache.clear() if asked == "all" else int(cache.delete(asked))
        del st.session_state[ASKED]
        st.cache_data.clear()  # results memoised from the deleted entries must not show any more
        st.session_state["_cache_deleted"] = removed
        st.rerun()
    if cols[1].button("Cancel", key="cache-cancel"):
        del st.session_state[ASKED]
        st.rerun()


with errors():
    try:
        sidebar()  # the shared navigation and selection; this page itself needs no selection
    except (RBAError, Waiting):
        pass
    cache = Cache()
    st.markdown(f"Results are stored in **`{cache.root}`** (set `RBA_CACHE_DIR` to move it), one folder per "
                "result, keyed by everything that changes it. A **pass** holds the per-block CLS "
                "representations and token statistics of n images; an **approximated run** the final "
                "representations of an approximated model on the evaluation images, with its measured latency. "
                "A job launched elsewhere (`torchrun`, `srun`, `accelerate launch`; see the README's Scaling out) "
                "that writes to the same folder, e.g. a shared `RBA_CACHE_DIR` on a cluster, shows up here with its "
                "number of **workers**, and every page opens its results as if they had been computed here.")
    deleted = st.session_state.pop("_cache_deleted", None)
    if deleted is not None:
        st.success(f"Deleted {deleted} stored result{'s' if deleted != 1 else ''}.")
    entries = cache.entries()
    total = sum(e.size for e in entries)
    cols = st.columns(2)
    cols[0].metric("Stored results", len(entries))
    cols[1].metric("Total size", _size(total))
    if not entries:
        st.info("Nothing is stored yet: results appear here once a page has computed them.")
    else:
        dataframe(pd.DataFrame([{
            "key": e.key[:12], "kind": KINDS.get(e.kind, e.kind), "model": e.model, "dataset": e.dataset,
            "split": e.split, "n": e.n, "workers": e.workers, "size": _size(e.size),
            "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created))} for e in entries]),
            column_config={"n": st.column_config.NumberColumn(format="%d")})
        asked = st.session_state.get(ASKED)
        if shared.active():  # a shared demo: nobody deletes from the page
            st.info(shared.NO_DELETION)
        elif asked and (asked == "all" or any(e.key == asked for e in entries)):
            _confirm(cache, asked, entries)
        else:
            cols = st.columns([3, 1, 1], vertical_alignment="bottom")
            by_key = {e.key: e for e in entries}
            chosen = cols[0].selectbox("Entry", list(by_key), format_func=lambda k: _describe(by_key[k]),
                                       key="cache-entry")
            if cols[1].button("Delete this entry…", key="cache-delete-one"):
                st.session_state[ASKED] = chosen
                st.rerun()
            if cols[2].button("Delete all…", key="cache-delete-all"):
                st.session_state[ASKED] = "all"
                st.rerun()
