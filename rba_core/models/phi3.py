"""Phi-3 causal LMs: the Llama layout with fused qkv and gate/up projections."""

from __future__ import annotations

from rba_core.models.decoder import DecoderLM


class Phi3LM(DecoderLM):
    """``Phi3ForCausalLM``: blocks in ``model.layers``; the MLP output is ``mlp.down_proj``."""

    hf_classes = ("Phi3ForCausalLM",)
