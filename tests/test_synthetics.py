"""The synthetic recall lab: generator invariants, configs, lab models, trainer, grid resume, report, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from jrt.synthetics import data as D
from jrt.synthetics.config import ModelSpec, MQARTask, RunConfig, SDTask, TrainSpec
from jrt.synthetics.train import append_result, load_results, lr_at, run_grid, train_run

# --------------------------------------------------------------------------------------------------
# SD generator
# --------------------------------------------------------------------------------------------------


def _sd_sets(ids: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B of the first read: ``[1] A [2] B ...``."""
    return ids[:, 1 : 1 + n], ids[:, 2 + n : 2 + n + m]


@pytest.mark.parametrize("vocab", ["shared", "halves"])
@pytest.mark.parametrize("order", ["short_first", "long_first"])
def test_sd_exactly_one_shared_element(vocab, order):
    short, long, v = 3, 9, 40
    batch = D.make_sd(300, short, long, v, order=order, vocab=vocab, seed=1)
    n, m = (short, long) if order == "short_first" else (long, short)
    assert batch.input_ids.shape == (300, D.sd_seq_len(short, long))
    ids = batch.input_ids
    assert (ids[:, 0] == D.SEP_A).all() and (ids[:, 1 + n] == D.SEP_B).all() and (ids[:, -1] == D.SEP_QUERY).all()
    a, b = _sd_sets(ids, n, m)
    assert (a >= D.NUM_SPECIAL).all() and (b >= D.NUM_SPECIAL).all() and (ids < v).all()
    for row in range(300):
        sa, sb = set(a[row].tolist()), set(b[row].tolist())
        assert len(sa) == n and len(sb) == m  # no repeats inside a set
        shared = sa & sb
        assert len(shared) == 1
        assert batch.labels[row, -1].item() == shared.pop()
    if vocab == "halves":
        half = (v - D.NUM_SPECIAL) // 2
        assert (a < D.NUM_SPECIAL + half).all()
        answer = batch.labels[:, -1:]
        assert ((b >= D.NUM_SPECIAL + half) | (b == answer)).all()


def test_sd_labels_only_at_the_query_and_prefix_covers_the_sets():
    batch = D.make_sd(64, 4, 8, 60, seed=0)
    labelled = batch.labels != D.IGNORE_INDEX
    assert labelled[:, -1].all() and labelled.sum() == 64
    assert (batch.prefix_lengths == batch.seq_len - 1).all()


@pytest.mark.parametrize("order", ["short_first", "long_first"])
def test_sd_read_twice_repeats_exactly(order):
    once = D.make_sd(50, 4, 8, 60, order=order, seed=7)
    twice = D.make_sd(50, 4, 8, 60, order=order, read_twice=True, seed=7)
    body = once.seq_len - 1
    assert twice.seq_len == D.sd_seq_len(4, 8, read_twice=True) == 2 * body + 1
    assert torch.equal(twice.input_ids[:, :body], once.input_ids[:, :body])
    assert torch.equal(twice.input_ids[:, body : 2 * body], once.input_ids[:, :body])
    assert torch.equal(twice.labels[:, -1], once.labels[:, -1])
    assert (twice.labels[:, :-1] == D.IGNORE_INDEX).all()


def test_sd_deterministic_per_seed():
    a = D.make_sd(32, 4, 16, 100, seed=3)
    b = D.make_sd(32, 4, 16, 100, seed=3)
    c = D.make_sd(32, 4, 16, 100, seed=4)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_sd_bad_configs_are_clear():
    with pytest.raises(ValueError, match="larger than half"):
        D.make_sd(4, 4, 30, 60)
    with pytest.raises(ValueError, match="larger than half"):
        SDTask(short_size=4, long_size=40, vocab_size=60)
    with pytest.raises(ValueError, match="must not exceed"):
        D.make_sd(4, 8, 4, 60)
    with pytest.raises(ValueError, match="order"):
        D.make_sd(4, 2, 4, 60, order="sideways")
    with pytest.raises(ValueError, match="positive"):
        D.make_sd(0, 2, 4, 60)


