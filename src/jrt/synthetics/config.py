"""Typed experiment configs for the synthetic recall lab (Zoology style: a grid is a list of configs).

A :class:`RunConfig` fully determines one training run (task, model, optimiser, seed); its
:meth:`RunConfig.run_id` is a hash of all of it, which is how an interrupted grid knows which runs are done.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from jrt.synthetics.data import (
    NUM_SPECIAL,
    SD_ORDERS,
    SD_VOCABS,
    SyntheticBatch,
    make_mqar,
    make_sd,
    mqar_seq_len,
    sd_seq_len,
)

ARCHS = ("attention", "based", "jrt_rnn", "mamba")
EXPERIMENTS = ("sd", "mqar")


@dataclass(frozen=True)
class SDTask:
    """Set disjointness with sets of sizes ``short_size`` and ``long_size`` in the given ``order``."""

    short_size: int = 4
    long_size: int = 16
    order: str = "short_first"
    read_twice: bool = False
    vocab_size: int = 260
    vocab: str = "shared"
    kind: str = "sd"

    def __post_init__(self) -> None:
        if self.kind != "sd":
            raise ValueError(f"SDTask.kind must be 'sd', got {self.kind!r}")
        if self.order not in SD_ORDERS:
            raise ValueError(f"order must be one of {SD_ORDERS}, got {self.order!r}")
        if self.vocab not in SD_VOCABS:
            raise ValueError(f"vocab must be one of {SD_VOCABS}, got {self.vocab!r}")
        if not 0 < self.short_size <= self.long_size:
            raise ValueError(f"need 0 < short_size <= long_size, got {self.short_size}, {self.long_size}")
        half = (self.vocab_size - NUM_SPECIAL) // 2
        if self.long_size > half:
            raise ValueError(
                f"set size {self.long_size} is larger than half the content vocabulary ({half} for "
                f"vocab_size {self.vocab_size})"
            )

    @property
    def seq_len(self) -> int:
        return sd_seq_len(self.short_size, self.long_size, self.read_twice)

    @property
    def order_label(self) -> str:
        """``"twice"`` for read-twice input, else the set order."""
        return "twice" if self.read_twice else self.order

    def generate(self, num_examples: int, seed: int) -> SyntheticBatch:
        return make_sd(
            num_examples, self.short_size, self.long_size, self.vocab_size, order=self.order,
            read_twice=self.read_twice, vocab=self.vocab, seed=seed,
        )


@dataclass(frozen=True)
class MQARTask:
    """MQAR with ``num_pairs`` key-value pairs in a single-read sequence of ``seq_len_single`` tokens."""

    num_pairs: int = 8
    seq_len_single: int = 64
    read_twice: bool = False
    vocab_size: int = 260
    power_a: float = 0.01
    kind: str = "mqar"

    def __post_init__(self) -> None:
        if self.kind != "mqar":
            raise ValueError(f"MQARTask.kind must be 'mqar', got {self.kind!r}")
        half = (self.vocab_size - NUM_SPECIAL) // 2
        if not 0 < self.num_pairs <= half:
            raise ValueError(
                f"num_pairs must be in 1..{half} (half the content vocabulary), got {self.num_pairs}"
            )
        if self.seq_len_single < 4 * self.num_pairs:
            raise ValueError(
                f"seq_len_single ({self.seq_len_single}) is too short for {self.num_pairs} pairs: "
                f"need at least {4 * self.num_pairs}"
            )

    @property
    def seq_len(self) -> int:
        return mqar_seq_len(self.num_pairs, self.seq_len_single, self.read_twice)

    @property
    def order_label(self) -> str:
        return "twice" if self.read_twice else "once"

    def generate(self, num_examples: int, seed: int) -> SyntheticBatch:
        return make_mqar(
            num_examples, self.num_pairs, self.seq_len_single, self.vocab_size, read_twice=self.read_twice,
            power_a=self.power_a, seed=seed,
        )


@dataclass(frozen=True)
class ModelSpec:
    """A small lab model.

    ``arch``: ``"attention"`` (causal softmax), ``"based"`` (BaseConv + causal linear attention),
    ``"jrt_rnn"`` (BaseConv + prefix linear attention, non-causal over the prefix) or ``"mamba"``
    (``transformers``' Mamba). ``num_layers`` blocks alternate BaseConv and the sequence mixer (starting
    with BaseConv) for the three library models. ``feature_dim`` is the Taylor map's input dimension f
    (state ``D = 1+f+f^2`` per head); ``d_state``/``expand`` only matter for Mamba.
    """

    arch: str = "based"
    d_model: int = 64
    num_layers: int = 4
    num_heads: int = 1
    feature_dim: int = 8
    d_state: int = 16
    expand: int = 2

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("d_model", "num_layers", "num_heads", "feature_dim", "d_state", "expand"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation: AdamW with linear warmup then cosine decay to ``lr * min_lr_ratio``; evaluation every
    ``eval_every`` steps on a validation set; stop early when validation accuracy reaches ``target_acc`` or
    has not improved for ``patience`` evaluations. ``overfit=True`` validates and tests on the training
    examples themselves (a memorisation check for tiny instances)."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    batch_size: int = 64
    max_steps: int = 1500
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    patience: int = 5
    target_acc: float = 0.995
    num_train: int = 20000
    num_valid: int = 500
    num_test: int = 1000
    overfit: bool = False

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("batch_size", "max_steps", "eval_every", "patience", "num_train", "num_valid", "num_test"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps must be in 0..max_steps, got {self.warmup_steps}")


@dataclass(frozen=True)
class RunConfig:
    """One training run. ``model_name`` is the label used in tables (e.g. ``"based"``, ``"jrt_rnn"``)."""

    experiment: str
    model_name: str
    task: SDTask | MQARTask
    model: ModelSpec
    train: TrainSpec = field(default_factory=TrainSpec)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.experiment not in EXPERIMENTS:
            raise ValueError(f"experiment must be one of {EXPERIMENTS}, got {self.experiment!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        task_data = dict(data["task"])
        task_cls = SDTask if task_data.get("kind", "sd") == "sd" else MQARTask
        train = dict(data.get("train", {}))
        if "betas" in train:
            train["betas"] = tuple(train["betas"])
        return cls(
            experiment=data["experiment"], model_name=data["model_name"], task=task_cls(**task_data),
            model=ModelSpec(**data["model"]), train=TrainSpec(**train), seed=int(data.get("seed", 0)),
        )

    def run_id(self) -> str:
        """A stable 16-hex-digit hash of the whole config."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe(self) -> str:
        m, t = self.model, self.task
        size = f"n={m.d_state}" if m.arch == "mamba" else f"f={m.feature_dim}"
        if isinstance(t, SDTask):
            task = f"sd {t.short_size}/{t.long_size} {t.order_label}"
        else:
            task = f"mqar P={t.num_pairs} T={t.seq_len} {t.order_label}"
        return f"{self.model_name} d={m.d_model} {size} L={m.num_layers} | {task} | seed {self.seed}"


Grid = list[RunConfig]


