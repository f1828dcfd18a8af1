"""What a grid costs: training steps per second measured on this machine's device, per model and sequence
length, and the grid's device hours that follow from them (``jrt reproduce --estimate``).

For each distinct (model, task) of the grid, a few training steps (forward, backward, AdamW step) are timed
on every training pool after one warm-up step; a run's time is its step count times the mean step time over
its pools (the trainer draws the pools' batches uniformly). The measurement also counts, per step, the
floating-point operations (``torch.utils.flop_counter``) and the ATen operator calls (each one kernel launch
on a GPU), so that a CPU measurement can be scaled to a GPU with stated assumptions (see ``docs/reproduce.md``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from jrt.synthetics.config import RunConfig


class _OpCounter(TorchDispatchMode):
    """Counts ATen operator calls (excluding views and metadata-only ops)."""

    _free = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "detach",
             "alias", "as_strided", "slice", "select", "split", "unflatten", "reshape", "unbind", "chunk"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self._free:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Any) -> None:
    from jrt.synthetics.train import _forward, masked_loss_and_hits

    loss, _, _ = masked_loss_and_hits(_forward(model, batch), batch.labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def measure_steps(cfg: RunConfig, *, device: str = "cpu", steps: int = 2, count: bool = True) -> dict[str, Any]:
    """Time ``steps`` training steps of ``cfg``'s model on each of its training pools (batch ``cfg.train``'s).

    Returns:
        ``{"seconds_per_step": mean over pools, "pools": [{"seq_len", "seconds", "cpu_seconds", "flops",
        "ops"} per pool], "device"}``; ``seconds``/``cpu_seconds`` are per step (wall / process CPU time).
    """
    from jrt.synthetics.models import build_lab_model
    from jrt.synthetics.train import resolve_device
    from jrt.training.optim import adamw

    dev = resolve_device(device)
    torch.manual_seed(0)
    bs = cfg.train.batch_size
    pools = cfg.task.train_pools(bs, seed=0)
    model = build_lab_model(cfg.model, cfg.task.vocab_size, cfg.task.seq_len).to(dev).train()
    opt = adamw(model, cfg.train.lr, cfg.train.weight_decay, tuple(cfg.train.betas), grouped=cfg.train.grouped_decay)
    out = []
    for pool in pools:
        batch = pool.to(dev)
        flops = ops = None
        if count:  # the warm-up step counts FLOPs; a 2-row step counts operator calls (independent of the batch)
            flop_mode, counter = FlopCounterMode(display=False), _OpCounter()
            with flop_mode:
                _step(model, opt, batch)
            with counter:
                _step(model, opt, pool.slice(0, 2).to(dev))
            flops, ops = int(flop_mode.get_total_flops()), counter.count
        else:
            _step(model, opt, batch)  # warm-up (first-call setup, AdamW state)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            _step(model, opt, batch)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        out.append({"seq_len": batch.seq_len, "seconds": (time.perf_counter() - t0) / steps,
                    "cpu_seconds": (time.process_time() - c0) / steps, "flops": flops, "ops": ops})
    return {"seconds_per_step": sum(p["seconds"] for p in out) / len(out), "pools": out, "device": str(dev)}


def _shape_key(cfg: RunConfig) -> str:
    """Runs that differ only in learning rate or seed cost the same."""
    d = cfg.to_dict()
    d.pop("seed")
    d["train"] = {k: v for k, v in d["train"].items() if k in ("batch_size", "num_train")}
    return repr(sorted((k, repr(v)) for k, v in d.items()))


def estimate_grid(
    grid: Sequence[RunConfig], *, device: str = "cpu", steps: int = 2, count: bool = True
) -> dict[str, Any]:
    """Measure each distinct model/task of ``grid`` once and sum ``max_steps * seconds_per_step`` over its runs.

    Returns:
        ``{"hours": total, "runs": len(grid), "shapes": [per distinct shape: model, d_model, feature_dim, runs,
        max_steps, seconds_per_step, pools], "device"}``.
    """
    groups: dict[str, list[RunConfig]] = defaultdict(list)
    for cfg in grid:
        groups[_shape_key(cfg)].append(cfg)
    shapes, total = [], 0.0
    for runs in groups.values():
        cfg = runs[0]
        m = measure_steps(cfg, device=device, steps=steps, count=count)
        seconds = sum(c.train.max_steps for c in runs) * m["seconds_per_step"]
        total += seconds
        shapes.append({"experiment": cfg.experiment, "model": cfg.model_name, "style": cfg.model.style,
                       "d_model": cfg.model.d_model, "feature_dim": cfg.model.feature_dim, "runs": len(runs),
                       "max_steps": cfg.train.max_steps, "hours": seconds / 3600, **m})
    return {"hours": total / 3600, "runs": len(grid), "shapes": shapes, "device": str(device)}