# --------------------------------------------------------------------------------------------------
# MQAR generator
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("read_twice", [False, True])
def test_mqar_invariants(read_twice):
    n, p, t, v = 200, 6, 40, 68
    batch = D.make_mqar(n, p, t, v, read_twice=read_twice, seed=2)
    ctx = 2 * p * (2 if read_twice else 1)
    assert batch.input_ids.shape == (n, D.mqar_seq_len(p, t, read_twice))
    assert (batch.prefix_lengths == ctx).all()
    half = (v - D.NUM_SPECIAL) // 2
    keys, values = batch.input_ids[:, 0 : 2 * p : 2], batch.input_ids[:, 1 : 2 * p : 2]
    assert ((keys >= D.NUM_SPECIAL) & (keys < D.NUM_SPECIAL + half)).all()
    assert ((values >= D.NUM_SPECIAL + half) & (values < v)).all()
    labelled = batch.labels != D.IGNORE_INDEX
    assert (labelled.sum(1) == p).all()  # every key queried exactly once
    assert not labelled[:, :ctx].any()  # answers only in the query region
    assert (batch.input_ids[:, ctx:][~labelled[:, ctx:]] == D.PAD_ID).all()  # only queries there
    for row in range(n):
        kv = dict(zip(keys[row].tolist(), values[row].tolist()))
        assert len(kv) == p
        pos = labelled[row].nonzero().flatten()
        for i in pos.tolist():
            assert batch.labels[row, i].item() == kv[batch.input_ids[row, i].item()]
    if read_twice:
        assert torch.equal(batch.input_ids[:, : 2 * p], batch.input_ids[:, 2 * p : 4 * p])


def test_mqar_read_twice_keeps_the_queries_and_is_deterministic():
    once = D.make_mqar(40, 4, 32, 68, seed=5)
    twice = D.make_mqar(40, 4, 32, 68, read_twice=True, seed=5)
    assert torch.equal(twice.input_ids[:, 8:], once.input_ids)
    assert torch.equal(twice.labels[:, 8:], once.labels)
    again = D.make_mqar(40, 4, 32, 68, seed=5)
    assert torch.equal(again.input_ids, once.input_ids)
    assert not torch.equal(D.make_mqar(40, 4, 32, 68, seed=6).input_ids, once.input_ids)


def test_mqar_power_law_prefers_short_gaps():
    batch = D.make_mqar(2000, 4, 208, 68, seed=0)
    pos = (batch.labels[:, 8:] != D.IGNORE_INDEX).nonzero()[:, 1].float()
    assert pos.mean() < 0.4 * 200  # uniform slots would average ~100


def test_mqar_bad_configs_are_clear():
    with pytest.raises(ValueError, match="too short"):
        D.make_mqar(4, 8, 20, 68)
    with pytest.raises(ValueError, match="too short"):
        MQARTask(num_pairs=8, seq_len_single=20)
    with pytest.raises(ValueError, match="half the content vocabulary"):
        D.make_mqar(4, 40, 200, 68)


# --------------------------------------------------------------------------------------------------
# configs, schedule
# --------------------------------------------------------------------------------------------------


def test_run_config_round_trip_and_stable_id():
    cfg = RunConfig("mqar", "based_twice", MQARTask(read_twice=True), ModelSpec(arch="based"), TrainSpec(), 3)
    back = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.run_id() == cfg.run_id()
    other = RunConfig("mqar", "based_twice", MQARTask(read_twice=True), ModelSpec(arch="based"), TrainSpec(), 4)
    assert other.run_id() != cfg.run_id()
    with pytest.raises(ValueError, match="arch"):
        ModelSpec(arch="lstm")
    with pytest.raises(ValueError, match="experiment"):
        RunConfig("xyz", "based", SDTask(), ModelSpec())


def test_lr_schedule_warmup_then_cosine():
    kw = {"lr": 1.0, "warmup_steps": 10, "max_steps": 110, "min_lr_ratio": 0.1}
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# --------------------------------------------------------------------------------------------------
# lab models
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["attention", "based", "jrt_rnn", "mamba"])
def test_lab_models_forward_and_state(arch):
    from jrt.synthetics.models import build_model

    spec = ModelSpec(arch=arch, d_model=16, num_layers=2, num_heads=2, feature_dim=4, d_state=4)
    model = build_model(spec, vocab_size=40, seq_len=23)
    batch = D.make_sd(3, 4, 16, 40, seed=0)
    logits = model(batch.input_ids, prefix_lengths=batch.prefix_lengths)
    assert logits.shape == (3, 23, 40) and torch.isfinite(logits).all()
    state = model.state_size_bytes()
    if arch in ("based", "jrt_rnn"):
        d_feat = 1 + 4 + 16
        pla = 2 * (8 * d_feat + d_feat) * 4  # H * (Dv * D + D) float32
        conv = (3 - 1) * 2 * 16 * 4  # (kernel - 1) * expand * d float32 (the convolved branch)
        assert state == pla + conv
        assert model.state_size_bytes(1000) == state  # constant in the length
    elif arch == "attention":
        # the KV cache grows with the length: 23 more slots x (K and V float32 + int64 position)
        assert model.state_size_bytes(46) - state == 23 * (2 * 16 * 4 + 8)
    else:
        assert state == 2 * (32 * 4 + 32 * 3) * 4


