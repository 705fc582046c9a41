"""Running the core from a page: cached models and results, and long work the user can follow and stop.

Results live in the core's on-disk cache; ``stored_*`` read them (never running a model, never waiting
for another session's computation) and are memoised per process with ``st.cache_data`` keyed on
strings and ints only. ``run_*`` do the work inside :func:`_working`: a status box with a progress
bar, an ETA and a Stop button, which ends complete, or in the error state with the error's sentence.

Stop: any widget interaction makes Streamlit stop the running script at its next Streamlit call
(with ``runner.fastReruns``, the default, the new run starts at once while the old one raises
StopException at its next call: here the next progress update, so within about one batch). The
core stores a result only after its loop, so a stopped computation stores nothing, and the key's
single-flight lock is released as the exception unwinds. The Stop button's callback keeps how far
the work got; :func:`start_button` says so on the next run. No mutable state is kept in module globals.
"""

from __future__ import annotations

import io
import os
import json
import tempfile
import threading
import time
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pandas as pd
import streamlit as st

from rba_core.passes.extract import DECODE_WORKERS_ENV

# The server runs many threads; forking it for DataLoader decoding workers could copy a lock some other
# thread holds. Passes started here read ahead with one thread instead, unless the user set the variable.
os.environ.setdefault(DECODE_WORKERS_ENV, "0")

# transformers resolves its classes lazily and that is not thread-safe, while Streamlit may run two
# script threads at once (fast reruns, several tabs). Resolving them here, while this module is
# imported, happens once: Python's per-module import lock makes other threads wait for it.
from rba_core.models import preload  # noqa: E402

preload()

from rba_core.ops.analysis import analyze_run, approximate_run, export_run, fit_range_maps
from rba_core.passes.approx import ApproximatedEncoder, approximate_encoder
from rba_core.cache import Cache, cache_root
from rba_core.store.export import ONNX, RECORD
from rba_core.hub import hub_status, on_disk
from rba_core.data.lm_data import DEFAULT_SEQ_LEN
from rba_core.data import dataset_unit
from rba_core.distributed import run_group
from rba_core.maps import MapParams
from rba_core.models import Encoder, load_encoder, model_info
from rba_core.progress import stage_unit, stopped_sentence
from rba_core.ops.search import SearchPlan, search_run
from rba_core.ops.run import Run
from rba_core.ops.table import table_run
from rba_core.threads import configure_threads

from pages._ui import shared
from pages._ui.selection import Selection
from pages._ui.show import NotComputed, not_computed, sentence


STARTED_BY, PROGRESS, STOPPED = "_started_by", "_progress", "_stopped"  # session-state keys


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
    """What the dataset's samples are called: "images" or "texts"."""
    return dataset_unit(dataset)


def _params(params: str) -> MapParams:
    return MapParams(**json.loads(params))


def params_key(params: MapParams) -> str:
    """A map's hyperparameters as text, for the functions cached on strings."""
    return json.dumps(asdict(params), sort_keys=True)


def _reading(read: Callable[[Cache], dict], cache_dir: str) -> dict:
    """``read(cache)`` on a cache that never waits for another asker; a miss raises :class:`NotComputed`
    carrying what the cache found on the way (a damaged entry is removed on read, so its sentence is
    carried to the page here or never)."""
    cache = Cache(cache_dir, wait=False)
    try:
        return read(cache)
    except NotComputed:
        raise NotComputed(cache.damaged) from None


@st.cache_data(max_entries=16, show_spinner="Reading stored results…")
def stored_analysis(model: str, dataset: str, n: int, seed: int, cache_dir: str, stats_window: int = 0) -> dict:
    """The ``analyze`` results from the disk cache; raises :class:`NotComputed` (not memoised) on a miss."""
    return _reading(lambda cache: analyze_run(Run(model, dataset, n, n, seed, cache=cache, encoder=_refuse),
                                              windows=(), stats_window=stats_window or None), cache_dir)


@st.cache_data(max_entries=16, show_spinner="Reading stored results…")
def stored_approximation(sel: Selection, eval_n: int, ranges: str, kind: str, params: str, probe: bool,
                         cache_dir: str) -> dict:
    """The ``approximate`` results from the disk cache (``ranges`` and the map's ``params`` as JSON)."""
    return _reading(lambda cache: approximate_run(_stored(sel, eval_n, cache), json.loads(ranges), kind,
                                                  _params(params), probe), cache_dir)


