"""Showing results and failures: one-sentence errors, not-computed notices, tables, CSV/JSON downloads."""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from typing import Iterator, Sequence

import pandas as pd
import streamlit as st

from rba_core.errors import RBAError
from rba_core.store.plots import state_labels
from rba_core.store.results import Result, plain

log = logging.getLogger(__name__)
MISSING = "—"  # what a table cell without a value shows


class NotComputed(Exception):
    """The result is not in the on-disk cache yet; the page offers a Compute button. ``notes`` are what
    looking for it found on the way (a damaged entry, removed: the CLI's warning sentence)."""

    def __init__(self, notes: Sequence[str] = ()):
        super().__init__("These results are not computed yet; press Compute first.")
        self.notes = list(notes)


class Waiting(Exception):
    """The selection cannot be shown yet because something it needs is being prepared in the background (a
    GGUF model being dequantised); the page says so with ``st.info`` and continues by itself when it is ready."""


def _one_sentence(text: str, limit: int = 300) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def sentence(exc: Exception) -> str:
    """The one sentence a page shows for ``exc``: the user's mistake as the core words it, or a bug report."""
    if isinstance(exc, (RBAError, NotComputed)):
        return _one_sentence(str(exc))
    return _one_sentence(f"Something unexpected went wrong ({type(exc).__name__}: {exc}); "
                         "the details are in the server log — please report them.")


def not_computed(exc: NotComputed, message: str) -> None:
    """Say that results are not stored yet (``message``), after any damaged entry found while looking."""
    for note in exc.notes:
        st.warning(note)
    st.info(message)


@contextmanager
def errors() -> Iterator[None]:
    """Show any error raised in the block as one ``st.error`` sentence, never a traceback (a :class:`Waiting`
    notice as ``st.info``)."""
    try:
        yield
    except Waiting as exc:
        st.info(str(exc))
    except Exception as exc:
        if not isinstance(exc, (RBAError, NotComputed)):  # a bug: the details go to the log
            log.exception("unexpected error in a dashboard page")
        for note in getattr(exc, "notes", []):
            st.warning(note)
        st.error(sentence(exc))


def dataframe(frame: pd.DataFrame, **kwargs) -> None:
    """A table without its index, where a missing value reads "—" (never "None")."""
    st.dataframe(frame, hide_index=True, placeholder=MISSING, **kwargs)


def to_json(data) -> str:
    """A result (its CLI JSON) or a plain dict as strict JSON text."""
    return json.dumps(data.to_json() if isinstance(data, Result) else plain(data), indent=1)


def matrix_table(matrix, corner: str = "block output") -> pd.DataFrame:
    """An (L+1, L+1) matrix over block outputs as a table with labelled rows and columns."""
    labels = state_labels(len(matrix))
    return pd.DataFrame(matrix, index=labels, columns=labels).rename_axis(corner).reset_index()


def result_part(results: dict, *keys: str) -> dict:
    """Some entries of an analysis, with what identifies it (model, dataset, n, seed), for a download."""
    return {k: results[k] for k in ("model", "dataset", "n", "seed", *keys)}


def file_name(name: str) -> str:
    """``name`` as a safe file name (datasets and models may be folder paths)."""
    return re.sub(r"[^\w.-]+", "_", name).strip("_")


def file_download(label: str, content: str | bytes, name: str, mime: str, at=st) -> None:
    """One download button that does not rerun the page; its key is the file name."""
    at.download_button(label, content, name, mime, key=f"download-{name}", on_click="ignore",
                       icon=":material/download:")


def downloads(name: str, table: pd.DataFrame | str | None = None, data: dict | None = None,
              markdown: str | None = None, of: str | None = None) -> None:
    """Download buttons (CSV for a table or CSV text, Markdown text, JSON for a result) that do
    not rerun the page; ``of`` names what they hold when a page shows several (e.g. the dataset)."""
    name = file_name(name)
    suffix = f" · {of}" if of else ""
    files = []
    if table is not None:
        csv = table if isinstance(table, str) else table.to_csv(index=False)
        files.append((f"Download CSV{suffix}", csv, f"{name}.csv", "text/csv"))
    if markdown is not None:
        files.append((f"Download Markdown{suffix}", markdown, f"{name}.md", "text/markdown"))
    if data is not None:
        files.append((f"Download JSON{suffix}", to_json(data), f"{name}.json", "application/json"))
    row = st.container(horizontal=True)  # buttons as wide as their labels, side by side
    for file in files:
        file_download(*file, at=row)
