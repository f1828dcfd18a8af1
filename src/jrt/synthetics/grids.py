"""The experiment grids of ``jrt reproduce``: ``quick`` (CPU, minutes) and ``full`` (paper-sized, hours).

Three experiments, each a list of :class:`~jrt.synthetics.config.RunConfig`:

1. SD order: causal Based (and Mamba) trained and tested with the short set first, then with the long set
   first, at several state sizes (Based: the Taylor feature dim f; Mamba: ``d_state``).
2. SD fixes: Based fed the long-set-first input read twice (order ``"twice"``: ``A B A B`` contains the
   short-first order ``B A``), and JRT-RNN (prefix linear attention over both sets) in both orders.
3. MQAR: attention, Based, Based read twice and JRT-RNN at several state sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from jrt.synthetics.config import Grid, ModelSpec, MQARTask, RunConfig, SDTask, TrainSpec

GRID_NAMES = ("quick", "full")


@dataclass(frozen=True)
class GridPlan:
    """The knobs of one grid (everything else follows from them)."""

    # SD task
    sd_short: int
    sd_long: int
    sd_vocab: int
    sd_sizes: tuple[tuple[int, int], ...]  # (d_model, feature_dim) per Based/JRT-RNN state size
    sd_mamba_sizes: tuple[tuple[int, int], ...]  # (d_model, d_state)
    sd_train: TrainSpec
    sd_mamba_train: TrainSpec
    # MQAR task
    mqar_pairs: int
    mqar_seq_len: int
    mqar_vocab: int
    mqar_sizes: tuple[tuple[int, int], ...]  # (d_model, feature_dim) for Based / JRT-RNN
    mqar_attention_sizes: tuple[int, ...]  # d_model for attention
    mqar_train: TrainSpec
    num_layers: int = 4
    num_heads: int = 1
    seeds: tuple[int, ...] = (0,)
    mamba_twice: bool = True  # also train Mamba on the read-twice input


QUICK = GridPlan(
    sd_short=4, sd_long=12, sd_vocab=36,
    sd_sizes=((64, 2), (64, 4), (64, 8)),
    sd_mamba_sizes=((32, 2), (32, 8), (32, 32)),
    sd_train=TrainSpec(lr=1e-2, batch_size=64, max_steps=600, warmup_steps=40, eval_every=100, patience=10,
                       num_train=20000, num_valid=400, num_test=1000),
    sd_mamba_train=TrainSpec(lr=1e-2, batch_size=32, max_steps=300, warmup_steps=20, eval_every=100,
                             patience=10, num_train=10000, num_valid=400, num_test=1000),
    mqar_pairs=4, mqar_seq_len=32, mqar_vocab=36,
    mqar_sizes=((64, 2), (64, 4), (64, 8)),
    mqar_attention_sizes=(32, 64),
    mqar_train=TrainSpec(lr=1e-2, batch_size=64, max_steps=800, warmup_steps=40, eval_every=100, patience=10,
                         num_train=20000, num_valid=400, num_test=1000),
    mamba_twice=False,
)

FULL = GridPlan(
    sd_short=4, sd_long=64, sd_vocab=1028,
    sd_sizes=((36, 4), (64, 8), (96, 16), (128, 24)),
    sd_mamba_sizes=((36, 4), (64, 8), (96, 16), (128, 32)),
    sd_train=TrainSpec(lr=3e-3, batch_size=128, max_steps=20000, warmup_steps=500, eval_every=500,
                       patience=10, num_train=100000, num_valid=1000, num_test=3000),
    sd_mamba_train=TrainSpec(lr=3e-3, batch_size=128, max_steps=20000, warmup_steps=500, eval_every=500,
                             patience=10, num_train=100000, num_valid=1000, num_test=3000),
    mqar_pairs=64, mqar_seq_len=256, mqar_vocab=8192,
    mqar_sizes=((64, 8), (128, 16), (256, 16), (512, 16)),
    mqar_attention_sizes=(64, 128, 256),
    mqar_train=TrainSpec(lr=3e-3, batch_size=128, max_steps=20000, warmup_steps=500, eval_every=500,
                         patience=10, num_train=100000, num_valid=1000, num_test=3000),
    seeds=(0, 1, 2),
)

PLANS = {"quick": QUICK, "full": FULL}


def plan_for(name: str) -> GridPlan:
    if name not in PLANS:
        raise ValueError(f"unknown grid {name!r}; choose one of {GRID_NAMES}")
    return PLANS[name]


def sd_grid(plan: GridPlan) -> Grid:
    """Experiments 1 and 2: SD order for Based and Mamba, and the fixes (read twice, JRT-RNN)."""
    grid: Grid = []
    base_task = SDTask(short_size=plan.sd_short, long_size=plan.sd_long, vocab_size=plan.sd_vocab)
    short = replace(base_task, order="short_first")
    long = replace(base_task, order="long_first")
    twice = replace(long, read_twice=True)
    for seed in plan.seeds:
        for d, f in plan.sd_sizes:
            spec = ModelSpec(arch="based", d_model=d, feature_dim=f, num_layers=plan.num_layers,
                             num_heads=plan.num_heads)
            rnn = replace(spec, arch="jrt_rnn")
            for task in (short, long, twice):
                grid.append(RunConfig("sd", "based", task, spec, plan.sd_train, seed))
            for task in (short, long):
                grid.append(RunConfig("sd", "jrt_rnn", task, rnn, plan.sd_train, seed))
        for d, n in plan.sd_mamba_sizes:
            spec = ModelSpec(arch="mamba", d_model=d, d_state=n, num_layers=plan.num_layers)
            for task in (short, long, twice) if plan.mamba_twice else (short, long):
                grid.append(RunConfig("sd", "mamba", task, spec, plan.sd_mamba_train, seed))
    return grid


def mqar_grid(plan: GridPlan) -> Grid:
    """Experiment 3: MQAR accuracy against state size."""
    grid: Grid = []
    once = MQARTask(num_pairs=plan.mqar_pairs, seq_len_single=plan.mqar_seq_len, vocab_size=plan.mqar_vocab)
    twice = replace(once, read_twice=True)
    for seed in plan.seeds:
        for d in plan.mqar_attention_sizes:
            spec = ModelSpec(arch="attention", d_model=d, num_layers=plan.num_layers, num_heads=plan.num_heads)
            grid.append(RunConfig("mqar", "attention", once, spec, plan.mqar_train, seed))
        for d, f in plan.mqar_sizes:
            spec = ModelSpec(arch="based", d_model=d, feature_dim=f, num_layers=plan.num_layers,
                             num_heads=plan.num_heads)
            grid.append(RunConfig("mqar", "based", once, spec, plan.mqar_train, seed))
            grid.append(RunConfig("mqar", "based_twice", twice, spec, plan.mqar_train, seed))
            grid.append(RunConfig("mqar", "jrt_rnn", once, replace(spec, arch="jrt_rnn"), plan.mqar_train, seed))
    return grid


def reproduce_grid(name: str = "quick") -> Grid:
    """The whole grid of ``jrt reproduce --quick`` / ``--full``."""
    plan = plan_for(name)
    return sd_grid(plan) + mqar_grid(plan)
