"""Running an evaluation: per-example JSONL written as it goes, resume, summary table, JSON and bar chart."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from jrt.evaluation.distributed import RankInfo, barrier, results_files
from jrt.evaluation.engine import MAX_NEW_TOKENS, Prepared, generate, prepare
from jrt.jsonl import append_jsonl, read_jsonl
from jrt.prompting.templates import PROMPT_FORMAT_VERSION, mode_repeats
from jrt.stats import paired_bootstrap
from jrt.tasks.metrics import contains, exact_match, token_f1
from jrt.tasks.registry import Example, TaskData, TaskSpec

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
TABLE_FILE = "summary.md"
CHART_FILE = "summary.png"
RUN_FILE = "run.json"
#: Keys every record of ``results.jsonl`` has (what resuming relies on).
RECORD_KEYS = ("task", "mode", "id", "correct")


def score(prediction: str, golds: Sequence[str], span_metrics: bool) -> dict[str, Any]:
    """``contains`` (and exact match / token F1 for single-span tasks) of one generation."""
    out: dict[str, Any] = {"correct": contains(prediction, golds)}
    if span_metrics:
        out["exact_match"] = exact_match(prediction.strip(), golds)
        out["f1"] = round(token_f1(prediction.strip(), golds), 6)
    return out


def read_results(path: str | Path, repair: bool = True) -> list[dict[str, Any]]:
    """Records of a results JSONL (see :mod:`jrt.jsonl`: a torn last line is dropped and cut from the file; any
    other malformed line, or a record without ``task``/``mode``/``id``, is an error naming the file and line)."""
    return read_jsonl(path, required=RECORD_KEYS, repair=repair)


@dataclass
class EvalConfig:
    """Settings of one run (stored in ``run.json``; a resumed run must match its identity, see :func:`run_identity`).

    Attributes:
        model: model name as given by the user.
        modes: prompting modes.
        batch_size: examples per batch (finished rows leave it during decoding, see ``engine.generate``).
        max_new_tokens: generation cap.
        max_length: model positions (None: unbounded).
        truncation_tokenizer: ``gpt2`` or ``model``.
        identity: further settings that change a generation (GGUF file, tokenizer, ...): part of the run's
            identity with those of :func:`run_identity`.
        extra: informative settings recorded in ``run.json`` (not compared on resume).
    """

    model: str
    modes: list[str]
    batch_size: int = 16
    max_new_tokens: int = MAX_NEW_TOKENS
    max_length: int | None = None
    truncation_tokenizer: str = "gpt2"
    identity: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def data_fingerprint(data: TaskData) -> str:
    """What the examples of a task came from: ``sha256:<hex>`` of a local file, ``hub:<dataset>`` otherwise."""
    path = Path(data.source)
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return f"sha256:{digest.hexdigest()}"
    return f"hub:{data.source}"


def run_identity(
    model: Any, config: EvalConfig, tasks: Sequence[TaskData], add_special_tokens: bool
) -> dict[str, Any]:
    """Every setting that changes a generation: a resumed run must match it (``data`` per task)."""
    param = next(model.parameters(), None)
    return {
        "model": config.model,
        "max_new_tokens": config.max_new_tokens,
        "max_length": config.max_length,
        "truncation_tokenizer": config.truncation_tokenizer,
        "add_bos": add_special_tokens,
        "prompt_format": PROMPT_FORMAT_VERSION,
        "dtype": str(param.dtype).removeprefix("torch.") if param is not None else None,
        "device_type": param.device.type if param is not None else None,
        **config.identity,
        "data": {d.spec.name: data_fingerprint(d) for d in tasks},
    }


def _check_run(output: Path, identity: dict[str, Any], extra: dict[str, Any], write: bool = True) -> None:
    """Refuse to add to ``output`` results made under another identity; with ``write`` (one process or rank 0)
    record this run's in ``run.json``, atomically, since the other ranks read it at the same time."""
    path = output / RUN_FILE
    merged = dict(identity)
    if path.is_file() and any(p.stat().st_size > 0 for p in results_files(output)):
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is corrupt ({err}); use another --output") from None
        if isinstance(old, dict) and "identity" not in old:
            raise ValueError(f"{path} was written by an older jrt and does not record every generation setting; "
                             "use another --output (or delete that run.json to keep adding to these results)")
        old_id = old.get("identity") if isinstance(old, dict) else None
        if not isinstance(old_id, dict) or not isinstance(old_id.get("data", {}), dict):
            raise ValueError(f"{path} is corrupt (not a JSON object with an identity object); use another --output")
        for key, value in identity.items():
            if key == "data":
                old_data = old_id.get("data", {})
                for task, fp in value.items():
                    if task in old_data and old_data[task] != fp:
                        raise ValueError(f"{output} holds {task} results made from other task data "
                                         f"({old_data[task]}, now {fp}); use another --output")
                merged["data"] = {**old_data, **value}
            elif key not in old_id:
                raise ValueError(f"{path} does not record {key} (written by an older jrt); use another --output")
            elif old_id[key] != value:
                raise ValueError(f"{output} holds results of a run with {key}={old_id[key]!r} (now {value!r}); "
                                 "use another --output")
    if write:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"identity": merged, **extra}, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def _evaluate_mode(
    model: Any, tokenizer: Any, spec: TaskSpec, mode: str, todo: list[Example], config: EvalConfig,
    results_path: Path, truncation_tokenizer: Any | None, add_special_tokens: bool, progress: bool,
    ranks: RankInfo,
) -> None:
    """Prepare the examples ``todo`` of one task x mode, generate for them in batches of decreasing prompt
    length, and append each batch's scored rows to ``results_path``."""
    prepared = [
        prepare(spec, ex, mode, tokenizer, truncation_tokenizer, config.max_length, config.max_new_tokens)
        for ex in tqdm(todo, desc=f"prepare {spec.name}/{mode}", disable=not progress, leave=False)
    ]
    prepared.sort(key=lambda p: -p.prompt_tokens)
    desc = f"{spec.name}/{mode}" + (f" [rank {ranks.rank}]" if ranks.world_size > 1 else "")
    bar = tqdm(total=len(prepared), desc=desc, disable=not progress, position=ranks.rank)
    for start in range(0, len(prepared), config.batch_size):
        batch = prepared[start : start + config.batch_size]
        t0 = time.perf_counter()
        gens = generate(model, tokenizer, [p.prompt for p in batch], config.max_new_tokens,
                        add_special_tokens=add_special_tokens)
        per = (time.perf_counter() - t0) / len(batch)
        append_jsonl(results_path, [_result_row(spec, mode, p, gen, per) for p, gen in zip(batch, gens)])
        bar.update(len(batch))
    bar.close()


