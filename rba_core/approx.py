"""Block ranges i→j and the approximated encoder that replaces them by maps.

A range i→j (0 <= i < j <= L) removes blocks i+1..j and sends hs[i] to hs[j] with one map
shared by all tokens (:mod:`rba_core.maps`).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from rba_core.errors import RBAError
from rba_core.maps import Conditioning, MapParams, Range, fit_map
from rba_core.models import Encoder


class LinearMap(nn.Module):
    """h ↦ h @ weight + bias, applied to every token. ``weight``: (D, D)."""

    def __init__(self, weight: np.ndarray | torch.Tensor, bias: np.ndarray | torch.Tensor | None = None, *,
                 conditioning: "Conditioning | None" = None):
        super().__init__()
        self.conditioning = conditioning  # how well the fit's system was determined (None: not fitted here)
        self.weight = nn.Parameter(torch.as_tensor(weight, dtype=torch.float32), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(torch.as_tensor(bias, dtype=torch.float32), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """In float32 on the map's device whatever the model computes in; returned in the hidden states' dtype."""
        out = hidden.to(self.weight) @ self.weight
        return (out if self.bias is None else out + self.bias).to(hidden.dtype)


class FoldedMap(nn.Module):
    """Range i→j's folded map: ``hs[i] ↦ hs[i] − m + m·T``, m being what block i's MLP output layer
    added to the residual (for i = 0, m = hs[0]: ``hs[0]·T``). This is exactly what block i computes
    once T is folded into that layer (``W ← W·T``, ``b ← b·T``), so T is a buffer, not a parameter:
    the folded model has no added parameters."""

    def __init__(self, weight: np.ndarray | torch.Tensor, start: int, *, conditioning: "Conditioning | None" = None):
        super().__init__()
        self.start = start
        self.conditioning = conditioning
        self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, hidden: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
        """``m``: block i's MLP output captured while it ran (:func:`captured`); None for i = 0. In float32
        on the map's device whatever the model computes in; returned as the hidden states are."""
        if m is None:
            if self.start > 0:
                raise RuntimeError(f"the folded map of block {self.start} needs that block's MLP output m")
            return (hidden.to(self.weight) @ self.weight).to(hidden)
        m = m.to(self.weight)
        return (hidden.to(self.weight) - m + m @ self.weight).to(hidden)


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


def validate_ranges(ranges: Sequence[Sequence[int]], num_blocks: int) -> list[Range]:
    """Sorted, checked ranges: integers with 0 <= i < j <= L, pairwise disjoint."""
    if not ranges:
        raise RBAError("Give at least one range i→j of blocks to approximate.")
    checked = []
    for rng in ranges:
        if len(rng) != 2:
            raise RBAError(f"A range has two ends i and j; got {list(rng)}.")
        i, j = (int(v) for v in rng)
        if i >= j:
            raise RBAError(f"Range {i}→{j} is empty or reversed: the start i must be smaller than the end j.")
        if i < 0 or j > num_blocks:
            raise RBAError(f"Range {i}→{j} is outside 0..{num_blocks}: this model has {num_blocks} blocks.")
        checked.append((i, j))
    checked.sort()
    for (_, j1), (i2, j2) in zip(checked, checked[1:]):
        if i2 < j1:
            raise RBAError(f"Ranges overlap at {i2}→{j2}: each block can be removed only once.")
    return checked


class ApproximatedEncoder(nn.Module):
    """Blocks 1..i, T, blocks j+1..L, final norm and pooling: only what the compressed model computes.

    Shares (never modifies) the original encoder's modules: ``stem`` (what runs before the first
    block), the kept blocks and the final norm, plus the maps. ``forward(**inputs)`` takes the
    encoder's own inputs (``pixel_values``, or ``input_ids`` and ``attention_mask``) and returns
    the final representation (B, D). Padding tokens are mapped too but never reach a real token
    (attention masks them) or the pooling.
    """

    def __init__(self, encoder: Encoder, ranges: Sequence[Range], maps: Sequence[LinearMap | FoldedMap | None]):
        super().__init__()
        self.encoder = encoder  # not a submodule: its model holds the removed blocks too
        self.ranges = list(ranges)
        self.stem = nn.ModuleDict(encoder.stem())
        starts = {i: (j, m) for (i, j), m in zip(ranges, maps)}
        steps, k = [], 0
        while k < encoder.num_blocks:
            if k in starts:
                k, linear_map = starts[k]
                if linear_map is not None:
                    steps.append(linear_map.to(encoder.device))
            else:
                steps.append(encoder.blocks[k])
                k += 1
        self.steps = nn.ModuleList(steps)
        self.norm = encoder.final_norm

    def __setattr__(self, name, value):
        if name == "encoder":  # keep the adapter out of the module tree (and the state dict)
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def last_hidden(self, **inputs: torch.Tensor) -> torch.Tensor:
        """What the compressed model has where the original has hs[L]: (B, T, D), before the final norm."""
        enc = self.encoder
        hidden = enc.embed(inputs)
        ctx = enc.context(inputs, hidden)
        folded = mlp_outputs(enc, [step.start for step in self.steps if isinstance(step, FoldedMap)])
        with captured(folded) as m:  # block i's MLP output, for the folded map that follows it
            for step in self.steps:
                if isinstance(step, FoldedMap):
                    hidden = step(hidden, m.get(step.start))
                elif isinstance(step, LinearMap):
                    hidden = step(hidden)
                else:
                    hidden = enc.run_block(step, hidden, ctx)
        return hidden

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
        later = mlp_outputs(self.encoder, [s.start for s in self.steps if isinstance(s, FoldedMap) and s.start > start])
        with captured(later) as own:
            for step in self.steps[start:]:
                if isinstance(step, FoldedMap):
                    hidden = step(hidden, m.get(step.start) if step.start == start else own.get(step.start))
                elif isinstance(step, LinearMap):
                    hidden = step(hidden)
                else:
                    hidden = self.encoder.run_block(step, hidden, ctx)
        return hidden


def approximate_encoder(encoder: Encoder, stats, ranges: Sequence[Range],
                        kind: str = "linear", params: MapParams | None = None) -> ApproximatedEncoder:
    """Fit one map per range and build the approximated encoder. ``stats``: what the map kind is
    fitted from (its ``statistics``): the :class:`TokenStats` of the fit samples, or the fold statistics
    of the ranges (:func:`rba_core.fold.fold_pass`)."""
    maps = [fit_map(stats, rng, kind, params) for rng in ranges]
    return ApproximatedEncoder(encoder, ranges, maps).eval()


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
