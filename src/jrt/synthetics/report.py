"""Tables, plots, ``summary.json`` and ``report.md`` from the lab's results.

Every number in the report comes from the results (one JSON object per run, see
:func:`jrt.synthetics.train.train_run`), including the verdict on each of the paper's expected outcomes, which
carries its numbers and a 95% interval over the test examples (Wilson for an accuracy, Newcombe's hybrid
score interval for a difference of two accuracies).

SD panels (as in the paper's figure): per run, ``short_first`` / ``long_first`` = the mean accuracy over the
test pairs in that order, ``difference`` = short-first minus long-first. Runs are selected over learning rates
(and seeds) in two ways per (model, state size):

- ``best``: the authors' way: each panel separately takes the best run, so the three panels may show three
  different runs;
- ``fixed``: one learning rate per point, the one with the best mean of both orders (averaged over seeds); all
  three panels show that learning rate's runs, averaged over seeds.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from jrt.stats import newcombe, wilson

#: A "no order gap" claim holds when the 95% interval of the gap lies within +-this many points, or when the
#: gap is at most ``1 / REMEDY_FACTOR`` of causal Based's gap at the same state (which must itself hold).
NO_GAP_MARGIN = 3.0
REMEDY_FACTOR = 3.0
#: An order counts as learned when the lower end of its accuracy's 95% interval is at least this many points
#: above the memory-less floor (a model that has no memory of the first set guesses among the tokens of the
#: second: ``1/|B|``, averaged over the test pairs of that order).
LEARNED_MARGIN = 10.0
SD_PANELS = ("short_first", "long_first", "difference")


# ------------------------------------------------------------------------------------------------
# aggregation
# ------------------------------------------------------------------------------------------------


def _size(r: dict[str, Any]) -> tuple[int, int]:
    m = r["config"]["model"]
    return int(m["d_model"]), int(m["feature_dim"])


def _order_acc(r: dict[str, Any], order: str) -> float:
    """Mean accuracy over the run's test groups of one order (the authors' panel value of one run)."""
    accs = [g["accuracy"] for g in r["groups"] if g["order"] == order]
    return sum(accs) / len(accs) if accs else float("nan")


def _panel(r: dict[str, Any], panel: str) -> float:
    if panel == "difference":
        return _order_acc(r, "short_first") - _order_acc(r, "long_first")
    return _order_acc(r, panel)


def _points(results: Iterable[dict[str, Any]], experiment: str) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Runs grouped by (model, state bytes)."""
    out: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        if r.get("experiment") == experiment and "groups" in r:
            out[(r["model"], int(r["state_bytes"]))].append(r)
    return out


def _fixed_runs(runs: Sequence[dict[str, Any]], score) -> list[dict[str, Any]]:
    """The runs (all seeds) of the learning rate with the best seed-mean ``score``."""
    by_lr: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        by_lr[float(r["lr"])].append(r)
    best = max(by_lr, key=lambda lr: (sum(score(r) for r in by_lr[lr]) / len(by_lr[lr]), -lr))
    return by_lr[best]


def _floor(r: dict[str, Any], order: str) -> float:
    """The memory-less floor of one order: ``1/|B|`` (B = the set read second), averaged over its test pairs."""
    sizes = [g["pair"][1] if order == "short_first" else g["pair"][0] for g in r["groups"] if g["order"] == order]
    return sum(1 / b for b in sizes) / len(sizes) if sizes else float("nan")


def _pool(runs: Sequence[dict[str, Any]], order: str | None = None, seen: bool | None = None) -> tuple[int, int]:
    hits = n = 0
    for r in runs:
        for g in r["groups"]:
            if (order is None or g["order"] == order) and (seen is None or g["seen"] == seen):
                hits, n = hits + g["hits"], n + g["n"]
    return hits, n


