"""Mistral causal LMs: the Llama layout with an optional sliding window on every block."""

from __future__ import annotations

from rba_core.models.decoder import DecoderLM


class MistralLM(DecoderLM):
    """``MistralForCausalLM``: blocks in ``model.layers``; ``config.sliding_window`` picks the sliding mask."""

    hf_classes = ("MistralForCausalLM",)
