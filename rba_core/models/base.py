"""What every family adapter answers: load, preprocess, hs[0], the blocks, one block call, norm, pooling.

Block numbering: ``hs[0]`` is the embedding output and ``hs[k]`` the output of block k (1..L),
before the final norm. An adapter never registers hooks on (or otherwise changes) its model.

A family is one subclass in its own file (``rba_core/models/<family>.py``) plus one line in the
registry (:data:`rba_core.models.ADAPTERS`). The subclass declares how to load the model and its
preprocessing, the embedding step, the block list, how one block is called (``context`` holds what
every block of a batch needs: attention masks, position embeddings), the final norm and how a
block output becomes one vector per sample. Everything else (the pass, maps, search, export, the
pages) talks to :class:`Encoder` only.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from rba_core.errors import RBAError

Inputs = dict[str, torch.Tensor]  # the model's own inputs: pixel_values, or input_ids + attention_mask ...
Context = dict[str, Any]  # per batch: what every block call needs besides the hidden states

#: How a block output (B, T, D) becomes one vector per sample: the first token, the mean over
#: real tokens, or the last real token (decoders).
POOLINGS = ("first", "mean", "last")

#: Why post-LN encoders (BERT, DistilBERT, MPNet ...) cannot take a folded map.
POST_LN_REASON = "its post-LN blocks and embeddings end in a LayerNorm, so no linear layer writes the residual stream"


class Encoder:
    """A loaded model of one family with the pieces the method needs. Hidden states are (B, T, D)."""

    modality: str = "image"  # "image" or "text": what the model reads
    hf_classes: tuple[str, ...] = ()  # transformers classes the family loads (see models.preload)
    default_pooling: str = "first"  # one of POOLINGS, unless a sentence-transformers folder says otherwise

    def __init__(self, name: str, source: str, family: str, model: nn.Module, processor: Any,
                 device: str, pooling: str = "first", max_length: int | None = None, config=None):
        self.name, self.source, self.family = name, source, family
        self.model, self.processor, self.device = model, processor, device
        self.pooling = pooling
        self.max_length = max_length
        self._config = config

    # --- declared by each family -------------------------------------------------------------
    #: the transformers class of the family's model (an ``Auto*`` class or a concrete one) and the extra
    #: keyword arguments it is built with (``add_pooling_layer=False``: the pooler is never used)
    hf_model: str = "AutoModel"
    hf_options: dict[str, Any] = {}

    @classmethod
    def model_class(cls, config):
        """The transformers class that loads or builds this config's model."""
        import transformers

        return getattr(transformers, cls.hf_model)

    @classmethod
    def load_model(cls, source: str, config, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The model (no pooler; decoders keep their LM head) from a hub id or folder, read in ``dtype``."""
        return cls.model_class(config).from_pretrained(source, dtype=dtype, trust_remote_code=False, **cls.hf_options)

    @classmethod
    def load_processor(cls, source: str):
        """The image processor or tokenizer saved with the model."""
        raise NotImplementedError

    @classmethod
    def compute_dtype(cls, device: str) -> torch.dtype:
        """The dtype of the weights and activations on ``device`` (part of every cache key; the model is read
        in it): float32."""
        return torch.float32

    @classmethod
    def place(cls, model: nn.Module, device: str) -> nn.Module:
        """The loaded model in eval mode, without gradients, on ``device`` in :meth:`compute_dtype`."""
        return model.eval().requires_grad_(False).to(device=device, dtype=cls.compute_dtype(device))

    @classmethod
    def build_empty(cls, config) -> nn.Module:
        """The same architecture with random weights (what an exported folder is loaded into)."""
        model_class = cls.model_class(config)
        if cls.hf_model.startswith("Auto"):
            return model_class.from_config(config, **cls.hf_options)
        return model_class(config, **cls.hf_options)

    @classmethod
    def num_blocks_of(cls, config) -> int:
        """L, from the config alone (no weights loaded)."""
        return int(config.num_hidden_layers)

    @classmethod
    def hidden_size_of(cls, config) -> int:
        """D, from the config alone (no weights loaded)."""
        return int(config.hidden_size)

    @classmethod
    def max_tokens_of(cls, config) -> int | None:
        """The most tokens one sample may have, from the config alone (None: no limit that a setting reaches)."""
        return None

    @property
    def blocks(self) -> nn.ModuleList:
        """The L transformer blocks, in order."""
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module | None:
        """The norm applied to hs[L] before pooling (None for post-LN encoders such as BERT)."""
        return None

    def stem(self) -> dict[str, nn.Module]:
        """Modules that run before the first block (embeddings, pre-norm, position biases)."""
        raise NotImplementedError

    def embed(self, inputs: Inputs) -> torch.Tensor:
        """hs[0]: the embedding output (B, T, D)."""
        raise NotImplementedError

    def context(self, inputs: Inputs, hidden: torch.Tensor) -> Context:
        """What every block call of this batch needs (computed once per batch)."""
        return {}

    def call_block(self, block: nn.Module, hidden: torch.Tensor, ctx: Context):
        """One block, called the way the model's own forward calls it."""
        return block(hidden)

    def preprocess(self, items: Sequence) -> Inputs:
        """Raw samples (PIL images or texts) -> the model's inputs on the encoder's device."""
        raise NotImplementedError

    # --- folding (rba_core.passes.fold): where a map can be folded into the weights ------------------
    #: the linear layer (path inside a block) whose output, times ``mlp_scale`` where there is one,
    #: is the MLP output m that the block adds to the residual stream; None: no map folds into a block
    mlp_out: str | None = None
    mlp_out_transposed = False  # its weight is stored (in, out), as GPT-2's Conv1D
    mlp_scale: str | None = None  # a per-channel scale parameter (path inside a block) applied after mlp_out
    no_fold_reason = "its blocks do not end in a linear layer that writes the residual stream"
    #: modules (paths inside ``model``) whose parameters hs[0] is linear in, each with the hidden
    #: size as its output axis: a range 0→j folds its map into them; empty: it cannot
    linear_stem: tuple[str, ...] = ()
    no_stem_fold_reason = "its embedding output hs[0] is not linear in the embedding weights"

    def folds_at(self, start: int) -> bool:
        """Whether a range starting at ``start`` can fold: into the linear embeddings for 0, else into block
        ``start``'s MLP output layer (:mod:`rba_core.passes.fold`)."""
        return bool(self.linear_stem) if start == 0 else self.mlp_out is not None

    def mlp_output_module(self, block: int) -> nn.Module:
        """The module of block ``block`` (1..L) whose output is m, exactly what the block adds to the
        residual stream (the layer scale after the MLP where there is one)."""
        return self.blocks[block - 1].get_submodule(self.mlp_scale.rpartition(".")[0] if self.mlp_scale
                                                    else self.mlp_out)

    def save_pretrained_files(self, folder: Path) -> None:
        """Write the config and the processor or tokenizer next to an exported model."""
        self.config.to_json_file(folder / "config.json")
        self.processor.save_pretrained(folder)

    # --- shared by every family --------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def config(self):
        """The family's config (Hugging Face ``PretrainedConfig``, or timm's config.json)."""
        return self._config if self._config is not None else self.model.config

    def token_mask(self, inputs: Inputs) -> torch.Tensor | None:
        """(B, T) bool of real tokens; None when every token is real (images)."""
        mask = inputs.get("attention_mask")
        return None if mask is None else mask.bool()

    def run_block(self, block: nn.Module, hidden: torch.Tensor, ctx: Context) -> torch.Tensor:
        out = self.call_block(block, hidden, ctx)
        return out[0] if isinstance(out, tuple) else out

    def run_blocks(self, hidden: torch.Tensor, first: int, last: int, ctx: Context) -> torch.Tensor:
        """Run blocks ``first..last`` (1-indexed, inclusive) on ``hidden``; returns hs[last]."""
        for block in self.blocks[first - 1 : last]:
            hidden = self.run_block(block, hidden, ctx)
        return hidden

    def hidden_states(self, inputs: Inputs, seconds: list[float] | None = None) -> tuple[list[torch.Tensor], Context]:
        """hs[0..L] for one batch (each (B, T, D)) and the batch's block context: the one loop
        every pass (extraction, search, evaluation) runs. ``seconds``, when given, receives the
        wall time of the embedding step and of each block (L+1 entries)."""
        clock = time.perf_counter
        began = clock()
        hidden = self.embed(inputs)
        ctx = self.context(inputs, hidden)
        hs = [hidden]
        if seconds is not None:
            seconds.append(clock() - began)
        for block in self.blocks:
            began = clock()
            hs.append(self.run_block(block, hs[-1], ctx))
            if seconds is not None:
                seconds.append(clock() - began)
        return hs, ctx

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, D) -> (B, D): the first token, or the mean over real tokens (``pooling``)."""
        if self.pooling == "first":
            return hidden[:, 0]
        if mask is None:
            return hidden.mean(1)
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def final(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Final representation (B, D): the final norm of hs[L] (if any), then the pooling."""
        norm = self.final_norm
        return self.pool(hidden if norm is None else norm(hidden), mask)

    def num_params(self) -> int:
        """Parameters of the stem, blocks and final norm (no pooler, no head)."""
        modules = [*self.stem().values(), self.blocks] + ([self.final_norm] if self.final_norm else [])
        return sum(p.numel() for m in modules for p in m.parameters())

    def block_params(self, block: int) -> int:
        """Parameters of block ``block`` (1..L)."""
        return sum(p.numel() for p in self.blocks[block - 1].parameters())

    def with_max_length(self, max_length: int | None) -> "Encoder":
        """The same encoder (sharing the model) truncating texts at ``max_length``; the shared
        encoder itself is never changed, so concurrent requests cannot disturb each other."""
        twin = copy.copy(self)
        twin.max_length = max_length if self.modality == "text" else None
        return twin

    def describe(self) -> dict:
        """What results record about the model."""
        return {"family": self.family, "modality": self.modality, "pooling": self.pooling,
                "max_length": self.max_length}


