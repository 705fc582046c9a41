"""ViT and DeiT image encoders (Hugging Face ``ViTModel`` / ``DeiTModel``): CLS token after the final LayerNorm."""

from __future__ import annotations

from rba_core.models.base import ImageEncoder


class ViTEncoder(ImageEncoder):
    """Blocks in ``model.layers``; final norm ``model.layernorm``; the pooler is never used."""

    hf_classes = ("ViTModel", "DeiTModel")
    mlp_out = "mlp.fc2"
    #: patch projection, position embeddings, CLS (DeiT: and distillation) token, mask token if present
    linear_stem = ("embeddings",)

    hf_model = "ViTModel"
    hf_options = {"add_pooling_layer": False}  # the pooler is unused and often newly initialised in a backbone

    @classmethod
    def model_class(cls, config):
        import transformers

        return transformers.DeiTModel if config.model_type == "deit" else getattr(transformers, cls.hf_model)

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
