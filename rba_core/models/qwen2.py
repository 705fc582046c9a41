"""Qwen2 / Qwen2.5 and Qwen3 causal LMs: the Llama layout with per-block ``layer_types`` (full or sliding attention)."""

from __future__ import annotations

from rba_core.models.decoder import DecoderLM


class Qwen2LM(DecoderLM):
    """``Qwen2ForCausalLM``: blocks in ``model.layers``, each with the mask of its ``layer_types`` entry."""

    hf_classes = ("Qwen2ForCausalLM",)


class Qwen3LM(DecoderLM):
    """``Qwen3ForCausalLM``: Qwen2's layout with q/k norms inside attention (invisible to the pass)."""

    hf_classes = ("Qwen3ForCausalLM",)