class ImageEncoder(Encoder):
    """Hugging Face image encoders: an image processor and ``pixel_values`` in."""

    modality = "image"

    @classmethod
    def load_processor(cls, source: str):
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(source, backend="pil")

    def preprocess(self, items: Sequence) -> Inputs:
        pixels = self.processor(images=[im.convert("RGB") for im in items], return_tensors="pt")
        return {"pixel_values": pixels["pixel_values"].to(self.device, torch.float32)}

    def image_size(self) -> tuple[int, int]:
        """(H, W) of the processor's output: crop size when it crops, else its resize size, else the config's."""
        for attr in ("crop_size", "size"):
            size = getattr(self.processor, attr, None) or {}
            if "height" in size and (attr == "crop_size" or not getattr(self.processor, "do_center_crop", False)):
                return int(size["height"]), int(size["width"])
        return int(self.config.image_size), int(self.config.image_size)


class TextEncoder(Encoder):
    """Hugging Face text encoders: the model's own tokenizer, padding to the longest in the batch."""

    modality = "text"

    @classmethod
    def load_processor(cls, source: str):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source)

    @classmethod
    def position_offset(cls, config) -> int:
        """Position embeddings never used: 0, or pad_token_id + 1 where position ids start after the padding
        id (RoBERTa, XLM-R, MPNet)."""
        return 0

    @classmethod
    def max_tokens_of(cls, config) -> int | None:
        """The model's position embeddings: a text truncated to more tokens than this cannot run."""
        limit = getattr(config, "max_position_embeddings", None)
        return int(limit) - cls.position_offset(config) if limit else None

    def preprocess(self, items: Sequence) -> Inputs:
        """Texts (or (text_a, text_b) pairs) -> input_ids, attention_mask (+ token_type_ids)."""
        pairs = bool(items) and isinstance(items[0], (tuple, list))
        first = [it[0] for it in items] if pairs else list(items)
        second = [it[1] for it in items] if pairs else None
        encoded = self.processor(first, second, padding="longest", truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in encoded.items()
                if k in ("input_ids", "attention_mask", "token_type_ids")}

    def bidirectional_mask(self, inputs: Inputs, hidden: torch.Tensor):
        """The attention mask in the form the model's own forward builds it.

        Built from the loaded model's own config, which carries the attention implementation
        (``sdpa``, ``eager``...): a config read separately has none, and the mask builder then
        returns no mask at all, so padding would be attended to."""
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden,
                                         attention_mask=inputs.get("attention_mask"))

    def context(self, inputs: Inputs, hidden: torch.Tensor) -> Context:
        """A bidirectional encoder's blocks need the padding mask only (families with more override this)."""
        return {"mask": self.bidirectional_mask(inputs, hidden)}

    def call_block(self, block: nn.Module, hidden: torch.Tensor, ctx: Context):
        return block(hidden, ctx["mask"])


def sentence_pooling(folder: Path) -> str | None:
    """``mean`` or ``first`` from a sentence-transformers ``1_Pooling/config.json``; None without one.

    The mean over real tokens is used when ``pooling_mode_mean_tokens`` is set (the later
    Normalize module of such folders is not applied)."""
    path = folder / "1_Pooling" / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        raise RBAError(f"'{path}' is not valid JSON; repair or remove the sentence-transformers pooling config.") from None
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    if config.get("pooling_mode_cls_token"):
        return "first"
    modes = [k for k, v in config.items() if k.startswith("pooling_mode") and v]
    raise RBAError(f"The sentence-transformers pooling in '{path}' ({', '.join(modes) or 'none'}) is not "
                   "supported; RBA Explorer supports mean and CLS pooling.")
