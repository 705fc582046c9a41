"""BERT-style text encoders: BERT, RoBERTa and XLM-RoBERTa (post-LN blocks in ``model.encoder.layer``).

The blocks end in a LayerNorm, so there is no final norm: the final representation is the
pooling of hs[L] ([CLS], or the mean over real tokens for sentence-transformers folders).
"""

from __future__ import annotations

from rba_core.models.base import POST_LN_REASON, TextEncoder


class BertEncoder(TextEncoder):
    """``BertModel`` / ``RobertaModel`` / ``XLMRobertaModel`` without the pooler."""

    hf_classes = ("BertModel", "RobertaModel", "XLMRobertaModel")
    hf_options = {"add_pooling_layer": False}
    no_fold_reason = POST_LN_REASON

    @classmethod
    def position_offset(cls, config) -> int:
        return 0 if config.model_type == "bert" else int(config.pad_token_id) + 1  # RoBERTa, XLM-R

    @property
    def blocks(self):
        return self.model.encoder.layer

    def stem(self):
        return {"embeddings": self.model.embeddings}

    def embed(self, inputs):
        return self.model.embeddings(input_ids=inputs["input_ids"], token_type_ids=inputs.get("token_type_ids"))
