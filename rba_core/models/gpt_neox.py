"""GPT-NeoX causal LMs (Pythia): rotary blocks in ``gpt_neox.layers``, parallel attention and MLP residuals."""

from __future__ import annotations

from rba_core.models.decoder import DecoderLM


class GPTNeoXLM(DecoderLM):
    """``GPTNeoXForCausalLM``: final norm ``gpt_neox.final_layer_norm``, MLP output ``mlp.dense_4h_to_h``."""

    hf_classes = ("GPTNeoXForCausalLM",)
    parts = {"base": "gpt_neox", "blocks": "layers", "norm": "final_layer_norm", "embed": "embed_in"}
    mlp_out = "mlp.dense_4h_to_h"
