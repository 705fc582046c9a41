"""Linear probe: one nn.Linear on frozen final representations, as in the paper's tables."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rba_core.errors import RBAError


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                   seeds=(0, 1, 2), epochs: int = 5, batch_size: int = 256, lr: float = 0.01) -> dict:
    """Train nn.Linear(D, C) with Adam and cross-entropy per seed; test accuracy mean and std.

    Shapes: ``train_x`` (N, D), ``train_y`` (N,). Returns ``{"mean", "std", "per_seed"}``.
    """
    if (train_y < 0).any() or (test_y < 0).any():
        raise RBAError("The linear probe needs labelled images; this dataset has no label column.")
    classes = int(max(train_y.max(), test_y.max())) + 1
    x, y = torch.as_tensor(train_x, dtype=torch.float32), torch.as_tensor(train_y, dtype=torch.long)
    tx, ty = torch.as_tensor(test_x, dtype=torch.float32), torch.as_tensor(test_y, dtype=torch.long)
    accuracies = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        head = nn.Linear(x.shape[1], classes)
        optimizer = torch.optim.Adam(head.parameters(), lr=lr)
        for _ in range(epochs):
            for rows in torch.randperm(len(x), generator=gen).split(batch_size):
                optimizer.zero_grad()
                nn.functional.cross_entropy(head(x[rows]), y[rows]).backward()
                optimizer.step()
        with torch.no_grad():
            accuracies.append(float((head(tx).argmax(1) == ty).float().mean()))
    return {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)), "per_seed": accuracies}
