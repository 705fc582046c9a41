"""How to take an approximated encoder away: a folder of safetensors weights, config and a record
of its ranges and maps, loaded back as a plain ``nn.Module`` (and an ONNX file for other runtimes).

Folder layout::

    config.json                 the original encoder's config (ViT, DeiT or DINOv2)
    preprocessor_config.json    its image processor
    model.safetensors           the compressed weights only: embeddings, kept blocks, maps, final norm
    rba.json                    the record: ranges, map kinds, kept blocks, tensor shapes, file digests
    model.onnx                  optional: the same forward, pixel_values (B, 3, H, W) -> final (B, D)

Loading never unpickles: JSON and safetensors only. The weights' metadata holds the sha256 of
``rba.json`` and the record holds the sha256 of every other file, so an edited, swapped or
missing file is refused with an :class:`~rba_core.errors.RBAError` before anything runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from rba_core.approx import ApproximatedEncoder, LinearMap, Range, _Block, count_params, paper_notation, validate_ranges
from rba_core.errors import RBAError
from rba_core.models import Encoder, load_config

FORMAT = "rba-compressed"
VERSION = 1
RECORD, WEIGHTS, CONFIG, PREPROCESSOR, ONNX = (
    "rba.json", "model.safetensors", "config.json", "preprocessor_config.json", "model.onnx")
_DIGEST_KEY = "rba_record_sha256"

Compressed = ApproximatedEncoder | tuple[Encoder, Sequence[Range], Sequence[LinearMap | None]]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _map_kind(linear_map: LinearMap | None) -> str:
    return "identity" if linear_map is None else ("linear" if linear_map.bias is None else "affine")


def _maps_of(net: ApproximatedEncoder) -> list[LinearMap | None]:
    """The map of each range, read back by walking the steps as ApproximatedEncoder built them
    (a skipped range has no step; an identity range followed by an adjacent mapped range reads
    the other way round, which computes the same function)."""
    steps = list(net.steps)
    starts = dict(net.ranges)
    num_blocks = sum(isinstance(s, _Block) for s in steps) + sum(j - i for i, j in net.ranges)
    maps, k, position = [], 0, 0
    while k < num_blocks:
        if k in starts:
            step = steps[position] if position < len(steps) else None
            maps.append(step if isinstance(step, LinearMap) else None)
            position += isinstance(step, LinearMap)
            k = starts[k]
        else:
            position, k = position + 1, k + 1
    return maps


def _parts(compressed: Compressed, encoder: Encoder | None) -> tuple[Encoder, list[Range], list[LinearMap | None]]:
    if isinstance(compressed, ApproximatedEncoder):
        if encoder is None or compressed.embeddings is not encoder.model.embeddings:
            raise RBAError("Pass the encoder the approximated model was built from (encoder=...): "
                           "its config and image processor are saved with the weights.")
        return encoder, list(compressed.ranges), _maps_of(compressed)
    encoder, ranges, maps = compressed
    if len(maps) != len(ranges):
        raise RBAError(f"Give one map per range: {len(ranges)} ranges but {len(maps)} maps.")
    order = sorted(range(len(ranges)), key=lambda n: tuple(ranges[n]))  # keep each map with its range
    return encoder, validate_ranges(ranges, encoder.num_blocks), [maps[n] for n in order]


def save_compressed(compressed: Compressed, folder: Path | str, *, encoder: Encoder | None = None,
                    onnx: bool = False) -> Path:
    """Save an :class:`ApproximatedEncoder` (with ``encoder=`` the one it was built from) or an
    ``(encoder, ranges, maps)`` triple to ``folder``; ``onnx=True`` adds ``model.onnx``."""
    from safetensors.torch import save_file

    encoder, ranges, maps = _parts(compressed, encoder)
    net = ApproximatedEncoder(encoder, ranges, maps).eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (RECORD, WEIGHTS, ONNX, ONNX + ".data"):  # never leave a file of an older export
        (folder / stale).unlink(missing_ok=True)
    encoder.model.config.to_json_file(folder / CONFIG)
    encoder.processor.save_pretrained(folder)
    state = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in net.state_dict().items()}
    files = [CONFIG, PREPROCESSOR]
    if onnx:
        export_onnx(net, folder / ONNX, _image_size(encoder.processor, encoder.model.config))
        files.append(ONNX)
    removed = {k for i, j in ranges for k in range(i + 1, j + 1)}
    record = {
        "format": FORMAT, "version": VERSION, "family": encoder.family, "source": encoder.source,
        "num_blocks": encoder.num_blocks, "hidden_size": encoder.hidden_size,
        "ranges": [{"start": i, "end": j, "paper": paper_notation((i, j)), "map": _map_kind(m)}
                   for (i, j), m in zip(ranges, maps)],
        "kept_blocks": [k for k in range(1, encoder.num_blocks + 1) if k not in removed],
        "params": {"original": encoder.num_params(), "compressed": count_params(net)},
        "tensors": {name: list(t.shape) for name, t in state.items()},
        "files": {name: _sha256(folder / name) for name in files},
    }
    (folder / RECORD).write_text(json.dumps(record, indent=1))
    save_file(state, str(folder / WEIGHTS), metadata={_DIGEST_KEY: _sha256(folder / RECORD), "format": FORMAT})
    return folder


def _image_size(processor, config) -> tuple[int, int]:
    """(H, W) of the processor's output: crop size when it crops, else its resize size, else the config's."""
    for attr in ("crop_size", "size"):
        size = getattr(processor, attr, None) or {}
        if "height" in size and (attr == "crop_size" or not getattr(processor, "do_center_crop", False)):
            return int(size["height"]), int(size["width"])
    return int(config.image_size), int(config.image_size)


def _refuse(folder: Path, what: str) -> RBAError:
    return RBAError(f"The compressed model in '{folder}' {what}; export it again with save_compressed.")


def _read_record(folder: Path) -> dict:
    """The record, checked against the weights' digest and the digests of the other files."""
    from safetensors import safe_open

    if not folder.is_dir():
        raise RBAError(f"'{folder}' is not a folder: give the folder save_compressed wrote.")
    for name in (RECORD, WEIGHTS, CONFIG, PREPROCESSOR):
        if not (folder / name).is_file():
            raise _refuse(folder, f"lacks {name}")
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as weights:
            digest = (weights.metadata() or {}).get(_DIGEST_KEY)
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise _refuse(folder, f"has an unreadable {WEIGHTS} ({exc.__class__.__name__})") from None
    if digest != _sha256(folder / RECORD):
        raise _refuse(folder, f"has a {RECORD} that does not belong to its {WEIGHTS} (one was edited or swapped)")
    record = json.loads((folder / RECORD).read_text())
    if record.get("format") != FORMAT or record.get("version") != VERSION:
        raise _refuse(folder, f"is not a version-{VERSION} {FORMAT} folder")
    for name, expected in record["files"].items():
        if not (folder / name).is_file():
            raise _refuse(folder, f"lacks {name}")
        if _sha256(folder / name) != expected:
            raise _refuse(folder, f"has a {name} that was changed after export")
    return record


