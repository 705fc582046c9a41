"""GPT-2 causal LMs: learned absolute position embeddings, pre-LN blocks in ``transformer.h``.

hs[0] is token plus position embeddings (what GPT-2's own ``hidden_states[0]`` holds); positions
count real tokens only, so left padding does not shift them. The MLP output projection is a
``Conv1D`` whose weight is stored (in, out).
"""

from __future__ import annotations

from rba_core.models.decoder import DecoderLM


class GPT2LM(DecoderLM):
    """``GPT2LMHeadModel``: blocks ``transformer.h``, final norm ``transformer.ln_f``, head tied to ``wte``."""

    hf_classes = ("GPT2LMHeadModel",)
    parts = {"base": "transformer", "blocks": "h", "norm": "ln_f", "embed": "wte"}
    mlp_out = "mlp.c_proj"
    mlp_out_transposed = True
    linear_stem = ("transformer.wte", "transformer.wpe")

    def stem(self):
        return {"embed": self.base.wte, "positions": self.base.wpe}

    def embed(self, inputs):
        return self.base.wte(inputs["input_ids"]) + self.base.wpe(self.position_ids(inputs))

    def call_block(self, block, hidden, ctx):
        return block(hidden, attention_mask=ctx["mask"]["full_attention"])
