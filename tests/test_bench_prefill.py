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
    assert [(r["method"], r["length"]) for r in rows] == [(m, t) for t in (32, 64) for m in prefill.DEFAULT_METHODS]
    assert all(r["seconds"] > 0 and r["gflops"] > 0 for r in rows)


def test_registry_backends_and_errors():
    assert methods_of("ops") == prefill.METHODS
    assert set(methods_of("kernels")) == set(METHODS) - {"jrt_prompt_products"} and set(TIMERS) == {"cpu", "cuda"}
    case = build("jrt_rnn", "ops", Shape(1, 2, 16, 4, 8, torch.device("cpu"), torch.float32, "chunk"))
    o, state = case.run()
    assert o.shape == (1, 16, 2, 8) and state is None and case.tokens == 16 and case.flops > 0
    with pytest.raises(ValueError, match="unknown ops prefill method"):
        build("based", "ops", Shape(1, 2, 16, 4, 8, torch.device("cpu"), torch.float32))
    with pytest.raises(ValueError, match="unknown method"):
        prefill.run_prefill([32], methods=("nope",))


def test_prefill_backward_mode_and_fraction_of_matmul(tmp_path, capsys):
    """--backward times forward + backward of every method; every row carries its fraction of the run's matrix
    multiply, and the table prints it."""
    parser = argparse.ArgumentParser()
    prefill.add_parser(parser.add_subparsers())
    out = tmp_path / "prefill.json"
    args = parser.parse_args(["prefill", "--lengths", "32", "--heads", "2", "--head-dim", "8", "--feature-dim", "4",
                              "--repeats", "1", "--warmup", "0", "--backward", "--json", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "forward + backward" in text and "% mm" in text
    result = json.loads(out.read_text())
    assert result["config"]["backward"] is True
    mm = result["machine"]["matmul_gflops"]
    for r in result["rows"]:
        assert r["fraction_of_matmul"] == pytest.approx(r["gflops"] / mm)


def test_products_only_method(capsys):
    """jrt_prompt_products: the chunked form's products alone, with the FLOP model of jrt_prompt; no sdpa ratio."""
    result = prefill.run_prefill([128], heads=2, head_dim=8, feature=4, methods=("sdpa", "jrt_prompt_products"),
                                 repeats=1, warmup=0, progress=None)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["jrt_prompt_products"]["gflops"] > 0
    assert "sdpa/jrt_prompt_products" not in prefill.format_table(result)
    with pytest.raises(ValueError, match="forward products only"):
        prefill.run_prefill([32], methods=("jrt_prompt_products",), backward=True, progress=None)


@pytest.mark.parametrize("method", ["sdpa", "jrt_prompt", "jrt_rnn"])
def test_backward_cases_fill_gradients_and_count_flops(method):
    shape = Shape(1, 2, 16, 4, 8, torch.device("cpu"), torch.float32, "chunk")
    forward = build(method, "ops", shape)
    shape.backward = True
    both = build(method, "ops", shape)
    out = both.run()
    assert out.requires_grad and both.flops == pytest.approx(
        forward.flops * (3.5 if method == "sdpa" else 3.0))


def test_flop_model_of_the_chunked_algorithm():
    """45,045 FLOPs per token at F = 16, Dv = 64 (state update and read in the compressed space, intra-chunk
    lower triangles of C = 64), and 19,890 per prefix token."""
    assert prefill.linear_attention_flops(1, 1, 1000, 16, 64) == 45_045 * 1000
    assert prefill.prefix_flops(1, 1, 1000, 500, 16, 64) == 45_045 * 1000 + 19_890 * 500


def test_methods_with_their_own_implementation_side_by_side(capsys):
    """``METHOD@IMPL`` times one implementation beside another in one run; the table and the ratios name both."""
    result = prefill.run_prefill([96], heads=2, head_dim=8, feature=4, repeats=1, warmup=0, progress=None,
                                 methods=("sdpa", "jrt_prompt", "jrt_prompt@chunk", "jrt_rnn@reference"))
    assert [r["method"] for r in result["rows"]] == ["sdpa", "jrt_prompt", "jrt_prompt@chunk", "jrt_rnn@reference"]
    table = prefill.format_table(result)
    assert "jrt_prompt@chunk ms" in table and "sdpa/jrt_prompt@chunk" in table and "sdpa/jrt_rnn@reference" in table
    with pytest.raises(ValueError, match="unknown impl"):
        prefill.run_prefill([32], methods=("jrt_prompt@bogus",), progress=None)
    with pytest.raises(ValueError, match="unknown method"):
        prefill.run_prefill([32], methods=("nope@chunk",), progress=None)
