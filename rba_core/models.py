"""Load a ViT-family encoder and its image processor, and run its blocks from any index.

Block numbering: ``hs[0]`` is the embedding output and ``hs[k]`` the output of block k (1..L),
before the final LayerNorm. The adapter never registers hooks on the shared model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from rba_core.errors import RBAError
from rba_core.hub import hub_cache_dir, require_available
from rba_core.registry import SUPPORTED_FAMILIES, resolve_model

_FAMILY_NAMES = "ViT, DeiT and DINOv2 encoders"


def default_device() -> str:
    """CUDA when present, else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            sha.update(chunk)
    return sha.hexdigest()


def model_fingerprint(name: str, revision: str = "main") -> dict:
    """What identifies a model's weights and preprocessing, computed without loading it.

    A local folder is identified by the content of its files; a hub id by its id and the commit
    its ``revision`` points to in the local cache (``revision`` itself when not cached).
    """
    source = resolve_model(name)
    folder = Path(source)
    if folder.is_dir():
        digests = {}
        for path in sorted(folder.iterdir()):
            if path.suffix in {".json", ".safetensors", ".bin"} and path.is_file():
                stat = path.stat()
                digests[path.name] = _file_digest(str(path), stat.st_size, stat.st_mtime_ns)
        return {"model": str(folder.resolve()), "files": digests}
    ref = hub_cache_dir(source) / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    return {"model": source, "revision": commit}


def _load_error(source: str, exc: Exception) -> RBAError:
    if Path(source).exists() or source.startswith((".", "/", "~")):
        return RBAError(
            f"Could not read the model folder '{source}': it needs a config.json, weights "
            f"(model.safetensors) and a preprocessor_config.json ({exc.__class__.__name__})."
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "connect" in str(exc).lower():
        return RBAError(
            f"Model '{source}' is not in the local Hugging Face cache and the hub cannot be "
            "reached; connect to the internet once to download it, or pass a local folder."
        )
    return RBAError(
        f"Model '{source}' was not found: use a paper alias (ViT-S, ViT-B, DiNO-S, DiNO-B, "
        "DEiT-S), a Hugging Face hub id or a local folder."
    )


@dataclass
class Encoder:
    """A loaded encoder with the pieces the method needs. Shapes: (B, T, D) hidden states."""

    name: str
    source: str
    family: str
    model: nn.Module
    processor: object
    device: str

    @property
    def blocks(self) -> nn.ModuleList:
        """The L transformer blocks, in order."""
        return self.model.encoder.layer if self.family == "dinov2" else self.model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.model.layernorm

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def num_params(self) -> int:
        """Parameters of embeddings, blocks and final norm (no pooler, no head)."""
        return sum(p.numel() for p in self.model.parameters())

    def block_params(self, block: int) -> int:
        """Parameters of block ``block`` (1..L)."""
        return sum(p.numel() for p in self.blocks[block - 1].parameters())

    def preprocess(self, images: list) -> torch.Tensor:
        """PIL images -> pixel values (B, 3, H, W) on the encoder's device."""
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return pixels["pixel_values"].to(self.device, torch.float32)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """hs[0]: the embedding output (B, T, D)."""
        return self.model.embeddings(pixel_values)

    def run_blocks(self, hidden: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Run blocks ``first..last`` (1-indexed, inclusive) on ``hidden``; returns hs[last]."""
        for block in self.blocks[first - 1 : last]:
            out = block(hidden)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def final_cls(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final representation: final norm of hs[L], CLS token (B, D)."""
        return self.final_norm(hidden)[:, 0, :]


def load_config(name: str):
    """The model's config, checked to be a supported encoder family (never remote code)."""
    from transformers import AutoConfig

    source = resolve_model(name)
    require_available(model=name)  # offline and not cached: one sentence at once, no retries
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise _load_error(source, exc) from None
    family = getattr(config, "model_type", "unknown")
    if family not in SUPPORTED_FAMILIES:
        raise RBAError(
            f"'{name}' is a '{family}' model; RBA Explorer supports {_FAMILY_NAMES} only."
        )
    return config


def load_encoder(name: str, device: str | None = None) -> Encoder:
    """Load an alias, hub id or local folder as an :class:`Encoder` in float32, eval mode."""
    from transformers import AutoImageProcessor, Dinov2Model, ViTModel, DeiTModel

    source = resolve_model(name)
    config = load_config(name)
    family = config.model_type
    device = device or default_device()
    kwargs = {"dtype": torch.float32, "trust_remote_code": False}
    if family != "dinov2":
        kwargs["add_pooling_layer"] = False  # the pooler is unused and often newly initialised
    model_class = {"vit": ViTModel, "deit": DeiTModel, "dinov2": Dinov2Model}[family]
    try:
        model = model_class.from_pretrained(source, **kwargs)
        processor = AutoImageProcessor.from_pretrained(source, backend="pil")
    except (OSError, ValueError) as exc:
        raise _load_error(source, exc) from None
    model.eval().requires_grad_(False).to(device)
    return Encoder(name, source, family, model, processor, device)