def _skeleton(folder: Path, record: dict) -> tuple[ApproximatedEncoder, object]:
    """The approximated encoder's modules, on the meta device (no memory, no random init)."""
    from transformers import DeiTModel, Dinov2Model, ViTModel

    config = load_config(str(folder))
    family = config.model_type
    if family != record["family"] or config.num_hidden_layers != record["num_blocks"]:
        raise _refuse(folder, f"has a {CONFIG} that does not match its {RECORD}")
    kwargs = {} if family == "dinov2" else {"add_pooling_layer": False}
    model_class = {"vit": ViTModel, "deit": DeiTModel, "dinov2": Dinov2Model}[family]
    with torch.device("meta"):
        model = model_class(config, **kwargs)
    encoder = Encoder(str(folder), str(folder), family, model, None, "meta")
    d = config.hidden_size
    maps = []
    for rng in record["ranges"]:
        bias = torch.empty(d, device="meta") if rng["map"] == "affine" else None
        maps.append(None if rng["map"] == "identity" else LinearMap(torch.empty(d, d, device="meta"), bias))
    ranges = validate_ranges([(r["start"], r["end"]) for r in record["ranges"]], config.num_hidden_layers)
    return ApproximatedEncoder(encoder, ranges, maps), config


def load_compressed(path: Path | str) -> ApproximatedEncoder:
    """Rebuild a saved approximated encoder on CPU, in eval mode: ``forward(pixel_values) -> (B, D)``.

    The module also carries ``processor`` (the image processor), ``config`` and ``record``.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor

    folder = Path(path)
    record = _read_record(folder)
    net, config = _skeleton(folder, record)
    expected = {name: list(t.shape) for name, t in net.state_dict().items()}
    with safe_open(str(folder / WEIGHTS), framework="pt") as weights:
        stored = {name: list(weights.get_slice(name).get_shape()) for name in weights.keys()}
    for name in sorted(set(expected) | set(stored)):
        if name not in stored:
            raise _refuse(folder, f"has no tensor '{name}' in {WEIGHTS}")
        if name not in expected:
            raise _refuse(folder, f"has an unexpected tensor '{name}' in {WEIGHTS}")
        if stored[name] != expected[name] or record["tensors"].get(name) != expected[name]:
            raise _refuse(folder, f"has tensor '{name}' of shape {stored[name]} where this model needs "
                                  f"{expected[name]}")
    net.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True, assign=True)
    net.processor = AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    net.config, net.record = config, record
    return net.eval().requires_grad_(False)


def export_onnx(net: nn.Module, path: Path | str, image_size: tuple[int, int]) -> Path:
    """ONNX graph of ``net``: input ``pixel_values`` (B, 3, H, W) with a dynamic batch, output ``final`` (B, D)."""
    path = Path(path)
    example = torch.zeros(2, 3, *image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(net.eval(), (example,), str(path), input_names=["pixel_values"], output_names=["final"],
                      dynamic_shapes={"pixel_values": {0: batch}}, external_data=False, dynamo=True,
                      verbose=False)
    return path


def onnx_session(path: Path | str):
    """An onnxruntime session for the ``model.onnx`` of a saved folder, checked against its record."""
    import onnxruntime

    folder = Path(path)
    record = _read_record(folder)
    if ONNX not in record["files"]:
        raise RBAError(f"'{folder}' has no ONNX export; save it with save_compressed(..., onnx=True).")
    return onnxruntime.InferenceSession(str(folder / ONNX), providers=["CPUExecutionProvider"])
