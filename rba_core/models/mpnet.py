"""MPNet text encoders: post-LN blocks in ``model.encoder.layer`` sharing one relative position bias."""

from __future__ import annotations

from rba_core.models.base import POST_LN_REASON, TextEncoder


class MPNetEncoder(TextEncoder):
    """``MPNetModel`` without the pooler; the position bias is computed once per batch, as its forward does."""

    hf_classes = ("MPNetModel",)
    hf_model = "MPNetModel"
    hf_options = {"add_pooling_layer": False}
    no_fold_reason = POST_LN_REASON

    @classmethod
    def position_offset(cls, config) -> int:
        return int(config.pad_token_id) + 1  # position ids start after the padding id, as RoBERTa's

    @property
    def blocks(self):
        return self.model.encoder.layer

    def stem(self):
        return {"embeddings": self.model.embeddings,
                "relative_attention_bias": self.model.encoder.relative_attention_bias}

    def embed(self, inputs):
        return self.model.embeddings(input_ids=inputs["input_ids"])

    def context(self, inputs, hidden):
        return {"mask": self.bidirectional_mask(inputs, hidden),
                "position_bias": self.model.encoder.compute_position_bias(hidden)}

    def call_block(self, block, hidden, ctx):
        return block(hidden, ctx["mask"], ctx["position_bias"])
