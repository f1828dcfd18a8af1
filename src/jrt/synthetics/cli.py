"""``jrt reproduce``: train the synthetic-recall grid and write tables, plots and a summary."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from jrt.synthetics.grids import reproduce_grid
from jrt.synthetics.report import checks_sections, mqar_table, sd_table, write_report
from jrt.synthetics.train import load_results, resolve_device, run_grid


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "reproduce",
        help="train the synthetic recall lab (MQAR, set disjointness on the authors' protocol) and report",
        description=(
            "Train small Based / JRT-Prompt / non-causal Based / JRT-RNN models on MQAR and set disjointness and "
            "report accuracy against recurrent state size, with a verdict on each of the paper's expected "
            "outcomes. --quick (default) fits in 10 minutes on 2 CPU cores (MQAR, plus an SD smoke test); --medium "
            "tests the paper's set-disjointness claims in about an hour on 2 CPU cores; --full "
            "is the authors' grid (GPU days: --device cuda or --ray ADDRESS). Results are appended to "
            "DIR/results.jsonl as each run ends: rerunning the same command resumes."
        ),
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="grid", action="store_const", const="quick", help="small grid (default)")
    size.add_argument("--medium", dest="grid", action="store_const", const="medium",
                      help="set disjointness at CPU scale: the order effect and its remedies (an hour, 2 cores)")
    size.add_argument("--full", dest="grid", action="store_const", const="full", help="the authors' grid")
    p.set_defaults(grid="quick")
    p.add_argument("--out", default="runs/reproduce", help="output folder (default: ./runs/reproduce)")
    p.add_argument("--workers", type=int, default=2, help="local worker processes (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default cores / workers)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run the grid on a Ray cluster at ADDRESS ('local' starts one); needs the ray extra")
    p.add_argument("--only", choices=("sd", "mqar"), default=None, help="run one experiment only")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="train every run of the grid for N steps instead (its own results: new run ids)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from DIR/results.jsonl")
    p.add_argument("--estimate", action="store_true",
                   help="train nothing: time a few training steps of every distinct model of the grid on --device "
                        "and write the grid's device hours to DIR/estimate.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    resolve_device(args.device)
    out = Path(args.out)
    results_path = out / "results.jsonl"
    grid = reproduce_grid(args.grid)
    if args.only is not None:
        grid = [cfg for cfg in grid if cfg.experiment == args.only]
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
        grid = [
            replace(cfg, train=replace(cfg.train, max_steps=args.max_steps,
                                       warmup_steps=min(cfg.train.warmup_steps, args.max_steps),
                                       eval_every=min(cfg.train.eval_every, args.max_steps)))
            for cfg in grid
        ]
    if args.estimate:
        return _estimate(grid, args.device, out)
    wanted = {cfg.run_id() for cfg in grid}
    t0 = time.perf_counter()
    if args.report_only:
        results = [r for r in load_results(results_path) if r.get("run_id") in wanted]
        if not results:
            raise ValueError(f"no results of the {args.grid} grid in {results_path}")
        wall = _previous_wall(out / "summary.json")
    else:
        print(f"jrt reproduce --{args.grid}: {len(grid)} runs, results in {results_path}")
        results = run_grid(
            grid, results_path, workers=args.workers, device=args.device, threads=args.threads,
            ray_address=args.ray, progress=not args.no_progress,
        )
        wall = time.perf_counter() - t0
    summary = write_report(results, out, grid_name=args.grid, wall_seconds=wall, command=_command(args))
    if summary["mqar"]:
        print("\nMQAR (accuracy %)\n" + mqar_table(summary["mqar"]))
    if summary["sd"]:
        print("\nSet disjointness (accuracy %)\n" + sd_table(summary["sd"]))
    if summary["checks"]:
        print("\nExpected outcomes, as measured\n" + "\n\n".join(checks_sections(summary["checks"])))
    suffix = f" in {wall / 60:.1f} min" if wall is not None else ""
    print(f"\n{len(results)} runs{suffix}; report: {out / 'report.md'}, summary: {out / 'summary.json'}")
    return 0


def _estimate(grid: list, device: str, out: Path) -> int:
    from jrt.synthetics.cost import estimate_grid

    print(f"jrt reproduce --estimate: timing the {len(grid)}-run grid's distinct models on {device}")
    est = estimate_grid(grid, device=device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "estimate.json").write_text(json.dumps(est, indent=2) + "\n")
    print("| experiment | model | d_model | f | runs | steps per run | s per step | hours |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for s in est["shapes"]:
        print(f"| {s['experiment']} | {s['model']} | {s['d_model']} | {s['feature_dim']} | {s['runs']} | "
              f"{s['max_steps']:,} | {s['seconds_per_step']:.4f} | {s['hours']:.1f} |")
    print(f"\n{est['runs']} runs: {est['hours']:.1f} {device} hours (measured steps, serial); {out / 'estimate.json'}")
    return 0


def _command(args: argparse.Namespace) -> str:
    parts = ["jrt reproduce", f"--{args.grid}"]
    if args.only:
        parts.append(f"--only {args.only}")
    if args.max_steps is not None:
        parts.append(f"--max-steps {args.max_steps}")
    return " ".join(parts)


def _previous_wall(path: Path) -> float | None:
    """The wall time recorded by the run that wrote ``summary.json`` (kept when only the report is rebuilt)."""
    try:
        value = json.loads(path.read_text()).get("wall_seconds")
    except (OSError, ValueError):
        return None
    return float(value) if isinstance(value, (int, float)) else None
