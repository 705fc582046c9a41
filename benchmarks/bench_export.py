"""Benchmark (issue 4): size on disk and latency of an exported compressed ViT-S against the original.

    python benchmarks/bench_export.py [--fit-n 64] [--batch 8] [--range 2 6]

A random-weight ViT-S (224 px) whose range i→j (default 2→6, the paper's "1 5": 8 of 12 blocks
left) is replaced by the least-squares map fitted on real CIFAR-10 images. It is saved with
``save_compressed(..., onnx=True)``, loaded back with ``rba_core.load_compressed`` and run by
PyTorch and by onnxruntime (the original model is exported the same way for comparison);
latency per image is measured by ``rba_core.latency.measure`` (warm-up, interleaved runs on one
batch until the interquartile spread is within 5% or 5 s are used; median and p25-p75).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch

import common
import rba_core
from rba_core.passes.approx import ApproximatedEncoder, approximate_encoder
from rba_core.cache import Cache
from rba_core.data import open_dataset
from rba_core.store.export import ONNX, WEIGHTS, export_onnx, onnx_session, save_compressed
from rba_core.passes.extract import extract
from rba_core.latency import measure
from rba_core.models import load_encoder


def _mb(path: Path) -> float:
    return path.stat().st_size / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fit-n", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--range", nargs=2, type=int, default=(2, 6))
    parser.add_argument("--json", type=Path, default=common.ROOT / "benchmarks" / "out" / "export.json")
    args = parser.parse_args()
    dataset = common.dataset()
    rng = tuple(args.range)
    with tempfile.TemporaryDirectory() as tmp:
        folder = common.vit_s_folder(Path(tmp) / "vit-s")
        encoder = load_encoder(folder, "cpu")
        stats = extract(folder, dataset, args.fit_n, 0, "train", cache=Cache(Path(tmp) / "cache"),
                        encoder=encoder).stats()
        net = approximate_encoder(encoder, stats, [rng])
        out = save_compressed(net, Path(tmp) / "compressed", encoder=encoder, onnx=True)
        loaded = rba_core.load_compressed(out)
        session = onnx_session(out)
        # The original model through the same exporter, for a like-for-like onnxruntime comparison.
        original = ApproximatedEncoder(encoder, [], [])  # no range: the original model's own path
        full_onnx = export_onnx(original, Path(tmp) / "original.onnx", (224, 224))
        full_session = onnxruntime.InferenceSession(str(full_onnx), providers=["CPUExecutionProvider"])
        pixels = encoder.preprocess(open_dataset(dataset, "test").items(range(args.batch)))
        run_onnx = lambda pixel_values: session.run(["final"], {"pixel_values": pixel_values.numpy()})[0]  # noqa: E731
        run_full_onnx = lambda pixel_values: full_session.run(["final"], {"pixel_values": pixel_values.numpy()})[0]  # noqa: E731, E501
        with torch.inference_mode():
            reference = net(**pixels)
            loaded_diff = float((loaded(**pixels) - reference).abs().max())
        onnx_diff = float(np.abs(run_onnx(**pixels) - reference.numpy()).max())
        # Interleaved on the same pixels, repeated to a stated spread: median and p25-p75 per forward.
        latency = measure({"original_pytorch": original, "compressed_pytorch": loaded,
                           "original_onnxruntime": run_full_onnx, "compressed_onnxruntime": run_onnx}, pixels)
        sizes = {
            "original_model_safetensors": _mb(Path(folder) / "model.safetensors"),
            "compressed_model_safetensors": _mb(out / WEIGHTS),
            "original_model_onnx": _mb(full_onnx),
            "compressed_model_onnx": _mb(out / ONNX),
            "compressed_folder_without_onnx": sum(_mb(p) for p in out.iterdir() if p.name != ONNX),
        }
        record = loaded.record
    result = {
        "machine": common.machine(), "load_average_1min": os.getloadavg()[0], "batch": args.batch,
        "range": f"{rng[0]}→{rng[1]}", "paper": record["ranges"][0]["paper"], "kept_blocks": record["kept_blocks"],
        "params": record["params"], "size_mb": sizes, "latency_ms_per_image": latency,
        "max_abs_diff": {"load_compressed_vs_approximated": loaded_diff, "onnxruntime_vs_approximated": onnx_diff},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
