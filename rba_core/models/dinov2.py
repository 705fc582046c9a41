"""DINOv2 image encoders (Hugging Face ``Dinov2Model``, layer scale inside each block): CLS after the final LayerNorm."""

from __future__ import annotations

from rba_core.models.vit import ViTEncoder


class Dinov2Encoder(ViTEncoder):
    """As ViT (embeddings, final norm ``model.layernorm``, CLS), with blocks in ``model.encoder.layer``."""

    hf_classes = ("Dinov2Model",)
    hf_model = "Dinov2Model"
    hf_options = {}  # no pooler to leave out
    mlp_scale = "layer_scale2.lambda1"  # m = λ ⊙ mlp(x): folding puts λ into the MLP output layer

    @property
    def mlp_out(self):
        return "mlp.down_proj" if self.model.config.use_swiglu_ffn else "mlp.fc2"

    @property
    def blocks(self):
        return self.model.encoder.layer
