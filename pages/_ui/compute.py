"""Running the core from a page: cached models and results, Compute with a progress bar and ETA.

Results live in the core's on-disk cache; ``stored_*`` read them (never running a model) and are
memoised per process with ``st.cache_data`` keyed on strings and ints only. ``run_*`` do the work
inside ``st.status`` with a progress bar and an ETA. No mutable state is kept in module globals.
"""

from __future__ import annotations

import io
import json
import tempfile
import threading
import time
import zipfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Sequence

import streamlit as st

# transformers resolves its classes lazily and that is not thread-safe, while Streamlit may run two
# script threads at once (fast reruns, several tabs). Resolving them here, while this module is
# imported, happens once: Python's per-module import lock makes other threads wait for it.
from rba_core.models import preload  # noqa: E402

preload()

from rba_core.analysis import analysis_results, approximate
from rba_core.approx import approximate_encoder
from rba_core.cache import Cache, cache_root
from rba_core.export import ONNX, RECORD, save_compressed
from rba_core.extract import extract
from rba_core.maps import MapParams
from rba_core.models import Encoder, load_encoder, model_info
from rba_core.search import search
from rba_core.table import table

from pages._ui.selection import Selection, on_disk


class NotComputed(Exception):
    """The result is not in the on-disk cache yet; the page offers a Compute button."""


def _refuse() -> Encoder:
    raise NotComputed


@st.cache_resource
def _loading_lock() -> threading.Lock:
    """One process-wide lock: transformers imports per-family modules lazily while loading."""
    return threading.Lock()


@st.cache_resource(max_entries=2, show_spinner="Loading the model…")
def encoder(model: str) -> Encoder:
    """One loaded model per process, shared read-only by all sessions (bounded: models are large)."""
    with _loading_lock():
        return load_encoder(model)


@st.cache_data(max_entries=32, show_spinner=False)
def num_blocks(model: str) -> int:
    """L, from the model's config alone."""
    with _loading_lock():
        return model_info(model).num_blocks


@st.cache_data(max_entries=32, show_spinner=False)
def unit(dataset: str) -> str:
    """What the dataset's samples are called: "images" or "texts" (opening the dataset's labels only)."""
    from rba_core.data import open_dataset

    return open_dataset(dataset, "train").unit


def _params(params: str) -> MapParams:
    return MapParams(**json.loads(params))


def params_key(params: MapParams) -> str:
    """A map's hyperparameters as text, for the functions cached on strings."""
    return json.dumps(asdict(params), sort_keys=True)


@st.cache_data(max_entries=16, show_spinner="Reading stored results…")
def stored_analysis(model: str, dataset: str, n: int, seed: int, cache_dir: str) -> dict:
    """The ``analyze`` results from the disk cache; raises :class:`NotComputed` (not memoised) on a miss."""
    return analysis_results(extract(model, dataset, n, seed, "train", cache=Cache(cache_dir), encoder=_refuse))


@st.cache_data(max_entries=16, show_spinner="Reading stored results…")
def stored_approximation(model: str, dataset: str, fit_n: int, eval_n: int, seed: int, ranges: str,
                         kind: str, params: str, probe: bool, cache_dir: str) -> dict:
    """The ``approximate`` results from the disk cache (``ranges`` and the map's ``params`` as JSON)."""
    return approximate(model, dataset, fit_n, eval_n, seed, json.loads(ranges), kind, map_params=_params(params),
                       probe=probe, cache=Cache(cache_dir), encoder=_refuse)


def _progress_bar(unit: Callable[[], str] = lambda: "samples") -> Callable[[int, int], None]:
    """A progress callback drawing a bar with items done (``unit()`` names them), speed and ETA;
    restarts on a new stage."""
    bar = st.progress(0.0, text="Starting…")
    clock = {"began": time.perf_counter(), "last": 0}

    def update(done: int, total: int) -> None:
        if done < clock["last"]:  # a new stage started counting from zero
            clock["began"] = time.perf_counter()
        clock["last"] = done
        elapsed = time.perf_counter() - clock["began"]
        speed = f" · {done / elapsed:.1f} {unit()}/s · about {elapsed / done * (total - done):.0f} s left" \
            if done and elapsed > 0 else ""
        bar.progress(min(done / max(total, 1), 1.0), text=f"{done}/{total} {unit()}{speed}")

    return update


