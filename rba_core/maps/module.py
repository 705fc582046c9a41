"""The module every fitted map is: its kind's tensors, applied as its declaration says (:mod:`rba_core.maps`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rba_core.maps.base import Conditioning
from rba_core.maps.registry import map_kind


class FittedMap(nn.Module):
    """A map of range i→j (``start`` = i) of kind ``kind``: ``forward(hidden, m=None)`` computes the kind's
    ``apply`` in float32 on the map's device whatever the model computes in, returned in the hidden states'
    dtype. Tensors are frozen parameters (buffers for a kind that folds into the weights, which adds none).
    ``params``: the hyperparameters it was fitted with; ``conditioning``: how well its solve was determined;
    ``report``: a trained map's losses and steps (:func:`rba_core.maps.training.train`)."""

    def __init__(self, kind: str, tensors: dict[str, np.ndarray | torch.Tensor], start: int = 0, *,
                 conditioning: Conditioning | None = None, params: dict | None = None,
                 report: dict | None = None):
        super().__init__()
        declared = map_kind(kind)
        self.kind, self.start, self.conditioning, self.params = kind, start, conditioning, dict(params or {})
        self.report = report  # a trained map's losses and steps (``training`` is nn.Module's mode flag)
        self.needs_mlp_output = declared.needs_mlp_output
        self.names = tuple(tensors)
        for name, value in tensors.items():
            tensor = torch.as_tensor(value, dtype=torch.float32)
            if declared.folds:
                self.register_buffer(name, tensor)
            else:
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))

    def forward(self, hidden: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
        if self.needs_mlp_output and m is None and self.start > 0:
            raise RuntimeError(f"the {self.kind} map of block {self.start} needs that block's MLP output m")
        reference = getattr(self, self.names[0])
        out = map_kind(self.kind).apply(self, hidden.to(reference), None if m is None else m.to(reference))
        return out.to(hidden.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, start={self.start}"
