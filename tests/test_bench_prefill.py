"""``jrt bench prefill`` smoke test on a CPU: the table, the JSON rows and the method registry (no timing
assertions)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from jrt.bench import prefill
from jrt.bench.prefill_methods import METHODS, TIMERS, Shape, build, methods_of


def test_prefill_cli_prints_the_table_and_writes_rows(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    prefill.add_parser(parser.add_subparsers())
    out = tmp_path / "prefill.json"
    args = parser.parse_args(["prefill", "--lengths", "32,64", "--heads", "2", "--head-dim", "8", "--feature-dim",
                              "4", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "sdpa ms" in text and "sdpa/jrt_prompt" in text and "matrix multiply in this run" in text
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["length"]) for r in rows] == [(m, t) for t in (32, 64) for m in prefill.METHODS]
    assert all(r["seconds"] > 0 and r["gflops"] > 0 for r in rows)


def test_registry_backends_and_errors():
    assert methods_of("ops") == prefill.METHODS
    assert set(methods_of("kernels")) == set(METHODS) and set(TIMERS) == {"cpu", "cuda"}
    case = build("jrt_rnn", "ops", Shape(1, 2, 16, 4, 8, torch.device("cpu"), torch.float32, "chunk"))
    o, state = case.run()
    assert o.shape == (1, 16, 2, 8) and state is None and case.tokens == 16 and case.flops > 0
    with pytest.raises(ValueError, match="unknown ops prefill method"):
        build("based", "ops", Shape(1, 2, 16, 4, 8, torch.device("cpu"), torch.float32))
    with pytest.raises(ValueError, match="unknown method"):
        prefill.run_prefill([32], methods=("nope",))
