"""Shared fixtures: tiny random ViT / DeiT / DINOv2 encoders saved to disk, tiny image datasets."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One thread (see below), also where the code under test plans threads (rba_core.threads): the user's choice wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the threads
# contend: one thread makes a tiny-model test run up to 20x faster (measured on issue 4's tests).
torch.set_num_threads(1)

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
            image_size=32, patch_size=8)


def build_tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A random encoder of ``family``, the same for the same seed."""
    from transformers import DeiTConfig, DeiTModel, Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    torch.manual_seed(seed)
    if family == "vit":
        return ViTModel(ViTConfig(**TINY), add_pooling_layer=False)
    if family == "deit":
        return DeiTModel(DeiTConfig(**TINY), add_pooling_layer=False)
    return Dinov2Model(Dinov2Config(**{**TINY, "image_size": 32, "patch_size": 8}))


def save_tiny_model(folder: Path, family: str, seed: int = 0) -> Path:
    """Build a random encoder of ``family`` and save it with its image processor."""
    from transformers import ViTImageProcessor

    model = build_tiny_model(family, seed)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {fam: str(save_tiny_model(root / fam, fam)) for fam in ("vit", "deit", "dinov2")}


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> str:
    """Three classes of random grayscale and colour images, one sub-folder per class."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"class{c}").mkdir()
        for k in range(20):
            shape = (20, 24) if k % 2 else (20, 24, 3)
            pixels = (rng.random(shape) * 80 + 60 * c).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{k}.png")
    return str(root)


@pytest.fixture
def cache(tmp_path):
    from rba_core.cache import Cache

    return Cache(tmp_path / "cache")
