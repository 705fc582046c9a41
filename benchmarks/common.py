"""Shared set-up for the benchmarks: a random ViT-S folder, real images, the machine's matmul rate."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts run from a checkout, rba_core need not be installed
SHARED_CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10"
VIT_S = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
             image_size=224, patch_size=16)


def vit_s_folder(folder: Path) -> str:
    """Save a random-weight ViT-S (the paper's ViT-S architecture) with a 224 px processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        ViTModel(ViTConfig(**VIT_S), add_pooling_layer=False).save_pretrained(folder)
        ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return str(folder)


def dataset() -> str:
    """Real CIFAR-10 from ../shared/datasets when present (the benchmarks need real images)."""
    if not SHARED_CIFAR.is_dir():
        raise SystemExit(f"{SHARED_CIFAR} is missing: the benchmarks read real CIFAR-10 images")
    return str(SHARED_CIFAR)


def vit_flops_per_image(hidden: int, layers: int, mlp: int, image: int, patch: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of one ViT forward: patch embedding, attention and MLP."""
    tokens = (image // patch) ** 2 + 1
    per_block = tokens * (4 * hidden * hidden + 2 * hidden * mlp) + 2 * tokens * tokens * hidden
    return 2.0 * (layers * per_block + (tokens - 1) * 3 * patch * patch * hidden)


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GEMM rate of this machine, in GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - began)
    return 2 * size**3 / best / 1e9


def vit_gemm_gflops(hidden: int = 384, mlp: int = 1536, image: int = 224, patch: int = 16,
                    batch: int = 32, repeats: int = 3) -> float:
    """fp32 GEMM rate at a ViT block's own shapes (QKV, projection, MLP up and down), GFLOP/s."""
    rows = batch * ((image // patch) ** 2 + 1)
    shapes = [(hidden, 3 * hidden), (hidden, hidden), (hidden, mlp), (mlp, hidden)]
    pairs = [(torch.randn(rows, k), torch.randn(k, n)) for k, n in shapes]
    flops = sum(2 * rows * k * n for k, n in shapes)
    best = float("inf")
    for _ in range(repeats + 1):
        began = time.perf_counter()
        for a, b in pairs:
            a @ b
        best = min(best, time.perf_counter() - began)
    return flops / best / 1e9


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def best_seconds(fn, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``fn()``, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - began)
    return best