def test_jrt_rnn_reads_the_prefix_non_causally():
    """With the prefix covering the sets, the first position already depends on a later prefix token."""
    from jrt.synthetics.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="jrt_rnn", d_model=16, num_layers=2, feature_dim=4), 40, 23).eval()
    batch = D.make_sd(1, 4, 16, 40, seed=0)
    changed = batch.input_ids.clone()
    changed[0, 10] = 39 if changed[0, 10] != 39 else 38
    out_a = model(batch.input_ids, batch.prefix_lengths)
    out_b = model(changed, batch.prefix_lengths)
    assert (out_a[0, 0] - out_b[0, 0]).abs().max() > 1e-6
    causal = build_model(ModelSpec(arch="based", d_model=16, num_layers=2, feature_dim=4), 40, 23).eval()
    assert torch.allclose(causal(batch.input_ids)[0, :10], causal(changed)[0, :10])


# --------------------------------------------------------------------------------------------------
# trainer and grid
# --------------------------------------------------------------------------------------------------


def _tiny_run(seed: int = 0, **train) -> RunConfig:
    warmup = min(10, train.get("max_steps", 400))
    spec = TrainSpec(**{"lr": 1e-2, "batch_size": 16, "max_steps": 400, "warmup_steps": warmup, "eval_every": 25,
                        "patience": 100, "num_train": 16, "num_valid": 16, "num_test": 16, "overfit": True,
                        "target_acc": 1.0, **train})
    return RunConfig("sd", "based", SDTask(short_size=2, long_size=3, vocab_size=24),
                     ModelSpec(arch="based", d_model=32, num_layers=2, feature_dim=4), spec, seed)


def test_trainer_overfits_a_tiny_sd_instance():
    result = train_run(_tiny_run(), progress=False)
    assert result["accuracy"] == 1.0
    assert result["stopped"] == "target"
    assert result["state_bytes"] > 0 and result["run_id"] == _tiny_run().run_id()
    assert json.loads(json.dumps(result))["accuracy"] == 1.0  # JSON-ready


def _fake_result(cfg: RunConfig, acc: float = 0.5) -> dict:
    return {"run_id": cfg.run_id(), "experiment": cfg.experiment, "model": cfg.model_name,
            "order": cfg.task.order_label, "config": cfg.to_dict(), "state_bytes": 100, "accuracy": acc,
            "steps": 1, "seconds": 0.0, "stopped": "max_steps"}


def test_interrupted_grid_resumes_and_skips_finished_runs(tmp_path, monkeypatch):
    import jrt.synthetics.train as T

    grid = [_tiny_run(seed=s, max_steps=2, eval_every=1) for s in range(3)]
    path = tmp_path / "results.jsonl"
    calls: list[int] = []

    def flaky(cfg, **kwargs):
        calls.append(cfg.seed)
        if cfg.seed == 1 and len(calls) == 2:
            raise KeyboardInterrupt  # the grid is interrupted during its second run
        return _fake_result(cfg)

    monkeypatch.setattr(T, "train_run", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, path, progress=False, log=None)
    assert [r["run_id"] for r in load_results(path)] == [grid[0].run_id()]
    with path.open("a") as fh:
        fh.write('{"torn": ')  # a crash mid-write leaves a torn line: it is skipped
    results = run_grid(grid + [grid[0]], path, progress=False, log=None)
    assert calls == [0, 1, 1, 2]  # the finished run 0 was not trained again
    assert [r["run_id"] for r in results] == [c.run_id() for c in grid]
    assert len(load_results(path)) == 3


