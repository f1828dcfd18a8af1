"""JSON-lines files, read and appended the same way everywhere (eval results, synthetic-grid results, training
metrics).

One torn-line rule: a crash or a full disk can cut the *last* line of a file short (no trailing newline). Such a
line, if it does not parse, is dropped on reading (and, with ``repair=True``, cut from the file); a last line that
parses is kept even without its newline. Any other line that is not valid JSON is an error naming the file and
the line number: it was not written by an interrupted append, so silently skipping it would hide lost records.

Appends always start on a fresh line (a newline is written first when the file does not end with one), and each
call flushes and fsyncs, so a record acknowledged by :func:`append_jsonl` survives a crash.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


class JSONLError(ValueError):
    """A malformed JSON-lines file (the message names the file and the line)."""


def read_jsonl(
    path: str | os.PathLike, *, objects: bool = True, required: Sequence[str] = (), repair: bool = False
) -> list[Any]:
    """Every record of a JSON-lines file (a missing file has none; blank lines are skipped).

    Args:
        path: the file.
        objects: require every record to be a JSON object (``{...}``).
        required: keys every record must have (implies ``objects``).
        repair: cut a torn last line from the file, so that the next append continues cleanly.

    Raises:
        JSONLError: a line other than a torn last one is not valid JSON (or not an object with ``objects``),
            or lacks a ``required`` key, e.g. ``results.jsonl line 3: not valid JSON (Expecting value)``.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    records: list[Any] = []
    pos, lineno, good = 0, 0, 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        last = end < 0
        raw = data[pos:] if last else data[pos:end]
        lineno += 1
        nxt = len(data) if last else end + 1
        if raw.strip():
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                if last:
                    break  # torn final line: an interrupted append
                detail = err.reason if isinstance(err, UnicodeDecodeError) else err.msg
                raise JSONLError(f"{path} line {lineno}: not valid JSON ({detail}); fix or remove that line") from None
            if (objects or required) and not isinstance(record, dict):
                raise JSONLError(
                    f"{path} line {lineno}: expected a JSON object, got {type(record).__name__} "
                    f"{_short(raw)}; fix or remove that line"
                )
            missing = [k for k in required if k not in record]
            if missing:
                raise JSONLError(f"{path} line {lineno}: record lacks {', '.join(map(repr, missing))}; "
                                 "fix or remove that line")
            records.append(record)
        pos = good = nxt
    if repair and good < len(data):
        with path.open("r+b") as fh:
            fh.truncate(good)
            fh.flush()
            os.fsync(fh.fileno())
    return records


def append_jsonl(path: str | os.PathLike, records: dict[str, Any] | Iterable[dict[str, Any]]) -> None:
    """Append one record (a dict) or several as JSON lines, starting on a fresh line; flushed and fsynced.

    The parent folder is created when missing.
    """
    path = Path(path)
    rows = [records] if isinstance(records, dict) else list(records)
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with path.open("a+b") as fh:
        if fh.tell() > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                text = "\n" + text
        fh.seek(0, os.SEEK_END)
        fh.write(text.encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Replace ``path`` by ``records`` atomically (a temporary file renamed over it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _short(raw: bytes, limit: int = 40) -> str:
    text = raw.decode("utf-8", errors="replace").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."
