"""What the paper's Tables 1 and 2 say for any model and dataset: one row per approximated range.

Each row is exactly what :func:`rba_core.ops.analysis.approximate` returns with ``probe=True`` for
the same settings (so the two never disagree), and it reuses that function's cache: a second
table with more rows runs the model only for the new ones.

Row syntax: ``I:J`` is range i→j; ``I:J+K:L`` approximates several ranges in one model; rows are
separated by commas and may include presets. ``all-consecutive`` is every one-block range i→i+1
(i = 0..L-1); ``paper`` is the paper's Table 1 range "1 5" (2→6 here, 8 of 12 blocks left; only
for models with at least 12 blocks, as the paper's are) followed by the consecutive one-block
ranges of its Table 2 in its notation, "0 1" .. "L-2 L-1" (1→2 .. L-1→L here; the paper's
notation cannot name the embedding output hs[0]). The paper's tables could not
be consulted offline, so the Table 2 preset is our reading of "consecutive ranges".
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Sequence

from rba_core.ops.analysis import approximate_run
from rba_core.passes.approx import Range, paper_notation
from rba_core.cache import Cache
from rba_core.errors import RBAError
from rba_core.maps import MapParams, map_kind, validate_ranges
from rba_core.progress import duration_text
from rba_core.store.results import TableResult, flat_row
from rba_core.ops.run import Run

Row = list[Range]
PRESETS = ("paper", "all-consecutive")
FORMATS = (".csv", ".md", ".json")
ACCURACIES = ("accuracy", "accuracy_converged")  # the paper's probe protocol, the converged probe
_RANGE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def preset_rows(name: str, num_blocks: int) -> list[Row]:
    """The rows of a preset for a model with ``num_blocks`` blocks."""
    if name == "all-consecutive":
        return [[(i, i + 1)] for i in range(num_blocks)]
    if name == "paper":
        table1 = [[(2, 6)]] if num_blocks >= 12 else []  # the paper's range is for its 12-block models
        return table1 + [[(i, i + 1)] for i in range(1, num_blocks)]
    raise RBAError(f"Unknown preset '{name}': use {' or '.join(PRESETS)}, or ranges like 2:6,8:10+3:4.")


def parse_rows(spec: str | Sequence[Sequence[Range]], num_blocks: int) -> list[Row]:
    """Checked rows from a string like ``"paper,2:6,8:10+3:4"`` (presets and ranges) or lists of ranges."""
    if isinstance(spec, str):
        rows = []
        for item in spec.split(","):
            if item.strip() in PRESETS:
                rows += preset_rows(item.strip(), num_blocks)
                continue
            parts = [_RANGE.match(part) for part in item.split("+")]
            if not all(parts):
                raise RBAError(f"Cannot read the range '{item.strip()}': write I:J (blocks I+1..J removed), "
                               "join ranges of one row with '+' and separate rows with ','.")
            rows.append([(int(m.group(1)), int(m.group(2))) for m in parts])
        spec = rows
    return [validate_ranges(row, num_blocks) for row in spec]


def row_label(row: Sequence[Range]) -> tuple[str, str]:
    """(our notation, the paper's notation) of a row, e.g. ("2→6 + 8→10", "1 5 + 7 9")."""
    return " + ".join(f"{i}→{j}" for i, j in row), " + ".join(paper_notation(r) for r in row)


def table(model, datasets: Sequence[str], fit_n: int, eval_n: int, seed: int = 0,
          rows: str | Sequence[Sequence[Range]] = "paper", kind: str = "linear", **options) -> TableResult:
    """:func:`table_run` of the :class:`Run` of these arguments (on the first dataset). ``options``: the run's
    (``max_length``, ``seq_len``, ``cache``, ``progress``, ``on_stage``, ``encoder``), ``map_params``,
    ``label_map``, and ``tasks`` with ``limit`` and ``include_path`` (:class:`rba_core.ops.downstream.TaskRequest`)."""
    if not datasets:
        raise RBAError("Give at least one dataset for the table.")
    run, asked = Run.of(model, datasets[0], {**options, "fit_n": fit_n, "eval_n": eval_n, "seed": seed},
                        ("map_params", "label_map", "tasks", "limit", "include_path"))
    tasks = None
    if asked.get("tasks"):
        from rba_core.ops.downstream import TaskRequest

        tasks = TaskRequest(asked["tasks"], asked.get("limit"), include_path=asked.get("include_path"))
    return table_run(run, datasets, rows, kind, asked.get("map_params"), asked.get("label_map"), tasks)


def table_run(run: Run, datasets: Sequence[str], rows: str | Sequence[Sequence[Range]] = "paper",
              kind: str = "linear", map_params: MapParams | None = None, label_map=None, tasks=None) -> TableResult:
    """The original model's row then one row per range set, for each dataset (the run on each in turn).

    Rows: ``dataset``, ``range`` and ``paper`` (labels), ``ranges`` ([[i, j], ...]),
    ``blocks_left``, ``params`` (T included), ``mse_final``, ``accuracy`` {``approximated``,
    ``skip``} each {mean, std} over probe seeds 0, 1, 2 (``original`` on the original row), and
    ``accuracy_converged`` the same for the converged probe (one deterministic run, std 0); with a
    classification head that matches the dataset's classes (or ``label_map``), ``head_accuracy`` the same for
    the model's own head ({top1[, top5]}; :mod:`rba_core.ops.head`). ``tasks`` (causal LMs, a
    :class:`rba_core.ops.downstream.TaskRequest`): lm-eval tasks scored on every row's model, in ``tasks`` as
    ``{task: {metric: value}}`` (:func:`rba_core.ops.downstream.evaluate_run`; the original model once).
    The model is loaded once, and only when some row is not cached. A causal LM on a language-model text reads
    it as windows of the run's ``seq_len`` tokens.
    """
    if not datasets:
        raise RBAError("Give at least one dataset for the table.")
    declared = map_kind(kind)
    params = map_params or MapParams()
    checked = parse_rows(rows, run.info.num_blocks)
    if not checked:
        raise RBAError("The table has no rows: this model is too shallow for the preset; give ranges like 1:2.")
    cache, stage, fit_n, eval_n = run.cache, run.stage, run.fit_n, run.eval_n
    rows = len(datasets) * len(checked)
    per_row = 2 * (fit_n + eval_n)  # the approximated and the skipped model, on the fit and evaluation samples
    stage(f"Table: {len(checked)} rows on {len(datasets)} dataset{'s' if len(datasets) > 1 else ''}, about "
          f"{rows * per_row:,} sample forwards of approximated models ({per_row:,} per row) after one pass of the "
          "original model over each split; stored passes and rows are read instead, and the time follows the first row")
    out = []
    lm_tasks = _task_runner(run, tasks, kind, params) if tasks else None
    for position, dataset in enumerate(datasets):
        on = (run if position == 0 else run.on(dataset)).quiet()  # the table says its own stages
        for n, row in enumerate(checked):
            label, paper = row_label(row)
            stage(f"{dataset}: row {n + 1}/{len(checked)}, range {label}")
            # Latency is not in the table, so the rows are not timed (a stored timed run serves them too).
            res = approximate_run(on, row, kind, params, probe=True, latency=False, label_map=label_map)
            heads = res.head_accuracy and {"head_accuracy": res.head_accuracy}
            scores = lm_tasks and {"tasks": lm_tasks(dataset, row)}
            if len(out) == 0 and rows > 1:
                stage(_estimate(cache, res.cache["eval"], rows - 1, per_row, (len(datasets) - 1) * (fit_n + eval_n)))
            if n == 0:
                out.append({"dataset": dataset, "range": "original", "paper": "original", "ranges": [],
                            "blocks_left": res["blocks"]["original"], "params": res["params"]["original"],
                            "mse_final": 0.0, **{key: {"approximated": res[key]["original"], "skip": None}
                                                 for key in ACCURACIES},
                            **{key: {"approximated": v["original"], "skip": None} for key, v in (heads or {}).items()},
                            **({"tasks": lm_tasks(dataset, [])} if lm_tasks else {})})
            out.append({"dataset": dataset, "range": label, "paper": paper, "ranges": [list(r) for r in row],
                        "blocks_left": res["blocks"]["approximated"], "params": res["params"]["approximated"],
                        "mse_final": res["mse_final"],
                        **{key: {"approximated": res[key]["approximated"], "skip": res[key]["skip"]}
                           for key in ACCURACIES},
                        **{key: {"approximated": v["approximated"], "skip": v["skip"]} for key, v in (heads or {}).items()},
                        **(scores or {})})
    return TableResult(model=res.model, datasets=[str(d) for d in datasets], fit_n=fit_n, eval_n=eval_n, seed=run.seed,
                       map=kind, map_params=declared.key(params), rows=out)


def _task_runner(run: Run, tasks, kind: str, params: MapParams):
    """``score(dataset, ranges)``: lm-eval ``tasks`` (a :class:`rba_core.ops.downstream.TaskRequest`) on the run's
    model with ``ranges`` approximated (maps fitted on ``dataset`` as ``approximate`` fits them),
    ``{task: {metric: value}}``; the original model (no ranges) is scored once. Checks the tasks before any row
    runs."""
    from dataclasses import replace

    from rba_core.ops.downstream import _task_names, check_tasks, evaluate_run, task_manager

    names = _task_names(tasks.tasks)
    check_tasks(task_manager(tasks.include_path, names), names)
    request = replace(tasks, tasks=names, with_original=False)
    scored: dict = {}

    def score(dataset, ranges) -> dict:
        if not ranges and "original" in scored:
            return scored["original"]
        run.stage(f"lm-eval {', '.join(names)}: " + (" + ".join(f"{i}→{j}" for i, j in ranges) or "original model"))
        record = evaluate_run(run.on(dataset).quiet(), request, ranges, kind, params)
        which = "approximated" if ranges else "original"
        result = {task: {m: v for m, v in models[which].items() if not m.endswith("_stderr")}
                  for task, models in record["results"].items()}
        if not ranges:
            scored["original"] = result
        return result

    return score


def _estimate(cache: Cache, pass_key: str, rows: int, per_row: int, passes: int) -> str:
    """How long the other ``rows`` will take at most: their forwards (and ``passes`` samples of the original
    model for the other datasets) at the original model's speed per sample in the stored pass ``pass_key``
    (the approximated models are faster, so it is an upper bound)."""
    entry = cache.get(pass_key)
    meta = entry.meta if entry is not None else {}
    other = "The other row" if rows == 1 else f"The other {rows} rows"
    if not meta.get("seconds") or not meta.get("n"):
        return f"{other}: about {rows * per_row + passes:,} sample forwards"
    per_sample = meta["seconds"] / meta["n"]
    return (f"{other}: at most about {duration_text(per_sample * (rows * per_row + passes))} "
            f"({1000 * per_sample:.3g} ms per sample, the original model's speed; stored rows take no time)")


def _number(value) -> str:
    """A task metric as lm-eval gives it (4 decimals); empty where there is none."""
    return "" if value is None or value == "" else f"{value:.4f}"


def _percent(mean, std=None) -> str:
    """"91.20 ± 0.35" (or "91.20" without a std); empty where there is no value."""
    if mean == "":
        return ""
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def render(result: dict, fmt: str) -> str:
    """The table as ``csv``, ``md`` or ``json`` text."""
    rows = [flat_row(r) for r in result["rows"]]
    if fmt == "json":
        return json.dumps(result.to_json() if hasattr(result, "to_json") else result, indent=1)
    if fmt == "csv":
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["range"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return text.getvalue()
    if fmt == "md":
        heads = [k for k in (rows[0] if rows else {}) if k.startswith(("head_", "skip_head_")) or " " in k]
        lines = ["| dataset | range (ours) | paper | blocks left | params | final MSE | accuracy % | skip accuracy % "
                 "| converged probe % | converged skip % |" + "".join(
                     f" {k} |" if " " in k else f" {k.replace('_', ' ')} % |" for k in heads),
                 "|---|---|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(heads)]
        lines += [f"| {r['dataset']} | {r['range']} | {r['paper']} | {r['blocks_left']} | {r['params']:,} | "
                  f"{r['mse_final']:.4g} | {_percent(r['acc_mean'], r['acc_std'])} | "
                  f"{_percent(r['skip_acc_mean'], r['skip_acc_std'])} | {_percent(r['converged_acc'])} | "
                  f"{_percent(r['converged_skip_acc'])} |" + "".join(
                      f" {_number(r.get(k))} |" if " " in k else f" {_percent(r.get(k, ''))} |" for k in heads)
                  for r in rows]
        return "\n".join(lines) + "\n"
    raise RBAError(f"Unknown table format '{fmt}': use csv, md or json.")


def table_format(path: Path | str) -> str:
    """``csv``, ``md`` or ``json`` from the file name's suffix (checked before any work is done)."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise RBAError(f"Cannot tell the table format from '{Path(path).name}': "
                       "end the file name with .csv, .md or .json.")
    return suffix[1:]


def write_table(result: dict, path: Path | str) -> Path:
    """Write the table in the format its suffix names (.csv, .md or .json)."""
    path = Path(path)
    text = render(result, table_format(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
