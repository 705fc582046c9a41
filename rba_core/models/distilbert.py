"""DistilBERT text encoders (post-LN blocks in ``model.transformer.layer``, no token types)."""

from __future__ import annotations

import torch

from rba_core.models.base import POST_LN_REASON, TextEncoder


class DistilBertEncoder(TextEncoder):
    """``DistilBertModel``; the final representation is the pooling of hs[L] (no final norm)."""

    hf_classes = ("DistilBertModel",)
    no_fold_reason = POST_LN_REASON

    @classmethod
    def load_model(cls, source: str, config):
        from transformers import DistilBertModel

        return DistilBertModel.from_pretrained(source, dtype=torch.float32, trust_remote_code=False)

    @classmethod
    def build_empty(cls, config):
        from transformers import DistilBertModel

        return DistilBertModel(config)

    @property
    def blocks(self):
        return self.model.transformer.layer

    def stem(self):
        return {"embeddings": self.model.embeddings}

    def embed(self, inputs):
        return self.model.embeddings(inputs["input_ids"])

    def context(self, inputs, hidden):
        return {"mask": self.bidirectional_mask(inputs, hidden)}

    def call_block(self, block, hidden, ctx):
        return block(hidden, ctx["mask"])
