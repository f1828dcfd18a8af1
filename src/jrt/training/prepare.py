"""``jrt data prepare``: text -> packed token shards (the format :mod:`jrt.training.data` reads).

Documents are tokenized without special tokens and each is followed by the EOS id, then packed back to back
(a document may continue in the next shard). Document ``i`` (in input order) goes to the validation split
when ``i % round(1 / val_fraction) == 0``, so the split is deterministic, even when streaming. Re-running with
the same inputs and options is a no-op when ``COMPLETE`` matches; a folder without it (a killed run) is
cleaned of its shard files and redone.

Text rule, the same for every kind of local input (plain text in any ``--doc-split``, JSON lines): a file must
be UTF-8 without NUL bytes. Anything else (undecodable bytes, a binary file) is an error naming the file and the
byte offset, never a silent replacement.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing as mp
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jrt.paths import data_path
from jrt.training.data import COMPLETE_FILE, FORMAT_VERSION, INDEX_FILE, is_complete, read_index

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
        lines = read_text_lines(spec)
        if spec.endswith(".jsonl") or doc_split == "jsonl":
            for lineno, line in enumerate(lines, 1):
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
        elif doc_split == "file":
            text = "".join(lines)
            if text.strip():
                yield text
        elif doc_split == "line":
            for line in lines:
                if line.strip():
                    yield line.rstrip("\n")
        else:
            block: list[str] = []
            for line in lines:
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block).rstrip("\n")
                    block = []
            if block:
                yield "".join(block).rstrip("\n")


def read_text_lines(path: str | Path) -> Iterator[str]:
    """The lines of a UTF-8 text file (newlines kept), streamed.

    Raises:
        ValueError: undecodable bytes or a NUL byte (a binary file), naming the file and the byte offset.
    """
    offset = 0
    with open(path, "rb") as fh:
        for raw in fh:
            nul = raw.find(b"\0")
            if nul >= 0:
                raise ValueError(f"{path}: NUL byte at byte offset {offset + nul}: not a text file")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at byte offset "
                                 f"{offset + err.start})") from None
            offset += len(raw)
            yield line.replace("\r\n", "\n")


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
