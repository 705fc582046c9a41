"""Decoder language models (causal LMs): pre-LN blocks behind a causal mask, read with their LM head kept.

What every decoder family shares, as its own ``Model.forward`` runs it: ``hs[0]`` is the token
embeddings (plus position embeddings where the family adds them), each block is called with the
causal mask of its attention kind (full or sliding window, built once per batch by
``transformers.masking_utils`` from the loaded model's config) and the rotary position embeddings
computed once per batch. Position ids count real tokens only (``cumsum(mask) - 1``, as generation
does), so a text gets the same states whichever side the tokenizer pads. The final representation
of a token is the final norm of ``hs[L]``; one vector per text is its last real token.

A family declares where its pieces live (:attr:`DecoderLM.parts`) and, for folding, the module
that writes the MLP output into the residual stream (:attr:`Encoder.mlp_out`).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch import nn

from rba_core.errors import RBAError
from rba_core.models.base import Inputs, TextEncoder


class DecoderLM(TextEncoder):
    """A ``*ForCausalLM`` model: blocks, final norm and embeddings under its base model, LM head kept."""

    hf_classes = ("AutoModelForCausalLM",)
    hf_model = "AutoModelForCausalLM"
    default_pooling = "last"
    #: attribute names: the base model inside the causal LM, its block list, final norm, token embedding
    parts = {"base": "model", "blocks": "layers", "norm": "norm", "embed": "embed_tokens"}
    mlp_out: str | None = "mlp.down_proj"
    rotary_per_kind = False  # Gemma 3: one rotary embedding per attention kind


    @classmethod
    def compute_dtype(cls, device: str) -> torch.dtype:
        """bfloat16 weights and activations on CUDA (statistics still take float32 products summed in
        float64), float32 elsewhere."""
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32

    @classmethod
    def place(cls, model: nn.Module, device: str) -> nn.Module:
        """As every family does, except that a model larger than the free memory of one CUDA device is
        spread over the GPUs (then CPU memory) as ``device_map="auto"`` would; the pass then follows the
        layers across devices (accelerate's hooks move each block's inputs to it)."""
        if not str(device).startswith("cuda"):
            return super().place(model, device)
        model = model.eval().requires_grad_(False).to(cls.compute_dtype(device))
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        free = torch.cuda.mem_get_info(torch.device(device))[0]
        if size < 0.9 * free:
            return model.to(device)
        need = f"This model needs {size / 1e9:.1f} GB, more than the {free / 1e9:.1f} GB free on {device}"
        if int(os.environ.get("WORLD_SIZE") or 1) > 1:  # each worker holds a whole copy on its own GPU
            raise RBAError(f"{need}; run it as one process (no launcher), which spreads it over the GPUs.")
        try:
            from accelerate import dispatch_model, infer_auto_device_map
        except ImportError:
            raise RBAError(f"{need}; install accelerate (pip install accelerate) to spread it over the devices.") \
                from None
        device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules)
        if "disk" in device_map.values():
            raise RBAError(f"{need}, and more than the GPUs and the free RAM together hold; use a machine with "
                           "more memory or a smaller model.")
        return dispatch_model(model, device_map)

    @classmethod
    def load_processor(cls, source: str):
        tokenizer = super().load_processor(source)
        if tokenizer.pad_token is None:  # decoders often have none; padding is masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    # --- where the pieces live ----------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        return getattr(self.model, self.parts["base"])

    @property
    def blocks(self):
        return getattr(self.base, self.parts["blocks"])

    @property
    def final_norm(self):
        return getattr(self.base, self.parts["norm"])

    @property
    def linear_stem(self) -> tuple[str, ...]:
        """The token embedding (scaled or not, hs[0] is linear in it)."""
        return (f"{self.parts['base']}.{self.parts['embed']}",)

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def stem(self):
        stem = {"embed": getattr(self.base, self.parts["embed"])}
        if getattr(self.base, "rotary_emb", None) is not None:
            stem["rotary_emb"] = self.base.rotary_emb
        return stem

    # --- one batch ----------------------------------------------------------------------------
    @staticmethod
    def position_ids(inputs: Inputs) -> torch.Tensor:
        """(B, T) positions counting real tokens only (padding gets 0), as generation computes them."""
        mask = inputs.get("attention_mask")
        if mask is None:
            return torch.arange(inputs["input_ids"].shape[1], device=inputs["input_ids"].device).unsqueeze(0)
        return (mask.long().cumsum(-1) - 1).clamp_min(0)

    def embed(self, inputs):
        return getattr(self.base, self.parts["embed"])(inputs["input_ids"])

    def attention_kinds(self) -> list[str]:
        """The attention kind of every block (``layer_types``), full attention when the config has none."""
        config = self.model.config
        # Mistral and Phi-3 have no layer_types: a configured sliding window applies to every block
        default = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
        return list(getattr(config, "layer_types", None) or [default] * self.num_blocks)

    def context(self, inputs, hidden):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        positions = self.position_ids(inputs)
        mask = inputs.get("attention_mask")
        # Without padding, no position ids reach the mask builders: as in the model's own forward, the
        # causal mask can then stay implicit (sdpa's fast is_causal path) instead of a (B, 1, T, T) tensor.
        kwargs = {"config": self.model.config, "inputs_embeds": hidden,  # config: carries the attention implementation
                  "attention_mask": mask, "past_key_values": None,
                  "position_ids": None if mask is None or bool(mask.all()) else positions}
        builders = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        kinds = self.attention_kinds()
        rotary = getattr(self.base, "rotary_emb", None)
        if rotary is None:
            embeddings = {}
        elif self.rotary_per_kind:
            embeddings = {kind: rotary(hidden, positions, kind) for kind in set(kinds)}
        else:
            shared = rotary(hidden, positions)
            embeddings = {kind: shared for kind in set(kinds)}
        return {"positions": positions, "mask": {kind: builders[kind](**kwargs) for kind in set(kinds)},
                "rotary": embeddings, "kind": {id(block): kind for block, kind in zip(self.blocks, kinds)}}

    def call_block(self, block, hidden, ctx):
        kind = ctx["kind"][id(block)]
        return block(hidden, attention_mask=ctx["mask"][kind], position_embeddings=ctx["rotary"].get(kind),
                     position_ids=ctx["positions"])

    def preprocess(self, items: Sequence) -> Inputs:
        """Texts (tokenized with padding on the tokenizer's side) or token windows (equal-length id arrays)."""
        if len(items) and not isinstance(items[0], str):
            ids = torch.as_tensor(np.stack([np.asarray(it, dtype=np.int64) for it in items]))
            return {"input_ids": ids.to(self.device), "attention_mask": torch.ones_like(ids).to(self.device)}
        encoded = self.processor(list(items), padding="longest", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        return {k: encoded[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def pool(self, hidden, mask):
        if self.pooling != "last":
            return super().pool(hidden, mask)
        if mask is None:
            return hidden[:, -1]
        # the last real token wherever the padding is: the largest position whose mask is set
        order = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask, order, -1).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, V) from hs[L], (B, T, D): final norm, then the model's own LM head."""
        logits = self.lm_head(self.final_norm(hidden))
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits
