"""Side-by-side training throughput of several presets on the same data (``python -m jrt.training.throughput``).

Steps of the presets are interleaved (A, B, A, B, ...) after a warm-up, so that load from other processes
hits them alike; the median step time gives tokens/s. The ratio to the first preset is the number to read on
a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from jrt.ops.common import split_impl
from jrt.training.config import build_config, parse_overrides
from jrt.training.distributed import DistInfo
from jrt.training.trainer import Trainer


def measure_throughput(presets: Sequence[str], data_dir: str, steps: int = 10, warmup: int = 2,
                       overrides: dict[str, Any] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Median training tokens/s of each preset (one process, interleaved steps); one row per preset with
    ``preset``, ``parameters``, ``tokens_per_step``, ``median_step_s``, ``tokens_per_s``, ``ratio``."""
    if steps < 1 or warmup < 0:
        raise ValueError("steps must be >= 1 and warmup >= 0")
    from tqdm.auto import tqdm

    trainers = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(presets):
            preset, impl = split_impl(name)  # PRESET@IMPL: the same model on another jrt.ops implementation
            cfg = build_config(preset, None, {**(overrides or {}), "max_steps": warmup + steps})
            if impl:
                cfg.model_overrides = {**cfg.model_overrides, "ops_impl": impl}
                cfg = cfg.validate()
            trainers.append(Trainer(cfg, data_dir, f"{tmp}/{i}", DistInfo(), progress=False, tensorboard=False))
        times: list[list[float]] = [[] for _ in trainers]
        bar = tqdm(total=(warmup + steps) * len(trainers), desc="throughput", disable=not progress)
        for step in range(warmup + steps):
            for k, tr in enumerate(trainers):
                t0 = time.perf_counter()
                tr.train_step(step)
                if step >= warmup:
                    times[k].append(time.perf_counter() - t0)
                bar.update(1)
        bar.close()
        for tr in trainers:
            if tr.logger is not None:
                tr.logger.close()
    rows = []
    for name, tr, ts in zip(presets, trainers, times):
        med = statistics.median(ts)
        rows.append({"preset": name, "parameters": tr.n_params, "tokens_per_step": tr.cfg.tokens_per_step,
                     "median_step_s": med, "tokens_per_s": tr.cfg.tokens_per_step / med})
    for row in rows:
        row["ratio"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jrt.training.throughput", description=__doc__)
    parser.add_argument("--data", required=True, help="folder written by `jrt data prepare`")
    parser.add_argument("--presets", default="based-tiny,jrt-tiny",
                        help="comma-separated training presets, each optionally as PRESET@IMPL (the model on another "
                        "jrt.ops implementation, e.g. jrt-tiny,jrt-tiny@chunk)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rows = measure_throughput(args.presets.split(","), args.data, args.steps, args.warmup,
                                  parse_overrides(args.overrides))
    except (ValueError, FileNotFoundError) as err:
        print(f"throughput: error: {err}", file=sys.stderr)
        return 2
    print(f"{'preset':<14}{'params':>12}{'tokens/step':>13}{'step (s)':>10}{'tokens/s':>11}{'ratio':>8}")
    for r in rows:
        print(f"{r['preset']:<14}{r['parameters']:>12,}{r['tokens_per_step']:>13,}{r['median_step_s']:>10.3f}"
              f"{r['tokens_per_s']:>11,.0f}{r['ratio']:>8.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