def run_analysis(sel: Selection) -> None:
    """The streaming pass for ``sel`` (or a cache hit), inside ``st.status``."""
    with st.status(f"Computing {sel.model} on {sel.dataset} (n={sel.n}, seed={sel.seed})…",
                   expanded=True) as status:
        began = time.perf_counter()
        ex = extract(sel.model, sel.dataset, sel.n, sel.seed, "train", cache=Cache(),
                     progress=_progress_bar(lambda: unit(sel.dataset)), encoder=lambda: encoder(sel.model))
        _opened(sel)
        for note in ex.notes:
            st.warning(note)
        status.update(state="complete", expanded=bool(ex.notes), label=(
            f"Cache hit: results for this selection were already stored (key {ex.key[:12]}…); "
            "the model was not run." if ex.hit else
            f"Computed {ex.num_blocks} blocks on {sel.n} {unit(sel.dataset)} in {time.perf_counter() - began:.1f} s "
            f"and stored them (key {ex.key[:12]}…)."))


def _opened(sel: Selection) -> None:
    """Remember, for this session, that ``sel``'s dataset is open (downloaded if it had to be)."""
    opened = st.session_state.setdefault("_opened", [])
    if repr(sel) not in opened:
        opened.append(repr(sel))


def may_read(sel: Selection) -> bool:
    """Whether stored results may be looked up without a click: looking opens the dataset, which
    for a hub dataset may mean downloading it, so that waits until this session pressed Compute."""
    return on_disk(sel.dataset) or repr(sel) in st.session_state.get("_opened", [])


def analysis(sel: Selection, key: str = "compute", label: str = "Compute") -> dict | None:
    """The analysis for ``sel``: stored results at once, else a Compute button; None until computed."""
    clicked = st.button(label, key=key, type="primary",
                        help="One forward pass over the n sampled images or texts (skipped when already stored).")
    if clicked:
        run_analysis(sel)
    elif not may_read(sel):
        st.info(f"Press {label} to compute {sel.model} on {sel.dataset} (n={sel.n}, seed={sel.seed}), or to "
                "load it if it is stored; the dataset comes from the hub and may be downloaded first.")
        return None
    try:
        results = stored_analysis(sel.model, sel.dataset, sel.n, sel.seed, str(cache_root()))
    except NotComputed:
        st.info(f"{sel.model} on {sel.dataset} (n={sel.n}, seed={sel.seed}) is not computed yet: "
                f"press {label}.")
        return None
    if not clicked:
        st.caption(f"Loaded from the cache (computed earlier, key {results['cache']['key'][:12]}…); "
                   "the model was not run.")
    return results


def _stage(status, stage: str) -> None:
    st.write(stage)
    status.update(label=stage)


def run_approximation(sel: Selection, eval_n: int, ranges: list[tuple[int, int]], kind: str,
                      params: MapParams, probe: bool) -> None:
    """Fit the maps and evaluate the approximated model (cached stages are skipped), in ``st.status``."""
    with st.status("Approximating…", expanded=True) as status:
        progress = _progress_bar()
        began = time.perf_counter()
        approximate(sel.model, sel.dataset, sel.n, eval_n, sel.seed, ranges, kind, map_params=params, probe=probe,
                    cache=Cache(), progress=progress, encoder=lambda: encoder(sel.model),
                    on_stage=lambda stage: _stage(status, stage))
        _opened(sel)
        status.update(state="complete", expanded=False,
                      label=f"Done in {time.perf_counter() - began:.1f} s (stored for next time).")


def approximation(sel: Selection, eval_n: int, ranges: list[tuple[int, int]], kind: str, params: MapParams,
                  probe: bool) -> dict:
    """Stored approximation results; raises :class:`NotComputed` when they are not stored yet."""
    return stored_approximation(sel.model, sel.dataset, sel.n, eval_n, sel.seed, json.dumps(ranges), kind,
                                params_key(params), probe, str(cache_root()))


@st.cache_data(max_entries=32, show_spinner=False)
def stored_meta(key: str, cache_dir: str) -> dict:
    """What a stored pass recorded about its model (``num_params``, ``block_params``, ...)."""
    entry = Cache(cache_dir).get(key)
    if entry is None:
        raise NotComputed
    return entry.meta


def pass_meta(results: dict) -> dict:
    """The stored metadata of the pass behind an analysis (its ``cache`` key), read without running anything."""
    return stored_meta(results["cache"]["key"], str(cache_root()))


