"""``jrt bench generate`` smoke test on a tiny local Llama: JSON rows, baseline, same generations (no timings)."""

from __future__ import annotations

import argparse
import json

import pytest

from jrt.bench import generate as bench
from recall_fixtures import tiny_llama, write_recall_files


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    return parser.parse_args(["generate", *argv])


def test_generate_bench_writes_rows(tmp_path, tok) -> None:
    folder = tmp_path / "llama"
    tiny_llama().save_pretrained(folder)
    tok.save_pretrained(folder)
    recall = write_recall_files(tmp_path / "recall", n=4)
    out = tmp_path / "gen.json"
    args = _parse(["--model", str(folder), "--task", "squad", "--limit", "4", "--batch-sizes", "3",
                   "--dtypes", "float32", "--max-new-tokens", "4", "--round-tokens", "2", "--data-dir", str(recall),
                   "--json", str(out)])
    assert args.func(args) == 0
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert [(r["dtype"], r["batch_size"]) for r in rows] == [("float32", 1), ("float32", 3)]
    assert rows[0]["speedup"] == 1.0 and rows[0]["round_tokens"] is None and rows[1]["round_tokens"] == 2
    for row in rows:
        assert row["n"] == 4 and row["seconds"] > 0 and 0 <= row["contains"] <= 100
        assert row["same_as_batch1"] == 4  # float32, left padding: batching changes no generation
    assert payload["config"]["task"] == "squad" and payload["config"]["mean_prompt_tokens"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--limit", "0"], "--limit"),
    (["--batch-sizes", "0"], "batch sizes"),
    (["--round-tokens", "-1"], "--round-tokens"),
])
def test_generate_bench_bad_arguments(argv, message) -> None:
    args = _parse(argv)
    with pytest.raises(ValueError, match=message):
        args.func(args)