def sd_points(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per SD (model, state size): both selections of the three panels, the fixed selection's pooled
    counts per order (all test pairs, and the pairs unseen in training), and its per-pair accuracies."""
    rows = []
    for (model, state), runs in sorted(_points(results, "sd").items()):
        fixed = _fixed_runs(runs, lambda r: _panel(r, "short_first") + _panel(r, "long_first"))
        d, f = _size(fixed[0])
        row: dict[str, Any] = {"model": model, "state_bytes": state, "d_model": d, "feature_dim": f,
                               "style": fixed[0].get("style", "library"), "lr": fixed[0]["lr"],
                               "seeds": len(fixed), "runs": len(runs)}
        for panel in SD_PANELS:
            row[f"best_{panel}"] = round(100 * max(_panel(r, panel) for r in runs), 2)
            row[f"fixed_{panel}"] = round(100 * sum(_panel(r, panel) for r in fixed) / len(fixed), 2)
        for order in ("short_first", "long_first"):
            row[f"{order}_hits"], row[f"{order}_n"] = _pool(fixed, order)
            row[f"{order}_unseen_hits"], row[f"{order}_unseen_n"] = _pool(fixed, order, seen=False)
            row[f"{order}_floor"] = round(100 * _floor(fixed[0], order), 2)
            short_key = "in_first" if order == "short_first" else "in_second"
            in_short = [g[short_key] for r in fixed for g in r["groups"] if g["order"] == order and short_key in g]
            row[f"{order}_in_short"] = (round(100 * sum(in_short) / max(1, row[f"{order}_n"]), 2)
                                        if in_short else None)
        row["seed_gaps"] = [round(100 * _panel(r, "difference"), 2) for r in sorted(fixed, key=lambda r: r["seed"])]
        per_pair: dict[str, list[float]] = defaultdict(list)
        for r in fixed:
            for g in r["groups"]:
                per_pair[f"{g['pair'][0]}/{g['pair'][1]} {g['order']}"].append(g["accuracy"])
        row["per_pair"] = {k: round(100 * sum(v) / len(v), 1) for k, v in per_pair.items()}
        rows.append(row)
    return rows


def mqar_points(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per MQAR (model, state size): the best learning rate's runs pooled over seeds."""
    rows = []
    for (model, state), runs in sorted(_points(results, "mqar").items()):
        fixed = _fixed_runs(runs, lambda r: r["accuracy"])
        hits, n = _pool(fixed)
        d, f = _size(fixed[0])
        rows.append({"model": model, "order": fixed[0]["order"], "state_bytes": state, "d_model": d,
                     "feature_dim": f if fixed[0]["config"]["model"]["arch"] != "attention" else None,
                     "hits": hits, "n": n, "accuracy": round(100 * hits / max(1, n), 2), "seeds": len(fixed),
                     "steps": round(sum(r["steps"] for r in fixed) / len(fixed))})
    return rows


# ------------------------------------------------------------------------------------------------
# the paper's expected outcomes
# ------------------------------------------------------------------------------------------------


def _verdict_better(lo: float, hi: float) -> str:
    return "held" if lo > 0 else ("reversed" if hi < 0 else "not shown")


def _fmt_ci(lo: float, hi: float) -> str:
    return f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"


def checks(mqar: Sequence[dict[str, Any]], sd: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The expected outcomes, each with its numbers, a 95% interval and a verdict (``held``, ``not shown``,
    ``reversed`` or ``inconclusive``), all computed from the rows. ``source`` says whose claim it is: ``paper``
    (set disjointness: the order effect and its two remedies, at every model size of the run) or ``extension``
    (MQAR with read-twice input and JRT-RNN: this project's own question, not a claim of the paper)."""
    return _mqar_checks(mqar) + _sd_checks(sd)


def _mqar_checks(mqar: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    by = {(r["model"], r["state_bytes"]): r for r in mqar}
    for state in sorted({r["state_bytes"] for r in mqar if r["model"] == "based"}):
        base = by[("based", state)]
        for other, label in (("based_twice", "Based read twice (JRT-Prompt)"), ("jrt_rnn", "JRT-RNN")):
            if (other, state) not in by:
                continue
            o = by[(other, state)]
            lo, hi = newcombe(o["hits"], o["n"], base["hits"], base["n"])
            out.append({
                "experiment": "mqar", "source": "extension",
                "claim": f"MQAR, {state:,} B state: {label} is more accurate than causal Based",
                "measured": f"{o['accuracy']:.1f} vs {base['accuracy']:.1f} % (difference "
                            f"{o['accuracy'] - base['accuracy']:+.1f}, 95% CI {_fmt_ci(lo, hi)} points; "
                            f"{o['n']:,} and {base['n']:,} queries)",
                "difference": round(o["accuracy"] - base["accuracy"], 2),
                "ci": [round(100 * lo, 2), round(100 * hi, 2)],
                "verdict": _verdict_better(lo, hi),
            })
    return out


#: The paper's set-disjointness claims: (model, claim, kind).
SD_CLAIMS = (("based", "causal Based is more accurate with the short set first", "gap"),
             ("based_twice", "Based reading the input twice shows no order gap", "no_gap"),
             ("based_noncausal", "non-causal Based shows no order gap", "no_gap"),
             ("jrt_rnn", "JRT-RNN shows no order gap", "no_gap"))


def _learned(hits: int, n: int, floor_pct: float) -> bool:
    return 100 * wilson(hits, n)[0] >= floor_pct + LEARNED_MARGIN


def _sd_check(r: dict[str, Any], text: str, kind: str, base_gap: dict[str, Any] | None) -> dict[str, Any]:
    hs, ns, hl, nl = r["short_first_hits"], r["short_first_n"], r["long_first_hits"], r["long_first_n"]
    lo, hi = newcombe(hs, ns, hl, nl)
    short, long = 100 * hs / max(1, ns), 100 * hl / max(1, nl)
    gap = short - long
    learned_short = _learned(hs, ns, r["short_first_floor"])
    learned_long = _learned(hl, nl, r["long_first_floor"])
    if kind == "gap":
        verdict = _verdict_better(lo, hi) if learned_short else "inconclusive"
    elif not (learned_short and learned_long):
        verdict = "inconclusive"
    else:
        within = -NO_GAP_MARGIN < 100 * lo and 100 * hi < NO_GAP_MARGIN
        smaller = (base_gap is not None and base_gap["verdict"] == "held"
                   and abs(gap) * REMEDY_FACTOR <= base_gap["difference"])
        verdict = "held" if within or smaller else "not shown"
    seeds = r.get("seed_gaps") or []
    per_seed = f"; per seed {', '.join(f'{g:+.1f}' for g in seeds)}" if len(seeds) > 1 else ""
    return {
        "experiment": "sd", "source": "paper", "model": r["model"], "state_bytes": r["state_bytes"],
        "claim": f"SD, d = {r['d_model']}, f = {r['feature_dim']} ({r['state_bytes']:,} B state): {text}",
        "measured": f"short first {short:.1f} %, long first {long:.1f} % (floors {r['short_first_floor']:.1f} / "
                    f"{r['long_first_floor']:.1f}); gap {gap:+.1f}, 95% CI {_fmt_ci(lo, hi)} points{per_seed}; "
                    f"{ns:,} + {nl:,} test sequences",
        "difference": round(gap, 2), "ci": [round(100 * lo, 2), round(100 * hi, 2)],
        "learned": {"short_first": learned_short, "long_first": learned_long}, "verdict": verdict,
    }


def _sizes_by_state(rows: Iterable[dict[str, Any]]) -> list[tuple[int, int]]:
    """The model sizes ``(d_model, feature_dim)`` of SD rows, smallest state first."""
    smallest: dict[tuple[int, int], int] = {}
    for r in rows:
        size = (int(r["d_model"]), int(r["feature_dim"]))
        smallest[size] = min(smallest.get(size, r["state_bytes"]), r["state_bytes"])
    return sorted(smallest, key=lambda size: (smallest[size], size))


def _sd_checks(sd: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The SD claims per model size (d_model, f): the models of one size share their linear-attention state
    (their convolutions may differ by a few hundred bytes), and each remedy is judged against causal Based's
    gap at the same size."""
    out: list[dict[str, Any]] = []
    by = {(r["model"], r["d_model"], r["feature_dim"]): r for r in sd}
    for size in _sizes_by_state(sd):
        base_gap = None
        for model, text, kind in SD_CLAIMS:
            if (model, *size) in by:
                found = _sd_check(by[(model, *size)], text, kind, base_gap)
                base_gap = found if model == "based" else base_gap
                out.append(found)
    return out


VERDICT_RULES = (
    f"A claim that one number exceeds another *held* when the 95% interval of the difference is above 0, is "
    f"*reversed* when it is below 0 and *not shown* otherwise. A \"no order gap\" claim held when the interval "
    f"of the gap lies within +-{NO_GAP_MARGIN:g} points, or when the gap is at most 1/{REMEDY_FACTOR:g} of causal "
    "Based's (held) gap at the same state. A model without a memory of the first set can still guess among the "
    "tokens of the second, which scores 1/|B| (the *floor*) and so favours the long set first whatever the "
    "architecture: an SD claim is *inconclusive* unless the lower end of the accuracy's interval is at least "
    f"{LEARNED_MARGIN:g} points above the floor, in the short-first order for causal Based's gap and in both "
    "orders for a no-gap claim. Intervals are over the test examples of the selected runs, pooled over seeds "
    "(Wilson / Newcombe; the per-seed gaps show the spread between seeds), MQAR queries counted one by one."
)


EXTENSION_NOTE = (
    "The MQAR rows are this project's own question, not a claim of the paper: the paper's order argument is "
    "about set disjointness, and the authors' released synthetics have no MQAR experiment with read-twice input "
    "or prefix linear attention. A second read of an MQAR key-value block tells a causal model nothing new about "
    "which keys will be asked for, since the queries come after both copies."
)


# ------------------------------------------------------------------------------------------------
# tables and plots
# ------------------------------------------------------------------------------------------------


def mqar_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| model | input | state (bytes) | d_model | f | accuracy % | 95% CI | steps |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in sorted(rows, key=lambda r: (r["state_bytes"], r["model"])):
        lo, hi = wilson(r["hits"], r["n"])
        f = "-" if r["feature_dim"] is None else str(r["feature_dim"])
        lines.append(f"| {r['model']} | {r['order']} | {r['state_bytes']:,} | {r['d_model']} | {f} | "
                     f"{r['accuracy']:.1f} | {100 * lo:.1f}-{100 * hi:.1f} | {r['steps']} |")
    return "\n".join(lines)


def sd_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per model and state: both selections of the three panels (accuracy %, mean over test pairs)."""
    lines = ["| model | state (bytes) | d, f | lr (fixed) | short first | long first | difference | "
             "best: short | best: long | best: difference | unseen pairs: short / long | floors | "
             "answers in the short set |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["state_bytes"])):
        unseen = "-"
        if r["short_first_unseen_n"]:
            unseen = (f"{100 * r['short_first_unseen_hits'] / r['short_first_unseen_n']:.1f} / "
                      f"{100 * r['long_first_unseen_hits'] / max(1, r['long_first_unseen_n']):.1f}")
        lines.append(
            f"| {r['model']} | {r['state_bytes']:,} | {r['d_model']}, {r['feature_dim']} | {r['lr']:g} | "
            f"{r['fixed_short_first']:.1f} | {r['fixed_long_first']:.1f} | {r['fixed_difference']:+.1f} | "
            f"{r['best_short_first']:.1f} | {r['best_long_first']:.1f} | {r['best_difference']:+.1f} | {unseen} | "
            f"{r.get('short_first_floor', float('nan')):.1f} / {r.get('long_first_floor', float('nan')):.1f} | "
            f"{_pct(r.get('short_first_in_short'))} / {_pct(r.get('long_first_in_short'))} |"
        )
    return "\n".join(lines)


SD_TABLE_NOTE = (
    "Accuracy %, mean over the test pairs of each order; \"best\" columns: the authors' selection (best run per "
    "panel over learning rates and seeds), the others: one fixed learning rate per point (best mean of both "
    "orders), averaged over seeds. *Floors*: 1/|B| per order (no memory of the first set: a guess among the "
    "second). *Answers in the short set*: the share of answers (right or wrong) that are tokens of the shorter "
    "set; a model that remembers only the short set and guesses in it scores about 1/|short| in both orders."
)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def sd_pair_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per model (smallest state of each): accuracy % per test pair and order (fixed selection)."""
    keys = sorted({k for r in rows for k in r["per_pair"]}, key=lambda k: (
        int(k.split("/")[1].split()[0]), int(k.split("/")[0]), k.split()[1]))
    lines = ["| model | state (bytes) | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for r in sorted(rows, key=lambda r: (r["model"], r["state_bytes"])):
        cells = [f"{r['per_pair'][k]:.1f}" if k in r["per_pair"] else "-" for k in keys]
        lines.append(f"| {r['model']} | {r['state_bytes']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks_table(found: Sequence[dict[str, Any]], header: str = "expected (from the paper)") -> str:
    lines = [f"| {header} | measured | verdict |", "|---|---|---|"]
    for c in found:
        lines.append(f"| {c['claim']} | {c['measured']} | **{c['verdict']}** |")
    return "\n".join(lines)


EXTENSION_HEADER = "this project's extension (not a claim of the paper)"


def untested_note(found: Sequence[dict[str, Any]]) -> str | None:
    """One sentence for the paper's SD claims when a run can test none of them (every one inconclusive: no
    model clear of the memory-less floor), else None."""
    sd = [c for c in found if c["experiment"] == "sd"]
    if not sd or any(c["verdict"] != "inconclusive" for c in sd):
        return None
    return (f"The paper's set-disjointness claims ({len(sd)} checks) are not tested by this run: no model is "
            f"{LEARNED_MARGIN:g} points clear of the memory-less floor (1/|B|) in the orders each claim needs, so "
            "the floor, which favours the long set first for every architecture, decides the gaps. `jrt reproduce "
            "--medium` (about an hour on 2 CPU cores) tests them; `--full` is the authors' grid.")


def checks_sections(found: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown blocks: the paper's claims (collapsed to one sentence when none is testable), then the
    project's own extensions."""
    paper = [c for c in found if c.get("source", "paper") == "paper"]
    extension = [c for c in found if c.get("source") == "extension"]
    note = untested_note(paper)
    parts = []
    if paper:
        parts += [note] if note else [checks_table(paper)]
    if extension:
        parts.append(checks_table(extension, EXTENSION_HEADER))
    return parts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_mqar(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """MQAR accuracy against state size (log x), one line per model; PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        lines[r["model"]].append((r["state_bytes"], r["accuracy"]))
    for label, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set(xscale="log", xlabel="recurrent state (bytes per sequence)", ylabel="accuracy (%)", ylim=(-2, 102),
           title="MQAR: accuracy against state size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, plt, path)


def plot_sd_panels(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """The paper's SD figure: short-first, long-first and their difference against state size (log x), one
    line per model; top row the authors' selection (best run per panel), bottom row one fixed learning rate
    per point. PNG."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), dpi=100, sharex=True)
    titles = {"short_first": "short A, long B", "long_first": "long A, short B",
              "difference": "difference (short - long)"}
    for i, sel in enumerate(("best", "fixed")):
        for j, panel in enumerate(SD_PANELS):
            ax = axes[i][j]
            lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
            for r in rows:
                lines[r["model"]].append((r["state_bytes"], r[f"{sel}_{panel}"]))
            for label, pts in sorted(lines.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax.set_xscale("log")
            ax.set_title(f"{titles[panel]} ({'best run per panel' if sel == 'best' else 'fixed lr per point'})",
                         fontsize=9)
            ax.grid(True, alpha=0.3)
            if panel == "difference":
                ax.axhline(0, color="k", lw=0.8)
            else:
                ax.set_ylim(-2, 102)
            if i == 1:
                ax.set_xlabel("recurrent state (bytes per sequence)")
            if j == 0:
                ax.set_ylabel("accuracy (%)")
    axes[0][0].legend(fontsize=7)
    return _save(fig, plt, path)


def sd_curves(results: Iterable[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Learning curves of the SD runs that recorded them (``history[*].valid_orders``): per model size and model,
    the fixed selection's learning rate, accuracy % per order at each evaluated step, averaged over seeds.

    Returns ``{"d=D, f=F": {model: {"state_bytes", "steps": [...], "short_first": [...], "long_first": [...]}}}``,
    sizes in order of state.
    """
    lrs = {(r["model"], r["state_bytes"]): r["lr"] for r in rows}
    acc: dict[tuple[int, int, str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    states: dict[tuple[int, int, str], int] = {}
    for r in results:
        key = (r.get("model"), int(r.get("state_bytes", -1)))
        if r.get("experiment") != "sd" or lrs.get(key) != r.get("lr"):
            continue
        (d, f), model = _size(r), key[0]
        states[(d, f, model)] = key[1]
        for h in r.get("history", []):
            for order, a in (h.get("valid_orders") or {}).items():
                acc[(d, f, model, h["step"])][order].append(100 * a)
    rank = {size: i for i, size in enumerate(_sizes_by_state(rows))}
    out: dict[str, dict[str, Any]] = {}
    for d, f, model, step in sorted(acc, key=lambda k: (rank.get(k[:2], len(rank)), k)):
        curve = out.setdefault(f"d={d}, f={f}", {}).setdefault(
            model, {"state_bytes": states[(d, f, model)], "steps": [], "short_first": [], "long_first": []})
        curve["steps"].append(step)
        for order in ("short_first", "long_first"):
            vals = acc[(d, f, model, step)].get(order, [])
            curve[order].append(round(sum(vals) / len(vals), 2) if vals else float("nan"))
    return out


def plot_sd_curves(curves: dict[str, dict[str, Any]], path: str | os.PathLike) -> Path:
    """SD learning curves: one panel per model size, accuracy per order against training steps (solid: short set
    first, dashed: long set first), one colour per model. PNG."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5.6 * len(curves), 4.4), dpi=100, squeeze=False)
    colours = {m: f"C{i}" for i, m in enumerate(sorted({m for c in curves.values() for m in c}))}
    for ax, (size, models) in zip(axes[0], curves.items()):
        for model, c in sorted(models.items()):
            label = f"{model} ({c['state_bytes']:,} B)"
            ax.plot(c["steps"], c["short_first"], color=colours[model], label=f"{label}: short first")
            ax.plot(c["steps"], c["long_first"], color=colours[model], ls="--", label=f"{label}: long first")
        ax.set(title=size, xlabel="training step", ylim=(-2, 102))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("held-out accuracy (%)")
    return _save(fig, plt, path)


def _save(fig, plt, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"mqar": rows, "sd": rows, "checks": [...]}`` from the results."""
    mqar, sd = mqar_points(results), sd_points(results)
    return {"mqar": mqar, "sd": sd, "checks": checks(mqar, sd), "sd_curves": sd_curves(results, sd)}


def write_report(
    results: Sequence[dict[str, Any]],
    out_dir: str | os.PathLike,
    *,
    grid_name: str = "quick",
    wall_seconds: float | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Write ``summary.json``, ``report.md``, ``mqar.png`` and ``sd_panels.png`` into ``out_dir``.

    Returns:
        The summary dict (also written to ``summary.json``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = summarize(results)
    summary.update(grid=grid_name, runs=len(results))
    if wall_seconds is not None:
        summary["wall_seconds"] = round(wall_seconds, 1)
    cpu = [r["cpu_seconds"] for r in results if "cpu_seconds" in r]
    if cpu:
        summary["cpu_seconds_total"] = round(sum(cpu), 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = "quick run" if grid_name == "quick" else f"{grid_name} grid"
    parts = [f"# Synthetic recall: `jrt reproduce` ({title})", ""]
    if command:
        parts += [f"Command: `{command}`.", ""]
    timing = [f"{len(results)} runs"]
    if wall_seconds is not None:
        timing.append(f"wall time {wall_seconds / 60:.1f} min")
    if cpu:
        timing.append(f"CPU time summed over the runs {sum(cpu) / 60:.1f} min")
    parts += [", ".join(timing) + ".", ""]
    if summary["checks"]:
        parts += ["## Expected outcomes, as measured by this run", ""]
        for block in checks_sections(summary["checks"]):
            parts += [block, ""]
        parts += [VERDICT_RULES, EXTENSION_NOTE, ""]
    if summary["mqar"]:
        plot_mqar(summary["mqar"], out / "mqar.png")
        parts += ["## MQAR", "", mqar_table(summary["mqar"]), "", "![MQAR](mqar.png)", ""]
    if summary["sd"]:
        plot_sd_panels(summary["sd"], out / "sd_panels.png")
        head = "## Set disjointness" + (" (smoke test)"
                                        if grid_name == "quick" else "")
        parts += [head, "", SD_TABLE_NOTE, "", sd_table(summary["sd"]),
                  "", "Per test pair (short/long sizes, order), fixed selection:", "", sd_pair_table(summary["sd"]),
                  "", "![SD panels](sd_panels.png)", ""]
    if summary["sd_curves"]:
        plot_sd_curves(summary["sd_curves"], out / "sd_curves.png")
        parts += ["Learning curves (held-out accuracy per order, fixed selection, mean over seeds):", "",
                  "![SD learning curves](sd_curves.png)", ""]
    (out / "report.md").write_text("\n".join(parts))
    return summary
