"""Llama causal LMs (Llama 2, Llama 3.x, TinyLlama, SmolLM2): the decoder layout every rotary family shares."""

from __future__ import annotations

from rba_core.models.decoder import DecoderLM


class LlamaLM(DecoderLM):
    """``LlamaForCausalLM``: blocks in ``model.layers``, final RMSNorm ``model.norm``, MLP output ``mlp.down_proj``."""

    hf_classes = ("LlamaForCausalLM",)
