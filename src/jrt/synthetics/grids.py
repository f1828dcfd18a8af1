"""The experiment grids of ``jrt reproduce``: ``quick`` (CPU, minutes) and ``full`` (the authors' grid, GPU days).

Two experiments, each a list of :class:`~jrt.synthetics.config.RunConfig`:

- **MQAR** (the quick run's lead): causal Based against the same model fed the key-value block twice
  (JRT-Prompt, ``based_twice``) and JRT-RNN, at equal recurrent state.
- **SD** on the authors' protocol: one model per (architecture, state size, learning rate, seed), trained on a
  mix of set-size pairs in both orders and scored per order and per pair, including longer pairs never seen in
  training. Models: causal Based, Based reading the input twice, fully non-causal Based, JRT-RNN.

The full grid's SD part is the authors' sweep (``synthetic/zoology/experiments/{causal,non_causal}.py`` of
their repository): d_model in {36, 48, 64, 96, 128} x feature dim in {4, 8, 16, 24}, 2 heads, no MLP, vocabulary
2,048, 6 pairs x 2 orders with 20,000 examples each, 48 epochs at batch 128, lr in {1e-4, 5e-4, 8e-4}, 3 seeds,
scored on their 10 test pairs x 2 orders (1,000 examples each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from jrt.synthetics.config import (
    AUTHORS_SD_PAIRS,
    AUTHORS_SD_TEST_PAIRS,
    AUTHORS_SD_VOCAB,
    Grid,
    ModelSpec,
    MQARTask,
    RunConfig,
    SDTask,
    TrainSpec,
)

GRID_NAMES = ("quick", "medium", "full")
#: SD model names -> (arch, read twice).
SD_MODELS = {"based": ("based", False), "based_twice": ("based", True),
             "based_noncausal": ("based_noncausal", False), "jrt_rnn": ("jrt_rnn", False)}
#: MQAR model names -> (arch, read twice).
MQAR_MODELS = {"attention": ("attention", False), "based": ("based", False), "based_twice": ("based", True),
               "jrt_rnn": ("jrt_rnn", False)}
AUTHORS_LRS = (1e-4, 5e-4, 8e-4)
AUTHORS_EPOCHS = 48


@dataclass(frozen=True)
class GridPlan:
    """The knobs of one grid (everything else follows from them)."""

    # MQAR (library models)
    mqar_pairs: int
    mqar_seq_len: int
    mqar_vocab: int
    mqar_sizes: tuple[tuple[int, int], ...]  # (d_model, feature_dim)
    mqar_models: tuple[str, ...]
    mqar_attention_sizes: tuple[int, ...]  # d_model for attention
    mqar_train: TrainSpec
    mqar_seeds: tuple[int, ...]
    # SD (authors' model spec)
    sd_pairs: tuple[tuple[int, int], ...]
    sd_test_pairs: tuple[tuple[int, int], ...]
    sd_vocab: int
    sd_sizes: tuple[tuple[int, int], ...]  # (d_model, feature_dim)
    sd_models: tuple[str, ...]
    sd_lrs: tuple[float, ...]
    sd_seeds: tuple[int, ...]
    sd_num_train: int  # per pair (both orders together)
    sd_num_test: int  # per pair and order
    sd_epochs: int | None  # the run length in epochs, or
    sd_steps: int | None  # in steps
    sd_style: str = "authors"
    sd_curve_points: int = 0  # learning-curve evaluations per run (0: the final model only)
    sd_num_valid: int = 0  # held-out examples per test pair and order for each curve point


QUICK = GridPlan(
    mqar_pairs=4, mqar_seq_len=32, mqar_vocab=260,
    mqar_sizes=((64, 2), (64, 4)),
    mqar_models=("based", "based_twice", "jrt_rnn"),
    mqar_attention_sizes=(),
    mqar_train=TrainSpec(lr=1e-2, batch_size=64, max_steps=800, warmup_steps=40, eval_every=100, patience=10,
                         num_train=20000, num_valid=400, num_test=1000),
    mqar_seeds=(0,),
    sd_pairs=((4, 16), (8, 32)), sd_test_pairs=((4, 16), (8, 32), (4, 64)), sd_vocab=260,
    sd_sizes=((64, 4),),
    sd_models=("based", "based_twice", "based_noncausal", "jrt_rnn"),
    sd_lrs=(8e-4,), sd_seeds=(0,), sd_num_train=6400, sd_num_test=500, sd_epochs=None, sd_steps=400,
)

#: Set disjointness at CPU scale (``--medium``, about an hour on 2 cores): chosen by measurement
#: (``benchmarks/sd_search.py``, docs/reproduce.md). The authors' blocks (no MLP) plateaued near the floor of a
#: model that guesses among the short set (about 1/4 here) for every architecture, causal or not, up to 8,000
#: steps; the library's blocks (BaseConv, SwiGLU MLP) learn the task within 4,000 steps, and their accuracy
#: depends on the state (f = 2 vs 4 at d = 32). Fresh examples every step (one epoch: the authors' per-epoch
#: cosine keeps the learning rate constant), a short and a long pair, both orders, two seeds.
MEDIUM = GridPlan(
    mqar_pairs=4, mqar_seq_len=32, mqar_vocab=260, mqar_sizes=(), mqar_models=(), mqar_attention_sizes=(),
    mqar_train=QUICK.mqar_train, mqar_seeds=(),
    sd_pairs=((4, 16), (4, 64)), sd_test_pairs=((4, 16), (4, 64)), sd_vocab=260,
    sd_sizes=((32, 2), (32, 4)),
    sd_models=("based", "based_twice", "based_noncausal", "jrt_rnn"),
    sd_lrs=(3e-3,), sd_seeds=(0, 1), sd_num_train=200_000, sd_num_test=1000, sd_epochs=None, sd_steps=3000,
    sd_style="library", sd_curve_points=10, sd_num_valid=200,
)

FULL = GridPlan(
    mqar_pairs=64, mqar_seq_len=256, mqar_vocab=8192,
    mqar_sizes=((64, 8), (128, 16), (256, 16), (512, 16)),
    mqar_models=("based", "based_twice", "jrt_rnn"),
    mqar_attention_sizes=(64, 128, 256),
    mqar_train=TrainSpec(lr=3e-3, batch_size=128, max_steps=20000, warmup_steps=500, eval_every=500,
                         patience=10, num_train=100000, num_valid=1000, num_test=3000),
    mqar_seeds=(0, 1, 2),
    sd_pairs=AUTHORS_SD_PAIRS, sd_test_pairs=AUTHORS_SD_TEST_PAIRS, sd_vocab=AUTHORS_SD_VOCAB,
    sd_sizes=tuple((d, f) for d in (36, 48, 64, 96, 128) for f in (4, 8, 16, 24)),
    sd_models=("based", "based_twice", "based_noncausal", "jrt_rnn"),
    sd_lrs=AUTHORS_LRS, sd_seeds=(0, 1, 2), sd_num_train=40000, sd_num_test=1000,
    sd_epochs=AUTHORS_EPOCHS, sd_steps=None,
)

PLANS = {"quick": QUICK, "medium": MEDIUM, "full": FULL}


def plan_for(name: str) -> GridPlan:
    if name not in PLANS:
        raise ValueError(f"unknown grid {name!r}; choose one of {GRID_NAMES}")
    return PLANS[name]


def sd_steps(plan: GridPlan, batch_size: int = 128) -> int:
    """Training steps of one SD run: ``sd_steps``, or ``sd_epochs`` passes over every pair's examples."""
    if plan.sd_steps is not None:
        return plan.sd_steps
    per_epoch = len(plan.sd_pairs) * math.ceil(plan.sd_num_train / batch_size)
    return plan.sd_epochs * per_epoch