@st.cache_data(max_entries=8, show_spinner="Reading stored results…")
def stored_table(model: str, datasets: tuple[str, ...], fit_n: int, eval_n: int, seed: int, rows: str, kind: str,
                 params: str, cache_dir: str) -> dict:
    """The ``table`` results from the disk cache (``params`` as JSON); :class:`NotComputed` on a missing row."""
    return table(model, list(datasets), fit_n, eval_n, seed, rows, kind, map_params=_params(params), cache=Cache(cache_dir),
                 encoder=_refuse)


def table_results(sel: Selection, datasets: Sequence[str], eval_n: int, rows: str, kind: str, params: MapParams) -> dict:
    """Stored table rows for the sidebar's model, n and seed; raises :class:`NotComputed` until computed."""
    return stored_table(sel.model, tuple(datasets), sel.n, eval_n, sel.seed, rows, kind, params_key(params),
                        str(cache_root()))


def run_table(sel: Selection, datasets: Sequence[str], eval_n: int, rows: str, kind: str, params: MapParams) -> None:
    """Every row of the table (cached rows are read, not recomputed), in ``st.status``."""
    with st.status("Computing the table…", expanded=True) as status:
        began = time.perf_counter()
        result = table(sel.model, list(datasets), sel.n, eval_n, sel.seed, rows, kind, map_params=params, cache=Cache(),
                       progress=_progress_bar(), encoder=lambda: encoder(sel.model),
                       on_stage=lambda stage: _stage(status, stage))
        for dataset in datasets:
            _opened(replace(sel, dataset=dataset))
        status.update(state="complete", expanded=False, label=f"Computed {len(result['rows'])} rows in "
                      f"{time.perf_counter() - began:.1f} s (stored for next time).")


def run_search(sel: Selection, eval_n: int, budget: dict, pairs: bool, probe_top: int, kind: str,
               params: MapParams) -> dict:
    """The measured search (``budget``: search's ``blocks``, ``max_params`` or ``max_latency_ms``),
    in ``st.status``. Not cached on disk: it is cheap next to the passes it reuses."""
    samples = unit(sel.dataset)
    now = {"unit": samples}

    def stage(text: str) -> None:
        # The search counts candidates, the passes and probes before and after it count samples.
        now["unit"] = "candidate runs" if text.startswith("Measured search") else samples
        _stage(status, text)

    with st.status("Searching…", expanded=True) as status:
        result = search(sel.model, sel.dataset, sel.n, eval_n, sel.seed, **budget, pairs=pairs, probe_top=probe_top,
                        kind=kind, map_params=params, cache=Cache(), progress=_progress_bar(lambda: now["unit"]),
                        on_stage=stage, encoder=lambda: encoder(sel.model))
        _opened(sel)
        status.update(state="complete", expanded=False, label=f"Measured {result['evaluated']} candidates on "
                      f"{eval_n} {samples} in {result['seconds']['total']:.1f} s.")
    return result


def _zip(folder: Path) -> bytes:
    """The folder as a zip holding one top-level folder of the same name (stored: weights barely compress)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, f"{folder.name}/{path.name}")
    return buffer.getvalue()


def run_export(sel: Selection, ranges: list[tuple[int, int]], kind: str, params: MapParams, name: str,
               onnx: bool) -> dict:
    """The approximated model of the dashboard (maps fitted from the stored statistics) written by
    :func:`rba_core.export.save_compressed` in a temporary folder, in ``st.status``. Returns
    ``content`` (the folder as a zip, or with ``onnx`` the ONNX file), ``sizes`` (bytes on disk per
    file) and ``record`` (rba.json)."""
    what = "the ONNX file" if onnx else "the compressed model"
    with st.status(f"Building {what}…", expanded=True) as status:
        began = time.perf_counter()
        _stage(status, "Fitting the maps from the stored token statistics")
        fit = extract(sel.model, sel.dataset, sel.n, sel.seed, "train", cache=Cache(), progress=_progress_bar(),
                      encoder=lambda: encoder(sel.model))
        _opened(sel)
        model = encoder(sel.model)
        net = approximate_encoder(model, fit.stats(), ranges, kind, params)
        _stage(status, "Exporting to ONNX (tracing the model)" if onnx else
               "Writing the safetensors weights, config and record")
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_compressed(net, Path(tmp) / name, onnx=onnx)
            sizes = {path.name: path.stat().st_size for path in sorted(folder.iterdir())}
            content = (folder / ONNX).read_bytes() if onnx else _zip(folder)
            record = json.loads((folder / RECORD).read_text())
        status.update(state="complete", expanded=False, label=f"Built {what} in {time.perf_counter() - began:.1f} s.")
    return {"content": content, "sizes": sizes, "record": record}
