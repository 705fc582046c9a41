"""Block ranges i→j and the approximated encoder that replaces them by maps.

A range i→j (0 <= i < j <= L) removes blocks i+1..j and sends hs[i] to hs[j] with one map
shared by all tokens (:mod:`rba_core.maps`).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from rba_core.maps import Conditioning, MapParams, Range, fit_map
from rba_core.maps.module import FittedMap
from rba_core.models import Encoder


def LinearMap(weight, bias=None, *, conditioning: Conditioning | None = None) -> FittedMap:  # noqa: N802
    """A ``linear`` (or, with a bias, ``affine``) map h ↦ h @ weight + bias from given tensors."""
    tensors = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    return FittedMap("linear" if bias is None else "affine", tensors, conditioning=conditioning)


def FoldedMap(weight, start: int, *, conditioning: Conditioning | None = None) -> FittedMap:  # noqa: N802
    """Range i→j's ``folded`` map (start = i) from a given T: ``hs[i] ↦ hs[i] − m + m·T``."""
    return FittedMap("folded", {"weight": weight}, start, conditioning=conditioning)


@contextmanager
def captured(modules: dict[int, nn.Module]) -> Iterator[dict[int, torch.Tensor]]:
    """The latest output of each module while the block runs, by key; the hooks are always removed.
    Only this thread's forwards are caught: the dashboard's sessions share one loaded model, and a
    hook fires for every caller of its module."""
    outputs: dict[int, torch.Tensor] = {}
    owner = threading.get_ident()

    def keep(key: int, out: torch.Tensor) -> None:
        if threading.get_ident() == owner:
            outputs[key] = out

    handles = [module.register_forward_hook(lambda _m, _in, out, key=key: keep(key, out))
               for key, module in modules.items()]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def mlp_outputs(encoder: Encoder, starts) -> dict[int, nn.Module]:
    """The MLP output layers of the blocks that folded maps start at (block 0, the embeddings, has none)."""
    return {i: encoder.mlp_output_module(i) for i in starts if i > 0}


def paper_notation(rng: Range) -> str:
    """The paper's tables write range i→j in 0-indexed block outputs as "i-1 j-1"; a range that
    starts at the embeddings (i = 0) has no such index and is written "emb j-1"."""
    start = "emb" if rng[0] == 0 else str(rng[0] - 1)
    return f"{start} {rng[1] - 1}"


class ApproximatedEncoder(nn.Module):
    """Blocks 1..i, T, blocks j+1..L, final norm and pooling: only what the compressed model computes.

    Shares (never modifies) the original encoder's modules: ``stem`` (what runs before the first
    block), the kept blocks and the final norm, plus the maps. ``forward(**inputs)`` takes the
    encoder's own inputs (``pixel_values``, or ``input_ids`` and ``attention_mask``) and returns
    the final representation (B, D). Padding tokens are mapped too but never reach a real token
    (attention masks them) or the pooling.
    """

    def __init__(self, encoder: Encoder, ranges: Sequence[Range], maps: Sequence[FittedMap | None]):
        super().__init__()
        self.encoder = encoder  # not a submodule: its model holds the removed blocks too
        self.ranges = list(ranges)
        self.maps = [None if m is None else m.to(encoder.device) for m in maps]  # one per range (None: skipped)
        self.stem = nn.ModuleDict(encoder.stem())
        starts = {i: (j, m) for (i, j), m in zip(ranges, self.maps)}
        steps, at, k = [], set(), 0
        while k < encoder.num_blocks:
            if k in starts:
                k, fitted = starts[k]
                if fitted is not None:
                    at.add(len(steps))
                    steps.append(fitted)
            else:
                steps.append(encoder.blocks[k])
                k += 1
        self.steps = nn.ModuleList(steps)
        self.map_steps = frozenset(at)  # the positions in ``steps`` that are maps
        self.norm = encoder.final_norm

    def __setattr__(self, name, value):
        if name in ("encoder", "maps"):  # outside the module tree: the adapter, and the maps already in steps
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def last_hidden(self, **inputs: torch.Tensor) -> torch.Tensor:
        """What the compressed model has where the original has hs[L]: (B, T, D), before the final norm."""
        enc = self.encoder
        hidden = enc.embed(inputs)
        ctx = enc.context(inputs, hidden)
        with captured(mlp_outputs(enc, self.mlp_starts())) as m:  # block i's MLP output, for a map that reads it
            for position, step in enumerate(self.steps):
                if position in self.map_steps:
                    hidden = step(hidden, m.get(step.start))
                else:
                    hidden = enc.run_block(step, hidden, ctx)
        return hidden

    def mlp_starts(self) -> list[int]:
        """The blocks whose MLP output a map of this model reads (:attr:`FittedMap.needs_mlp_output`)."""
        return [m.start for m in self.maps if m is not None and m.needs_mlp_output]

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.encoder.final(self.last_hidden(**inputs), self.encoder.token_mask(inputs))

    @property
    def first_map(self) -> int:
        """The step index where this model first leaves the original's path (the first range's start i)."""
        return min((i for i, _ in self.ranges), default=self.encoder.num_blocks)

    def resume(self, hs: list[torch.Tensor], m: dict[int, torch.Tensor], ctx) -> torch.Tensor:
        """:meth:`last_hidden` from the original's block outputs ``hs`` of the same inputs: up to the first
        range's start i the two models compute the same thing, so only the steps from there on run. ``m``:
        the original's MLP outputs of the folded maps' blocks (:func:`captured`)."""
        start = self.first_map
        hidden = hs[start]
        # a folded map at a later range needs its block's MLP output in this model, not in the original
        later = mlp_outputs(self.encoder, [i for i in self.mlp_starts() if i > start])
        with captured(later) as own:
            for position in range(start, len(self.steps)):
                step = self.steps[position]
                if position in self.map_steps:
                    hidden = step(hidden, m.get(step.start) if step.start == start else own.get(step.start))
                else:
                    hidden = self.encoder.run_block(step, hidden, ctx)
        return hidden


def approximate_encoder(encoder: Encoder, stats, ranges: Sequence[Range],
                        kind: str = "linear", params: MapParams | None = None) -> ApproximatedEncoder:
    """Fit one map per range and build the approximated encoder. ``stats``: what the map kind reads
    (:func:`rba_core.maps.fit_map`)."""
    maps = [fit_map(stats, rng, kind, params) for rng in ranges]
    return ApproximatedEncoder(encoder, ranges, maps).eval()


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
