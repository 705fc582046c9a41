"""CLIP vision towers (``CLIPVisionModel``, also from a full ``CLIPModel`` checkpoint).

hs[0] is the patch embeddings after CLIP's pre-LayerNorm (``pre_layrnorm``); the final
representation is the CLS token of hs[L] after ``post_layernorm``, as CLIP's own pooled output.
"""

from __future__ import annotations

from rba_core.models.base import ImageEncoder


def _vision_config(config):
    return getattr(config, "vision_config", config)  # a CLIPModel config holds the tower's config


class CLIPVisionEncoder(ImageEncoder):
    """Blocks in ``model.encoder.layers``."""

    hf_classes = ("CLIPVisionModel",)
    hf_model = "CLIPVisionModel"
    mlp_out = "mlp.fc2"
    no_stem_fold_reason = "its hs[0] is the embeddings after pre_layrnorm, which is not linear in them"

    def __init__(self, name, source, family, model, *args, config=None, **kwargs):
        vision = getattr(model, "vision_model", None)
        if vision is not None:  # a loaded full CLIPModel: its vision tower, described by the full config
            config, model = config or model.config, vision
        super().__init__(name, source, family, model, *args, config=config, **kwargs)

    @classmethod
    def build_empty(cls, config):
        return super().build_empty(_vision_config(config))

    @classmethod
    def num_blocks_of(cls, config) -> int:
        return int(_vision_config(config).num_hidden_layers)

    @classmethod
    def hidden_size_of(cls, config) -> int:
        return int(_vision_config(config).hidden_size)

    @property
    def blocks(self):
        return self.model.encoder.layers

    @property
    def final_norm(self):
        return self.model.post_layernorm

    def stem(self):
        return {"embeddings": self.model.embeddings, "pre_layrnorm": self.model.pre_layrnorm}

    def embed(self, inputs):
        return self.model.pre_layrnorm(self.model.embeddings(inputs["pixel_values"]))

    def call_block(self, block, hidden, ctx):
        return block(hidden, None)
