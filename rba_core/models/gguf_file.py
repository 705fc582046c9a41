"""GGUF files (llama.cpp's format) as model sources: found, checked and dequantised once into a plain checkpoint.

GGUF is a file format, not a family: a ``.gguf`` holds a decoder of a family its metadata names, and that
family's adapter runs it like any other. transformers reads the file (``from_pretrained(folder,
gguf_file=name)``, the ``gguf`` package dequantising the weights); :func:`write_plain` writes what it read
as a plain float32 Hugging Face checkpoint (config, safetensors, tokenizer, generation config), which
the registry keeps in the cache (``rba_core.models.gguf_checkpoint``) so that the slow read happens once
per file. transformers refuses ``save_pretrained`` on a model loaded from GGUF, so the weights are first
copied into the family's plain architecture; the cached folder, and every export made from it, is an
ordinary checkpoint.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Callable

from rba_core.errors import RBAError

SUFFIX = ".gguf"
KIND = "dequantised GGUF"  # the cache entry's kind, as the cache page lists it
#: the quantisation types to convert an unreadable file to, for the error sentence
READABLE = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 or a K-quant such as Q4_K_M"


def _first_line(exc: Exception) -> str:
    """``Type: first line of the message`` (no final full stop), for a sentence's brackets."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0].rstrip('.')}" if text else type(exc).__name__


def find(source: str) -> Path | None:
    """The ``.gguf`` file a model source names: the file itself, or the one ``.gguf`` of a folder without a
    ``config.json``; None for anything else. A folder holding several is one sentence."""
    path = Path(source).expanduser()
    if path.suffix.lower() == SUFFIX:
        if not path.is_file():
            raise RBAError(f"The GGUF file '{source}' does not exist; check the path.")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
    if len(files) > 1:
        raise RBAError(f"The folder '{source}' holds {len(files)} GGUF files ({', '.join(p.name for p in files)}); "
                       f"pass the one to use, for example '{files[0]}'.")
    return files[0] if files else None


def _readable_type(qtype) -> bool:
    """Whether the ``gguf`` package (which transformers dequantises with) can dequantise this tensor type."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return True
    try:
        dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], np.uint8), qtype)  # one block of zeros
    except (NotImplementedError, KeyError):
        return False
    return True


def check(path: Path) -> dict:
    """What the file holds (``architecture``, ``tensor_types``), read from its header; one sentence when it
    is not a GGUF file, or stores tensors in a quantisation type transformers cannot dequantise."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise RBAError("Reading GGUF files needs the gguf package: pip install gguf==0.19.0.") from None
    try:
        reader = GGUFReader(str(path))
        architecture = str(reader.fields["general.architecture"].contents())
        types = sorted({tensor.tensor_type for tensor in reader.tensors})
    except Exception as exc:  # the reader fails in many ways on a truncated or foreign file
        raise RBAError(f"'{path}' is not a readable GGUF file ({_first_line(exc)}); download or convert it "
                       "again.") from None
    unreadable = [qtype.name for qtype in types if not _readable_type(qtype)]
    if unreadable:
        raise RBAError(f"'{path.name}' stores weights as {', '.join(unreadable)}, a quantisation type transformers "
                       f"cannot dequantise; use a file quantised as {READABLE} (llama.cpp's llama-quantize "
                       "converts one).")
    return {"architecture": architecture, "tensor_types": [qtype.name for qtype in types]}


def write_plain(path: Path, folder: Path, adapter_of: Callable[[str], type]) -> dict:
    """Read the GGUF at ``path`` with transformers and write it into ``folder`` as a plain float32 checkpoint
    of its family (``adapter_of(model_type)``, which refuses unsupported families); returns :func:`check`'s
    description of the file."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    described = check(path)
    where, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name)
    except (ValueError, KeyError, OSError) as exc:  # an architecture transformers reads no GGUF of
        raise RBAError(f"transformers cannot read '{name}', a '{described['architecture']}' GGUF "
                       f"({_first_line(exc)}); convert the original checkpoint with save_pretrained instead.") from None
    cls = adapter_of(getattr(config, "model_type", described["architecture"]))
    try:
        model = cls.model_class(config).from_pretrained(where, config=config, gguf_file=name, dtype=torch.float32,
                                                        trust_remote_code=False, **cls.hf_options)
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    except NotImplementedError as exc:  # a tensor type the check above let through
        raise RBAError(f"transformers cannot dequantise '{name}' ({_first_line(exc)}); use a file quantised as "
                       f"{READABLE}.") from None
    except (ValueError, KeyError, IndexError, OSError, struct.error) as exc:  # tensors or tokenizer unreadable
        raise RBAError(f"transformers could not read the weights or tokenizer of '{name}' ({_first_line(exc)}); "
                       "download or convert the file again.") from None
    config = model.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):  # the plain checkpoint is not quantised
            delattr(config, attribute)
    plain = cls.build_empty(config)  # save_pretrained refuses the GGUF-loaded model: copy into the plain one
    plain.load_state_dict(model.state_dict(), strict=True)
    del model
    plain.to(torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return described
