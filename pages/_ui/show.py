"""Showing results and failures: one-sentence errors, CSV/JSON downloads, matrix tables."""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from typing import Iterator

import pandas as pd
import streamlit as st

from rba_core.errors import RBAError
from rba_core.plots import state_labels
from rba_core.results import Result, plain

from pages._ui.compute import NotComputed

log = logging.getLogger(__name__)


def _one_sentence(text: str, limit: int = 300) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextmanager
def errors() -> Iterator[None]:
    """Show any error raised in the block as one ``st.error`` sentence, never a traceback."""
    try:
        yield
    except RBAError as exc:
        st.error(_one_sentence(str(exc)))
    except NotComputed:
        st.error("These results are not computed yet; press Compute first.")
    except Exception as exc:  # anything else is a bug: say so in one sentence, details go to the log
        log.exception("unexpected error in a dashboard page")
        st.error(_one_sentence(f"Something unexpected went wrong ({type(exc).__name__}: {exc}); "
                               "the details are in the server log — please report them."))


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
              markdown: str | None = None) -> None:
    """Download buttons (CSV for a table or CSV text, Markdown text, JSON for a result) that do
    not rerun the page."""
    name = file_name(name)
    files = []
    if table is not None:
        csv = table if isinstance(table, str) else table.to_csv(index=False)
        files.append(("Download CSV", csv, f"{name}.csv", "text/csv"))
    if markdown is not None:
        files.append(("Download Markdown", markdown, f"{name}.md", "text/markdown"))
    if data is not None:
        files.append(("Download JSON", to_json(data), f"{name}.json", "application/json"))
    row = st.container(horizontal=True)  # buttons as wide as their labels, side by side
    for file in files:
        file_download(*file, at=row)
