"""Training a map by gradient descent on token samples (the trained kinds: ``cosine``, ``mlp``, ``deep-mlp``).

Adam from a warm start (the kind's closed-form solution), on the training rows of the fit samples' token states
(:class:`rba_core.passes.range_pass.TokenSamples`), in minibatches drawn with the run's seed; the loss on the held-out
rows (every tenth fit sample) is checked every few steps, and the tensors of the best check are kept, stopping
early when it has not improved for :data:`PATIENCE` checks. Deterministic on CPU for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import torch

#: Rows per Adam step.
BATCH = 2048
#: Checks of the held-out loss without improvement before training stops.
PATIENCE = 8
#: Held-out checks over a run of ``steps``.
CHECKS = 25


def mse(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((predicted - target) ** 2).mean()


def cosine_distance(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of 1 − cos(predicted, target) over rows."""
    cos = (predicted * target).sum(-1) / (predicted.norm(dim=-1) * target.norm(dim=-1)).clamp_min(1e-12)
    return (1 - cos).mean()


@dataclass(frozen=True)
class Fitting:
    """What a map is trained to do: ``apply(tensors, *inputs)`` approach ``target`` under ``loss`` on the rows not
    ``held_out``; the tensors named in ``frozen`` keep their start."""

    apply: Callable
    inputs: Sequence[np.ndarray | None]
    target: np.ndarray
    held_out: np.ndarray
    loss: Callable = mse
    frozen: Sequence[str] = ()


def train(init: dict[str, np.ndarray], fitting: Fitting, params, seed: int, progress=None
          ) -> tuple[dict[str, np.ndarray], dict]:
    """Train the tensors ``init`` for ``fitting``; ``params``: ``train_lr``, ``train_steps``. Returns the best tensors and a report: ``train_loss`` (on every
    training row), ``val_loss`` and ``initial_val_loss`` (on the held-out rows), ``steps`` (of the best check)
    and ``stopped_early``."""
    apply, inputs, target, held_out, loss, frozen = (fitting.apply, fitting.inputs, fitting.target, fitting.held_out,
                                                     fitting.loss, fitting.frozen)
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: torch.tensor(np.asarray(v), dtype=torch.float32, requires_grad=k not in frozen)
               for k, v in init.items()}
    data = [None if x is None else torch.as_tensor(np.asarray(x), dtype=torch.float32) for x in inputs]
    y = torch.as_tensor(np.asarray(target), dtype=torch.float32)
    fit_rows = torch.from_numpy(np.flatnonzero(~held_out))
    val_rows = torch.from_numpy(np.flatnonzero(held_out))
    if len(val_rows) == 0:  # a single fit sample: check on the training rows
        val_rows = fit_rows

    def value(rows: torch.Tensor) -> float:
        with torch.no_grad():
            out = apply(SimpleNamespace(**tensors), *[None if x is None else x[rows] for x in data])
            return float(loss(out, y[rows]))

    optimizer = torch.optim.Adam([t for k, t in tensors.items() if k not in frozen], lr=float(params.train_lr))
    steps = int(params.train_steps)
    every = max(1, steps // CHECKS)
    best = initial = value(val_rows)
    kept, best_step, since, step = {k: t.detach().clone() for k, t in tensors.items()}, 0, 0, 0
    order = fit_rows[torch.randperm(len(fit_rows), generator=generator)]
    position = 0
    for step in range(1, steps + 1):
        if position + BATCH > len(order) and position:
            order, position = fit_rows[torch.randperm(len(fit_rows), generator=generator)], 0
        rows = order[position : position + BATCH]
        position += BATCH
        optimizer.zero_grad()
        out = apply(SimpleNamespace(**tensors), *[None if x is None else x[rows] for x in data])
        loss(out, y[rows]).backward()
        optimizer.step()
        if step % every == 0 or step == steps:
            current = value(val_rows)
            if current < best:
                best, best_step, since = current, step, 0
                kept = {k: t.detach().clone() for k, t in tensors.items()}
            else:
                since += 1
            if progress:
                progress(step, steps)
            if since >= PATIENCE:
                break
    tensors = kept
    report = {"train_loss": value(fit_rows), "val_loss": best, "initial_val_loss": initial, "steps": best_step,
              "stopped_early": step < steps, "rows": {"train": int(len(fit_rows)), "held_out": int(held_out.sum())}}
    return {k: t.double().numpy() for k, t in tensors.items()}, report
