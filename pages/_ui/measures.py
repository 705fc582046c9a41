"""What users of a cut model measure, on the Approximate page: the model's own classifier head (shown with the
results) and, for causal language models, lm-eval tasks on the original and the approximated model
(:func:`rba_core.ops.downstream.evaluate`), run like every long step (status box, Stop)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from pages._ui.compute import _opened, _working, encoder, start_button, unit
from pages._ui.selection import Selection
from pages._ui.show import dataframe, downloads, errors
from rba_core.ops.downstream import DEBIAN_TASK
from rba_core.maps import MapParams

DONE = "_lm_tasks"  # session key: the results of the runs made in this session, by their settings


def run_lm_tasks(sel: Selection, ranges: list[tuple[int, int]], kind: str, params: MapParams, tasks: str,
                 limit: int | None) -> dict:
    """lm-eval ``tasks`` on the original and approximated model (maps fitted as the page fits them), in a status
    box with Stop."""
    from rba_core.ops.downstream import evaluate

    with _working("Running the lm-eval tasks…", unit(sel.dataset)) as work:
        record = evaluate(sel.model, tasks, dataset=sel.dataset, fit_n=sel.n, seed=sel.seed, ranges=ranges,
                          kind=kind, map_params=params, limit=limit, cache=work.cache, progress=work.progress,
                          on_stage=work.stage, encoder=lambda: encoder(sel.model))
        _opened(sel)
        work.status.update(state="complete", expanded=False, label="Ran the lm-eval tasks on both models.")
    return record


def frame(record: dict) -> pd.DataFrame:
    """One row per task and metric: the original, the approximated model and their difference."""
    rows = []
    for task, models in record["results"].items():
        for metric, value in models["original"].items():
            if metric.endswith("_stderr"):
                continue
            rows.append({"task": task, "metric": metric, "original": value,
                         "approximated": (models.get("approximated") or {}).get(metric),
                         "difference": (models.get("difference") or {}).get(metric)})
    return pd.DataFrame(rows)


def downstream_tasks(sel: Selection, ranges: list[tuple[int, int]], kind: str, params: MapParams) -> None:
    """The section: task list, document limit, Run, and the table of the runs made for these settings."""
    st.subheader("Downstream tasks (lm-eval)")
    st.markdown("lm-eval-harness tasks on the original model and the approximated one (the same maps), as "
                f"`python -m rba_core eval` runs them. `{DEBIAN_TASK}`, shipped with RBA Explorer, works offline "
                "(which Debian section does a package description belong to? six choices); lm-eval's own tasks "
                "need their data in the local datasets cache.")
    with errors():
        cols = st.columns([3, 1])
        tasks = cols[0].text_input("Tasks", value=DEBIAN_TASK, key="lm_tasks",
                                   help="Comma-separated lm-eval task, group or tag names.")
        limit = cols[1].number_input("Documents per task", min_value=0, value=40, step=10, key="lm_tasks_limit",
                                     help="0: every document of each task.")
        spec = repr((sel.model, sel.dataset, sel.n, sel.seed, ranges, kind, params, tasks, int(limit)))
        done = st.session_state.setdefault(DONE, {})
        if start_button("Run the tasks", key="lm-tasks", help="Both models through lm-eval (the original first); "
                        "Stop ends it, nothing partial is kept."):
            done[spec] = run_lm_tasks(sel, ranges, kind, params, tasks, int(limit) or None)
        if spec in done:
            table = frame(done[spec])
            dataframe(table, column_config={name: st.column_config.NumberColumn(format="%.4f")
                                            for name in ("original", "approximated", "difference")})
            downloads("lm-eval", table=table, data=done[spec])


def head_metrics(res) -> None:
    """The model's own classifier head on the evaluation samples (models whose head matches the dataset's classes)."""
    head = res.get("head_accuracy")
    if not head:
        return
    st.markdown(f"**The model's own classifier head** ({head['classes']} classes, matched by {head['matched_by']}) on "
                f"the {head['n']} evaluation samples:")
    for col, name in zip(st.columns(3), ("original", "approximated", "skip")):
        ks = ", ".join(f"top-{k[3:]} {100 * v:.1f}%" for k, v in head[name].items())
        col.metric(f"Head accuracy, {name}", f"{100 * head[name]['top1']:.1f}%", help=ks)
