"""What the operations return: typed results that the CLI, the pages and notebooks share.

Each result is a dataclass whose fields are the JSON keys the CLI writes (``to_json()``), with a
``to_frame()`` giving its main table as a pandas DataFrame. Results read like their JSON too
(``result["mse_final"]``), so a saved JSON file and a live result are used the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np


def plain(value):
    """The same data with numpy values as Python ones and NaN as None (strict JSON)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


class Result:
    """Shared behaviour: JSON out, read access by key, an optional non-JSON ``arrays`` field."""

    _not_json: tuple[str, ...] = ()
    _omit_if_none: tuple[str, ...] = ()  # optional fields the JSON leaves out when they were not computed

    def to_json(self) -> dict:
        """The CLI's JSON (numpy arrays, fields in ``_not_json`` and unset optional fields left out)."""
        return plain({f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._not_json
                      and not (f.name in self._omit_if_none and getattr(self, f.name) is None)})

    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in self.keys() and getattr(self, key) is not None

    def get(self, key: str, default=None):
        return getattr(self, key, default)

    def keys(self):
        return [f.name for f in fields(self) if f.name not in self._not_json]


@dataclass
class AnalysisResult(Result):
    """``analyze``: Block Redundancy of blocks 1..L; cosine, CKA and fit residual over states 0..L."""

    model: str
    dataset: str
    split: str
    modality: str
    family: str
    pooling: str
    max_length: int | None
    num_blocks: int
    hidden_size: int
    n: int
    seed: int
    block_redundancy: list[float]
    cosine: list[list[float]]
    cka: list[list[float]]
    fit_residual: list[list[float | None]]
    cache: dict
    notes: list[str] = field(default_factory=list)
    block_redundancy_all_tokens: list[float] | None = None  # BR(k) over every real token, not the pooled vector
    block_influence: list[float] | None = None  # ShortGPT: 1 - cos(hs[k-1], hs[k]) over real tokens, k = 1..L
    angular_distance: dict[str, list[float]] | None = None  # PruneMe: {"n": [l = 0..L-n]} on the pooled vectors
    stats: dict | None = None  # the token statistics kept: kind and bytes
    workers: int = 1  # processes that computed the stored result (torch.distributed ranks)
    threads: int | None = None  # torch threads per process of the run that computed it (None: stored before they were recorded)

    _omit_if_none = ("block_redundancy_all_tokens", "block_influence", "angular_distance", "stats", "threads")

    def to_frame(self):
        """One row per block k = 1..L: its Block Redundancy and the fit residual of range k-1→k."""
        import pandas as pd

        return pd.DataFrame({"block": range(1, self.num_blocks + 1), "block_redundancy": self.block_redundancy,
                             "fit_residual_prev": [self.fit_residual[k - 1][k] for k in range(1, self.num_blocks + 1)]})


@dataclass
class ApproximationResult(Result):
    """``approximate``: the approximated model against the original on the evaluation samples.

    ``final`` (original and approximated final representations with labels, numpy) is not JSON."""

    _not_json = ("final",)

    model: str
    dataset: str
    modality: str
    pooling: str
    max_length: int | None
    fit_n: int
    eval_n: int
    seed: int
    num_blocks: int
    ranges: list[dict]
    map: str
    map_params: dict
    blocks: dict
    mse_final: float
    params: dict
    latency_ms_per_image: dict | None
    cache: dict
    notes: list[str]
    final: dict = field(repr=False)
    accuracy: dict | None = None  # the paper's probe protocol (Adam, 5 epochs, batch 256, seeds 0-2)
    accuracy_converged: dict | None = None  # scikit-learn LogisticRegression trained to convergence
    perplexity: dict | None = None  # causal LMs: original / approximated / skip on the evaluation windows
    top1_agreement: dict | None = None  # causal LMs: next-token argmax equal to the original's
    # per fitted map: range, condition number, rank used, dimension, statistics precision (none for identity)
    conditioning: list[dict] | None = None
    # the model's own classifier head (issue 17): {original, approximated, skip: {top1[, top5]}, classes, ...}
    head_accuracy: dict | None = None
    healing: dict | None = None  # --heal: the healed model's metric before and after, and its training

    _omit_if_none = ("accuracy", "accuracy_converged", "perplexity", "top1_agreement", "conditioning",
                     "head_accuracy", "healing")

    def to_frame(self):
        """One row per model (original, approximated, and skip when probed): blocks, parameters, accuracy."""
        import pandas as pd

        rows = [{"model": "original", "blocks": self.blocks["original"], "params": self.params["original"],
                 "mse_final": 0.0},
                {"model": "approximated", "blocks": self.blocks["approximated"],
                 "params": self.params["approximated"], "mse_final": self.mse_final}]
        if self.accuracy:
            for row in rows:
                row["accuracy"] = self.accuracy[row["model"]]["mean"]
            rows.append({"model": "skip", "blocks": self.blocks["approximated"], "accuracy":
                         self.accuracy["skip"]["mean"]})
        return pd.DataFrame(rows)


