"""The one optimiser and learning-rate schedule of the project, used by the pretraining trainer
(:mod:`jrt.training.trainer`) and the synthetic lab (:mod:`jrt.synthetics.train`).

- :func:`adamw`: AdamW, either with decay / no-decay parameter groups (norms, biases and 1-d parameters, and
  optionally embeddings, without weight decay) or with weight decay on every parameter (``torch.optim.AdamW``
  over ``model.parameters()``, as the authors' synthetic trainer does);
- :class:`WarmupCosineSchedule`: linear warmup then a cosine to ``min_lr``, either per step (pretraining) or in
  whole epochs (``steps_per_epoch``: the learning rate is constant within an epoch, as with PyTorch's
  ``CosineAnnealingLR`` stepped once per epoch; with ``min_lr=0`` this is the authors' synthetic schedule).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)) or "norm" in name


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = True) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices with ``weight_decay``; norms, biases, 1-d parameters (and embeddings unless
    ``decay_embeddings``) without. Tied parameters appear once."""
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if _is_norm(module) or (isinstance(module, nn.Embedding) and not decay_embeddings):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in no_decay_ids or p.dim() < 2 or name.endswith("bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    *,
    grouped: bool = True,
    decay_embeddings: bool = True,
) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters: with :func:`param_groups` when ``grouped``, else one group with
    ``weight_decay`` on every parameter."""
    params = param_groups(model, weight_decay, decay_embeddings) if grouped else model.parameters()
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.AdamW:
    """AdamW as in the published runs (``cfg``: a :class:`~jrt.training.config.TrainConfig`)."""
    return adamw(model, cfg.warmup_init_lr if cfg.warmup_steps else cfg.lr, cfg.weight_decay,
                 (cfg.beta1, cfg.beta2), cfg.adam_eps, decay_embeddings=cfg.decay_embeddings)


class WarmupCosineSchedule:
    """Linear warmup from ``init_lr`` to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at
    ``max_steps`` (constant ``min_lr`` after). ``lr_at(s)`` is the learning rate used by optimizer step ``s``
    (0-based); :meth:`apply` sets it on the optimizer.

    With ``steps_per_epoch``, the cosine advances once per epoch of that many steps: after warmup, epoch
    ``e`` of ``E = ceil((max_steps - warmup_steps) / steps_per_epoch)`` uses
    ``min_lr + (lr - min_lr) (1 + cos(pi e / E)) / 2`` for all its steps.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None, lr: float, min_lr: float, warmup_steps: int,
                 max_steps: int, init_lr: float = 0.0, steps_per_epoch: int | None = None):
        if max_steps < 1 or warmup_steps < 0:
            raise ValueError("max_steps must be >= 1 and warmup_steps >= 0")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.optimizer = optimizer
        self.lr, self.min_lr, self.init_lr = lr, min_lr, init_lr
        self.warmup_steps, self.max_steps = warmup_steps, max_steps
        self.steps_per_epoch = steps_per_epoch
        self.last_step = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.init_lr + (self.lr - self.init_lr) * step / self.warmup_steps
        span = max(1, self.max_steps - self.warmup_steps)
        if self.steps_per_epoch is None:
            t = min(1.0, (step - self.warmup_steps) / span)
        else:
            epochs = math.ceil(span / self.steps_per_epoch)
            t = min(1.0, ((step - self.warmup_steps) // self.steps_per_epoch) / epochs)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * t))

    def apply(self, step: int) -> float:
        """Set the learning rate of every group for optimizer step ``step``; returns it."""
        if self.optimizer is None:
            raise ValueError("this schedule has no optimizer to apply to")
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.last_step = step
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "min_lr": self.min_lr, "init_lr": self.init_lr, "warmup_steps": self.warmup_steps,
                "max_steps": self.max_steps, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; the shape of the schedule comes from the (possibly extended) run config."""
        self.last_step = int(state["last_step"])
