"""The model's own classifier head: its accuracy on the evaluation samples before and after approximation.

A model folder whose ``architectures`` name a classification model (``*ForImageClassification``,
``*ForSequenceClassification``) carries a trained head. When the dataset's classes can be matched to the
head's ``config.id2label`` (the same names after normalising case and punctuation, or the same number of
classes where the dataset's labels are integers, or a user's label map), the head's top-1 accuracy (and
top-5 where the head has more than 10 classes) is measured for the original model, the approximated one
and the one with the blocks skipped: each is the classification model itself with its ranges replaced
(:func:`rba_core.passes.cut.cut_model`), so the head reads exactly what it reads in the model (its own pooling,
pooler or final norm). Otherwise :func:`head_setup` says in one sentence why there is no head accuracy.

A label map is a JSON file ``{dataset class: head class}``, each side a name or an integer index.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rba_core.errors import RBAError

#: The transformers classes whose head is measured (their names end so).
HEADS = ("ForImageClassification", "ForSequenceClassification")
HEAD_BATCH = 32  # samples per forward of the classification models
TOP5_ABOVE = 10  # top-5 accuracy is reported for heads with more classes than this


@dataclass
class Head:
    """A classification head found in ``source`` and how the dataset's classes map onto its classes."""

    source: str
    architecture: str
    mapping: np.ndarray  # dataset class -> head class
    classes: int  # the head's number of classes
    matched_by: str  # "names", "count" or "label map"


def normalise(name) -> str:
    """A class name compared case- and punctuation-blind: "Sea_Lion" and "sea lion" are both "sealion"."""
    return re.sub(r"[\W_]+", "", str(name).lower())


def _head_index(id2label: dict[int, str], key, where: str) -> int:
    """A head class given as an integer index or a name (normalised)."""
    if isinstance(key, int) or (isinstance(key, str) and key.strip().isdigit()):
        index = int(key)
        if index not in id2label:
            raise RBAError(f"{where}: head class {index} is outside the head's 0..{len(id2label) - 1}; fix the label map.")
        return index
    by_name = {normalise(name): k for k, name in id2label.items()}
    if normalise(key) not in by_name:
        raise RBAError(f"{where}: the head has no class named '{key}'; use one of its id2label names or an index.")
    return by_name[normalise(key)]


