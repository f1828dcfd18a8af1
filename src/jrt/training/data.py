"""Reading prepared token data for pretraining (what ``jrt data prepare`` writes, see :mod:`jrt.training.prepare`).

Layout of a prepared folder ``DIR``::

    DIR/train_00000.bin, train_00001.bin, ...   raw little-endian uint16 (vocab <= 65536) or uint32 tokens
    DIR/val_00000.bin, ...                       the validation split, same format
    DIR/index.json                               dtype, vocab size, EOS id, tokenizer, shards and token counts
    DIR/COMPLETE                                 written last; holds the fingerprint of the inputs/options

:class:`TokenDataset` memory-maps the shards as one stream and cuts it into windows of ``seq_len + 1``
tokens (input ``window[:-1]``, next-token targets ``window[1:]``), non-overlapping but for the one shared
token. :class:`BatchSampler` orders them by a per-epoch seeded permutation and gives each rank its slice of
every global batch, so the data position is a pure function of the optimizer step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

INDEX_FILE = "index.json"
COMPLETE_FILE = "COMPLETE"
FORMAT_VERSION = 1
#: Token dtypes of the shard files.
TOKEN_DTYPES = ("uint16", "uint32")


def is_complete(out: str | Path) -> bool:
    """Whether ``out`` holds a finished :func:`prepare_dataset` output."""
    out = Path(out)
    return (out / COMPLETE_FILE).is_file() and (out / INDEX_FILE).is_file()


def read_index(data_dir: str | Path) -> dict[str, Any]:
    """The ``index.json`` of a complete prepared dataset; ``ValueError`` if it is missing or half-written."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder not found: {data_dir}")
    if not is_complete(data_dir):
        raise ValueError(
            f"{data_dir} is not a complete tokenized dataset (no {COMPLETE_FILE}/{INDEX_FILE}); "
            "run `jrt data prepare` (again) to finish it"
        )
    try:
        index = json.loads((data_dir / INDEX_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{data_dir / INDEX_FILE} is corrupt: {err}") from err
    if not isinstance(index, dict) or index.get("format") != FORMAT_VERSION:
        found = index.get("format") if isinstance(index, dict) else None
        raise ValueError(f"{data_dir} has data format {found}, expected {FORMAT_VERSION}")
    _check_index(index, data_dir / INDEX_FILE)
    return index


def _check_index(index: Any, path: Path) -> None:
    """``ValueError`` naming ``path`` and the field when a (hand-edited) index holds a bad value."""
    def bad(field: str, expected: str, value: Any) -> ValueError:
        return ValueError(f"{path} is corrupt: {field} must be {expected}, got {value!r}; "
                          "run `jrt data prepare --overwrite` to rebuild it")

    if not isinstance(index, dict):
        raise bad("the file", "a JSON object", type(index).__name__)
    if index.get("dtype") not in TOKEN_DTYPES:
        raise bad("dtype", " or ".join(TOKEN_DTYPES), index.get("dtype"))
    for name in ("vocab_size", "eos_id", "max_token_id"):
        value = index.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "vocab_size" else 0):
            raise bad(name, "an int >= " + ("1" if name == "vocab_size" else "0"), value)
    for split in ("train", "val"):
        part = index.get(split)
        shards = part.get("shards") if isinstance(part, dict) else None
        if not isinstance(shards, list):
            raise bad(f"{split}.shards", "a list", shards)
        for i, shard in enumerate(shards):
            name = shard.get("file") if isinstance(shard, dict) else None
            if not isinstance(name, str) or Path(name).name != name or not name:
                raise bad(f"{split}.shards[{i}].file", "a file name inside the folder", name)
            tokens = shard.get("tokens")
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
                raise bad(f"{split}.shards[{i}].tokens", "an int >= 0", tokens)


# ---------------------------------------------------------------------------------------------- reading


class TokenStream:
    """The shards of one split, memory-mapped and addressed as one token stream of length ``len(self)``."""

    def __init__(self, data_dir: str | Path, split: str = "train"):
        index = read_index(data_dir)
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.index = index
        self.dtype = np.dtype(index["dtype"])
        self.maps: list[np.memmap] = []
        for shard in index[split]["shards"]:
            path = Path(data_dir) / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise ValueError(f"shard {path} is missing or has the wrong size (expected {expected} bytes)")
            self.maps.append(np.memmap(path, dtype=self.dtype, mode="r"))
        self.offsets = np.cumsum([0] + [len(m) for m in self.maps])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as int64 (``[length]``)."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"range [{start}, {start + length}) outside the stream of {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        shard = int(np.searchsorted(self.offsets, pos, side="right")) - 1
        while filled < length:
            local = pos - int(self.offsets[shard])
            take = min(length - filled, len(self.maps[shard]) - local)
            out[filled: filled + take] = self.maps[shard][local: local + take]
            filled += take
            pos += take
            shard += 1
        return out


class TokenDataset:
    """Windows of ``seq_len + 1`` tokens (stride ``seq_len``) over a split: ``ds[i] -> LongTensor [seq_len+1]``."""

    def __init__(self, data_dir: str | Path, seq_len: int, split: str = "train"):
        self.stream = TokenStream(data_dir, split)
        self.seq_len = seq_len
        self.num_sequences = (len(self.stream) - 1) // seq_len if len(self.stream) > 1 else 0
        if self.num_sequences < 1:
            raise ValueError(
                f"the {split} split of {data_dir} has {len(self.stream)} tokens: too few for one sequence of "
                f"{seq_len} + 1 tokens"
            )

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num_sequences:
            raise IndexError(i)
        return torch.from_numpy(self.stream.read(i * self.seq_len, self.seq_len + 1))

    def batch(self, indices: list[int]) -> torch.Tensor:
        """``[len(indices), seq_len + 1]`` int64."""
        return torch.stack([self[i] for i in indices]) if indices else torch.empty(0, self.seq_len + 1,
                                                                                    dtype=torch.long)


@dataclass
class BatchSampler:
    """Deterministic global batches: step ``s`` uses positions ``[s*G, (s+1)*G)`` of an endless sequence of
    per-epoch permutations (seed ``seed + epoch``) of ``num_sequences`` indices; rank ``r`` of ``world`` takes
    the ``r``-th contiguous slice of ``G / world`` of them."""

    num_sequences: int
    global_batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.global_batch_size % self.world_size:
            raise ValueError(f"global batch {self.global_batch_size} not divisible by world size {self.world_size}")
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng(self.seed + epoch).permutation(self.num_sequences)}
        return self._perm_cache[epoch]

    def global_indices(self, step: int) -> list[tuple[int, int]]:
        """``(epoch, sequence index)`` pairs of the whole global batch of ``step``."""
        start = step * self.global_batch_size
        out = []
        for pos in range(start, start + self.global_batch_size):
            epoch, j = divmod(pos, self.num_sequences)
            out.append((epoch, int(self._perm(epoch)[j])))
        return out

    def rank_indices(self, step: int) -> list[tuple[int, int]]:
        per = self.global_batch_size // self.world_size
        return self.global_indices(step)[self.rank * per: (self.rank + 1) * per]

    def position(self, step: int) -> dict[str, int]:
        """The data position after ``step`` optimizer steps (saved in checkpoints)."""
        pos = step * self.global_batch_size
        return {"sequences_consumed": pos, "epoch": pos // self.num_sequences,
                "index_in_epoch": pos % self.num_sequences}


__all__ = [
    "BatchSampler",
    "TokenDataset",
    "TokenStream",
    "is_complete",
    "read_index",
]
