"""Tables, plots, ``summary.json`` and ``report.md`` from the lab's results.

Results (one JSON object per run, see :func:`jrt.synthetics.train.train_run`) are averaged over seeds for
each ``(experiment, model, order, state_bytes)``. The checks compare the measurements with the paper's
claims; they report what was measured, whatever it is.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SD_ORDER_COLUMNS = ("short_first", "long_first", "twice")

#: Thresholds of the issue's expected outcome (points of accuracy).
SD_GAP_MIN = 15.0
SD_FIXED_GAP_MAX = 5.0


def aggregate(results: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """``{"sd": [...], "mqar": [...]}``: mean accuracy over seeds per model / order / state size, sorted."""
    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[(r["experiment"], r["model"], r["order"], int(r["state_bytes"]))].append(r)
    out: dict[str, list[dict[str, Any]]] = {"sd": [], "mqar": []}
    for (exp, model, order, state), runs in sorted(groups.items()):
        m = runs[0]["config"]["model"]
        row = {
            "model": model,
            "order": order,
            "state_bytes": state,
            "accuracy": round(sum(r["accuracy"] for r in runs) / len(runs), 4),
            "seeds": len(runs),
            "d_model": m["d_model"],
            "feature_dim": m["feature_dim"] if m["arch"] in ("based", "jrt_rnn") else None,
            "d_state": m["d_state"] if m["arch"] == "mamba" else None,
            "steps": round(sum(r["steps"] for r in runs) / len(runs)),
            "seconds": round(sum(r["seconds"] for r in runs), 1),
        }
        out.setdefault(exp, []).append(row)
    return out


def _acc(rows: Sequence[dict[str, Any]], model: str, order: str, state: int) -> float | None:
    for r in rows:
        if r["model"] == model and r["order"] == order and r["state_bytes"] == state:
            return 100.0 * r["accuracy"]
    return None


def checks(summary: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The issue's expected outcomes, each with the measured numbers and whether it held."""
    out: list[dict[str, Any]] = []
    sd = summary.get("sd", [])
    based_states = sorted({r["state_bytes"] for r in sd if r["model"] == "based"})
    if based_states:
        s = based_states[0]
        short, long, twice = (_acc(sd, "based", o, s) for o in SD_ORDER_COLUMNS)
        if short is not None and long is not None:
            gap = short - long
            out.append({"claim": f"SD, smallest Based state ({s} B): short-first - long-first >= {SD_GAP_MIN:g} "
                                 "points", "measured": round(gap, 1), "holds": gap >= SD_GAP_MIN})
        if short is not None and twice is not None:
            gap = abs(short - twice)
            out.append({"claim": f"SD, Based read twice ({s} B): abs(short-first - twice) <= {SD_FIXED_GAP_MAX:g}",
                        "measured": round(gap, 1), "holds": gap <= SD_FIXED_GAP_MAX})
    rnn_states = sorted({r["state_bytes"] for r in sd if r["model"] == "jrt_rnn"})
    if rnn_states:
        s = rnn_states[0]
        short, long = _acc(sd, "jrt_rnn", "short_first", s), _acc(sd, "jrt_rnn", "long_first", s)
        if short is not None and long is not None:
            gap = abs(short - long)
            out.append({"claim": f"SD, JRT-RNN ({s} B): abs(short-first - long-first) <= {SD_FIXED_GAP_MAX:g}",
                        "measured": round(gap, 1), "holds": gap <= SD_FIXED_GAP_MAX})
    mqar = summary.get("mqar", [])
    for s in sorted({r["state_bytes"] for r in mqar if r["model"] == "jrt_rnn"}):
        rnn, based = _acc(mqar, "jrt_rnn", "once", s), _acc(mqar, "based", "once", s)
        if rnn is not None and based is not None:
            out.append({"claim": f"MQAR ({s} B): JRT-RNN >= Based", "measured": round(rnn - based, 1),
                        "holds": rnn >= based})
    return out


