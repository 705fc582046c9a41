"""Which model families RBA Explorer runs, and how to load one: a registry of family adapters.

The registry maps a config's ``model_type`` to the adapter class of its family (one file each in
this package). Adding a family is one new file and one line in :data:`ADAPTERS`. Nothing outside
this package names a family.

A model is a hub id, a folder written by ``save_pretrained``, or a GGUF file (or a folder holding one):
a file format, not a family (:mod:`rba_core.models.gguf_file`). The first use of a GGUF dequantises it
into the cache as a plain checkpoint, keyed by the file's sha256; everything then reads that folder.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from rba_core.errors import RBAError, above_maximum
from rba_core.models import gguf_file
from rba_core.hub import hub_cache_dir, is_available_offline, require_available
from rba_core.models.base import Encoder
from rba_core.registry import DEFAULT_MAX_LENGTH, resolve_model

#: config ``model_type`` -> "module:Adapter" in this package (imported on first use).
ADAPTERS: dict[str, str] = {
    "vit": "vit:ViTEncoder",
    "deit": "vit:ViTEncoder",
    "dinov2": "dinov2:Dinov2Encoder",
    "clip": "clip:CLIPVisionEncoder",
    "clip_vision_model": "clip:CLIPVisionEncoder",
    "timm": "timm_vit:TimmViTEncoder",
    "bert": "bert:BertEncoder",
    "roberta": "bert:BertEncoder",
    "xlm-roberta": "bert:BertEncoder",
    "distilbert": "distilbert:DistilBertEncoder",
    "mpnet": "mpnet:MPNetEncoder",
    "modernbert": "modernbert:ModernBertEncoder",
    "llama": "llama:LlamaLM",
    "mistral": "mistral:MistralLM",
    "qwen2": "qwen2:Qwen2LM",
    "qwen3": "qwen2:Qwen3LM",
    "phi3": "phi3:Phi3LM",
    "gemma2": "gemma:Gemma2LM",
    "gemma3_text": "gemma:Gemma3LM",
    "gpt2": "gpt2:GPT2LM",
    "gpt_neox": "gpt_neox:GPTNeoXLM",
}

__all__ = ["ADAPTERS", "Encoder", "ModelInfo", "ModelRef", "adapter_class", "model_ref", "default_device", "is_available_offline",
           "check_text_length", "check_weights", "gguf_checkpoint", "gguf_ready", "is_gguf", "load_config",
           "load_encoder", "model_fingerprint", "model_info", "readable_source", "supported_families"]


def supported_families() -> str:
    """The supported ``model_type`` values, for messages."""
    return ", ".join(sorted(ADAPTERS))


def adapter_class(model_type: str) -> type[Encoder]:
    """The adapter of a family; an :class:`RBAError` listing the supported ones otherwise."""
    if model_type not in ADAPTERS:
        raise RBAError(f"'{model_type}' models are not supported; RBA Explorer runs these families: "
                       f"{supported_families()}.")
    module, name = ADAPTERS[model_type].split(":")
    return getattr(importlib.import_module(f"rba_core.models.{module}"), name)


def default_device() -> str:
    """CUDA when present, else CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            sha.update(chunk)
    return sha.hexdigest()


_FINGERPRINTED = {".json", ".safetensors", ".bin", ".txt", ".model"}


def _digest(path: Path) -> str:
    stat = path.stat()
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


def model_fingerprint(name: str, revision: str = "main") -> dict:
    """What identifies a model's weights, tokenizer or processor and pooling, without loading it.

    A local folder is identified by the content of its files (sub-folders such as
    ``1_Pooling/`` included), a GGUF file by its content; a hub id by its id and the commit its
    ``revision`` points to in the local cache (``revision`` itself when not cached).
    """
    source = resolve_model(name)
    gguf = gguf_file.find(source)
    if gguf is not None:
        return {"model": str(gguf.resolve()), "files": {gguf.name: _digest(gguf)}}
    folder = Path(source)
    if folder.is_dir():
        digests = {}
        for path in sorted(folder.rglob("*")):
            if path.suffix in _FINGERPRINTED and path.is_file() and not path.name.startswith("."):
                stat = path.stat()
                digests[str(path.relative_to(folder))] = _file_digest(str(path), stat.st_size, stat.st_mtime_ns)
        return {"model": str(folder.resolve()), "files": digests}
    ref = hub_cache_dir(source) / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    return {"model": source, "revision": commit}


WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _damaged(path: Path, what: str) -> RBAError:
    return RBAError(f"The weights file '{path}' {what}; download or copy the model again.")