def _result_row(spec: TaskSpec, mode: str, p: Prepared, gen: str, seconds: float) -> dict[str, Any]:
    """One line of ``results.jsonl``: the example, its generation, its scores and its share of the batch time."""
    return {
        "task": spec.name,
        "mode": mode,
        "id": p.example.id,
        "prompt_tokens": p.prompt_tokens,
        "context_tokens": p.context_tokens,
        "truncated": p.truncated,
        "fit_truncated": p.fit_truncated,
        "generation": gen,
        "gold": p.example.answers,
        **score(gen, p.example.answers, spec.span_metrics),
        "seconds": round(seconds, 4),
    }


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[TaskData],
    config: EvalConfig,
    output: str | Path,
    truncation_tokenizer: Any | None = None,
    add_special_tokens: bool = False,
    progress: bool = True,
    ranks: RankInfo | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on every task x mode, appending to ``output/results.jsonl`` as batches finish.

    Examples already in the results file (same task, mode and id) are not redone, so an interrupted run
    resumes where it stopped. Within a task x mode, examples are batched by decreasing prompt length (left
    padding, as lm-evaluation-harness does). Returns the summary (also written as ``summary.json``,
    ``summary.md`` and ``summary.png``).

    With ``ranks`` (several processes, :mod:`jrt.evaluation.distributed`), this process evaluates every
    ``world_size``-th example into ``results.rank<K>.jsonl``; after a barrier the summary covers every rank's
    results and rank 0 writes it.
    """
    ranks = ranks or RankInfo()
    if config.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {config.batch_size}")
    for mode in config.modes:
        mode_repeats(mode)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    _check_run(output, run_identity(model, config, tasks, add_special_tokens), config.extra, write=ranks.is_main)
    results_path = output / ranks.results_name()
    done = {(r["task"], r["mode"], r["id"]) for r in read_results(results_path)}
    done |= {(r["task"], r["mode"], r["id"]) for r in read_all_results(output, skip=results_path)}
    data_info: dict[str, dict[str, Any]] = {}
    for data in tasks:
        spec = data.spec
        data_info[spec.name] = {"n_skipped": data.n_skipped, "source": data.source}
        for mode in config.modes:
            todo = [ex for i, ex in enumerate(data.examples)
                    if ranks.owns(i) and (spec.name, mode, ex.id) not in done]
            if todo:
                _evaluate_mode(model, tokenizer, spec, mode, todo, config, results_path, truncation_tokenizer,
                               add_special_tokens, progress, ranks)
    barrier(ranks)
    summary = summarize(read_all_results(output), config.model, data_info,
                        wanted=[(d.spec.name, m, {e.id for e in d.examples}) for d in tasks for m in config.modes])
    if ranks.is_main:
        write_summary(summary, output)
    return summary


def read_all_results(output: Path, skip: Path | None = None) -> list[dict[str, Any]]:
    """The records of every results file of ``output`` (one process's and each rank's) but ``skip``, read
    without repairing (another rank may be appending to its file)."""
    return [r for path in results_files(output) if path != skip for r in read_results(path, repair=False)]


def summarize(
    records: Sequence[dict[str, Any]],
    model: str,
    data_info: dict[str, dict[str, Any]] | None = None,
    wanted: Sequence[tuple[str, str, set[str]]] | None = None,
) -> dict[str, Any]:
    """``{"model", "results": [{"task", "mode", "n", "contains", "seconds", ...}], "gains": [...]}``.

    ``contains``, ``exact_match`` and ``f1`` are percentages; ``gains`` gives, per task, each mode's
    ``contains`` minus ``default``'s in points. ``wanted`` restricts the rows to these (task, mode, ids).
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    if wanted is None:
        for r in records:
            groups.setdefault((r["task"], r["mode"]), []).append(r)
    else:
        index = {(r["task"], r["mode"], r["id"]): r for r in records}
        for task, mode, ids in wanted:
            rows = [index[(task, mode, i)] for i in ids if (task, mode, i) in index]
            if rows:
                groups[(task, mode)] = rows
    results = []
    for (task, mode), rows in groups.items():
        n = len(rows)
        row: dict[str, Any] = {
            "task": task,
            "mode": mode,
            "n": n,
            "contains": round(100.0 * sum(bool(r["correct"]) for r in rows) / n, 2),
            "seconds": round(sum(float(r.get("seconds", 0.0)) for r in rows), 2),
            "n_truncated": sum(bool(r.get("truncated")) for r in rows),
            "n_fit_truncated": sum(bool(r.get("fit_truncated")) for r in rows),
            "mean_prompt_tokens": round(sum(r.get("prompt_tokens", 0) for r in rows) / n, 1),
        }
        if all("exact_match" in r for r in rows):
            row["exact_match"] = round(100.0 * sum(bool(r["exact_match"]) for r in rows) / n, 2)
            row["f1"] = round(100.0 * sum(float(r["f1"]) for r in rows) / n, 2)
        if data_info and task in data_info:
            row["n_skipped"] = data_info[task]["n_skipped"]
        results.append(row)
    by_key = {(r["task"], r["mode"]): r for r in results}
    gains = []
    for r in results:
        if r["mode"] == "default" or (r["task"], "default") not in by_key:
            continue
        gain: dict[str, Any] = {
            "task": r["task"],
            "mode": r["mode"],
            "gain": round(r["contains"] - by_key[(r["task"], "default")]["contains"], 2),
        }
        gain.update(paired_gain(groups[(r["task"], "default")], groups[(r["task"], r["mode"])]))
        gains.append(gain)
    return {"model": model, "results": results, "gains": gains}