def sd_grid(plan: GridPlan) -> Grid:
    """SD on the authors' protocol: every model x state size x learning rate x seed."""
    grid: Grid = []
    steps = sd_steps(plan)
    base = SDTask(pairs=plan.sd_pairs, test_pairs=plan.sd_test_pairs, short_first=0.5, vocab_size=plan.sd_vocab)
    for seed in plan.sd_seeds:
        for lr in plan.sd_lrs:
            train = TrainSpec.authors(lr=lr, max_steps=steps, num_train=plan.sd_num_train,
                                      num_test=plan.sd_num_test,
                                      eval_every=steps // plan.sd_curve_points if plan.sd_curve_points else None)
            if plan.sd_curve_points:
                train = replace(train, num_valid=plan.sd_num_valid)
            for d, f in plan.sd_sizes:
                for name in plan.sd_models:
                    arch, twice = SD_MODELS[name]
                    spec = (ModelSpec.authors(arch, d, f) if plan.sd_style == "authors"
                            else ModelSpec(arch=arch, d_model=d, feature_dim=f, num_heads=2))
                    grid.append(RunConfig("sd", name, replace(base, read_twice=twice), spec, train, seed))
    return grid


def mqar_grid(plan: GridPlan) -> Grid:
    """MQAR accuracy against state size: causal Based, Based read twice, JRT-RNN (and attention)."""
    grid: Grid = []
    once = MQARTask(num_pairs=plan.mqar_pairs, seq_len_single=plan.mqar_seq_len, vocab_size=plan.mqar_vocab)
    for seed in plan.mqar_seeds:
        for d in plan.mqar_attention_sizes:
            spec = ModelSpec(arch="attention", d_model=d)
            grid.append(RunConfig("mqar", "attention", once, spec, plan.mqar_train, seed))
        for d, f in plan.mqar_sizes:
            for name in plan.mqar_models:
                arch, twice = MQAR_MODELS[name]
                spec = ModelSpec(arch=arch, d_model=d, feature_dim=f)
                grid.append(RunConfig("mqar", name, replace(once, read_twice=twice), spec, plan.mqar_train, seed))
    return grid


def reproduce_grid(name: str = "quick") -> Grid:
    """The whole grid of ``jrt reproduce`` / ``--full``: MQAR first, then SD."""
    plan = plan_for(name)
    return mqar_grid(plan) + sd_grid(plan)
