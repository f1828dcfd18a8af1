"""``jrt bench decode`` smoke test: the JSON rows and the state accounting (no timing assertions)."""

from __future__ import annotations

import argparse
import json

from jrt.bench import decode


def test_decode_bench_writes_rows(tmp_path):
    parser = argparse.ArgumentParser()
    decode.add_parser(parser.add_subparsers())
    out = tmp_path / "decode.json"
    args = parser.parse_args([
        "decode", "--contexts", "16", "48", "--batches", "1", "2", "--hidden-size", "32", "--layers", "3",
        "--heads", "2", "--steps", "1", "--warmup", "0", "--json", str(out),
    ])
    assert args.func(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8
    for row in rows:
        assert set(row) >= {"model", "context", "batch", "seconds_per_token", "state_bytes"}
        assert row["seconds_per_token"] > 0
    state = {(r["model"], r["context"], r["batch"]): r["state_bytes"] for r in rows}
    # constant JRT state, growing KV cache (2 * layers * B * L * d * 4 bytes)
    assert state[("jrt", 16, 2)] == state[("jrt", 48, 2)] == 2 * state[("jrt", 16, 1)]
    assert state[("llama", 48, 1)] == decode.llama_cache_bytes(32, 3, 48, 1)


def test_llama_rows_over_the_memory_limit_are_skipped(tmp_path):
    parser = argparse.ArgumentParser()
    decode.add_parser(parser.add_subparsers())
    args = parser.parse_args([
        "decode", "--contexts", "16", "--batches", "1", "--hidden-size", "32", "--layers", "2", "--heads", "2",
        "--steps", "1", "--warmup", "0", "--models", "llama", "--max-cache-gb", "0", "--json",
        str(tmp_path / "d.json"),
    ])
    assert args.func(args) == 0
    (row,) = json.loads((tmp_path / "d.json").read_text())["rows"]
    assert "skipped" in row