def read_label_map(path: Path | str, label_names: Sequence[str], id2label: dict[int, str]) -> np.ndarray:
    """The dataset-class -> head-class array from a JSON label map; every dataset class must be mapped."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError:
        raise RBAError(f"Cannot read the label map '{path}'; give a JSON file {{dataset class: head class}}.") from None
    except ValueError:
        raise RBAError(f"The label map '{path}' is not valid JSON; write {{dataset class: head class}}.") from None
    if not isinstance(raw, dict):
        raise RBAError(f"The label map '{path}' must be one JSON object {{dataset class: head class}}.")
    names = {normalise(n): k for k, n in enumerate(label_names)}
    mapping = np.full(len(label_names), -1)
    for key, value in raw.items():
        if key.strip().isdigit() and int(key) < len(label_names):
            k = int(key)
        elif normalise(key) in names:
            k = names[normalise(key)]
        else:
            raise RBAError(f"The label map '{path}' names dataset class '{key}', which the dataset does not have "
                           f"(its classes: {', '.join(label_names)}).")
        mapping[k] = _head_index(id2label, value, f"The label map '{path}'")
    missing = [label_names[k] for k in np.flatnonzero(mapping < 0)]
    if missing:
        raise RBAError(f"The label map '{path}' does not map the dataset class '{missing[0]}'; map every class.")
    return mapping


def match_labels(id2label: dict[int, str], label_names: Sequence[str] | None,
                 labels: np.ndarray) -> tuple[np.ndarray | None, str]:
    """(dataset class -> head class, how) by names, else by count for integer labels; (None, why not)."""
    count = len(label_names) if label_names else int(labels.max()) + 1 if len(labels) else 0
    if label_names:
        by_name: dict[str, int] = {}
        for k, name in id2label.items():
            by_name.setdefault(normalise(name), k)
            for synonym in str(name).split(","):  # ImageNet-style "tench, Tinca tinca"
                by_name.setdefault(normalise(synonym), k)
        found = [by_name.get(normalise(name)) for name in label_names]
        if all(k is not None for k in found):
            return np.asarray(found), "names"
    integer = not label_names or all(str(name).strip().isdigit() for name in label_names)
    if integer and count == len(id2label):
        return np.arange(count), "count"
    if label_names and not integer:
        unknown = next(name for name, k in zip(label_names, found) if k is None)
        return None, (f"the dataset's class '{unknown}' is not among the head's {len(id2label)} classes "
                      f"({', '.join(list(map(str, id2label.values()))[:4])}{', ...' if len(id2label) > 4 else ''}); "
                      "give --label-map FILE to match them")
    return None, (f"the dataset's {count} integer classes are not the head's {len(id2label)}; give --label-map FILE "
                  "to match them")


def head_setup(config, source: str, label_names: Sequence[str] | None, labels: np.ndarray,
               label_map: Path | str | None = None) -> tuple[Head | None, str | None]:
    """The model's head matched to the dataset's classes, or (None, one sentence why there is no head accuracy)."""
    names = [a for a in (getattr(config, "architectures", None) or []) if a.endswith(HEADS)]
    if not names:
        return None, ("No head accuracy: the model has no classification head (its checkpoint is "
                      f"{', '.join(getattr(config, 'architectures', None) or ['a bare backbone'])}).")
    if len(labels) and (np.asarray(labels) < 0).any():
        return None, "No head accuracy: the evaluation samples have no labels."
    id2label = {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}
    if label_map is not None:
        if not label_names:
            raise RBAError("--label-map needs a dataset with class names; this one has none.")
        return Head(source, names[0], read_label_map(label_map, label_names, id2label), len(id2label), "label map"), None
    mapping, how = match_labels(id2label, label_names, np.asarray(labels))
    if mapping is None:
        return None, f"No head accuracy: {how}."
    return Head(source, names[0], mapping, len(id2label), how), None


def load_head_model(head: Head, device) -> torch.nn.Module:
    """The whole classification model (backbone and head) in float32, eval mode, on ``device``."""
    import transformers

    from rba_core.quiet import no_library_bars

    with no_library_bars():
        model = getattr(transformers, head.architecture).from_pretrained(head.source, dtype=torch.float32)
    return model.eval().requires_grad_(False).to(device)


def head_blocks_path(model: torch.nn.Module, encoder) -> str:
    """Where the encoder's block list lives inside the classification model (under its base model or beside it)."""
    from rba_core.passes.cut import blocks_path

    inner = blocks_path(encoder)
    for path in (f"{model.base_model_prefix}.{inner}", inner):
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, torch.nn.ModuleList) and len(layers) == encoder.num_blocks:
            return path
    raise RBAError(f"The classification model {type(model).__name__} keeps its blocks elsewhere than its backbone "
                   "does; its head accuracy cannot be measured.")


@torch.inference_mode()
def head_accuracy(head: Head, encoder, ranges, maps, source, indices: np.ndarray, labels: np.ndarray,
                  progress=None) -> dict:
    """Top-1 (and top-5 above 10 classes) accuracy of the head on the samples ``indices`` of ``source`` for
    the original model, the approximated one (``maps``, one per range) and the skipped blocks."""
    from rba_core.passes.cut import cut_model
    from rba_core.passes.extract import model_inputs

    full = load_head_model(head, encoder.device)
    path = head_blocks_path(full, encoder)
    models = {"original": full, "approximated": cut_model(full, path, encoder, ranges, maps),
              "skip": cut_model(full, path, encoder, ranges, [None] * len(ranges))}
    ks = (1, 5) if head.classes > TOP5_ABOVE else (1,)
    hits = {name: dict.fromkeys(ks, 0) for name in models}
    targets = torch.as_tensor(head.mapping[np.asarray(labels)])
    batches = [indices[s : s + HEAD_BATCH] for s in range(0, len(indices), HEAD_BATCH)]
    done = 0
    for batch, inputs in zip(batches, model_inputs(encoder, source, batches)):
        truth = targets[done : done + len(batch)].to(encoder.device)
        for name, model in models.items():
            top = model(**inputs).logits.float().topk(max(ks), dim=-1).indices
            for k in ks:
                hits[name][k] += int((top[:, :k] == truth[:, None]).any(1).sum())
        done += len(batch)
        if progress:
            progress(done, len(indices))
    n = max(len(indices), 1)
    result = {name: {f"top{k}": hits[name][k] / n for k in ks} for name in models}
    return {**result, "classes": head.classes, "matched_by": head.matched_by, "n": len(indices)}


