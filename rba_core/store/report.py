"""What a result says in a few lines of plain text: the CLI's summary when no ``--json`` file is asked for."""

from __future__ import annotations

from rba_core.passes.approx import paper_notation
from rba_core.latency import change, describe
from rba_core.ranking import rank_ranges, suggested_removed, top_blocks

_MODELS = (("original", "original"), ("approximated", "approximated"), ("skip", "skipped"))


def _accuracy(scores: dict, std: bool = True) -> str:
    return ", ".join(f"{label} {100 * scores[k]['mean']:.2f}%" + (f" ± {100 * scores[k]['std']:.2f}" if std else "")
                     for k, label in _MODELS if k in scores)


def _unit(results: dict) -> str:
    return "texts" if results.get("modality") == "text" else "images"


def _cache(results: dict) -> str:
    cache = results["cache"]
    workers = results.get("workers", 1)
    by = f" by {workers} worker processes" if workers > 1 else ""
    return f"Cache: {'hit' if cache['hit'] else 'computed and stored'} (key {cache['key'][:12]}…){by}."


def summarise_analysis(results: dict) -> list[str]:
    blocks = results["num_blocks"]
    removed = suggested_removed(blocks)
    best = rank_ranges(results["fit_residual"], removed)
    lines = [f"{results['model']} on {results['dataset']} ({results['split']} split, n={results['n']}, "
             f"seed={results['seed']}): {blocks} blocks, hidden size {results['hidden_size']}.",
             "Most redundant blocks (highest Block Redundancy): "
             + ", ".join(f"block {k}" for k in top_blocks(results["block_redundancy"], 3)) + "."]
    if best:
        lines.append(f"Best range removing {removed} blocks: {best[0].start}→{best[0].end} "
                     f"(fit residual {best[0].residual:.4g}).")
    return lines + [_cache(results)]


def summarise_approximation(results: dict) -> list[str]:
    ranges = ", ".join(f"{r['start']}→{r['end']} (paper: {r['paper']})" for r in results["ranges"])
    blocks, params, latency = results["blocks"], results["params"], results["latency_ms_per_image"]
    lines = [f"{results['model']} on {results['dataset']}: {ranges}, {results['map']} map; blocks "
             f"{blocks['original']} → {blocks['approximated']}.",
             f"Final-representation MSE {results['mse_final']:.4g} on {results['eval_n']} test {_unit(results)}.",
             f"Parameters {params['original']:,} → {params['approximated']:,} "
             f"({params['approximated'] / params['original'] - 1:+.1%}).",
             f"Latency per sample, median (p25–p75): original {describe(latency['original'])}, "
             f"approximated {describe(latency['approximated'])}: "
             f"{change(latency['original'], latency['approximated'])}."]
    if "accuracy" in results:
        lines += [f"Probe accuracy, paper protocol (mean ± std, seeds 0-2): {_accuracy(results['accuracy'])}.",
                  f"Probe accuracy, converged: {_accuracy(results['accuracy_converged'], std=False)}."]
    return lines


def summarise_search(results: dict, top: int = 5) -> list[str]:
    lines = [f"{results['model']} on {results['dataset']}: {results['evaluated']} of {results['considered']} "
             f"candidates fit the budget; best by " + ("the model's own head's top-1 accuracy" if results.get(
                 "metric") == "head-accuracy" else "measured final MSE") + f" on {results['eval_n']} test samples:"]
    for rank, row in enumerate(results["candidates"][:top], start=1):
        lines.append(f"  {rank}. {row['range']} (paper: {row['paper']}): MSE {row['mse_final']:.4g}, "
                     f"{row['params']:,} parameters, about {row['latency_ms_per_image_estimate']:.3g} ms per image"
                     + (f", head top-1 {row['head_accuracy']['approximated']['top1']:.2%}" if "head_accuracy" in row
                        else ""))
    agreement = {name: v for name, v in (results.get("score_agreement") or {}).items() if v["spearman"] is not None}
    if agreement:
        lines.append("Spearman ρ of each cheap score with the measured ranking (candidates covered): " + ", ".join(
            f"{name} {v['spearman']:.2f} ({v['candidates']})"
            for name, v in sorted(agreement.items(), key=lambda kv: -kv[1]["spearman"])) + ".")
    return lines