def _stored(sel: Selection, eval_n: int, cache: Cache, dataset: str | None = None) -> Run:
    """The run of a selection that reads the cache only (a miss raises :class:`NotComputed`)."""
    return Run(sel.model, dataset or sel.dataset, sel.n, eval_n, sel.seed, cache=cache, encoder=_refuse)


@st.cache_data(max_entries=8, show_spinner="Reading stored results…")
def stored_table(sel: Selection, datasets: tuple[str, ...], eval_n: int, rows: str, kind: str, params: str,
                 cache_dir: str) -> dict:
    """The ``table`` results from the disk cache (``params`` as JSON); :class:`NotComputed` on a missing row."""
    return _reading(lambda cache: table_run(_stored(sel, eval_n, cache, datasets[0]), list(datasets), rows, kind,
                                            _params(params)), cache_dir)


@st.cache_data(max_entries=32, show_spinner=False)
def stored_meta(key: str, cache_dir: str) -> dict:
    """What a stored pass recorded about its model (``num_params``, ``block_params``, ...)."""
    entry = Cache(cache_dir, wait=False).get(key)
    if entry is None:
        raise NotComputed
    return entry.meta


# Long work: a button that starts it, a status box that shows it and can stop it.

def start_button(label: str, key: str, help: str, at=st, **kwargs) -> bool:
    """A button that starts long work; on the run after a Stop of the work it started, it says how far that got."""
    clicked = shared.gate(key, at.button(label, key=key, help=help, **kwargs))  # a shared demo queues it
    stopped = st.session_state.get(STOPPED)
    if stopped and stopped["by"] == key:
        del st.session_state[STOPPED]
        if not clicked:
            at.warning(stopped_sentence(stopped["done"], stopped["total"], stopped["unit"],
                                        waiting=stopped.get("waiting", False)))
    if clicked:
        st.session_state[STARTED_BY] = key
    return clicked


def _stop(by: str) -> None:
    """The Stop button's callback (it runs before the next run): keep how far the stopped work got."""
    progress = st.session_state.get(PROGRESS) or {}
    st.session_state[STOPPED] = {"done": 0, "total": 0, "unit": "samples", **progress, "by": by}


@dataclass
class _Work:
    """What a running computation reports to: its status box, progress callback and cache."""

    status: object
    samples: str = "images"  # what the dataset's samples are called: images or texts
    cache: Cache | None = None
    unit: str = "images"
    progress: Callable[[int, int], None] = field(default=lambda done, total: None)

    def stage(self, text: str) -> None:
        """A new stage: written in the box, named in its label; the progress bar counts its unit."""
        self.unit = stage_unit(text, self.samples)
        st.write(text)
        self.status.update(label=text)

    def wait(self, text: str) -> None:
        """Waiting for the same computation started elsewhere: said like a stage; a Stop now ends only the wait."""
        self.stage(text)
        st.session_state[PROGRESS] = {"done": 0, "total": 0, "unit": self.unit, "waiting": True}


def _progress_bar(work: _Work, by: str) -> tuple[object, Callable[[int, int], None]]:
    """A bar with items done, speed and ETA (restarting on a new stage); each update is also kept in the
    session, for the Stop button's sentence."""
    bar = st.progress(0.0, text="Starting…")
    clock = {"began": time.perf_counter(), "last": 0}

    def update(done: int, total: int) -> None:
        st.session_state[PROGRESS] = {"done": done, "total": total, "unit": work.unit, "waiting": work.cache.waiting}
        if done < clock["last"]:  # a new stage started counting from zero
            clock["began"] = time.perf_counter()
        clock["last"] = done
        elapsed = time.perf_counter() - clock["began"]
        tokens = f" ({done * DEFAULT_SEQ_LEN / elapsed:,.0f} tokens/s)" if work.unit == "windows" and elapsed > 0 else ""
        speed = f" · {done / elapsed:.1f} {work.unit}/s{tokens} · about {elapsed / done * (total - done):.0f} s left" \
            if done and elapsed > 0 else ""
        bar.progress(min(done / max(total, 1), 1.0), text=f"{done}/{total} {work.unit}{speed}")

    return bar, update


