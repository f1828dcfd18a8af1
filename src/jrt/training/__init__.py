"""Language-model pretraining for JRT-RNN and its baselines (``jrt train``, ``jrt data prepare``).

- :mod:`~jrt.training.prepare`: tokenization into packed token shards (``jrt data prepare``);
- :mod:`~jrt.training.data`: reading the shards (memory-mapped), the deterministic per-rank sampler;
- :mod:`~jrt.training.objective`: prefix masked-LM + next-token objective, ``L = L_ntp + w * L_mlm``;
- :mod:`~jrt.training.optim`: AdamW groups, warmup + cosine schedule;
- :mod:`~jrt.training.checkpoint`: atomic checkpoints with exact resume;
- :mod:`~jrt.training.trainer`: the loop (one CPU process, or DDP / FSDP2 under torchrun);
- :mod:`~jrt.training.config`: the run configuration and published presets.
"""

from jrt.training.config import TRAIN_PRESETS, TrainConfig, build_config
from jrt.training.data import BatchSampler, TokenDataset, read_index
from jrt.training.objective import ObjectiveBatch, make_batch, objective_loss
from jrt.training.optim import WarmupCosineSchedule, build_optimizer, param_groups
from jrt.training.prepare import prepare_dataset

__all__ = [
    "TRAIN_PRESETS",
    "BatchSampler",
    "ObjectiveBatch",
    "TokenDataset",
    "TrainConfig",
    "WarmupCosineSchedule",
    "build_config",
    "build_optimizer",
    "make_batch",
    "objective_loss",
    "param_groups",
    "prepare_dataset",
    "read_index",
]