def test_report_files(tmp_path):
    from jrt.synthetics.report import write_report

    results = []
    for state, (s_acc, l_acc, t_acc) in ((100, (0.9, 0.5, 0.88)), (400, (1.0, 0.95, 1.0))):
        base = RunConfig("sd", "based", SDTask(), ModelSpec(arch="based"))
        for order, acc in (("short_first", s_acc), ("long_first", l_acc), ("twice", t_acc)):
            r = _fake_result(base, acc)
            r.update(order=order, state_bytes=state, run_id=f"{state}{order}")
            results.append(r)
    for model, acc in (("based", 0.4), ("jrt_rnn", 0.7)):
        r = _fake_result(RunConfig("mqar", model, MQARTask(), ModelSpec(arch="based")), acc)
        r["run_id"] = model
        results.append(r)
    summary = write_report(results, tmp_path, wall_seconds=12.0)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["sd"][0].keys() >= {"model", "order", "state_bytes", "accuracy"}
    assert {r["order"] for r in saved["sd"]} == {"short_first", "long_first", "twice"}
    assert saved["mqar"][0].keys() >= {"model", "state_bytes", "accuracy"}
    claims = {c["claim"].split(":")[0]: c for c in summary["checks"]}
    gap = next(c for c in summary["checks"] if "short-first - long-first" in c["claim"] and "Based" in c["claim"])
    assert gap["measured"] == pytest.approx(40.0) and gap["holds"]
    assert any("MQAR" in k for k in claims)
    report = (tmp_path / "report.md").read_text()
    assert "![SD](sd_order.png)" in report and "| based | 100 |" in report
    for png in ("sd_order.png", "mqar.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_cli_reproduce_runs_a_grid_and_resumes(tmp_path, monkeypatch, capsys):
    import jrt.synthetics.cli as C
    from jrt.cli import main

    grid = [_tiny_run(max_steps=3, eval_every=3),
            RunConfig("mqar", "jrt_rnn", MQARTask(num_pairs=2, seq_len_single=8, vocab_size=24),
                      ModelSpec(arch="jrt_rnn", d_model=16, num_layers=2, feature_dim=2),
                      TrainSpec(max_steps=3, eval_every=3, warmup_steps=1, num_train=8, num_valid=8, num_test=8))]
    monkeypatch.setattr(C, "reproduce_grid", lambda name: grid)
    out = tmp_path / "out"
    assert main(["reproduce", "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "Set disjointness" in text and "MQAR" in text
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["sd"]) == 1 and len(summary["mqar"]) == 1 and summary["runs"] == 2
    assert main(["reproduce", "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    assert "resuming: 2 of 2" in capsys.readouterr().out
    assert len(load_results(out / "results.jsonl")) == 2
    assert main(["reproduce", "--out", str(out), "--report-only"]) == 0
    capsys.readouterr()
    assert main(["reproduce", "--out", str(out), "--workers", "1", "--no-progress", "--only", "mqar",
                 "--max-steps", "2"]) == 0  # other steps: a new run, the finished ones untouched
    assert "resuming" not in capsys.readouterr().out
    assert len(load_results(out / "results.jsonl")) == 3


def test_cli_reproduce_user_errors(tmp_path, capsys):
    from jrt.cli import main

    assert main(["reproduce", "--out", str(tmp_path), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert main(["reproduce", "--out", str(tmp_path / "none"), "--report-only"]) == 2
    assert main(["reproduce", "--device", "tpu", "--out", str(tmp_path)]) == 2
    assert main(["reproduce", "--max-steps", "0", "--out", str(tmp_path)]) == 2


def test_append_result_is_one_line_per_run(tmp_path):
    path = tmp_path / "r.jsonl"
    append_result(path, {"run_id": "a", "x": 1})
    append_result(path, {"run_id": "b", "x": 2})
    assert [r["run_id"] for r in load_results(path)] == ["a", "b"]
    assert load_results(tmp_path / "missing.jsonl") == []


@pytest.mark.slow
def test_grid_with_worker_processes(tmp_path):
    grid = [_tiny_run(seed=s, max_steps=5, eval_every=5) for s in range(2)]
    results = run_grid(grid, tmp_path / "r.jsonl", workers=2, progress=False, log=None)
    assert [r["run_id"] for r in results] == [c.run_id() for c in grid]
    assert len(load_results(tmp_path / "r.jsonl")) == 2


@pytest.mark.slow
def test_grid_on_a_local_ray_instance(tmp_path):
    pytest.importorskip("ray")
    grid = [_tiny_run(seed=s, max_steps=3, eval_every=3) for s in range(2)]
    results = run_grid(grid, tmp_path / "r.jsonl", ray_address="local", threads=1, progress=False, log=None)
    assert [r["run_id"] for r in results] == [c.run_id() for c in grid]
    assert len(load_results(tmp_path / "r.jsonl")) == 2