def _check_safetensors(path: Path) -> None:
    """The header of a safetensors file (its first 8 bytes give the JSON header's length, whose tensors must
    cover the rest of the file exactly), read without loading any tensor."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or 8 + length > size:
            raise _damaged(path, "is damaged (its header is cut off or garbled)")
        try:
            header = json.loads(handle.read(length))
            ends = [int(t["data_offsets"][1]) for name, t in header.items() if name != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise _damaged(path, "is damaged (its header is not valid)") from None
    if max(ends, default=0) != size - 8 - length:
        raise _damaged(path, "is truncated or damaged (its size does not match its header)")


def model_files(source: str) -> Path | None:
    """The folder holding a model's files: the folder itself, or a hub model's snapshot in the local
    Hugging Face cache (None when it is not there yet)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    ref = hub_cache_dir(source) / "refs" / "main"
    snapshot = hub_cache_dir(source) / "snapshots" / (ref.read_text().strip() if ref.is_file() else "")
    return snapshot if ref.is_file() and snapshot.is_dir() else None


def check_weights(source: str) -> None:
    """One sentence naming the damaged, truncated or missing weights file of a model (a shard an index lists
    included), before any library reads it; models not on disk yet are left to the download."""
    folder = model_files(source)
    if folder is None:
        return
    for index in WEIGHT_INDEXES:
        path = folder / index
        if not path.is_file():
            continue
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise _damaged(path, "is not a valid index (no weight_map)") from None
        for shard in shards:
            if not (folder / shard).is_file():
                raise RBAError(f"The weights file '{folder / shard}' is missing ({index} lists it); download or "
                               "copy the model again.")
            if shard.endswith(".safetensors"):
                _check_safetensors(folder / shard)
        return
    if (folder / "model.safetensors").is_file():
        _check_safetensors(folder / "model.safetensors")


def _gguf_key(path: Path) -> str:
    """The cache key of a GGUF file's plain checkpoint: its content, and the readers' versions."""
    from importlib.metadata import PackageNotFoundError, version

    from rba_core.cache import make_key

    readers = {}
    for package in ("transformers", "gguf"):
        try:
            readers[package] = version(package)
        except PackageNotFoundError:  # reading the file then says what to install
            readers[package] = None
    return make_key({"kind": gguf_file.KIND, "sha256": _digest(path), **readers})


def is_gguf(name: str) -> bool:
    """Whether ``name`` (alias or path) is a GGUF file or a folder holding one; False for anything unreadable."""
    try:
        return gguf_file.find(resolve_model(name)) is not None
    except RBAError:
        return True  # a missing .gguf path or a folder of several: a GGUF source all the same


def gguf_ready(name: str) -> bool:
    """False while ``name`` is a GGUF file whose plain checkpoint is not in the cache yet (its first load
    dequantises it, which takes a while); True for every other model. Reads no weights."""
    from rba_core.cache import cache_root

    path = gguf_file.find(resolve_model(name))
    return path is None or (cache_root() / _gguf_key(path) / "meta.json").is_file()


@lru_cache(maxsize=16)
def _intact_folder(root: str, key: str, stamp: int) -> Path | None:
    from rba_core.cache import Cache

    return Cache(root).folder(key)


def gguf_checkpoint(path: Path) -> Path:
    """The plain float32 checkpoint of the GGUF file ``path`` in the cache, written the first time (one
    writer at a time across threads and processes; a damaged copy is written again)."""
    from rba_core.cache import Cache
    from rba_core.quiet import silence_library_noise

    cache = Cache()
    key = _gguf_key(path)
    stored = cache.root / key / "meta.json"
    if stored.is_file():  # verified once per process and version of the entry (the weights are hundreds of MB)
        found = _intact_folder(str(cache.root), key, stored.stat().st_mtime_ns)
        if found is not None:
            return found

    def compute(progress) -> Path:
        silence_library_noise()
        meta = {"kind": gguf_file.KIND, "model": path.name, "dataset": "", "split": "", "source": str(path.resolve()),
                "sha256": _digest(path)}
        return cache.put_folder(key, lambda folder: gguf_file.write_plain(path, folder, adapter_class), meta).folder

    return cache.single_flight(key, lambda: cache.folder(key), compute)


def readable_source(name: str) -> str:
    """The hub id or folder transformers reads ``name`` from: for a GGUF file, its plain checkpoint in the
    cache (dequantised the first time); for anything else, what the alias resolves to."""
    source = resolve_model(name)
    path = gguf_file.find(source)
    return source if path is None else str(gguf_checkpoint(path))