def summarise_export(record: dict) -> list[str]:
    """An export's ``rba.json`` record: a folded checkpoint (``map`` folded) or an rba-compressed folder."""
    folded = record.get("map") == "folded"
    ranges = [(r["start"], r["end"]) if isinstance(r, dict) else tuple(r) for r in record["ranges"]]
    blocks = record["layers"] if folded else {"original": record["num_blocks"], "folded": len(record["kept_blocks"])}
    params = record["params"]
    after = params["folded" if folded else "compressed"]
    kinds = ["folded"] if folded else sorted({r["map"] for r in record["ranges"]})
    lines = [f"{record['source']}: " + ", ".join(f"{i}→{j} (paper: {paper_notation((i, j))})" for i, j in ranges)
             + f", {' and '.join(kinds)} map{'s' if len(kinds) > 1 else ''}; blocks {blocks['original']} → "
             f"{blocks['folded']}; parameters {params['original']:,} → {after:,} ({after / params['original'] - 1:+.1%}).",
             "A plain Hugging Face checkpoint with fewer layers: transformers' from_pretrained loads it, rba_core not "
             "needed." if folded else "rba_core.load_compressed(folder) rebuilds it (safetensors and JSON only)."]
    if "perplexity" in record:
        ppl = record["perplexity"]
        lines.append(f"Perplexity on {record['data']['eval_n']} test windows: original {ppl['original']:.4g}, "
                     f"folded {ppl['folded']:.4g}.")
    if "mse_final" in record:
        lines.append(f"Final-representation MSE of the folded model against the original on "
                     f"{record['data']['eval_n']} test samples: {record['mse_final']:.4g}.")
    return lines


def summarise_eval(record: dict) -> list[str]:
    """An ``eval`` record: per task and metric the original, approximated and their difference."""
    lines = [f"{record['model']}: lm-eval {', '.join(record['tasks'])}"
             + (f" (limit {record['limit']})" if record.get("limit") else "")]
    if record.get("ranges"):
        lines.append("approximated: " + ", ".join(f"{r['start']}→{r['end']}" for r in record["ranges"])
                     + f" ({record['map']} maps), {record['blocks']['approximated']} of "
                     f"{record['blocks']['original']} blocks")
    number = lambda value: "n/a" if value is None else f"{value:.4f}"  # noqa: E731
    signed = lambda value: "n/a" if value is None else f"{value:+.4f}"  # noqa: E731
    for task, models in record["results"].items():
        for metric, value in (models.get("original") or {}).items():
            if metric.endswith("_stderr"):
                continue
            row = f"  {task} {metric}: original {number(value)}"
            if models.get("approximated"):
                row += (f", approximated {number(models['approximated'].get(metric))}"
                        f" ({signed(models['difference'].get(metric))})")
            lines.append(row)
    return lines


def summarise_plan(results: dict) -> list[str]:
    """A plan: one line per step (the metric after it and its interval), then the final model against skipping."""
    metric, final, original = results["metric"], results["final"], results["original"]
    value = lambda part: f"{metric} {part['metric']:.4g} ({part['interval'][0]:.4g}–{part['interval'][1]:.4g})"  # noqa: E731
    lines = [f"{results['model']} on {results['dataset']}: {results['strategy']} plan, {results['map']} maps, "
             f"{metric} on {results['eval_n']} test samples (95% bootstrap interval).",
             f"  original: {value(original)}, {original['params']:,} parameters"]
    for step in results["steps"]:
        blocks = ", ".join(str(k) for k in step["removes"])
        lines.append(f"  step {step['step']}: range {step['range_label']} (paper: {step['paper']}, removes block "
                     f"{blocks}), {step['blocks_removed']} removed so far: {value(step)}, {step['params']:,} parameters")
    lines.append(f"Final: ranges {', '.join(f'{i}→{j}' for i, j in final['ranges'])}, blocks "
                 f"{final['blocks']['original']} → {final['blocks']['approximated']}: {value(final)}; the same "
                 f"blocks skipped: {value(final['skip'])}.")
    return lines


def summarise(command: str, results: dict) -> str:
    """The summary of an ``analyze``, ``approximate``, ``search`` or ``export`` result (its notes go to stderr)."""
    lines = {"analyze": summarise_analysis, "approximate": summarise_approximation,
             "search": summarise_search, "export": summarise_export, "eval": summarise_eval,
             "plan": summarise_plan}[command](results)
    return "\n".join(lines) + "\n"
