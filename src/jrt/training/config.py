"""Training configuration: one dataclass, the published presets, YAML/JSON files and ``key=value`` overrides.

A training preset names a *model* preset (resolved by :func:`jrt.models.factory.build_model`) and carries the
batch, schedule and objective of the run. Precedence, lowest first: dataclass defaults, ``--preset``,
``--config FILE``, command-line overrides.

Published runs (docs/design.md, section 4): sequences of 2048 tokens, a prefix of M = 1024 tokens with a masked-LM
loss of weight 0.25 (JRT-RNN only), AdamW lr 8e-4, betas (0.9, 0.95), weight decay 0.1, warmup 600 (360M) /
1000 (1.3B) steps from 1e-6, cosine to 8e-5 over 60k / 100k steps, global batch 256 x 2048 tokens, bf16,
gradient clipping at 1.0.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jrt.errors import check_known_keys, did_you_mean

OBJECTIVES = ("prefix_mlm", "ntp")
PRECISIONS = ("auto", "fp32", "bf16")
DISTRIBUTED_MODES = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """Everything a training run needs besides the data folder and the output folder.

    Batch sizes count *sequences* of ``seq_len`` tokens. ``global_batch_size`` is split over
    ``world_size`` ranks and ``grad_accum = global_batch_size / (micro * world_size)`` micro-steps, where the
    micro-batch is the largest divisor of the per-rank batch not above ``micro_batch_size``
    (:meth:`TrainConfig.batch_split`).
    """

    #: Model preset name (``jrt-tiny``, ``based-360m``, ``attn-tiny``, ``mamba-360m``, ...).
    model: str = "jrt-tiny"
    #: Extra keyword arguments applied to the model config (e.g. ``{"swa_window": 32}``).
    model_overrides: dict[str, Any] = field(default_factory=dict)
    #: ``prefix_mlm`` (JRT-RNN: masked-LM on the prefix, next-token after it) or ``ntp`` (plain next-token).
    #: ``None`` picks ``prefix_mlm`` for JRT models and ``ntp`` for the others.
    objective: str | None = None

    # sequences and objective
    seq_len: int = 256
    prefix_len: int = 128
    #: Draw M per sequence uniformly in ``[prefix_min, prefix_max]`` instead of using ``prefix_len``.
    random_prefix: bool = False
    prefix_min: int = 1
    prefix_max: int | None = None
    mask_prob: float = 0.15
    mlm_weight: float = 0.25

    # batch
    global_batch_size: int = 8
    micro_batch_size: int = 8

    # optimisation
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    warmup_init_lr: float = 1e-6
    max_steps: int = 1000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    #: Apply weight decay to embedding matrices (norms and biases never get it).
    decay_embeddings: bool = True

    # execution
    precision: str = "auto"
    compile: bool = False
    distributed: str = "ddp"
    seed: int = 1234
    deterministic: bool = False
    num_threads: int | None = None
    max_minutes: float | None = None

    # logging, evaluation, checkpoints
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 8
    #: Validate once before the first step of a fresh run (the start of the validation curve).
    eval_at_start: bool = True
    save_interval: int = 200
    keep_last: int = 3

    def validate(self) -> TrainConfig:
        """Raise ``ValueError`` for inconsistent settings; returns ``self``."""
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.distributed not in DISTRIBUTED_MODES:
            raise ValueError(f"distributed must be one of {DISTRIBUTED_MODES}, got {self.distributed!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.objective != "ntp":
            if not 0 <= self.prefix_len < self.seq_len:
                raise ValueError(
                    f"prefix_len ({self.prefix_len}) must be in [0, seq_len) = [0, {self.seq_len}): "
                    "a prefix as long as the sequence leaves no next-token positions"
                )
            if self.random_prefix:
                hi = self.prefix_max if self.prefix_max is not None else self.seq_len - 1
                if not 0 <= self.prefix_min <= hi < self.seq_len:
                    raise ValueError(
                        f"random prefix range [{self.prefix_min}, {hi}] must lie in [0, seq_len) "
                        f"= [0, {self.seq_len})"
                    )
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {self.mask_prob}")
        if self.mlm_weight < 0:
            raise ValueError(f"mlm_weight must be >= 0, got {self.mlm_weight}")
        for name in ("global_batch_size", "micro_batch_size", "max_steps", "log_interval", "eval_interval",
                     "save_interval", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_batches < 0 or self.warmup_steps < 0:
            raise ValueError("eval_batches and warmup_steps must be >= 0")
        if self.lr <= 0 or self.min_lr < 0 or self.warmup_init_lr < 0:
            raise ValueError("lr must be > 0, min_lr and warmup_init_lr >= 0")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")
        from jrt.models.factory import check_model_overrides

        check_model_overrides(self.model, self.model_overrides)
        return self

    def batch_split(self, world_size: int) -> tuple[int, int]:
        """``(micro_batch, grad_accum)`` with ``micro_batch * grad_accum * world_size == global_batch_size``.

        ``micro_batch`` is the largest divisor of ``global_batch_size / world_size`` that is at most
        ``micro_batch_size`` (so ``torchrun`` on any number of ranks that divides the global batch works);
        ``ValueError`` when ``world_size`` does not divide the global batch (no split exists).
        """
        if world_size < 1 or self.global_batch_size % world_size:
            raise ValueError(f"global_batch_size ({self.global_batch_size}) cannot be split over {world_size} "
                             "processes: use a process count that divides it, or change global_batch_size")
        per_rank = self.global_batch_size // world_size
        micro = max(m for m in range(1, min(self.micro_batch_size, per_rank) + 1) if per_rank % m == 0)
        return micro, per_rank // micro

    def grad_accum(self, world_size: int) -> int:
        """Micro-steps per optimizer step (see :meth:`batch_split`)."""
        return self.batch_split(world_size)[1]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


def _published(model: str, warmup: int, steps: int) -> dict[str, Any]:
    jrt = model.startswith("jrt")
    return dict(
        model=model, objective="prefix_mlm" if jrt else "ntp", seq_len=2048, prefix_len=1024,
        global_batch_size=256, micro_batch_size=8, lr=8e-4, min_lr=8e-5, warmup_steps=warmup,
        warmup_init_lr=1e-6, max_steps=steps, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
        precision="bf16", log_interval=10, eval_interval=1000, eval_batches=32, save_interval=1000, keep_last=3,
    )


def _tiny(model: str) -> dict[str, Any]:
    jrt = model.startswith("jrt")
    return dict(
        model=model, objective="prefix_mlm" if jrt else "ntp", seq_len=256, prefix_len=128,
        global_batch_size=8, micro_batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=20, warmup_init_lr=1e-6,
        max_steps=1000, precision="fp32", log_interval=5, eval_interval=10, eval_batches=2, save_interval=50,
        keep_last=2,
    )


def _based_1b_mixers() -> list[str]:
    """The JRT-1.3B layer pattern with Based (causal) linear attention in place of PLA."""
    pla, swa = (1, 6, 11, 16, 21, 27, 33), (2, 7, 12, 17, 22, 28, 34)
    return ["based" if i in pla else "swa" if i in swa else "base_conv" for i in range(36)]


#: Training presets: the published runs (360M / 30B tokens and 1.3B / 50B tokens) and CPU-sized ones.
#: ``based-1.3b`` is the ``jrt-1.3b`` model with its PLA layers replaced by Based layers.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    **{f"{arch}-360m": _published(f"{arch}-360m", 600, 60_000) for arch in ("jrt", "based", "attn", "mamba")},
    **{f"{arch}-1.3b": _published(f"{arch}-1.3b", 1000, 100_000) for arch in ("jrt", "attn", "mamba")},
    "based-1.3b": {**_published("jrt-1.3b", 1000, 100_000), "objective": "ntp",
                   "model_overrides": {"mixers": _based_1b_mixers()}},
    **{f"{arch}-tiny": _tiny(f"{arch}-tiny") for arch in ("jrt", "based", "attn", "mamba")},
}


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: Any) -> Any:
    """Convert ``value`` (from YAML/JSON or a ``key=value`` string) to the type of field ``name``."""
    hints = _field_types()
    check_known_keys([name], hints, "training option")
    tp = hints[name]
    if typing.get_origin(tp) is dict:
        base, optional = dict, False
    elif typing.get_args(tp):
        args = typing.get_args(tp)
        optional = type(None) in args
        base = next(a for a in args if a is not type(None))
    else:
        base, optional = tp, False
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if not optional:
            raise ValueError(f"option {name!r} cannot be null")
        return None
    if base is dict:
        if isinstance(value, str):
            value = _parse_scalar(value, name)
        if not isinstance(value, dict):
            raise ValueError(f"option {name!r} expects a mapping, got {value!r}")
        return {k: _number_or_text(v) for k, v in value.items()}
    if isinstance(value, str) and base is not str:
        value = _parse_scalar(value, name)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ValueError(f"option {name!r} expects {getattr(base, '__name__', base)}, got {value!r}")


def _number_or_text(value: Any) -> Any:
    """YAML 1.1 reads ``1e-5`` (no dot) as a string: a string that is a plain number becomes that number."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _parse_scalar(text: str, name: str) -> Any:
    """A ``key=value`` override's value, read as YAML (JSON without pyyaml)."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml ships with transformers
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"override {name}={text!r} is not valid YAML ({_yaml_problem(err)})") from None


def _yaml_problem(err: Exception) -> str:
    """One line from a PyYAML error: the problem and its line/column."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(problem)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a dict of options."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not UTF-8 text (byte offset {err.start})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:  # pragma: no cover
            raise ValueError("reading YAML configs needs pyyaml: pip install pyyaml") from err
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path} is not valid YAML ({_yaml_problem(err)})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of options, got {type(data).__name__}")
    return data


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["lr=1e-3", "model_overrides={swa_window: 32}"]`` -> ``{"lr": "1e-3", ...}`` (values coerced later)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = value
    return out


def build_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Merge defaults, a preset, a config file and overrides into a validated :class:`TrainConfig`."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in TRAIN_PRESETS:
            raise ValueError(f"unknown training preset {preset!r}{did_you_mean(preset, TRAIN_PRESETS)}; "
                             f"known: {', '.join(sorted(TRAIN_PRESETS))}")
        values.update(TRAIN_PRESETS[preset])
    if config_file is not None:
        file_values = load_config_file(config_file)
        file_values.pop("preset", None)
        values.update(file_values)
    values.update(overrides or {})
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    return cfg.validate()


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved with :meth:`TrainConfig.to_dict` (unknown keys are an error)."""
    return TrainConfig(**{k: _coerce(k, v) for k, v in data.items()}).validate()
