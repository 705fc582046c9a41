"""Gemma 2 and Gemma 3 (text) causal LMs: scaled token embeddings, alternating sliding and full attention.

Their blocks normalise the MLP output (``post_feedforward_layernorm``) before adding it to the
residual stream, so no linear layer writes m directly: a map folds only into the (scaled, still
linear) token embeddings, for a range 0→j.
Gemma 3 computes one rotary embedding per attention kind; Gemma 2 caps the logits.
"""

from __future__ import annotations

from rba_core.models.decoder import DecoderLM


class Gemma2LM(DecoderLM):
    """``Gemma2ForCausalLM``: blocks in ``model.layers``, each with the mask of its ``layer_types`` entry."""

    hf_classes = ("Gemma2ForCausalLM",)
    mlp_out = None
    no_fold_reason = ("its blocks normalise the MLP output (post_feedforward_layernorm) before adding it to the "
                      "residual stream")


class Gemma3LM(DecoderLM):
    """``Gemma3ForCausalLM`` (text only, ``gemma3_text``): rotary embeddings per attention kind."""

    hf_classes = ("Gemma3ForCausalLM",)
    mlp_out = None
    no_fold_reason = Gemma2LM.no_fold_reason
    rotary_per_kind = True
