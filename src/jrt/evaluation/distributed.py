"""Evaluation across processes and devices (``torchrun --nproc_per_node N -m jrt.evaluation ...``).

Every rank loads the model on its own device, takes every ``world_size``-th example of each task (by its
position in the task's example list, so the split does not depend on what is already done), and appends its
generations to its own ``results.rank<K>.jsonl``. A rank resumes from its own file; the set of finished
examples is read from every results file of the folder, so a run restarted with another number of processes
redoes nothing. After a barrier each rank reads all files, and rank 0 writes the summary. The summary is
exactly that of one process, because generations do not depend on the batch a row was decoded in (float32).

The rank and world size come from the variables ``torchrun`` (or ``accelerate launch``) sets: ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

RESULTS_STEM = "results"


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the run: ``rank`` in ``[0, world_size)``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> RankInfo:
        """From ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (one process when they are unset)."""
        try:
            rank = int(os.environ.get("RANK", "0"))
            world = int(os.environ.get("WORLD_SIZE", "1"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as err:
            raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {err}") from None
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
        return cls(rank, world, local)

    def results_name(self) -> str:
        """``results.jsonl`` for one process, ``results.rank<K>.jsonl`` for rank ``K`` of several."""
        return f"{RESULTS_STEM}.jsonl" if self.world_size == 1 else f"{RESULTS_STEM}.rank{self.rank}.jsonl"

    def owns(self, index: int) -> bool:
        """Whether the example at position ``index`` of its task belongs to this rank."""
        return index % self.world_size == self.rank

    def device(self, device: str) -> str:
        """The device of this rank: ``cuda`` becomes ``cuda:<local_rank>`` when several processes run."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.world_size > 1 else device


def results_files(output: str | Path) -> list[Path]:
    """Every results file of a run folder: ``results.jsonl`` and the ranks' ``results.rank<K>.jsonl``."""
    output = Path(output)
    files = [output / f"{RESULTS_STEM}.jsonl"] if (output / f"{RESULTS_STEM}.jsonl").is_file() else []
    ranked = sorted(output.glob(f"{RESULTS_STEM}.rank*.jsonl"), key=lambda p: int(p.stem.rsplit("rank", 1)[1])
                    if p.stem.rsplit("rank", 1)[1].isdigit() else -1)
    return files + ranked


def init(info: RankInfo, device: str) -> None:
    """Join the process group (gloo on CPU, NCCL on CUDA) when several processes run; no-op for one."""
    if info.world_size == 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def barrier(info: RankInfo) -> None:
    """Wait for every rank (no-op for one process)."""
    if info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def shutdown(info: RankInfo) -> None:
    """Leave the process group, if this module joined one."""
    if info.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
