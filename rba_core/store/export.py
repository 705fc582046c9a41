"""How to take an approximated encoder away: a folder of safetensors weights, config and a record
of its ranges and maps, loaded back as a plain ``nn.Module`` (and an ONNX file for other runtimes).

Folder layout::

    config.json                 the original encoder's config (any supported family)
    preprocessor_config.json    its image processor, or its tokenizer files (timm: inside config.json)
    model.safetensors           the compressed weights only: stem, kept blocks, maps, final norm
    rba.json                    the record: ranges, map kinds, kept blocks, tensor shapes, file digests
    model.onnx                  optional (image models): pixel_values (B, 3, H, W) -> final (B, D)

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

from rba_core.passes.approx import ApproximatedEncoder, count_params, paper_notation
from rba_core.errors import RBAError
from rba_core.maps import MAPS, Range, empty_map, map_kind, validate_ranges
from rba_core.maps.module import FittedMap
from rba_core.models import Encoder, adapter_class, load_config
from rba_core.quiet import no_library_bars, quiet_onnx_export

FORMAT = "rba-compressed"
VERSION = 2
RECORD, WEIGHTS, CONFIG, ONNX = ("rba.json", "model.safetensors", "config.json", "model.onnx")
_DIGEST_KEY = "rba_record_sha256"

Compressed = ApproximatedEncoder | tuple[Encoder, Sequence[Range], Sequence[FittedMap | None]]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _map_record(fitted: FittedMap | None) -> dict:
    """A range's map in ``rba.json``: its kind, the hyperparameters it was fitted with, its conditioning."""
    if fitted is None:
        return {"map": "identity"}
    return {"map": fitted.kind, **({"map_params": fitted.params} if fitted.params else {}),
            **({"conditioning": fitted.conditioning.to_json()} if fitted.conditioning else {}),
            **({"training": fitted.report} if fitted.report else {})}


def _parts(compressed: Compressed, encoder: Encoder | None) -> tuple[Encoder, list[Range], list[FittedMap | None]]:
    if isinstance(compressed, ApproximatedEncoder):
        if encoder is not None and compressed.encoder.model is not encoder.model:
            raise RBAError("The approximated model was built from another encoder than encoder=...; pass the "
                           "one it was built from, or leave encoder out.")
        encoder, ranges, maps = compressed.encoder, list(compressed.ranges), list(compressed.maps)
    else:
        encoder, ranges, maps = compressed
        if len(maps) != len(ranges):
            raise RBAError(f"Give one map per range: {len(ranges)} ranges but {len(maps)} maps.")
        order = sorted(range(len(ranges)), key=lambda n: tuple(ranges[n]))  # keep each map with its range
        ranges, maps = validate_ranges(ranges, encoder.num_blocks), [maps[n] for n in order]
    folding = next((m.kind for m in maps if m is not None and map_kind(m.kind).folds), None)
    if folding:
        raise RBAError(f"{folding.capitalize()} maps belong in the model's own weights: export them as a plain "
                       f"checkpoint with export --map {folding} (rba_core.ops.analysis.export(..., kind='{folding}')).")
    return encoder, ranges, maps


def save_compressed(compressed: Compressed, folder: Path | str, *, encoder: Encoder | None = None,
                    onnx: bool = False) -> Path:
    """Save an :class:`ApproximatedEncoder` or an ``(encoder, ranges, maps)`` triple to ``folder``;
    ``onnx=True`` adds ``model.onnx`` (image models)."""
    from safetensors.torch import save_file

    encoder, ranges, maps = _parts(compressed, encoder)
    if onnx and encoder.modality != "image":
        raise RBAError("ONNX export is available for image models; export this text model without ONNX.")
    net = ApproximatedEncoder(encoder, ranges, maps).eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _clear_earlier_export(folder)
    encoder.save_pretrained_files(folder)
    state = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in net.state_dict().items()}
    if onnx:
        export_onnx(net, folder / ONNX, encoder.image_size())
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    removed = {k for i, j in ranges for k in range(i + 1, j + 1)}
    record = {
        "format": FORMAT, "version": VERSION, "source": encoder.source, **encoder.describe(),
        "num_blocks": encoder.num_blocks, "hidden_size": encoder.hidden_size,
        "ranges": [{"start": i, "end": j, "paper": paper_notation((i, j)), **_map_record(m)}
                   for (i, j), m in zip(ranges, maps)],
        "kept_blocks": [k for k in range(1, encoder.num_blocks + 1) if k not in removed],
        "params": {"original": encoder.num_params(), "compressed": count_params(net)},
        "tensors": {name: list(t.shape) for name, t in state.items()},
        "files": {name: _sha256(folder / name) for name in files},
    }
    (folder / RECORD).write_text(json.dumps(record, indent=1))
    save_file(state, str(folder / WEIGHTS), metadata={_DIGEST_KEY: _sha256(folder / RECORD), "format": FORMAT})
    return folder


def _clear_earlier_export(folder: Path) -> None:
    """Remove the files of an earlier export in ``folder`` (never anything else); a non-empty folder
    that holds no export is refused, so nothing of the user's is overwritten."""
    present = {p.name for p in folder.iterdir()}
    if not present:
        return
    if RECORD not in present:
        raise RBAError(f"'{folder}' is not empty and holds no earlier export; choose an empty or new folder.")
    try:
        earlier = set(json.loads((folder / RECORD).read_text()).get("files", {}))
    except ValueError:
        earlier = set()
    for name in earlier | {RECORD, WEIGHTS, ONNX, ONNX + ".data"}:
        if "/" not in name:
            (folder / name).unlink(missing_ok=True)


