"""ViT and DeiT image encoders (Hugging Face ``ViTModel`` / ``DeiTModel``): CLS token after the final LayerNorm."""

from __future__ import annotations

import torch

from rba_core.models.base import ImageEncoder


class ViTEncoder(ImageEncoder):
    """Blocks in ``model.layers``; final norm ``model.layernorm``; the pooler is never used."""

    hf_classes = ("ViTModel", "DeiTModel")
    mlp_out = "mlp.fc2"
    #: patch projection, position embeddings, CLS (DeiT: and distillation) token, mask token if present
    linear_stem = ("embeddings",)

    @classmethod
    def _model_class(cls, config):
        from transformers import DeiTModel, ViTModel

        return DeiTModel if config.model_type == "deit" else ViTModel

    @classmethod
    def load_model(cls, source: str, config):
        # The pooler is unused and often newly initialised when loading a backbone.
        return cls._model_class(config).from_pretrained(source, dtype=torch.float32, trust_remote_code=False,
                                                        add_pooling_layer=False)

    @classmethod
    def build_empty(cls, config):
        return cls._model_class(config)(config, add_pooling_layer=False)

    @property
    def blocks(self):
        return self.model.layers

    @property
    def final_norm(self):
        return self.model.layernorm

    def stem(self):
        return {"embeddings": self.model.embeddings}

    def embed(self, inputs):
        return self.model.embeddings(inputs["pixel_values"])
