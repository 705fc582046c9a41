"""The approximated model as the model's own transformers class: what a downstream evaluator (lm-eval's
``HFLM``) or a classification head runs, with no second copy of the weights.

:func:`cut_model` returns a model object of the same class as a loaded Hugging Face model (a causal LM, an
``*ForImageClassification`` or ``*ForSequenceClassification`` model, a backbone) whose block list has each
range i→j replaced: the slot of block i+1 applies the range's map and the slots of blocks i+2..j pass
their input on. Everything else (embeddings, kept blocks, final norm, LM or classifier head, config) is
the original's own module, shared, not copied; the original model is never changed. The list keeps its
length, so the model's forward, its config and the blocks' layer indices need no change.

A folded map of a range i→j (i >= 1) is folded into a copy of block i's MLP output layer exactly as an
export folds it (:func:`rba_core.passes.fold.folded_model`), so the cut model computes what the exported
checkpoint computes; only block i is copied.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from rba_core.maps import Range, map_kind
from rba_core.maps.module import FittedMap
from rba_core.passes.fold import fold_into_block
from rba_core.models import Encoder


class PassOn(nn.Module):
    """The slot of a removed block: returns the hidden states it is given (the block's other arguments ignored)."""

    def forward(self, hidden, *args, **kwargs):
        return hidden


class MapSlot(nn.Module):
    """The slot of the first removed block of a range: applies the range's map to every token."""

    def __init__(self, linear_map: FittedMap):
        super().__init__()
        self.map = linear_map

    def forward(self, hidden, *args, **kwargs):
        return self.map(hidden)


def blocks_path(encoder: Encoder) -> str:
    """Where the encoder's block list lives inside its own model (``transformer.h``, ``layers`` ...)."""
    return next(name for name, module in encoder.model.named_modules() if module is encoder.blocks)


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object sharing every parameter, buffer and child of ``module``, with its own child table."""
    twin = copy.copy(module)
    twin._modules = type(module._modules)(module._modules)
    return twin


def cut_model(model: nn.Module, path: str, encoder: Encoder, ranges: Sequence[Range],
              maps: Sequence[FittedMap | None]) -> nn.Module:
    """``model`` (sharing its modules) with the blocks of ``ranges`` replaced by their ``maps`` (None: the
    blocks skipped). ``path``: the block list inside ``model``; ``encoder``: the adapter of the same family,
    which says where a folded map goes. In eval mode, without gradients."""
    names = path.split(".") if path else []
    root = parent = _shallow(model)
    for name in names[:-1]:
        child = _shallow(parent._modules[name])
        parent._modules[name] = child
        parent = child
    layers = list(parent._modules[names[-1]])
    for (i, j), linear_map in zip(ranges, maps):
        layers[i:j] = [PassOn() for _ in range(i, j)]
        if linear_map is None:
            continue
        folds = map_kind(linear_map.kind).folds
        if folds and i > 0:
            block = copy.deepcopy(layers[i - 1])
            with torch.no_grad():
                fold_into_block(encoder, block, torch.as_tensor(folds(linear_map), dtype=torch.float32))
            layers[i - 1] = block
        else:  # a map module, or a folding map of a range 0→j (hs[0]·T: no block to fold into)
            layers[i] = MapSlot(linear_map)
    device = next(model.parameters()).device
    parent._modules[names[-1]] = nn.ModuleList(layers).to(device)
    return root.eval().requires_grad_(False)
