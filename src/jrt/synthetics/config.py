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
    SyntheticBatch,
    make_mqar,
    make_sd,
    make_sd_mixed,
    mqar_seq_len,
    sd_halves,
    sd_seq_len,
)

ARCHS = ("attention", "based", "based_noncausal", "jrt_rnn", "mamba")
STYLES = ("library", "authors")
SCHEDULES = ("warmup_cosine", "epoch_cosine")
EXPERIMENTS = ("sd", "mqar")

#: The authors' training pairs (|A|, |B|) as (short, long): each is trained in both orders, 12 pairs in all.
AUTHORS_SD_PAIRS = ((4, 16), (8, 32), (16, 64), (4, 128), (16, 256), (4, 256))
#: The authors' test pairs as (short, long), scored in both orders (the last five are longer than any trained).
AUTHORS_SD_TEST_PAIRS = ((1, 32), (4, 32), (4, 128), (16, 256), (4, 256), (16, 512), (4, 512), (8, 768),
                         (16, 768), (4, 768))
AUTHORS_SD_VOCAB = 2048


def _pairs(value: Any) -> tuple[tuple[int, int], ...]:
    return tuple((int(a), int(b)) for a, b in value)


@dataclass(frozen=True)
class SDTask:
    """Set disjointness on the authors' protocol: one model is trained on a mix of set-size ``pairs`` and of
    both orders, and scored per order and per pair.

    ``pairs``: the trained ``(short, long)`` sizes; each training example of a pair has the short set first with
    probability ``short_first`` (exactly ``round(short_first * N)`` of the ``N`` examples of each pair).
    ``test_pairs``: the scored pairs (both orders each); a test pair that is not in ``pairs`` is never seen in
    training. ``read_twice``: every sequence (train and test) is read twice (JRT-Prompt).
    """

    pairs: tuple[tuple[int, int], ...] = ((4, 16),)
    test_pairs: tuple[tuple[int, int], ...] = ((4, 16),)
    short_first: float = 0.5
    read_twice: bool = False
    vocab_size: int = 260
    kind: str = "sd"

    def __post_init__(self) -> None:
        if self.kind != "sd":
            raise ValueError(f"SDTask.kind must be 'sd', got {self.kind!r}")
        object.__setattr__(self, "pairs", _pairs(self.pairs))
        object.__setattr__(self, "test_pairs", _pairs(self.test_pairs))
        if not self.pairs or not self.test_pairs:
            raise ValueError("SDTask needs at least one training pair and one test pair")
        if not 0.0 <= self.short_first <= 1.0:
            raise ValueError(f"short_first must be in [0, 1], got {self.short_first!r}")
        half_a, half_b = sd_halves(self.vocab_size)
        for short, long in self.pairs + self.test_pairs:
            if not 0 < short <= long:
                raise ValueError(f"a pair is (short, long) with 0 < short <= long, got ({short}, {long})")
            if long > min(half_a, half_b):
                raise ValueError(
                    f"set size {long} is larger than half the content vocabulary ({min(half_a, half_b)} for "
                    f"vocab_size {self.vocab_size})"
                )

    @property
    def seq_len(self) -> int:
        """The longest sequence of the task (over training and test pairs)."""
        return max(sd_seq_len(s, t, self.read_twice) for s, t in self.pairs + self.test_pairs)

    @property
    def order_label(self) -> str:
        """``"twice"`` for read-twice input, else ``"once"``."""
        return "twice" if self.read_twice else "once"

    def train_pools(self, num_per_pair: int, seed: int) -> list[SyntheticBatch]:
        """One pool of ``num_per_pair`` examples per training pair, both orders mixed in each."""
        return [
            make_sd_mixed(num_per_pair, s, t, self.vocab_size, short_first=self.short_first,
                          read_twice=self.read_twice, seed=seed + 1009 * i)
            for i, (s, t) in enumerate(self.pairs)
        ]

    def test_groups(self, num_per_group: int, seed: int) -> list[tuple[dict[str, Any], SyntheticBatch]]:
        """``(meta, batch)`` per test pair and order; ``meta``: ``pair`` [short, long], ``order``, ``seen``."""
        out = []
        for i, (s, t) in enumerate(self.test_pairs):
            for j, order in enumerate(SD_ORDERS):
                first, second = (s, t) if order == "short_first" else (t, s)
                batch = make_sd(num_per_group, first, second, self.vocab_size, read_twice=self.read_twice,
                                seed=seed + 1009 * i + 17 * j)
                meta = {"pair": [s, t], "order": order, "seen": (s, t) in self.pairs}
                out.append((meta, batch))
        return out


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

    def train_pools(self, num_examples: int, seed: int) -> list[SyntheticBatch]:
        return [self.generate(num_examples, seed)]

    def test_groups(self, num_examples: int, seed: int) -> list[tuple[dict[str, Any], SyntheticBatch]]:
        return [({"pair": None, "order": self.order_label, "seen": True}, self.generate(num_examples, seed))]

    def generate(self, num_examples: int, seed: int) -> SyntheticBatch:
        return make_mqar(
            num_examples, self.num_pairs, self.seq_len_single, self.vocab_size, read_twice=self.read_twice,
            power_a=self.power_a, seed=seed,
        )


