"""``jrt eval-compare``: one table for several ``jrt eval`` runs on the same examples.

Per run and task: ``contains``, exact match and token F1 in each mode, and the read-twice gain with a paired
bootstrap 95% interval (examples paired by id). Then, per task and mode, each run against the first (e.g. a
linearized student against its teacher), also paired by id with a bootstrap interval: the question "does the
JRT-RNN student without reading twice close part of the gap?" is a difference between two runs, not two modes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from jrt.evaluation.distributed import results_files
from jrt.evaluation.runner import paired_gain, read_all_results, summarize


def load_run(folder: str | Path) -> list[dict[str, Any]]:
    """Every record of a ``jrt eval`` output folder (one process's and each rank's results file)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"run folder not found: {folder}")
    if not results_files(folder):
        raise FileNotFoundError(f"{folder} holds no results.jsonl: not a jrt eval output folder")
    return read_all_results(folder)


def compare(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """``runs``: name -> records. Returns ``{"runs": {name: summary}, "against_first": [...]}``.

    Each row of ``against_first``: ``{"task", "mode", "run", "baseline", "n_paired", "paired_gain", "gain_ci"}``,
    the ``contains`` of ``run`` minus that of the first run on the examples both hold, in points.
    """
    if not runs:
        raise ValueError("no run to compare")
    names = list(runs)
    summaries = {name: summarize(records, name) for name, records in runs.items()}
    against = []
    first = names[0]
    for name in names[1:]:
        for row in summaries[name]["results"]:
            key = (row["task"], row["mode"])
            base = [r for r in runs[first] if (r["task"], r["mode"]) == key]
            mine = [r for r in runs[name] if (r["task"], r["mode"]) == key]
            gain = paired_gain(base, mine)
            if gain:
                against.append({"task": key[0], "mode": key[1], "run": name, "baseline": first, **gain})
    return {"runs": summaries, "against_first": against}


def _pct(row: dict[str, Any] | None, key: str) -> str:
    return "-" if row is None or key not in row else f"{row[key]:.1f}"


def format_compare(result: dict[str, Any]) -> str:
    """Markdown: the per-run table, then each run against the first."""
    runs = result["runs"]
    lines = ["| model | task | n | contains default / twice | exact match default / twice "
             "| token F1 default / twice | read-twice gain (pts) [95% CI] |",
             "|---|---|---|---|---|---|---|"]
    for name, summary in runs.items():
        rows = {(r["task"], r["mode"]): r for r in summary["results"]}
        gains = {g["task"]: g for g in summary["gains"] if g["mode"] == "twice"}
        for task in dict.fromkeys(r["task"] for r in summary["results"]):
            d, t = rows.get((task, "default")), rows.get((task, "twice"))
            n = "/".join(str(r["n"]) for r in (d, t) if r is not None)
            g = gains.get(task)
            gain = "-" if g is None else (f"{g['paired_gain']:+.1f} [{g['gain_ci'][0]:+.1f}, {g['gain_ci'][1]:+.1f}]"
                                          if "gain_ci" in g else f"{g['gain']:+.1f}")
            lines.append(f"| {name} | {task} | {n} | {_pct(d, 'contains')} / {_pct(t, 'contains')} "
                         f"| {_pct(d, 'exact_match')} / {_pct(t, 'exact_match')} | {_pct(d, 'f1')} / {_pct(t, 'f1')} "
                         f"| {gain} |")
    if result["against_first"]:
        first = next(iter(runs))
        lines += ["", f"Each run against `{first}` (contains, paired by example):", "",
                  "| model | task | mode | n paired | difference (pts) [95% CI] |", "|---|---|---|---|---|"]
        for a in result["against_first"]:
            lines.append(f"| {a['run']} | {a['task']} | {a['mode']} | {a['n_paired']} "
                         f"| {a['paired_gain']:+.1f} [{a['gain_ci'][0]:+.1f}, {a['gain_ci'][1]:+.1f}] |")
    return "\n".join(lines) + "\n"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval-compare",
        help="one table for several jrt eval runs: metrics per mode, read-twice gain and run-vs-run differences "
        "with paired bootstrap intervals",
        description="Compare jrt eval output folders on the examples they share: contains, exact match and token "
        "F1 per mode, the read-twice gain with a paired bootstrap 95%% interval, and each run against the first.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="jrt eval output folders (the first is the baseline)")
    p.add_argument("--names", default=None, help="comma-separated names for the runs (default: folder names)")
    p.add_argument("--json", default=None, metavar="F", help="also write the comparison as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jrt.cli import CLIError

    names = [n.strip() for n in args.names.split(",")] if args.names else [Path(r).name for r in args.runs]
    if len(names) != len(args.runs):
        raise CLIError(f"--names gives {len(names)} names for {len(args.runs)} runs")
    if len(set(names)) != len(names):
        raise CLIError(f"run names must differ, got {', '.join(names)}")
    result = compare({name: load_run(folder) for name, folder in zip(names, args.runs)})
    print(format_compare(result), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0
