"""The search for a set-disjointness configuration that a CPU can train in an hour (``jrt reproduce --medium``).

Every configuration tried while choosing the medium grid, in the order it was tried, as
:class:`~jrt.synthetics.config.RunConfig` s of the lab (set disjointness on the authors' protocol: one model
trained on both orders of its pairs, scored per order). Each run records a learning curve (accuracy per order
on held-out sequences every ``eval_every`` steps). The script trains what is not yet in ``OUT/results.jsonl``
(resumable, like ``jrt reproduce``), then prints one table row per run and writes ``OUT/search.json`` and
``OUT/curves.png`` (one panel per run: accuracy per order against steps, with the two floors).

    python benchmarks/sd_search.py --out docs/results/sd-search               # train what is missing, report
    python benchmarks/sd_search.py --out docs/results/sd-search --report-only # report from the results file

Measured results and what they mean: docs/reproduce.md ("Set disjointness at CPU scale").
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from jrt.synthetics.config import ModelSpec, RunConfig, SDTask, TrainSpec
from jrt.synthetics.train import load_results, run_grid

SHORT_LONG = ((4, 16), (4, 64))


def search_config(arch: str, d: int, f: int, pairs: tuple[tuple[int, int], ...], steps: int, *,
                  vocab: int = 260, num_train: int = 20000, style: str = "authors", eval_every: int = 250,
                  lr: float = 3e-3) -> RunConfig:
    """One search run: the authors' optimiser (constant lr within an epoch), batch 128, curve on 300
    held-out sequences per pair and order, 500 test sequences per pair and order."""
    task = SDTask(pairs=pairs, test_pairs=pairs, vocab_size=vocab)
    train = replace(TrainSpec.authors(lr=lr, max_steps=steps, num_train=num_train, num_test=500,
                                      eval_every=eval_every), num_valid=300)
    spec = (ModelSpec.authors(arch, d, f) if style == "authors"
            else ModelSpec(arch=arch, d_model=d, feature_dim=f, num_heads=2))
    return RunConfig("sd", arch, task, spec, train, 0)


#: (round, what it asked, config), in the order tried.
SEARCH = (
    ("1", "authors' blocks, quick pairs: does f matter?",
     search_config("based", 64, 4, ((4, 16), (8, 32)), 3000)),
    ("1", "", search_config("based", 64, 2, ((4, 16), (8, 32)), 3000)),
    ("2", "a larger vocabulary (a token-count shortcut costs more)",
     search_config("based", 64, 4, SHORT_LONG, 4000, vocab=1028)),
    ("2", "", search_config("based", 64, 4, SHORT_LONG, 4000)),
    ("3", "fresh examples (rounds 1-2 memorised their 20,000 per pair), smaller d",
     search_config("based", 32, 2, SHORT_LONG, 4000, num_train=256000)),
    ("3", "", search_config("based", 32, 4, SHORT_LONG, 4000, num_train=256000)),
    ("4", "twice as long; and a non-causal model (JRT-RNN) beside it",
     search_config("based", 32, 4, SHORT_LONG, 8000, num_train=512000, eval_every=500)),
    ("4", "", search_config("jrt_rnn", 32, 4, SHORT_LONG, 8000, num_train=512000, eval_every=500)),
    ("5", "the library's blocks (BaseConv, SwiGLU MLP)",
     search_config("based", 32, 4, SHORT_LONG, 4000, num_train=256000, style="library", eval_every=500)),
    ("5", "", search_config("based", 32, 2, SHORT_LONG, 4000, num_train=256000, style="library", eval_every=500)),
    ("6", "after the medium grid: the library's blocks trained longer, causal and non-causal",
     search_config("based", 32, 4, SHORT_LONG, 8000, num_train=512000, style="library", eval_every=500)),
    ("6", "", search_config("jrt_rnn", 32, 4, SHORT_LONG, 8000, num_train=512000, style="library", eval_every=500)),
)


def _floor(pair: list[int], order: str) -> float:
    return 1 / (pair[1] if order == "short_first" else pair[0])


def summarize(results: dict[str, dict]) -> list[dict]:
    rows = []
    for rnd, question, cfg in SEARCH:
        r = results.get(cfg.run_id())
        if r is None:
            continue
        m, t = cfg.model, cfg.task
        row = {"round": rnd, "question": question, "run_id": cfg.run_id(), "arch": m.arch, "style": m.style,
               "d_model": m.d_model, "feature_dim": m.feature_dim, "state_bytes": r["state_bytes"],
               "vocab": t.vocab_size, "pairs": [list(p) for p in t.pairs], "num_train": cfg.train.num_train,
               "steps": r["steps"], "final_loss": r["history"][-1]["loss"], "cpu_seconds": r["cpu_seconds"],
               "groups": r["groups"], "history": r["history"]}
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    pairs = sorted({(g["pair"][0], g["pair"][1]) for r in rows for g in r["groups"]}, key=lambda p: (p[1], p[0]))
    head = " | ".join(f"{s}/{t} short / long" for s, t in pairs)
    lines = [f"| round | model | blocks | d, f | state (B) | vocab | examples per pair | steps | final loss | {head} |",
             "|---|---|---|---|---:|---:|---:|---:|---:|" + "---|" * len(pairs)]
    for r in rows:
        acc = {(g["pair"][0], g["pair"][1], g["order"]): 100 * g["accuracy"] for g in r["groups"]}
        cells = [f"{acc[(s, t, 'short_first')]:.1f} / {acc[(s, t, 'long_first')]:.1f}"
                 if (s, t, "short_first") in acc else "-" for s, t in pairs]
        lines.append(f"| {r['round']} | {r['arch']} | {r['style']} | {r['d_model']}, {r['feature_dim']} | "
                     f"{r['state_bytes']:,} | {r['vocab']} | {r['num_train']:,} | {r['steps']:,} | "
                     f"{r['final_loss']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 5
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.1 * nrows), dpi=100, squeeze=False, sharey=True)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows):
        steps = [h["step"] for h in r["history"]]
        for order, style in (("short_first", "-"), ("long_first", "--")):
            ax.plot(steps, [100 * h["valid_orders"][order] for h in r["history"]], ls=style, color="C0",
                    label=order.replace("_", " "))
            floors = [_floor(g["pair"], order) for g in r["groups"] if g["order"] == order]
            ax.axhline(100 * sum(floors) / len(floors), ls=style, color="0.6", lw=0.8)
        ax.set_title(f"{r['round']}: {r['arch']} ({r['style']}) d={r['d_model']} f={r['feature_dim']}\n"
                     f"V={r['vocab']}, {r['num_train']:,}/pair", fontsize=8)
        ax.set_ylim(0, 100)
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("step", fontsize=8)
    axes[0][0].set_ylabel("held-out accuracy (%)")
    axes[0][0].legend(fontsize=7, title="grey: floors 1/|B|", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/sd-search", help="output folder (results.jsonl, search.json, curves.png)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (1 torch thread each)")
    p.add_argument("--report-only", action="store_true", help="train nothing: report what the results file holds")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    if not args.report_only:
        run_grid([cfg for _, _, cfg in SEARCH], path, workers=args.workers, threads=1)
    rows = summarize({r["run_id"]: r for r in load_results(path)})
    if not rows:
        raise SystemExit(f"no search results in {path}")
    print(table(rows))
    (out / "search.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, out / "curves.png")
    print(f"\n{len(rows)} runs; {out / 'search.json'}, {out / 'curves.png'}")


if __name__ == "__main__":
    main()