def paired_gain(base: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``other``'s ``contains`` minus ``base``'s on the examples both hold (paired by id), in points, with a
    paired bootstrap 95% interval (:func:`jrt.stats.paired_bootstrap`, 10,000 resamples, seed 0):
    ``{"n_paired", "paired_gain", "gain_ci": [low, high]}`` (empty when no example is in both)."""
    before = {r["id"]: bool(r["correct"]) for r in base}
    pairs = [(before[r["id"]], bool(r["correct"])) for r in other if r["id"] in before]
    if not pairs:
        return {}
    mean, low, high = paired_bootstrap([a for a, _ in pairs], [b for _, b in pairs])
    return {"n_paired": len(pairs), "paired_gain": round(100 * mean, 2),
            "gain_ci": [round(100 * low, 2), round(100 * high, 2)]}


def format_table(summary: dict[str, Any]) -> str:
    """Markdown table: one row per task, ``contains`` per mode, the gain of each mode over ``default`` (with its
    paired bootstrap interval when the summary has one)."""
    results = summary["results"]
    modes = list(dict.fromkeys(r["mode"] for r in results))
    tasks = list(dict.fromkeys(r["task"] for r in results))
    by_key = {(r["task"], r["mode"]): r for r in results}
    gain_ci = {(g["task"], g["mode"]): g["gain_ci"] for g in summary.get("gains", []) if "gain_ci" in g}
    other = [m for m in modes if m != "default"]
    head = ["task"] + [f"{m} (n)" for m in modes]
    head += [f"{m} gain (pts) [paired bootstrap 95% CI]" for m in other if "default" in modes]
    head += [f"{m} s" for m in modes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in tasks:
        cells = [task]
        for m in modes:
            r = by_key.get((task, m))
            cells.append(f"{r['contains']:.1f} ({r['n']})" if r else "-")
        if "default" in modes:
            for m in other:
                a, b = by_key.get((task, m)), by_key.get((task, "default"))
                ci = gain_ci.get((task, m))
                cells.append("-" if not (a and b) else f"{a['contains'] - b['contains']:+.1f}"
                             + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else ""))
        for m in modes:
            r = by_key.get((task, m))
            cells.append(f"{r['seconds']:.0f}" if r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict[str, Any], path: str | Path) -> None:
    """Grouped bar chart of ``contains`` per task and mode (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary["results"]
    modes = list(dict.fromkeys(r["mode"] for r in results))
    tasks = list(dict.fromkeys(r["task"] for r in results))
    by_key = {(r["task"], r["mode"]): r for r in results}
    width = 0.8 / max(1, len(modes))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(tasks), 3.6))
    for j, mode in enumerate(modes):
        xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(tasks))]
        ys = [by_key[(t, mode)]["contains"] if (t, mode) in by_key else 0.0 for t in tasks]
        bars = ax.bar(xs, ys, width, label=mode)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("contains (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{summary['model']}: single read vs JRT-Prompt", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(summary: dict[str, Any], output: str | Path) -> None:
    """Write ``summary.json``, ``summary.md`` and ``summary.png`` into ``output``."""
    output = Path(output)
    (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    (output / TABLE_FILE).write_text(f"# {summary['model']}\n\n" + format_table(summary))
    if summary["results"]:
        plot_summary(summary, output / CHART_FILE)