@dataclass(frozen=True)
class ModelSpec:
    """A small lab model.

    ``arch``: ``"attention"`` (causal softmax), ``"based"`` (causal Based linear attention), ``"based_noncausal"``
    (Based linear attention and convolutions that read the whole input), ``"jrt_rnn"`` (prefix linear attention,
    non-causal over the prefix) or ``"mamba"`` (``transformers``' Mamba). ``num_layers`` blocks alternate a
    short convolution and the sequence mixer (starting with the convolution) for the library models.
    ``feature_dim`` is the Taylor map's input dimension f (state ``D = 1+f+f^2`` per head);
    ``d_state``/``expand`` only matter for Mamba.

    ``style``: ``"library"`` = the library's blocks (BaseConv ``out_proj(silu(conv(u1)) * u2)``, a SwiGLU MLP per
    block); ``"authors"`` = the authors' synthetic models (their BaseConv form ``conv(x) * linear(x) + x``, no
    MLP, embedding dropout 0.1; use it with 2 heads). ``based_noncausal`` always uses the authors' conv form,
    centred (the library has no non-causal conv of its own).
    """

    arch: str = "based"
    d_model: int = 64
    num_layers: int = 4
    num_heads: int = 1
    feature_dim: int = 8
    d_state: int = 16
    expand: int = 2
    style: str = "library"

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        if self.arch == "mamba" and self.style != "library":
            raise ValueError("mamba is transformers' model: only style 'library'")
        for name in ("d_model", "num_layers", "num_heads", "feature_dim", "d_state", "expand"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")

    @classmethod
    def authors(cls, arch: str, d_model: int, feature_dim: int) -> ModelSpec:
        """The authors' synthetic configuration: 4 layers, 2 heads, their conv form, no MLP."""
        return cls(arch=arch, d_model=d_model, feature_dim=feature_dim, num_layers=4, num_heads=2, style="authors")


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation (:mod:`jrt.training.optim`): AdamW, then either ``schedule="warmup_cosine"`` (linear warmup,
    cosine to ``lr * min_lr_ratio`` per step) or ``"epoch_cosine"`` (the authors': cosine to
    ``lr * min_lr_ratio`` advanced once per epoch, an epoch being one pass over the ``num_train`` examples of
    every pool). ``grouped_decay``: no weight decay on norms, biases and embeddings (False: decay on every
    parameter, as the authors). Evaluation every ``eval_every`` steps on a validation set; with ``keep_best``
    the test scores the best validation checkpoint and training stops early at ``target_acc`` or after
    ``patience`` evaluations without improvement; without it (the authors) the final model is scored.
    ``num_train``/``num_valid``/``num_test`` count examples per pool / per test group (SD: per pair and order).
    ``overfit=True`` validates and tests on the training examples (a memorisation check for tiny instances).
    """

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
    schedule: str = "warmup_cosine"
    grouped_decay: bool = True
    keep_best: bool = True

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("batch_size", "max_steps", "eval_every", "patience", "num_train", "num_valid", "num_test"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps must be in 0..max_steps, got {self.warmup_steps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")

    @classmethod
    def authors(cls, lr: float, max_steps: int, num_train: int = 20000, num_test: int = 1000,
                eval_every: int | None = None) -> TrainSpec:
        """The authors' optimiser: AdamW (default betas, weight decay 0.1 on every parameter), batch 128, no
        warmup, no clipping, cosine to 0 per epoch, the final model scored."""
        return cls(lr=lr, weight_decay=0.1, betas=(0.9, 0.999), batch_size=128, max_steps=max_steps,
                   warmup_steps=0, min_lr_ratio=0.0, grad_clip=0.0, eval_every=eval_every or max_steps,
                   patience=10**6, target_acc=2.0, num_train=num_train, num_valid=num_test, num_test=num_test,
                   schedule="epoch_cosine", grouped_decay=False, keep_best=False)


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
        if task_cls is SDTask and "pairs" not in task_data:
            raise ValueError("an SD config from before the mixed-order protocol (no 'pairs'): rerun it")
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
            task = f"sd {len(t.pairs)} pairs {t.order_label}"
        else:
            task = f"mqar P={t.num_pairs} T={t.seq_len} {t.order_label}"
        return (f"{self.model_name} ({m.style}) d={m.d_model} {size} L={m.num_layers} | {task} | "
                f"lr {self.train.lr:g} | seed {self.seed}")


Grid = list[RunConfig]


