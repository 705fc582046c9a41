"""ModernBERT text encoders: pre-LN blocks with rotary position embeddings, global and sliding-window attention.

Each block's ``attention_type`` picks its mask and rotary embedding, both computed once per batch
as ``ModernBertModel.forward`` does; the final representation is ``final_norm`` then the pooling.
"""

from __future__ import annotations

import torch

from rba_core.models.base import TextEncoder


class ModernBertEncoder(TextEncoder):
    """``ModernBertModel``: blocks in ``model.layers``, final norm ``model.final_norm``."""

    hf_classes = ("ModernBertModel",)
    hf_model = "ModernBertModel"
    mlp_out = "mlp.Wo"
    no_stem_fold_reason = ("its hs[0] is the token embeddings after a LayerNorm (embeddings.norm), which is not "
                           "linear in them")

    @property
    def blocks(self):
        return self.model.layers

    @property
    def final_norm(self):
        return self.model.final_norm

    def stem(self):
        return {"embeddings": self.model.embeddings, "rotary_emb": self.model.rotary_emb}

    def embed(self, inputs):
        return self.model.embeddings(input_ids=inputs["input_ids"])

    def context(self, inputs, hidden):
        from transformers.masking_utils import create_bidirectional_sliding_window_mask

        config = self.model.config  # carries the attention implementation the masks are built for
        kwargs = {"config": config, "inputs_embeds": hidden, "attention_mask": inputs.get("attention_mask")}
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        return {
            "mask": {"full_attention": self.bidirectional_mask(inputs, hidden),
                     "sliding_attention": create_bidirectional_sliding_window_mask(**kwargs)},
            "rotary": {kind: self.model.rotary_emb(hidden, positions, kind) for kind in set(config.layer_types)},
        }

    def call_block(self, block, hidden, ctx):
        kind = block.attention_type
        return block(hidden, attention_mask=ctx["mask"][kind], position_embeddings=ctx["rotary"][kind])
