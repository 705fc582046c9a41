"""Can the Hugging Face hub be used right now, and what can be used without it?

The hub is probed once per process (one HEAD request, bounded by a short timeout). When it cannot
be reached, this process goes offline for every later call (``HF_HUB_OFFLINE`` and the constants
huggingface_hub and datasets read it into at import), so a model or dataset that is not cached
fails at once with one sentence instead of retrying a dead network for half a minute. The reason
given is the real one: the user's ``HF_HUB_OFFLINE``, or the failed probe.
"""

from __future__ import annotations

import os
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable

from rba_core.errors import RBAError
from rba_core.registry import (DATA_DIR_ENV, DEMO_PAIR, dataset_info, lm_text_info, local_dataset_dir, local_text_advice,
                               missing_model, resolve_model, stream_spec, stream_target)

PROBE_TIMEOUT_S = 2.0
USER_OFFLINE = "HF_HUB_OFFLINE is set"
UNREACHABLE = "the Hugging Face hub could not be reached at start-up"
_TRUE = {"1", "true", "yes", "on"}
_status: dict[str, tuple[bool, str]] = {}  # endpoint -> (reachable, reason): one probe per process


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _offline_flag() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """(reachable, what happened): one HEAD request to ``endpoint``, name resolution included, bounded by
    ``timeout`` seconds (an HTTP error status still means the server is there)."""
    outcome: list[tuple[bool, str]] = []

    def ask() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            outcome.append((True, f"{endpoint} answered"))
        except urllib.error.HTTPError:
            outcome.append((True, f"{endpoint} answered"))
        except (OSError, ValueError) as exc:
            outcome.append((False, f"{endpoint}: {getattr(exc, 'reason', exc)}"))

    # A thread, because urlopen's timeout does not bound the name lookup (a dead DNS can hang for long).
    thread = threading.Thread(target=ask, daemon=True, name="hub-probe")
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else (False, f"{endpoint} did not answer within {timeout:g} s")


def go_offline() -> None:
    """Make every later hub call in this process an offline one (local caches only, no retries)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module, names in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                          ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        if module in sys.modules:  # imported already: they copied the variable at import time
            for name in names:
                setattr(sys.modules[module], name, True)


def hub_status(timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """(reachable, reason): the user's ``HF_HUB_OFFLINE`` means unreachable without any network access;
    otherwise the hub is probed once per process and, when unreachable, the process goes offline."""
    endpoint = _endpoint()
    if endpoint not in _status:
        if _offline_flag() and all(reachable for reachable, _ in _status.values()):
            return False, USER_OFFLINE  # the user's switch, not ours: we set it only after a failed probe
        reachable, detail = probe(endpoint, timeout)
        _status[endpoint] = (True, detail) if reachable else (False, f"{UNREACHABLE} ({detail})")
        if not reachable:
            go_offline()
    return _status[endpoint]


def hub_cache_dir(repo_id: str, kind: str = "models") -> Path:
    """Where the local Hugging Face cache keeps a hub repository (``kind``: models or datasets)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE) / (f"{kind}--" + repo_id.replace("/", "--"))


def is_hub_model(name: str) -> bool:
    """True when ``name`` (alias, hub id or folder) names a hub model rather than a local folder."""
    source = resolve_model(name)
    return not (Path(source).expanduser().exists() or source.startswith((".", "/", "~")))


def is_available_offline(name: str) -> bool:
    """True when ``name`` is a local folder or a hub id already in the local Hugging Face cache."""
    source = resolve_model(name)
    if Path(source).is_dir():
        return (Path(source) / "config.json").is_file()
    return (hub_cache_dir(source) / "snapshots").is_dir()


def on_disk(dataset: str) -> bool:
    """True when opening ``dataset`` reads local files only (a folder, digits, a copy under
    $RBA_DATA_DIR); otherwise it goes to the hub and may download the whole dataset."""
    stream = stream_spec(dataset)
    if stream:  # streamed from the hub unless it names a local folder
        return Path(stream_target(stream)).expanduser().is_dir()
    info = dataset_info(dataset) or lm_text_info(dataset)
    # A local-only alias (no hub copy) never goes to the hub: opening it says where to put it.
    return info is None or info.hub_id in (None, "sklearn:digits") or local_dataset_dir(info) is not None


def _dataset_cached(hub_id: str) -> bool:
    """Whether the hub or datasets cache holds anything of ``hub_id`` (then the library may load it offline)."""
    from huggingface_hub.constants import HF_HOME

    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(HF_HOME) / "datasets")
    return hub_cache_dir(hub_id, "datasets").is_dir() or (datasets_cache / hub_id.replace("/", "___")).is_dir()


def offline_problem(model: str | None = None, datasets: Iterable[str] = ()) -> str | None:
    """The sentence saying why ``model`` or one of ``datasets`` cannot be used now, or None when they can.

    Looks at the hub only when something would come from it (local folders never need it); an alias whose
    package is not installed says how to add it.
    """
    if model and missing_model(model):
        return missing_model(model)
    hub_models = [model] if model and is_hub_model(model) and not is_available_offline(model) else []
    # A stream is read from the hub on every draw; another dataset may already be in the local cache.
    hub_data = [d for d in datasets if not on_disk(d) and (stream_spec(d) or not _dataset_cached((dataset_info(d) or lm_text_info(d)).hub_id))]
    if not hub_models and not hub_data:
        return None
    reachable, reason = hub_status()
    if reachable:
        return None
    if hub_models:
        return (f"Model '{model}' is not in the local Hugging Face cache and cannot be downloaded: {reason}; "
                f"pick {DEMO_PAIR[0]} (the offline demo) or a local folder written by save_pretrained.")
    if stream_spec(hub_data[0]):
        return (f"Dataset '{stream_target(stream_spec(hub_data[0]))}' cannot be streamed: {reason}; connect to the internet, or "
                "give a local folder of parquet shards or WebDataset shards.")
    info = dataset_info(hub_data[0])
    if info is None:  # a language-model text
        info = lm_text_info(hub_data[0])
        return f"Dataset '{info.alias}' ({info.hub_id}) is not available offline: {reason}; {local_text_advice(info)}"
    return (f"Dataset '{info.alias}' ({info.hub_id}) is not available offline: {reason}; set {DATA_DIR_ENV} to a "
            f"folder with local copies ({info.local_name}/train.parquet, {info.local_name}/test.parquet) "
            "or give a local dataset folder.")


def require_available(model: str | None = None, datasets: Iterable[str] = ()) -> None:
    """Raise :class:`RBAError` at once (before any model or dataset is opened) with :func:`offline_problem`."""
    problem = offline_problem(model, datasets)
    if problem:
        raise RBAError(problem)