def find_head(lazy, model, ev, label_map: Path | str | None = None) -> tuple[Head | None, str | None]:
    """:func:`head_setup` for the run's model (``lazy``: its LazyEncoder; no weights are loaded) and the
    evaluation samples ``ev``."""
    from rba_core.models import Encoder, load_config, readable_source

    loaded = lazy.encoder if isinstance(lazy.encoder, Encoder) else None
    config = loaded.config if loaded is not None else load_config(model)
    source = loaded.source if loaded is not None else readable_source(model)
    return head_setup(config, source, ev.label_names, ev.labels, label_map)


def rank_by_head(rows: list[dict], run, stage) -> tuple[list[dict], dict]:
    """``search --metric head-accuracy``: each candidate row gets the head accuracy of ``run(ranges)`` (an
    ``approximate`` result: the maps fitted as it fits them) and the rows are ranked by the approximated
    model's top-1 accuracy, highest first (ties: lower MSE first). Returns the rows and the original's accuracy."""
    original = None
    for n, row in enumerate(rows, start=1):
        stage(f"Head accuracy of candidate {n} of {len(rows)}: {row['range']}")
        head = run(row["ranges"]).head_accuracy
        row["head_accuracy"] = {"approximated": head["approximated"], "skip": head["skip"]}
        original = head["original"]
    ranked = sorted(rows, key=lambda r: (-r["head_accuracy"]["approximated"]["top1"], r["mse_final"]))
    return ranked, original


def measure_head(run, fit, ev, ranges, maps, kind: str, map_key: dict,
                 label_map: Path | str | None = None) -> tuple[dict | None, str | None]:
    """``approximate``'s head accuracy (:func:`head_accuracy`) on the evaluation samples of ``ev``, cached
    like every result (a stored one loads no model), or (None, the sentence why it is absent). ``run``: the
    :class:`~rba_core.ops.run.Run`; ``fit``: the statistics the ``maps`` come from."""
    from rba_core.cache import make_key
    from rba_core.data import open_dataset

    lazy, cache, stage = run.lazy, run.cache, run.stage
    head, why = find_head(lazy, run.ref.name, ev, label_map)
    if head is None:
        return None, why
    key = make_key({"kind": "head-accuracy", "fit": fit.key, "samples": ev.key, "ranges": [list(r) for r in ranges],
                    "map": kind, "map_params": map_key, "head": head.architecture,
                    "mapping": head.mapping.tolist()})

    def lookup():
        entry = cache.get(key)
        return None if entry is None else entry.meta["head_accuracy"]

    def compute(progress):
        stage(f"Evaluation samples: the model's own head ({head.architecture}) on the original, approximated "
              "and skipped models")
        accuracy = head_accuracy(head, lazy(), ranges, maps, ev.source or open_dataset(run.data, "test"),
                                 ev.indices, ev.labels, progress)
        cache.put(key, {}, {"kind": "head-accuracy", "head_accuracy": accuracy, "model": fit.meta["model"],
                            "dataset": fit.meta["dataset"], "split": "test", "n": len(ev.indices)})
        return accuracy

    return cache.single_flight(key, lookup, compute, run.progress), None