def _load_error(source: str, exc: Exception) -> RBAError:
    if Path(source).exists() or source.startswith((".", "/", "~")):
        return RBAError(
            f"Could not read the model folder '{source}': it needs a config.json, weights "
            f"(model.safetensors) and its preprocessing files, as save_pretrained writes them "
            f"({exc.__class__.__name__})."
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "connect" in str(exc).lower():
        return RBAError(
            f"Model '{source}' is not in the local Hugging Face cache and the hub cannot be "
            "reached; connect to the internet once to download it, or pass a local folder."
        )
    return RBAError(
        f"Model '{source}' was not found: use an alias (python -m rba_core analyze --help lists them), "
        "a Hugging Face hub id or a local folder."
    )


def _read_json(source: str, filename: str) -> dict | None:
    """A JSON file of a folder or of a hub repo (local cache first); None when absent."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        path = folder / filename
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(source, filename))
        except Exception:  # missing file, offline, unknown repo: the caller decides
            return None
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        raise RBAError(f"'{path}' is not valid JSON; repair the file or download the model again.") from None


def load_config(name: str):
    """The model's config (Hugging Face, or timm's config.json), checked to be a supported family."""
    require_available(model=name)  # offline and not cached: one sentence at once, no retries
    source = readable_source(name)
    raw = _read_json(source, "config.json")
    if raw is not None and "model_type" not in raw and "architecture" in raw:
        from rba_core.models.timm_vit import TimmConfig

        return TimmConfig(raw)
    if raw is not None and "model_type" not in raw:
        where = model_files(source)
        raise RBAError(f"The config file '{where / 'config.json' if where else source + ' config.json'}' has no "
                       "model_type, so the model's family cannot be told; add the model_type of its architecture "
                       "(for example \"model_type\": \"vit\") or save the model again with save_pretrained.")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        if "does not recognize this architecture" in str(exc) or "model_type" in str(exc):
            kind = (raw or {}).get("model_type", "unknown")
            raise RBAError(f"'{name}' is a '{kind}' model; RBA Explorer runs these families: "
                           f"{supported_families()}.") from None
        raise _load_error(source, exc) from None
    adapter_class(getattr(config, "model_type", "unknown"))  # unsupported families fail here
    return config


def _pooling(source: str, cls: type[Encoder]) -> str:
    """Mean over real tokens for sentence-transformers folders with mean pooling, else the family's default."""
    from rba_core.models.base import sentence_pooling

    folder = Path(source).expanduser()
    if folder.is_dir():
        return sentence_pooling(folder) or cls.default_pooling
    raw = _read_json(source, "1_Pooling/config.json")
    if raw is None:
        return cls.default_pooling
    return "mean" if raw.get("pooling_mode_mean_tokens") else "first"


@dataclass(frozen=True)
class ModelInfo:
    """What the tool knows of a model from its config alone: no weights are loaded."""

    family: str
    modality: str  # "image" or "text"
    num_blocks: int
    pooling: str  # "first", "mean" or "last" (decoders: the last real token)
    hidden_size: int | None = None  # D (None where a loaded model did not say)
    max_tokens: int | None = None  # text models: the most tokens a text may be truncated to (position embeddings)


def model_info(name: str) -> ModelInfo:
    """Family, modality, number of blocks and pooling of a model, read from its config files."""
    config = load_config(name)
    cls = adapter_class(config.model_type)
    pooling = _pooling(readable_source(name), cls) if cls.modality == "text" else "first"
    return ModelInfo(config.model_type, cls.modality, cls.num_blocks_of(config), pooling, cls.hidden_size_of(config),
                     cls.max_tokens_of(config))