@contextmanager
def _working(label: str, samples: str = "images") -> Iterator[_Work]:
    """``st.status`` around one long computation, with a Stop button and a progress bar; it ends in the error
    state, labelled with the error's sentence, when the computation fails (the page shows the error too)."""
    by = st.session_state.get(STARTED_BY, "")
    st.session_state[PROGRESS] = {}
    configure_threads()  # the cores free now (the server is long-lived: planned for each computation)
    with st.status(label, expanded=True) as status:
        stop = st.empty()
        stop.button("Stop", key=f"stop-{by}", on_click=_stop, args=(by,), icon=":material/stop_circle:",
                    help="Stops within about one batch; nothing partial is stored.")
        work = _Work(status, samples, unit=samples)
        work.cache = Cache(on_wait=work.wait)  # another tab or process computing the same: wait, then read
        bar, work.progress = _progress_bar(work, by)
        try:
            with shared.turn(status):  # a shared demo: this session's place in the queue, held while it runs
                yield work
        except Exception as exc:  # not Streamlit's StopException: a stopped run makes no more calls
            stop.empty()
            bar.empty()
            status.update(state="error", expanded=False, label=sentence(exc))
            raise
        stop.empty()


def _request(sel: Selection, work: "_Work", eval_n: int = 0, dataset: str | None = None) -> Run:
    """The :class:`Run` of the sidebar's selection (``eval_n`` evaluation samples; another ``dataset``), working
    in ``work`` with the app's shared model."""
    return Run(sel.model, dataset or sel.dataset, sel.n, eval_n, sel.seed, cache=work.cache, progress=work.progress,
               on_stage=work.stage, encoder=lambda: encoder(sel.model))


def run_analysis(sel: Selection, processes: int = 1) -> None:
    """The streaming pass for ``sel`` (or a cache hit), inside :func:`_working`; with ``processes`` > 1 it
    runs as that many torchrun workers on this machine (rank 0's progress shown), then is read back."""
    with _working(f"Computing {sel.model} on {sel.dataset} (n={sel.n}, seed={sel.seed})…", unit(sel.dataset)) as work:
        began = time.perf_counter()
        grouped = processes > 1 and not _stored_pass(sel, work.cache)
        if grouped:  # the workers compute and store the pass; it is then read back here
            work.stage(f"Running the pass as {processes} worker processes (torchrun) on this machine")
            window = ["--stats-window", str(sel.stats_window)] if sel.stats_window else []
            run_group(["analyze", "--model", sel.model, "--dataset", sel.dataset, "--n", str(sel.n),
                       "--seed", str(sel.seed), *window], processes, work.cache.root, work.progress)
            work.progress(sel.n, sel.n)
        ex = _request(sel, work).extract("train", stats_window=sel.stats_window or None)
        _opened(sel)
        for note in ex.notes:
            st.warning(note)
        by = f" with {processes} worker processes" if grouped else ""
        work.status.update(state="complete", expanded=bool(ex.notes), label=(
            f"Cache hit: results for this selection were already stored (key {ex.key[:12]}…); "
            "the model was not run." if ex.hit and not grouped else
            f"Computed {ex.num_blocks} blocks on {sel.n} {unit(sel.dataset)}{by} in "
            f"{time.perf_counter() - began:.1f} s and stored them (key {ex.key[:12]}…)."))


def _stored_pass(sel: Selection, cache: Cache) -> bool:
    """Whether the sidebar's pass is stored already (read from the cache only)."""
    try:
        _stored(sel, 0, cache).extract("train", stats_window=sel.stats_window or None)
        return True
    except NotComputed:
        return False


def _opened(sel: Selection) -> None:
    """Remember, for this session, that ``sel``'s dataset is open (downloaded if it had to be)."""
    opened = st.session_state.setdefault("_opened", [])
    if repr(sel) not in opened:
        opened.append(repr(sel))


def may_read(sel: Selection) -> bool:
    """Whether stored results may be looked up without a click: looking opens the dataset, which
    for a hub dataset may mean downloading it, so that waits until this session pressed Compute."""
    return on_disk(sel.dataset) or repr(sel) in st.session_state.get("_opened", [])


