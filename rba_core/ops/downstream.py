"""Downstream tasks for causal language models through lm-eval (EleutherAI's lm-evaluation-harness):
the ``eval`` operation.

The original model and the approximated one run ``lm_eval.simple_evaluate`` in the same process, each
handed to lm-eval's ``HFLM`` as a model object: the original as loaded, the approximated one as the same
transformers model with its ranges replaced (:func:`rba_core.passes.cut.cut_model`, which shares every other
module). The maps are fitted exactly as ``approximate`` and ``export`` fit them
(:func:`rba_core.ops.analysis.fit_range_maps`, the same cache entries), so ``eval`` of a folded map scores
what lm-eval's own ``hf`` model type scores on the folder ``export --map folded`` writes.

Tasks are lm-eval task names, groups or tags. The task shipped with the project (``debian_section``, in
:data:`TASKS_DIR`) and the tasks of a folder named by ``include_path`` (lm-eval's own option: YAML task
configs over local files) work offline; a task whose data is neither local nor in the datasets cache
fails with one sentence naming the task and the dataset it needs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

from rba_core.errors import RBAError

#: The tasks shipped with the project (one folder per task, lm-eval's YAML format over local JSONL).
TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
#: The shipped multiple-choice task: which Debian section a package description belongs to.
DEBIAN_TASK = "debian_section"
#: The fit data when ranges are given without a dataset: the language-model text shipped with the package.
DEFAULT_DATASET = "demo-text"
LM_EVAL_VERSION = "0.4.13"
INSTALL = f"pip install lm-eval=={LM_EVAL_VERSION}"


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise RBAError(f"Downstream tasks need lm-eval, which is not installed; install it with {INSTALL}.") from None
    return lm_eval


def task_manager(include_path: str | Path | None = None, names: Sequence[str] = ()):
    """lm-eval's TaskManager over the project's tasks (:data:`TASKS_DIR`), ``include_path``'s and, unless every
    one of ``names`` is among those (indexing lm-eval's own thousands of tasks takes seconds), lm-eval's own."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)]
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise RBAError(f"--include-path '{include_path}' is not a folder; give the folder that holds the "
                           "tasks' YAML files.")
        paths.append(str(include_path))
    with _quiet():
        local = TaskManager(include_path=paths, include_defaults=False)
        if names and set(names) <= set(local.all_tasks) | set(local.all_groups) | set(local.all_tags):
            return local
        return TaskManager(include_path=paths)


def _task_names(tasks: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise RBAError(f"Name at least one task, e.g. --tasks {DEBIAN_TASK} (the task shipped with RBA Explorer).")
    return list(dict.fromkeys(names))


def _dataset_of(manager, name: str) -> str:
    """The dataset a task's config names (``path`` or ``path/name``), for the offline sentence."""
    entry = manager.task_index.get(name)
    cfg = getattr(entry, "cfg", None) or {}
    path, sub = cfg.get("dataset_path"), cfg.get("dataset_name")
    return f"{path} ({sub})" if path and sub else (path or "its dataset")


def check_tasks(manager, names: Sequence[str]) -> None:
    """Every task is known and its data can be read here; else one sentence naming the task (and the dataset
    it needs when its data cannot be had). Loads each task once, before any model is loaded."""
    known = set(manager.all_tasks) | set(manager.all_groups) | set(manager.all_tags)
    for name in names:
        if name not in known and not Path(name).is_file():
            raise RBAError(f"Unknown lm-eval task '{name}': give a task, group or tag that lm-eval lists "
                           f"(lm-eval ls tasks), the shipped task '{DEBIAN_TASK}', or a task of a folder named "
                           "with --include-path.")
        try:
            with _quiet():
                manager.load([name])
        except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError ...
            dataset = _dataset_of(manager, name)
            raise RBAError(f"The data of task '{name}' ({dataset}) could not be loaded ({exc.__class__.__name__}: "
                           f"{str(exc).splitlines()[0][:160] if str(exc) else 'no message'}); it is not in the local "
                           "datasets cache, so run once online (without HF_DATASETS_OFFLINE) to download it, or use "
                           f"a local task ('{DEBIAN_TASK}', or --include-path DIR).") from None


class _quiet:
    """lm-eval logs warnings for every model object and task it builds: keep the tool's own output readable."""

    def __enter__(self):
        self.logger = logging.getLogger("lm_eval")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def run_tasks(model, tokenizer, names: Sequence[str], manager, request: "TaskRequest", seed: int = 0,
              documents: dict | None = None) -> tuple[dict, dict]:
    """``lm_eval.simple_evaluate`` on a loaded transformers model object (no re-load): per task its metrics
    ``{metric: value}`` (lm-eval's ``acc,none`` written ``acc``; stderr values kept as ``acc_stderr``) and the
    number of documents scored, with the ``request``'s limit, few-shot count and batch size. ``documents``, when given, receives per task the log-likelihood of every
    choice of every document, in document order (loglikelihood tasks)."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    limit, num_fewshot, batch_size = request.limit, request.num_fewshot, request.batch_size
    with _quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(names), task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=documents is not None, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                      bootstrap_iters=1000)
    metrics = {}
    for task, values in out["results"].items():
        metrics[task] = {key.split(",")[0]: _number(value) for key, value in values.items()
                         if "," in key and isinstance(value, (int, float))}
    samples = {task: int(n.get("effective", n.get("original", 0))) if isinstance(n, dict) else int(n)
               for task, n in (out.get("n-samples") or {}).items()}
    if documents is not None:
        for task, logged in (out.get("samples") or {}).items():
            documents[task] = [[float(r[0]) if isinstance(r, (tuple, list)) else None for r in doc["filtered_resps"]]
                               for doc in sorted(logged, key=lambda d: d["doc_id"])]
    return metrics, samples


def _number(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def difference(original: dict, approximated: dict) -> dict:
    """Per task and metric: approximated minus original (stderr values left out)."""
    return {task: {metric: (None if value is None or original[task].get(metric) is None
                            else value - original[task][metric])
                   for metric, value in metrics.items() if not metric.endswith("_stderr")}
            for task, metrics in approximated.items() if task in original}


@dataclass(frozen=True)
class TaskRequest:
    """What lm-eval is asked: the ``tasks`` (names, or one comma-separated string), ``limit`` documents per task
    (or a fraction below 1), ``num_fewshot``, ``include_path`` (a folder of local YAML tasks), ``batch_size``,
    ``log_documents`` (per task and model the log-likelihood of every choice of every document) and
    ``with_original`` (False, with ranges: the approximated model only; ``table`` scores the original once)."""

    tasks: str | Sequence[str]
    limit: int | float | None = None
    num_fewshot: int | None = None
    include_path: str | Path | None = None
    batch_size: int = 8
    log_documents: bool = False
    with_original: bool = True


def evaluate(model, tasks: str | Sequence[str], **options) -> dict:
    """lm-eval ``tasks`` on the causal LM ``model`` (alias, hub id, folder: an exported folder too) and, with
    ``ranges``, on the model approximated with maps of ``kind`` fitted on ``fit_n`` (default 64) windows (or
    texts) of ``dataset`` (default :data:`DEFAULT_DATASET`): :func:`evaluate_run`. ``options``: the run's
    (``dataset``, ``fit_n``, ``seed``, ``seq_len``, ``max_length``, ``cache``, ``progress``, ``on_stage``,
    ``encoder``), ``ranges``, ``kind``, ``map_params`` and the :class:`TaskRequest`'s fields."""
    from rba_core.models import DEFAULT_MAX_LENGTH, model_ref
    from rba_core.ops.run import Run

    asked = [f.name for f in fields(TaskRequest)] + ["ranges", "kind", "map_params"]
    options = {"dataset": DEFAULT_DATASET, "fit_n": 64, **options}
    dataset = options.pop("dataset") or DEFAULT_DATASET
    ref = _decoder(model_ref(model, options.get("max_length", DEFAULT_MAX_LENGTH)))  # before the data is read
    run, own = Run.of(ref if isinstance(model, str) else model, dataset, options, asked)
    ranges, kind, map_params = own.pop("ranges", ()), own.pop("kind", "linear"), own.pop("map_params", None)
    return evaluate_run(run, TaskRequest(tasks, **own), ranges, kind, map_params)


def _decoder(ref):
    """``ref``, or one sentence when it is not a causal language model."""
    from rba_core.models import adapter_class
    from rba_core.models.decoder import DecoderLM

    if not issubclass(adapter_class(ref.info.family), DecoderLM):
        raise RBAError(f"lm-eval tasks score causal language models; {ref.name} is a {ref.info.modality} encoder "
                       f"({ref.info.family}): use a decoder such as demo-GPT, or approximate --probe for encoders.")
    return ref


def evaluate_run(run, request: TaskRequest, ranges: Sequence[Sequence[int]] = (), kind: str = "linear",
                 map_params=None) -> dict:
    """lm-eval on the run's model, and with ``ranges`` on it approximated (maps fitted on the run's fit samples as
    ``approximate`` and ``export`` fit them). Returns the JSON record: per task the metrics of the ``original``
    and ``approximated`` models and their ``difference``, plus what was run."""
    from rba_core.ops.analysis import conditioning_report, fit_range_maps
    from rba_core.passes.approx import paper_notation
    from rba_core.maps import MapParams, map_kind, validate_ranges

    tasks, limit, num_fewshot, include_path = request.tasks, request.limit, request.num_fewshot, request.include_path
    log_documents, with_original = request.log_documents, request.with_original
    stage, ref, seed = run.stage, run.ref, run.seed
    names = _task_names(tasks)
    map_kind(kind)  # an unknown map fails before any work
    if limit is not None and limit <= 0:
        raise RBAError(f"--limit must be positive (documents per task, or a fraction below 1); got {limit}.")
    _decoder(ref)
    checked = validate_ranges(ranges, ref.info.num_blocks) if ranges else []
    stage("lm-eval: indexing the tasks and loading their data")
    manager = task_manager(include_path, names)
    check_tasks(manager, names)
    params = map_params or MapParams()
    lazy = run.lazy
    record = {"model": ref.name, "tasks": names, "limit": limit, "num_fewshot": num_fewshot,
              "lm_eval_version": _lm_eval().__version__, "notes": []}
    maps = []
    if checked:
        stage("Fit samples (train split): statistics of the ranges (float64, blocks up to the last range's end)")
        fit, maps = fit_range_maps(run, checked, kind, params)
        conditioning, notes = conditioning_report(checked, maps)
        record["notes"] += notes
        record.update(ranges=[{"start": i, "end": j, "removed_blocks": list(range(i + 1, j + 1)),
                               "paper": paper_notation((i, j))} for i, j in checked],
                      map=kind, map_params=map_kind(kind).key(params), conditioning=conditioning,
                      data={"dataset": str(run.dataset), "fit_n": run.fit_n, "seed": seed, "seq_len": run.seq_len,
                            "cache": fit.key})
    loaded = lazy()
    logged = {"original": {}, "approximated": {}} if log_documents else None
    original: dict = {}
    if with_original or not checked:
        stage(f"lm-eval on the original model: {', '.join(names)}")
        original, record["samples"] = run_tasks(loaded.model, loaded.processor, names, manager, request, seed,
                                                logged and logged["original"])
    record["results"] = {task: {"original": metrics} for task, metrics in original.items()}
    record["blocks"] = {"original": loaded.num_blocks}
    if checked:
        from rba_core.passes.cut import blocks_path, cut_model

        net = cut_model(loaded.model, blocks_path(loaded), loaded, checked, maps)
        stage(f"lm-eval on the approximated model ({', '.join(f'{i}→{j}' for i, j in checked)}, {kind} maps)")
        approximated, samples = run_tasks(net, loaded.processor, names, manager, request, seed,
                                          logged and logged["approximated"])
        record.setdefault("samples", samples)
        change = difference(original, approximated)
        for task, metrics in approximated.items():
            record["results"].setdefault(task, {}).update(approximated=metrics, difference=change.get(task))
        record["blocks"]["approximated"] = loaded.num_blocks - sum(j - i for i, j in checked)
    if logged is not None:
        record["documents"] = {task: {model: docs[task] for model, docs in logged.items() if task in docs}
                               for task in record["results"]}
    return record