def load_encoder(name, device: str | None = None, max_length: int | None = DEFAULT_MAX_LENGTH) -> Encoder:
    """Load an alias, hub id or local folder as an :class:`Encoder` in eval mode, in float32 (decoder LMs on
    CUDA: bfloat16, spread over the GPUs and memory when larger than one device).

    ``name`` may also be an already loaded Hugging Face model object (its processor or tokenizer
    is then loaded from ``name.name_or_path``). ``max_length`` truncates texts (text models only).
    """
    from rba_core.quiet import no_library_bars, silence_library_noise

    silence_library_noise()  # an unused head or pooler in the checkpoint is expected here, not a warning
    if isinstance(name, ModelRef):  # resolved already: its loaded encoder, or a load by its name
        return name.loaded.with_max_length(max_length) if name.loaded else load_encoder(name.name, device, max_length)
    if not isinstance(name, str):
        return _wrap_loaded(name, device, max_length)
    config = load_config(name)
    source = readable_source(name)
    cls = adapter_class(config.model_type)
    pooling = _pooling(source, cls) if cls.modality == "text" else "first"
    device = device or default_device()
    check_weights(source)
    try:
        with no_library_bars():  # the tool reports its own progress
            model = cls.load_model(source, config, cls.compute_dtype(device))
        processor = cls.load_processor(source)
    except (OSError, ValueError) as exc:
        raise _load_error(source, exc) from None
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":  # a bug, not the user's file
            raise
        check_weights(source)  # a hub model's files downloaded just now: name the damaged one
        raise RBAError(f"The weights of '{source}' cannot be read ({exc}); download or copy the model again.") from None
    model = cls.place(model, device)
    return cls(name, source, config.model_type, model, processor, device, pooling,
               max_length if cls.modality == "text" else None, config=config)


def _wrap_loaded(model, device: str | None, max_length: int | None) -> Encoder:
    """An :class:`Encoder` around a Hugging Face model object a notebook user already loaded."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family is None:
        raise RBAError("Pass a model id, a folder, or a loaded Hugging Face model (it has a .config).")
    cls = adapter_class(family)
    source = getattr(config, "name_or_path", "") or ""
    if not source:
        raise RBAError("This loaded model does not say where it came from (config.name_or_path is empty), "
                       "so its processor or tokenizer cannot be found; pass its folder or hub id instead.")
    pooling = _pooling(source, cls) if cls.modality == "text" else "first"
    device = device or str(next(model.parameters()).device)
    model = cls.place(model, device)
    return cls(source, source, family, model, cls.load_processor(source), device, pooling,
               max_length if cls.modality == "text" else None)


def check_text_length(info: ModelInfo, max_length: int) -> None:
    """Before any pass: ``max_length`` (texts are truncated to it) must lie in 2 .. the model's maximum."""
    if max_length < 2:
        raise RBAError(f"The maximum text length must be at least 2 tokens, got {max_length}.")
    if info.max_tokens and max_length > info.max_tokens:
        raise above_maximum("--max-length", max_length, info.max_tokens)


@dataclass
class ModelRef:
    """A model as a request names it: its display name, what identifies it (for cache keys), what
    its config says, and the loaded encoder when the caller passed one."""

    name: str
    fingerprint: dict
    info: ModelInfo
    loaded: Encoder | None = None


def _weights_digest(encoder: Encoder) -> str:
    import torch
    import xxhash

    digest = xxhash.xxh3_128()
    for name, tensor in sorted(encoder.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def model_ref(model, max_length: int | None = DEFAULT_MAX_LENGTH) -> ModelRef:
    """Resolve what a caller passed as the model: an alias, hub id or folder (nothing is loaded),
    a loaded :class:`Encoder`, or a loaded Hugging Face model object (identified by its weights); a
    :class:`ModelRef` (a model resolved once, :class:`rba_core.ops.run.Run`) is returned as it is."""
    if isinstance(model, ModelRef):
        return model
    if isinstance(model, str):
        return ModelRef(model, model_fingerprint(model), model_info(model))
    encoder = model if isinstance(model, Encoder) else load_encoder(model, max_length=max_length)
    info = ModelInfo(encoder.family, encoder.modality, encoder.num_blocks, encoder.pooling, encoder.hidden_size,
                     encoder.max_tokens_of(encoder.config))
    return ModelRef(encoder.name, {"weights": _weights_digest(encoder), "family": encoder.family}, info, encoder)


def preload() -> None:
    """Import every family adapter and the transformers classes they use, once.

    transformers resolves its classes lazily and that is not thread-safe, while a dashboard may
    run several script threads at once; importing them up front (under Python's import lock)
    makes later loads safe. Families whose optional package is missing (timm) are skipped.
    """
    import transformers
    import transformers.masking_utils  # noqa: F401
    import transformers.modeling_gguf_pytorch_utils  # noqa: F401  (GGUF files are read in a background thread)

    for name in ("AutoConfig", "AutoModel", "AutoTokenizer", "AutoImageProcessor"):
        getattr(transformers, name)
    for target in set(ADAPTERS.values()):
        module, name = target.split(":")
        cls = getattr(importlib.import_module(f"rba_core.models.{module}"), name)
        for class_name in (*cls.hf_classes, cls.hf_model):
            getattr(transformers, class_name)
