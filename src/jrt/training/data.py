"""Token data for pretraining: ``jrt data prepare`` (text -> packed token shards) and the training reader.

Output layout of :func:`prepare_dataset` (``DIR``)::

    DIR/train_00000.bin, train_00001.bin, ...   raw little-endian uint16 (vocab <= 65536) or uint32 tokens
    DIR/val_00000.bin, ...                       the validation split, same format
    DIR/index.json                               dtype, vocab size, EOS id, tokenizer, shards and token counts
    DIR/COMPLETE                                 written last; holds the fingerprint of the inputs/options

Documents are tokenized without special tokens and each is followed by the EOS id, then packed back to back
(a document may continue in the next shard). Document ``i`` (in input order) goes to the validation split
when ``i % round(1 / val_fraction) == 0``, so the split is deterministic, even when streaming. Re-running with
the same inputs and options is a no-op when ``COMPLETE`` matches; a folder without it (a killed run) is
cleaned of its shard files and redone.

:class:`TokenDataset` memory-maps the shards as one stream and cuts it into windows of ``seq_len + 1``
tokens (input ``window[:-1]``, next-token targets ``window[1:]``), non-overlapping but for the one shared
token. :class:`BatchSampler` orders them by a per-epoch seeded permutation and gives each rank its slice of
every global batch, so the data position is a pure function of the optimizer step.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing as mp
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jrt.paths import data_path

INDEX_FILE = "index.json"
COMPLETE_FILE = "COMPLETE"
FORMAT_VERSION = 1
DOC_SPLITS = ("file", "paragraph", "line", "jsonl")


# ---------------------------------------------------------------------------------------------- inputs


def resolve_tokenizer_path(name: str) -> str:
    """``gpt2`` (or ``""``) means the offline GPT-2 tokenizer in the data folder; anything else is passed to
    ``AutoTokenizer.from_pretrained`` (a local folder or a Hub name)."""
    if name in ("", "gpt2"):
        path = data_path("tokenizers", "gpt2")
        if path.is_dir():
            return str(path)
    return name


def load_tokenizer(name: str) -> Any:
    """A Hugging Face tokenizer (fast when available)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_tokenizer_path(name))
    except OSError as err:
        raise ValueError(f"cannot load tokenizer {name!r}: {err}") from err


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Local files and globs -> sorted file list; ``hf:...`` dataset specs are passed through."""
    out: list[str] = []
    for spec in inputs:
        if spec.startswith("hf:"):
            out.append(spec)
            continue
        matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        if not matches:
            raise FileNotFoundError(f"no input file matches {spec!r}")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                out.extend(sorted(str(f) for f in p.rglob("*") if f.is_file()))
            else:
                out.append(str(p))
    if not out:
        raise ValueError("no input files given")
    return out


def iter_documents(inputs: list[str], doc_split: str = "paragraph", text_field: str = "text") -> Iterator[str]:
    """Yield documents (non-empty strings) from files or ``hf:NAME[:CONFIG][@SPLIT]`` datasets.

    ``doc_split``: ``file`` (a file is one document), ``paragraph`` (blank-line separated blocks),
    ``line`` (one document per line) or ``jsonl`` (one JSON object per line, text in ``text_field``).
    Files ending in ``.jsonl`` are always read as JSON lines. Datasets are streamed.
    """
    if doc_split not in DOC_SPLITS:
        raise ValueError(f"doc_split must be one of {DOC_SPLITS}, got {doc_split!r}")
    for spec in inputs:
        if spec.startswith("hf:"):
            yield from _iter_hf_dataset(spec[3:], text_field)
            continue
        if spec.endswith(".jsonl") or doc_split == "jsonl":
            with open(spec, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{spec}:{lineno}: not valid JSON: {err}") from err
                    text = obj.get(text_field) if isinstance(obj, dict) else None
                    if not isinstance(text, str):
                        raise ValueError(f"{spec}:{lineno}: no string field {text_field!r}")
                    if text.strip():
                        yield text
            continue
        with open(spec, encoding="utf-8", errors="replace") as fh:
            if doc_split == "file":
                text = fh.read()
                if text.strip():
                    yield text
            elif doc_split == "line":
                for line in fh:
                    if line.strip():
                        yield line.rstrip("\n")
            else:
                block: list[str] = []
                for line in fh:
                    if line.strip():
                        block.append(line)
                    elif block:
                        yield "".join(block).rstrip("\n")
                        block = []
                if block:
                    yield "".join(block).rstrip("\n")


def _iter_hf_dataset(spec: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as err:
        raise ValueError("reading a Hugging Face dataset needs `pip install datasets`") from err
    split = "train"
    if "@" in spec:
        spec, split = spec.rsplit("@", 1)
    name, _, config = spec.partition(":")
    if Path(name).is_dir():  # a dataset saved with save_to_disk
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
    for row in ds:
        text = row.get(text_field)
        if not isinstance(text, str):
            raise ValueError(f"dataset {name}: rows have no string field {text_field!r}")
        if text.strip():
            yield text


# ---------------------------------------------------------------------------------------------- tokenizing

_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    torch.set_num_threads(1)
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_path)
    _WORKER_TOKENIZER.model_max_length = 2**62  # documents are packed, not fed whole: no length warning


def _encode_batch(docs: list[str]) -> list[list[int]]:
    return _WORKER_TOKENIZER(docs, add_special_tokens=False)["input_ids"]


def _batched(it: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


class _ShardWriter:
    """Append tokens to ``{prefix}_{i:05d}.bin`` files of at most ``shard_tokens`` tokens."""

    def __init__(self, out: Path, prefix: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.prefix, self.dtype, self.shard_tokens = out, prefix, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._fh = None
        self._in_shard = 0
        self.docs = 0

    def _open(self) -> None:
        name = f"{self.prefix}_{len(self.shards):05d}.bin"
        self._fh = open(self.out / name, "wb")
        self.shards.append({"file": name, "tokens": 0})
        self._in_shard = 0

    def write(self, tokens: np.ndarray) -> None:
        self.docs += 1
        pos = 0
        while pos < len(tokens):
            if self._fh is None or self._in_shard >= self.shard_tokens:
                self.close_shard()
                self._open()
            take = min(len(tokens) - pos, self.shard_tokens - self._in_shard)
            self._fh.write(tokens[pos: pos + take].astype(self.dtype, copy=False).tobytes())
            self._in_shard += take
            self.shards[-1]["tokens"] += take
            pos += take

    def close_shard(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)


def _fingerprint(inputs: list[str], options: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(options, sort_keys=True).encode())
    for spec in inputs:
        h.update(spec.encode())
        if not spec.startswith("hf:"):
            st = os.stat(spec)
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _clean_output(out: Path) -> None:
    """Remove what a previous (interrupted) prepare wrote: only files of our own naming scheme."""
    for f in out.iterdir():
        if f.is_file() and (
            (f.suffix == ".bin" and f.name.startswith(("train_", "val_"))) or f.name in (INDEX_FILE, COMPLETE_FILE)
        ):
            f.unlink()


def is_complete(out: str | Path) -> bool:
    """Whether ``out`` holds a finished :func:`prepare_dataset` output."""
    out = Path(out)
    return (out / COMPLETE_FILE).is_file() and (out / INDEX_FILE).is_file()


def prepare_dataset(
    inputs: list[str],
    output: str | Path,
    tokenizer: str = "gpt2",
    *,
    workers: int | None = None,
    val_fraction: float = 0.01,
    shard_tokens: int = 100_000_000,
    doc_split: str = "paragraph",
    text_field: str = "text",
    batch_docs: int = 256,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into packed shards in ``output``; returns the index (also in ``index.json``).

    ``workers`` processes tokenize batches of ``batch_docs`` documents in order (``None``: up to 4, or the
    number of CPUs). Raises ``ValueError`` for an empty corpus, a corpus with fewer than two documents (no
    train/validation split) or an output written from other inputs/options (unless ``overwrite``).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if shard_tokens < 1 or batch_docs < 1:
        raise ValueError("shard_tokens and batch_docs must be >= 1")
    files = expand_inputs(inputs)
    tok_path = resolve_tokenizer_path(tokenizer)
    tok = load_tokenizer(tokenizer)
    vocab_size = len(tok)
    eos = tok.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer!r} has no EOS token to separate documents")
    dtype = np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")
    period = max(2, round(1.0 / val_fraction))
    options = {"tokenizer": tok_path, "val_period": period, "shard_tokens": shard_tokens, "doc_split": doc_split,
               "text_field": text_field, "format": FORMAT_VERSION}
    fingerprint = _fingerprint(files, options)

    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if is_complete(out):
        done = (out / COMPLETE_FILE).read_text().strip()
        if done == fingerprint:
            return read_index(out)
        if not overwrite:
            raise ValueError(
                f"output {out} already holds a tokenized dataset made from other inputs or options; "
                "choose another folder or pass --overwrite"
            )
    _clean_output(out)

    train = _ShardWriter(out, "train", dtype, shard_tokens)
    val = _ShardWriter(out, "val", dtype, shard_tokens)
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    docs = _batched(iter_documents(files, doc_split, text_field), batch_docs)
    total_bytes = sum(os.path.getsize(f) for f in files if not f.startswith("hf:"))
    from tqdm.auto import tqdm

    bar = tqdm(total=total_bytes or None, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    doc_index = 0
    max_id = -1
    eos_arr = np.array([eos], dtype=np.int64)

    def consume(batch_docs_text: list[str], encoded: list[list[int]]) -> None:
        nonlocal doc_index, max_id
        for text, ids in zip(batch_docs_text, encoded):
            arr = np.concatenate([np.asarray(ids, dtype=np.int64), eos_arr])
            max_id = max(max_id, int(arr.max()))
            (val if doc_index % period == 0 else train).write(arr)
            doc_index += 1
            bar.update(len(text.encode("utf-8")))

    try:
        if n_workers <= 1:
            _init_worker(tok_path)
            for batch in docs:
                consume(batch, _encode_batch(batch))
        else:
            # fork is much cheaper than spawn (no re-import of torch/transformers); the parent has not run the
            # tokenizer yet, so the Rust tokenizer's thread pool is not inherited in a used state.
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(n_workers, initializer=_init_worker, initargs=(tok_path,)) as pool:
                pending: list[tuple[list[str], Any]] = []
                for batch in docs:
                    pending.append((batch, pool.apply_async(_encode_batch, (batch,))))
                    while len(pending) > 2 * n_workers:
                        b, res = pending.pop(0)
                        consume(b, res.get())
                for b, res in pending:
                    consume(b, res.get())
    finally:
        train.close_shard()
        val.close_shard()
        bar.close()

    if doc_index == 0 or train.tokens + val.tokens == 0:
        _clean_output(out)
        raise ValueError(f"the corpus is empty: no non-empty documents in {', '.join(files)}")
    if train.docs == 0:
        _clean_output(out)
        raise ValueError(
            f"the corpus has only {doc_index} document(s): at least 2 are needed for a train/validation "
            "split (use --doc-split paragraph or line for a single file)"
        )
    index = {
        "format": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "max_token_id": max_id,
        "eos_id": int(eos),
        "tokenizer": tok_path,
        "doc_split": doc_split,
        "val_period": period,
        "train": {"shards": train.shards, "tokens": train.tokens, "documents": train.docs},
        "val": {"shards": val.shards, "tokens": val.tokens, "documents": val.docs},
        "inputs": files,
    }
    _atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=2))
    _atomic_write_text(out / COMPLETE_FILE, fingerprint + "\n")
    return index


def write_token_dataset(
    documents: Iterable[Iterable[int]],
    output: str | Path,
    vocab_size: int,
    eos_id: int,
    *,
    val_fraction: float = 0.01,
    shard_tokens: int = 100_000_000,
) -> dict[str, Any]:
    """Write already tokenized documents (EOS appended to each) in the :func:`prepare_dataset` format, with the
    same deterministic validation split; for corpora tokenized elsewhere and for tests."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id {eos_id} outside the vocabulary of {vocab_size}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    _clean_output(out)
    dtype = np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")
    period = max(2, round(1.0 / val_fraction))
    train = _ShardWriter(out, "train", dtype, shard_tokens)
    val = _ShardWriter(out, "val", dtype, shard_tokens)
    n, max_id = 0, -1
    for doc in documents:
        arr = np.concatenate([np.asarray(list(doc), dtype=np.int64), np.array([eos_id], dtype=np.int64)])
        if arr.min() < 0 or arr.max() >= vocab_size:
            raise ValueError(f"document {n} has token ids outside [0, {vocab_size})")
        max_id = max(max_id, int(arr.max()))
        (val if n % period == 0 else train).write(arr)
        n += 1
    train.close_shard()
    val.close_shard()
    if train.docs == 0:
        _clean_output(out)
        raise ValueError(f"need at least 2 documents for a train/validation split, got {n}")
    index = {
        "format": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": vocab_size, "max_token_id": max_id,
        "eos_id": eos_id, "tokenizer": None, "doc_split": "pretokenized", "val_period": period,
        "train": {"shards": train.shards, "tokens": train.tokens, "documents": train.docs},
        "val": {"shards": val.shards, "tokens": val.tokens, "documents": val.docs}, "inputs": [],
    }
    _atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=2))
    _atomic_write_text(out / COMPLETE_FILE, "pretokenized\n")
    return index


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
        index = json.loads((data_dir / INDEX_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{data_dir / INDEX_FILE} is corrupt: {err}") from err
    if index.get("format") != FORMAT_VERSION:
        raise ValueError(f"{data_dir} has data format {index.get('format')}, expected {FORMAT_VERSION}")
    return index


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
    "load_tokenizer",
    "prepare_dataset",
    "read_index",
    "resolve_tokenizer_path",
    "write_token_dataset",
]