@dataclass
class SearchResult(Result):
    """``search``: every candidate that fits the budget, lowest measured final MSE first."""

    model: str
    dataset: str
    fit_n: int
    eval_n: int
    seed: int
    num_blocks: int
    map: str
    map_params: dict
    budget: dict
    pairs: bool
    considered: int
    evaluated: int
    chunk_size: int
    original: dict
    timing_ms_per_image: dict
    spearman: dict  # block_redundancy and fit_residual, as in score_agreement
    candidates: list[dict]
    cache: dict
    notes: list[str]
    seconds: dict
    exhaustive: bool = False  # every candidate on every sample, instead of the race
    top_k: int = 5  # the head of the ranking the race keeps exact
    rounds: list[dict] = field(default_factory=list)  # the race: samples seen, candidates run and kept
    score_agreement: dict = field(default_factory=dict)  # {cheap score: {"spearman": ρ, "candidates": k}}
    metric: str = "mse"  # what ranks the candidates: measured final MSE, or the model's own head ("head-accuracy")

    def to_frame(self):
        """One row per candidate, in ranking order."""
        import pandas as pd

        return pd.DataFrame([{k: v for k, v in row.items() if k not in ("ranges", "accuracy", "head_accuracy")}
                             for row in self.candidates])


@dataclass
class TableResult(Result):
    """``table``: rows like the paper's Tables 1 and 2, per dataset."""

    model: str
    datasets: list[str]
    fit_n: int
    eval_n: int
    seed: int
    map: str
    map_params: dict
    rows: list[dict]

    def to_frame(self):
        """The rows as CSV/Markdown columns (see :func:`flat_row`)."""
        import pandas as pd

        return pd.DataFrame([flat_row(r) for r in self.rows])


def flat_row(row: dict) -> dict:
    """A row as CSV/Markdown columns (accuracies as fractions, empty where not applicable)."""
    acc, converged = row["accuracy"], row["accuracy_converged"]
    skip, converged_skip = acc["skip"] or {}, converged["skip"] or {}
    return {"dataset": row["dataset"], "range": row["range"], "paper": row["paper"],
            "blocks_left": row["blocks_left"], "params": row["params"], "mse_final": row["mse_final"],
            "acc_mean": acc["approximated"]["mean"], "acc_std": acc["approximated"]["std"],
            "skip_acc_mean": skip.get("mean", ""), "skip_acc_std": skip.get("std", ""),
            "converged_acc": converged["approximated"]["mean"],
            "converged_skip_acc": converged_skip.get("mean", ""), **head_columns(row),
            **{f"{task} {metric}": value for task, metrics in (row.get("tasks") or {}).items()
               for metric, value in metrics.items()}}


def head_columns(row: dict) -> dict:
    """The model's own head's top-1 (and top-5) accuracy of the row and of its skipped blocks; none without a head."""
    head = row.get("head_accuracy")
    if not head:
        return {}
    skip = head["skip"] or {}
    return {f"head_{k}": v for k, v in head["approximated"].items()} | {f"skip_head_{k}": skip.get(k, "")
                                                                       for k in head["approximated"]}