def sd_table(summary: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: one row per SD model and state size, accuracy (%) per order, and the order gap."""
    rows = summary.get("sd", [])
    keys = sorted({(r["model"], r["state_bytes"]) for r in rows}, key=lambda k: (k[0], k[1]))
    lines = ["| model | state (bytes) | short first | long first | long first, read twice | short - long |",
             "|---|---:|---:|---:|---:|---:|"]
    for model, state in keys:
        vals = [_acc(rows, model, o, state) for o in SD_ORDER_COLUMNS]
        cells = ["-" if v is None else f"{v:.1f}" for v in vals]
        gap = "-" if vals[0] is None or vals[1] is None else f"{vals[0] - vals[1]:+.1f}"
        lines.append(f"| {model} | {state:,} | {' | '.join(cells)} | {gap} |")
    return "\n".join(lines)


def mqar_table(summary: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: MQAR accuracy (%) per model and state size."""
    rows = sorted(summary.get("mqar", []), key=lambda r: (r["model"], r["state_bytes"]))
    lines = ["| model | input | state (bytes) | d_model | f | accuracy |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        f = "-" if r["feature_dim"] is None else str(r["feature_dim"])
        lines.append(f"| {r['model']} | {r['order']} | {r['state_bytes']:,} | {r['d_model']} | {f} | "
                     f"{100 * r['accuracy']:.1f} |")
    return "\n".join(lines)


def checks_table(found: Sequence[dict[str, Any]]) -> str:
    lines = ["| expected (from the paper) | measured | holds |", "|---|---:|---|"]
    for c in found:
        claim = c["claim"].replace("|", "\\|")
        lines.append(f"| {claim} | {c['measured']:+.1f} | {'yes' if c['holds'] else 'no'} |")
    return "\n".join(lines)


def plot_accuracy(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str) -> Path:
    """Accuracy against state size (log x), one line per model and order; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        label = r["model"] if r["order"] == "once" else f"{r['model']} ({r['order'].replace('_', ' ')})"
        lines[label].append((r["state_bytes"], 100.0 * r["accuracy"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for label, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("recurrent state (bytes per sequence)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(
    results: Sequence[dict[str, Any]],
    out_dir: str | os.PathLike,
    *,
    grid_name: str = "quick",
    wall_seconds: float | None = None,
) -> dict[str, Any]:
    """Write ``summary.json``, ``report.md``, ``sd_order.png`` and ``mqar.png`` into ``out_dir``.

    Returns:
        The summary dict (also written to ``summary.json``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = aggregate(results)
    found = checks(summary)
    summary["checks"] = found
    summary["grid"] = grid_name
    summary["runs"] = len(results)
    if wall_seconds is not None:
        summary["wall_seconds"] = round(wall_seconds, 1)
    cpu = [r["cpu_seconds"] for r in results if "cpu_seconds" in r]
    if cpu:
        # CPU time is what the runs cost on idle cores: a load-independent estimate of the wall time
        summary["cpu_seconds_total"] = round(sum(cpu), 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    parts = [f"# Synthetic recall: `jrt reproduce --{grid_name}`", ""]
    if wall_seconds is not None:
        parts += [f"{len(results)} runs, wall time {wall_seconds / 60:.1f} min.", ""]
    if cpu:
        parts += [f"CPU time summed over the runs: {sum(cpu) / 60:.1f} min (about "
                  f"{sum(cpu) / 120:.1f} min of wall time on an idle 2-core machine with 2 workers).", ""]
    if summary["sd"]:
        plot_accuracy(summary["sd"], out / "sd_order.png", "Set disjointness: order and the JRT fixes")
        parts += ["## Set disjointness (accuracy %)", "", sd_table(summary), "", "![SD](sd_order.png)", ""]
    if summary["mqar"]:
        plot_accuracy(summary["mqar"], out / "mqar.png", "MQAR: accuracy against state size")
        parts += ["## MQAR (accuracy %)", "", mqar_table(summary), "", "![MQAR](mqar.png)", ""]
    if found:
        parts += ["## The paper's effects, as measured", "", checks_table(found), ""]
    (out / "report.md").write_text("\n".join(parts))
    return summary