def _refuse(folder: Path, what: str) -> RBAError:
    return RBAError(f"The compressed model in '{folder}' {what}; export it again with save_compressed.")


def _read_record(folder: Path) -> dict:
    """The record, checked against the weights' digest and the digests of the other files."""
    from safetensors import safe_open

    if not folder.is_dir():
        raise RBAError(f"'{folder}' is not a folder: give the folder save_compressed wrote.")
    for name in (RECORD, WEIGHTS, CONFIG):
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


def _skeleton(folder: Path, record: dict) -> ApproximatedEncoder:
    """The approximated encoder's modules with random weights, ready for the stored ones."""
    config = load_config(str(folder))
    family = config.model_type
    cls = adapter_class(family)
    if family != record["family"] or cls.num_blocks_of(config) != record["num_blocks"]:
        raise _refuse(folder, f"has a {CONFIG} that does not match its {RECORD}")
    model = cls.build_empty(config).eval().requires_grad_(False)
    encoder = cls(str(folder), str(folder), family, model, cls.load_processor(str(folder)), "cpu",
                  record.get("pooling", "first"), record.get("max_length"), config=config)
    unknown = next((r["map"] for r in record["ranges"] if r["map"] not in MAPS or MAPS[r["map"]].folds), None)
    if unknown:
        raise _refuse(folder, f"names a map kind this version cannot rebuild ('{unknown}')")
    maps = [empty_map(r["map"], encoder.hidden_size, r["start"], r.get("map_params")) for r in record["ranges"]]
    ranges = validate_ranges([(r["start"], r["end"]) for r in record["ranges"]], encoder.num_blocks)
    return ApproximatedEncoder(encoder, ranges, maps)


def load_compressed(path: Path | str) -> ApproximatedEncoder:
    """Rebuild a saved approximated encoder on CPU, in eval mode: ``forward(**inputs) -> (B, D)``
    with the encoder's own inputs (``pixel_values``, or ``input_ids`` and ``attention_mask``).

    The module also carries ``processor`` (image processor or tokenizer), ``preprocess(samples)``
    (images or texts -> inputs), ``config`` and ``record``.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(path)
    record = _read_record(folder)
    net = _skeleton(folder, record)
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
    net.processor, net.preprocess = net.encoder.processor, net.encoder.preprocess
    net.config, net.record = net.encoder.config, record
    return net.eval().requires_grad_(False)


def export_onnx(net: nn.Module, path: Path | str, image_size: tuple[int, int]) -> Path:
    """ONNX graph of ``net``: input ``pixel_values`` (B, 3, H, W) with a dynamic batch, output ``final`` (B, D)."""
    path = Path(path)
    example = torch.zeros(2, 3, *image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with quiet_onnx_export():
        torch.onnx.export(_PixelsIn(net).eval(), (example,), str(path), input_names=["pixel_values"],
                          output_names=["final"], dynamic_shapes={"pixel_values": {0: batch}}, external_data=False,
                          dynamo=True, verbose=False)
    return path


class _PixelsIn(nn.Module):
    """``forward(pixel_values)``: the one positional input an ONNX graph of an image model takes."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=pixel_values)


def onnx_session(path: Path | str):
    """An onnxruntime session for the ``model.onnx`` of a saved folder, checked against its record."""
    import onnxruntime

    folder = Path(path)
    record = _read_record(folder)
    if ONNX not in record["files"]:
        raise RBAError(f"'{folder}' has no ONNX export; save it with save_compressed(..., onnx=True).")
    return onnxruntime.InferenceSession(str(folder / ONNX), providers=["CPUExecutionProvider"])


FOLDED_FORMAT = "rba-folded"


#: the transformers classes whose head a folded export keeps (their backbone is replaced)
_HEADS = ("ForImageClassification", "ForSequenceClassification")


def _with_source_head(encoder: Encoder) -> nn.Module:
    """The folded model inside the source's classification model when the source checkpoint is one
    (its head kept, its backbone replaced by the folded one), else the folded model itself."""
    import transformers

    model = encoder.model
    for name in getattr(model.config, "architectures", None) or []:
        cls = getattr(transformers, name, None) if name.endswith(_HEADS) else None
        full = cls and cls.from_pretrained(encoder.source, dtype=torch.float32)
        if full is not None and type(getattr(full, full.base_model_prefix, None)) is type(model):
            setattr(full, full.base_model_prefix, model)
            full.config = model.config  # the cut layer count; labels and head settings are the source's
            return full.eval()
    return model


def save_folded(encoder: Encoder, folder: Path | str, record: dict) -> Path:
    """Write a folded model (:func:`rba_core.passes.fold.folded_encoder`) as a standard Hugging Face folder
    (config with the new layer count, safetensors, tokenizer or image processor, generation config)
    that plain transformers loads without rba_core (``AutoModelForCausalLM``; encoders: ``AutoModel``,
    or ``AutoModelForImageClassification`` / ``...SequenceClassification`` with the source's head
    kept when the source has one), and ``rba.json`` beside it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with no_library_bars():
        _with_source_head(encoder).save_pretrained(folder)
    encoder.processor.save_pretrained(folder)
    (folder / RECORD).write_text(json.dumps({"format": FOLDED_FORMAT, **record}, indent=2))
    return folder
