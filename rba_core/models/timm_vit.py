"""timm vision transformers (any ``timm`` ``VisionTransformer``), loaded and preprocessed by timm itself.

A timm folder or hub repo has a ``config.json`` naming an ``architecture`` (no ``model_type``);
the registry reads it as family ``timm``. hs[0] is ``norm_pre(pos_embed(patch_embed(x)))``; the
final representation is timm's own ``forward_head(norm(hs[L]), pre_logits=True)`` (its pooling
and ``fc_norm``, no classifier). Needs the optional ``timm`` package (and torchvision).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rba_core.errors import RBAError
from rba_core.models.base import ImageEncoder


def _timm():
    try:
        import timm
    except Exception as exc:  # ImportError, or torchvision failing to load its operators
        raise RBAError("This is a timm model but the timm package cannot be imported "
                       f"({exc.__class__.__name__}); install it with `pip install timm torchvision`.") from None
    return timm


class TimmConfig(dict):
    """timm's ``config.json`` (architecture, model_args, pretrained_cfg) read as a family config."""

    model_type = "timm"

    @property
    def architecture(self) -> str:
        return self["architecture"]

    def to_json_file(self, path) -> None:
        import json

        Path(path).write_text(json.dumps(self, indent=2))


class TimmViTEncoder(ImageEncoder):
    """``model.blocks``, final norm ``model.norm``, pooling and ``fc_norm`` as timm's head does
    (``final_norm`` holds ``norm`` and the head's parameters, so they are counted and exported)."""

    no_fold_reason = "timm models are not written as Hugging Face checkpoints"

    @classmethod
    def load_model(cls, source: str, config, dtype: torch.dtype = torch.float32):
        timm = _timm()
        prefix = "local-dir:" if Path(source).is_dir() else "hf-hub:"
        model = timm.create_model(prefix + source, pretrained=True, num_classes=0)
        if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
            raise RBAError(f"'{source}' is a timm {config.architecture}, not a VisionTransformer; "
                           "RBA Explorer runs timm vision transformers only.")
        return model.float()

    @classmethod
    def build_empty(cls, config):
        # save_for_hf records num_classes inside model_args too: one value, no classifier. The
        # saved pretrained_cfg (input size, mean, std, crop) is what timm's own loader uses; without
        # it the architecture's default (224 px) would build the transform of an exported model.
        kwargs = {**config.get("model_args", {}), "num_classes": 0}
        return _timm().create_model(config.architecture, pretrained=False,
                                    pretrained_cfg=config.get("pretrained_cfg"), **kwargs)

    @classmethod
    def load_processor(cls, source: str):
        return None  # built from the loaded model's pretrained_cfg in __init__

    @classmethod
    def num_blocks_of(cls, config) -> int:
        with torch.device("meta"):
            return len(cls.build_empty(config).blocks)

    @classmethod
    def hidden_size_of(cls, config) -> int:
        with torch.device("meta"):
            return int(cls.build_empty(config).embed_dim)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            from timm.data import create_transform, resolve_data_config

            self.processor = create_transform(**resolve_data_config({}, model=self.model))

    @property
    def hidden_size(self) -> int:
        return int(self.model.num_features)

    @property
    def blocks(self):
        return self.model.blocks

    @property
    def final_norm(self):
        return _FinalNorm(self.model)

    def stem(self):
        return {"patch_embed": self.model.patch_embed, "pos": _PositionEmbedding(self.model),
                "norm_pre": self.model.norm_pre}

    def embed(self, inputs):
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(inputs["pixel_values"]))))

    def pool(self, hidden, mask):
        if self.model.global_pool == "token":
            return hidden[:, 0]
        return hidden[:, self.model.num_prefix_tokens:].mean(1)

    def final(self, hidden, mask):
        return self.model.forward_head(self.model.norm(hidden), pre_logits=True)

    def preprocess(self, items):
        pixels = torch.stack([self.processor(im.convert("RGB")) for im in items])
        return {"pixel_values": pixels.to(self.device, torch.float32)}

    def save_pretrained_files(self, folder: Path) -> None:
        # timm rebuilds the transform from the pretrained_cfg inside config.json.
        self.config.to_json_file(folder / "config.json")

    def image_size(self) -> tuple[int, int]:
        return tuple(self.model.pretrained_cfg.get("input_size", (3, 224, 224))[1:])


class _PositionEmbedding(torch.nn.Module):
    """The position embedding and prefix tokens (cls, registers) a timm ViT adds to the patches.

    They are parameters of the ViT itself, shared here; loading a state dict (also with
    ``assign=True``, which swaps in new tensors) gives them back to the ViT, whose forward reads them.
    """

    def __init__(self, model):
        super().__init__()
        object.__setattr__(self, "_owner", model)  # not a submodule: its blocks are not part of the stem
        for name in ("cls_token", "reg_token", "pos_embed"):
            value = getattr(model, name, None)
            if isinstance(value, torch.nn.Parameter):
                self.register_parameter(name, value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for name, param in self._parameters.items():
            setattr(self._owner, name, param)


class _FinalNorm(torch.nn.Module):
    """timm's final ``norm`` (what ``forward_features`` ends with) together with the parameters its
    pooling head uses (``fc_norm``, the attention pool): what follows the last block, no classifier.
    Calling it applies ``norm``; :meth:`TimmViTEncoder.final` runs timm's own ``forward_head``."""

    def __init__(self, model):
        super().__init__()
        self.norm = model.norm
        for name in ("fc_norm", "attn_pool"):
            module = getattr(model, name, None)
            if isinstance(module, torch.nn.Module):
                self.add_module(name, module)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)
