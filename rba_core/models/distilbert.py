"""DistilBERT text encoders (post-LN blocks in ``model.transformer.layer``, no token types)."""

from __future__ import annotations

from rba_core.models.base import POST_LN_REASON, TextEncoder


class DistilBertEncoder(TextEncoder):
    """``DistilBertModel``; the final representation is the pooling of hs[L] (no final norm)."""

    hf_classes = ("DistilBertModel",)
    hf_model = "DistilBertModel"
    no_fold_reason = POST_LN_REASON

    @property
    def blocks(self):
        return self.model.transformer.layer

    def stem(self):
        return {"embeddings": self.model.embeddings}

    def embed(self, inputs):
        return self.model.embeddings(inputs["input_ids"])