def analysis(sel: Selection, key: str = "compute", label: str = "Compute", processes: int = 1) -> dict | None:
    """The analysis for ``sel``: stored results at once, else a Compute button (running the pass as
    ``processes`` worker processes when more than one); None until computed."""
    clicked = start_button(label, key=key, type="primary",
                           help="One forward pass over the n sampled images or texts (skipped when already stored).")
    if clicked:
        run_analysis(sel, processes)
    elif not may_read(sel):
        source = "may be downloaded first" if hub_status()[0] else "is read from the local Hugging Face cache"
        st.info(f"Press {label} to compute {sel.model} on {sel.dataset} (n={sel.n}, seed={sel.seed}), or to "
                f"load it if it is stored; the dataset comes from the hub and {source}.")
        return None
    try:
        results = stored_analysis(sel.model, sel.dataset, sel.n, sel.seed, str(cache_root()), sel.stats_window)
    except NotComputed as exc:
        not_computed(exc, f"{sel.model} on {sel.dataset} (n={sel.n}, seed={sel.seed}) is not computed yet: "
                          f"press {label}.")
        return None
    if not clicked:
        st.caption(f"Loaded from the cache (computed earlier, key {results['cache']['key'][:12]}…); "
                   "the model was not run.")
    return results


def run_approximation(sel: Selection, eval_n: int, ranges: list[tuple[int, int]], kind: str,
                      params: MapParams, probe: bool) -> None:
    """Fit the maps and evaluate the approximated model (cached stages are skipped), in :func:`_working`."""
    with _working("Approximating…", unit(sel.dataset)) as work:
        began = time.perf_counter()
        approximate_run(_request(sel, work, eval_n), ranges, kind, params, probe)
        _opened(sel)
        work.status.update(state="complete", expanded=False,
                           label=f"Done in {time.perf_counter() - began:.1f} s (stored for next time).")


def approximation(sel: Selection, eval_n: int, ranges: list[tuple[int, int]], kind: str, params: MapParams,
                  probe: bool) -> dict:
    """Stored approximation results; raises :class:`NotComputed` when they are not stored yet."""
    return stored_approximation(sel, eval_n, json.dumps(ranges), kind,
                                params_key(params), probe, str(cache_root()))


def pass_meta(results: dict) -> dict:
    """The stored metadata of the pass behind an analysis (its ``cache`` key), read without running anything."""
    return stored_meta(results["cache"]["key"], str(cache_root()))


def table_results(sel: Selection, datasets: Sequence[str], eval_n: int, rows: str, kind: str, params: MapParams) -> dict:
    """Stored table rows for the sidebar's model, n and seed; raises :class:`NotComputed` until computed."""
    return stored_table(sel, tuple(datasets), eval_n, rows, kind, params_key(params),
                        str(cache_root()))


def run_table(sel: Selection, datasets: Sequence[str], eval_n: int, rows: str, kind: str, params: MapParams) -> None:
    """Every row of the table (cached rows are read, not recomputed), in :func:`_working`."""
    with _working("Computing the table…", unit(sel.dataset)) as work:
        began = time.perf_counter()
        result = table_run(_request(sel, work, eval_n, datasets[0]), list(datasets), rows, kind, params)
        for dataset in datasets:
            _opened(replace(sel, dataset=dataset))
        work.status.update(state="complete", expanded=False, label=f"Computed {len(result['rows'])} rows in "
                           f"{time.perf_counter() - began:.1f} s (stored for next time).")


def run_search(sel: Selection, eval_n: int, budget: dict, pairs: bool, probe_top: int, kind: str,
               params: MapParams) -> dict:
    """The measured search (``budget``: search's ``blocks``, ``max_params`` or ``max_latency_ms``),
    in :func:`_working`. Not cached on disk: it is cheap next to the passes it reuses."""
    with _working("Searching…", unit(sel.dataset)) as work:
        board = st.empty()  # the ranking so far, sharpening round by round

        def show(rows: list[dict], summary: dict) -> None:
            board.dataframe(pd.DataFrame([{
                "range": r["range"], "paper": r["paper"], "MSE (so far)": r["mse_final"],
                "interval": f"{r['mse_ci'][0]:.3g} – {r['mse_ci'][1]:.3g}", "samples": r["samples"],
            } for r in rows[:10]]), hide_index=True)

        plan = SearchPlan(**budget, pairs=pairs, probe_top=probe_top, kind=kind, map_params=params)
        result = search_run(_request(sel, work, eval_n), plan, on_round=show)
        board.empty()
        _opened(sel)
        work.status.update(state="complete", expanded=False, label=f"Measured {result['evaluated']} candidates on "
                           f"{eval_n} {unit(sel.dataset)} in {result['seconds']['total']:.1f} s.")
    return result


def _zip(folder: Path) -> bytes:
    """The folder as a zip holding one top-level folder of the same name (stored: weights barely compress)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, f"{folder.name}/{path.name}")
    return buffer.getvalue()


def run_continuation(sel: Selection, ranges: list[tuple[int, int]], kind: str, params: MapParams, prompt: str,
                     tokens: int = 40) -> dict[str, str]:
    """Greedy continuations of ``prompt`` by the original, approximated and skipped language models
    (maps fitted from the stored statistics), in :func:`_working`."""
    from rba_core.passes.perplexity import continue_text

    with _working("Continuing the prompt…", unit(sel.dataset)) as work:
        model = encoder(sel.model)
        maps = _range_maps(sel, ranges, kind, params, work)
        nets = {"approximated": ApproximatedEncoder(model, ranges, maps).eval(),
                "skip": approximate_encoder(model, None, ranges, "identity")}
        work.stage(f"Generating {tokens} tokens greedily with each model")
        out = continue_text(model, nets, prompt, tokens)
        work.status.update(state="complete", expanded=False, label="Continued the prompt with each model.")
    return out


def _range_maps(sel: Selection, ranges: list[tuple[int, int]], kind: str, params: MapParams, work: "_Work") -> list:
    """The maps of ``kind`` for the sidebar's samples, fitted as ``approximate`` and ``export`` fit them (the
    ranges' float64 statistics, shared with the Approximate page's run through the cache)."""
    _fit, maps = fit_range_maps(_request(sel, work), ranges, kind, params)
    _opened(sel)
    return maps


def run_export(sel: Selection, ranges: list[tuple[int, int]], kind: str, params: MapParams, name: str,
               onnx: bool) -> dict:
    """The approximated model of the dashboard written in a temporary folder by the CLI's and the library's
    :func:`rba_core.ops.analysis.export` (maps fitted from the ranges' stored statistics; a kind that folds into
    the weights gives a plain Hugging Face checkpoint), in :func:`_working`. Returns ``content`` (the folder
    as a zip, or with ``onnx`` the ONNX file), ``sizes`` (bytes on disk per file) and ``record`` (rba.json)."""
    what = "the ONNX file" if onnx else "the compressed model"
    with _working(f"Building {what}…", unit(sel.dataset)) as work:
        began = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / name
            export_run(_request(sel, work), ranges, kind, folder, params, onnx)
            _opened(sel)
            sizes = {path.name: path.stat().st_size for path in sorted(folder.iterdir())}
            content = (folder / ONNX).read_bytes() if onnx else _zip(folder)
            record = json.loads((folder / RECORD).read_text())
        work.status.update(state="complete", expanded=False,
                           label=f"Built {what} in {time.perf_counter() - began:.1f} s.")
    return {"content": content, "sizes": sizes, "record": record}


def run_plans(sel: Selection, eval_n: int, remove: int, strategies: Sequence[str], kind: str,
              params: MapParams) -> dict[str, dict]:
    """One compression plan per strategy removing ``remove`` blocks (:func:`rba_core.ops.plan.plan_run`), in
    :func:`_working`; their JSON by strategy. Not stored as a whole: the fit passes they reuse are."""
    from rba_core.ops.plan import PlanSpec, plan_run

    out = {}
    with _working("Planning…", unit(sel.dataset)) as work:
        began = time.perf_counter()
        for strategy in strategies:
            work.stage(f"The {strategy} plan")
            out[strategy] = plan_run(_request(sel, work, eval_n), PlanSpec(
                remove_blocks=remove, strategy=strategy, kind=kind, map_params=params)).to_json()
        work.status.update(state="complete", expanded=False, label=f"Planned {len(out)} strategies in "
                           f"{time.perf_counter() - began:.1f} s.")
    return out
