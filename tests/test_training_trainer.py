"""The trainer in one process: Llama-style, Based and JRT-RNN models learn; checkpoints load with
``from_pretrained``; resume is exact; bad checkpoints and vocabulary mismatches give clear errors."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from jrt.training import checkpoint as ckpt
from jrt.training.config import build_config
from jrt.training.distributed import DistInfo
from jrt.training.metrics import read_metrics
from jrt.training.prepare import write_token_dataset
from jrt.training.trainer import Trainer, train

VOCAB, EOS, MODEL_VOCAB, MASK = 250, 249, 256, 255

SMALL_MODEL = {
    "attn-tiny": {"vocab_size": MODEL_VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "bos_token_id": EOS, "eos_token_id": EOS},
    "mamba-tiny": {"vocab_size": MODEL_VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "bos_token_id": EOS,
                   "eos_token_id": EOS, "pad_token_id": EOS},
    "jrt-tiny": {"vocab_size": MODEL_VOCAB, "mask_token_id": MASK, "hidden_size": 32, "intermediate_size": 64,
                 "bos_token_id": EOS, "eos_token_id": EOS, "pad_token_id": EOS},
    "based-tiny": {"vocab_size": MODEL_VOCAB, "mask_token_id": MASK, "hidden_size": 32, "intermediate_size": 64,
                   "bos_token_id": EOS, "eos_token_id": EOS, "pad_token_id": EOS},
}


@pytest.fixture(autouse=True)
def _restore_torch_settings():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def markov_docs(n: int = 300, seed: int = 0) -> list[list[int]]:
    """Learnable documents: arithmetic progressions mod 240 with a few step sizes."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        start, step, length = rng.integers(0, 240), rng.choice([1, 3, 7]), rng.integers(20, 80)
        docs.append([int((start + step * j) % 240) for j in range(length)])
    return docs


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens")
    write_token_dataset(markov_docs(), path, vocab_size=VOCAB, eos_id=EOS, val_fraction=0.1)
    return path


def tiny_config(model: str = "jrt-tiny", **kw):
    values = dict(model=model, model_overrides=SMALL_MODEL[model], seq_len=32, prefix_len=16, global_batch_size=4,
                  micro_batch_size=2, lr=1e-2, min_lr=1e-3, warmup_steps=2, max_steps=24, eval_interval=12,
                  eval_batches=2, save_interval=12, log_interval=4, num_threads=1, keep_last=2)
    values.update(kw)
    return build_config(None, None, values)


@pytest.mark.parametrize("model", ["attn-tiny", "mamba-tiny", "jrt-tiny", "based-tiny"])
def test_training_reduces_validation_loss_and_exports(model, tiny_data, tmp_path):
    out = tmp_path / "run"
    summary = train(tiny_config(model), tiny_data, out, progress=False, tensorboard=False)
    assert summary["step"] == 24
    rows = read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 4, 8, 12, 16, 20, 24]
    for r in train_rows:
        assert {"step", "loss", "lr", "tokens_per_s", "ntp_loss", "grad_norm"} <= set(r)
        assert np.isfinite(r["loss"])
    assert [r["step"] for r in val_rows] == [0, 12, 24]
    assert val_rows[-1]["val_loss"] < val_rows[0]["val_loss"]
    if model == "jrt-tiny":
        assert "mlm_loss" in train_rows[0] and "val_mlm_loss" in val_rows[0]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.5
    # checkpoints: keep_last=2 of the saves at 12 and 24; the export loads with from_pretrained
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [12, 24]
    from transformers import AutoModelForCausalLM

    import jrt.models  # noqa: F401  (registers the JRT classes with the Auto factories)

    loaded = AutoModelForCausalLM.from_pretrained(out / "model")
    again = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step_00000024")
    x = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, again(input_ids=x).logits)


def test_gradient_accumulation_matches_one_big_micro_batch(tiny_data, tmp_path):
    losses = []
    for micro in (4, 1, 3):  # 3 does not divide the batch of 4: the trainer uses micro-batches of 2
        out = tmp_path / f"m{micro}"
        train(tiny_config(micro_batch_size=micro, max_steps=4, log_interval=1), tiny_data, out, progress=False,
              tensorboard=False)
        losses.append([r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r])
    for other in losses[1:]:
        rel = np.abs(np.array(losses[0]) - np.array(other)) / np.array(losses[0])
        assert rel.max() < 1e-4
    trainer = _trainer(tiny_config(micro_batch_size=3, max_steps=4), tiny_data, tmp_path / "m")
    assert (trainer.micro, trainer.accum) == (2, 2)


def _trainer(cfg, data, out, resume=False):
    return Trainer(cfg, data, out, DistInfo(), resume=resume, progress=False, tensorboard=False)


def test_resume_in_process_is_exact(tiny_data, tmp_path):
    cfg = tiny_config(max_steps=6, deterministic=False)
    a = _trainer(cfg, tiny_data, tmp_path / "a")
    losses_a = [a.train_step(s)["loss"] for s in range(6)]
    b = _trainer(cfg, tiny_data, tmp_path / "b")
    losses_b = [b.train_step(s)["loss"] for s in range(3)]
    b.save(3)
    c = _trainer(cfg, tiny_data, tmp_path / "b", resume=True)
    assert c.start_step == 3
    losses_b += [c.train_step(s)["loss"] for s in range(3, 6)]
    assert losses_a == losses_b
    for (name, p), q in zip(a.raw.named_parameters(), c.raw.parameters()):
        assert torch.equal(p, q), name


def test_bad_checkpoints_give_clear_errors(tiny_data, tmp_path, capsys):
    cfg = tiny_config(max_steps=2, save_interval=1, eval_interval=100, keep_last=1)
    out = tmp_path / "run"
    train(cfg, tiny_data, out, progress=False, tensorboard=False)
    with pytest.raises(ValueError, match="already has checkpoints"):
        _trainer(cfg, tiny_data, out)
    with pytest.raises(ValueError, match="incompatible.*seq_len"):
        _trainer(tiny_config(max_steps=2, seq_len=48), tiny_data, out, resume=True)
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    (latest / "optimizer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="no intact checkpoint.*corrupt.*optimizer.pt"):
        _trainer(cfg, tiny_data, out, resume=True)
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt.*model.safetensors"):
        _trainer(cfg, tiny_data, out, resume=True)
    state = json.loads((latest / "trainer_state.json").read_text())
    (latest / "trainer_state.json").write_text(json.dumps(state)[:-20])
    with pytest.raises(ValueError, match="corrupt.*trainer_state"):
        _trainer(cfg, tiny_data, out, resume=True)
    for field, value in (("step", -1), ("scheduler", [1]), ("num_sequences", "many")):
        (latest / "trainer_state.json").write_text(json.dumps({**state, field: value}))
        with pytest.raises(ValueError, match=f"trainer_state.json field {field} must be"):
            _trainer(cfg, tiny_data, out, resume=True)


def test_corrupt_latest_checkpoint_falls_back_to_an_intact_one(tiny_data, tmp_path, capsys):
    cfg = tiny_config(max_steps=3, save_interval=1, eval_interval=100, keep_last=3)
    out = tmp_path / "run"
    train(cfg, tiny_data, out, progress=False, tensorboard=False)
    weights = out / "checkpoints" / "step_00000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a kill or a full disk truncated the newest weights
    trainer = _trainer(cfg, tiny_data, out, resume=True)
    assert trainer.start_step == 2
    assert "falling back to an older checkpoint" in capsys.readouterr().out
    (out / ".tmp-model-99999").mkdir()  # left by a kill during the final export
    train(cfg, tiny_data, out, resume=True, progress=False, tensorboard=False)
    assert not list(out.glob(".tmp-*")) and (out / "model" / "config.json").is_file()


def test_tokenizer_model_vocab_mismatch(tmp_path):
    data = tmp_path / "gpt2ish"
    write_token_dataset([[50000, 1, 2], [3, 4, 50100]] * 20, data, vocab_size=50257, eos_id=50256)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        _trainer(tiny_config("attn-tiny"), data, tmp_path / "o")
    # a mask id that is a real token of the data
    small = tmp_path / "small"
    write_token_dataset(markov_docs(40), small, vocab_size=VOCAB, eos_id=EOS)
    overrides = {**SMALL_MODEL["jrt-tiny"], "mask_token_id": 5}
    with pytest.raises(ValueError, match="mask token id 5"):
        _trainer(tiny_config("jrt-tiny", model_overrides=overrides), small, tmp_path / "o2")


def _cli(argv):
    from jrt.training.cli import register

    parser = argparse.ArgumentParser(prog="jrt")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_train_and_bad_input(tiny_data, tmp_path, capsys):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(tiny_config("based-tiny", max_steps=3).to_dict()))
    assert _cli(["train", "--config", str(cfg_file), "--data", str(tiny_data), "--output", str(tmp_path / "o"),
                 "--no-progress", "--max-steps", "2", "eval_interval=1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["val_loss"] is not None
    with pytest.raises(ValueError, match="prefix_len"):
        _cli(["train", "--config", str(cfg_file), "--data", str(tiny_data), "--output", str(tmp_path / "p"),
              "prefix_len=32"])
    with pytest.raises(ValueError, match="not a complete tokenized dataset"):
        _cli(["train", "--config", str(cfg_file), "--data", str(tmp_path), "--output", str(tmp_path / "q")])


def test_throughput_rows(tiny_data):
    from jrt.training.throughput import measure_throughput

    rows = measure_throughput(["based-tiny", "jrt-tiny", "jrt-tiny@chunk"], str(tiny_data), steps=1, warmup=0,
                              progress=False, overrides={"seq_len": 32, "prefix_len": 16, "global_batch_size": 2,
                                                         "micro_batch_size": 2, "num_threads": 1})
    assert [r["preset"] for r in rows] == ["based-tiny", "jrt-tiny", "jrt-tiny@chunk"]
    assert rows[0]["ratio"] == 1.0 and all(r["tokens_per_s"] > 0 for r in rows)
    assert rows[1]["parameters"] > rows[0]["parameters"]  # JRT-RNN adds the encoder key/value projections


def test_jrt_command_exit_codes(tiny_data, tmp_path, capsys):
    import jrt.cli

    code = jrt.cli.main(["train", "--preset", "jrt-tiny", "--data", str(tiny_data), "--output", str(tmp_path / "o"),
                         "prefix_len=256"])
    assert code == 2 and "prefix_len" in capsys.readouterr().err
    assert jrt.cli.main(["data", "prepare", "--input", str(tmp_path / "none*.txt"), "--output",
                         str(tmp_path / "d")]) == 2


def test_jrt_model_with_ntp_objective_reads_causally(tiny_data, tmp_path):
    tr = _trainer(tiny_config("jrt-tiny", objective="ntp"), tiny_data, tmp_path / "o")
    assert tr.takes_prefix  # the JRT model gets the objective's prefix lengths: zeros for next-token only
    x = torch.randint(0, VOCAB, (2, 32))
    y = x.clone()
    y[:, 20] = (y[:, 20] + 1) % VOCAB
    prefix = tr._batch(torch.cat([x, x[:, :1]], 1), [(0, 0), (0, 1)]).prefix_lengths
    assert prefix.tolist() == [0, 0]
    with torch.no_grad():
        a, b = tr._forward(tr.raw, x, prefix), tr._forward(tr.raw, y, prefix)
    assert torch.equal(a[:, :20], b[:, :20])  # no position sees a later token
    assert not torch.equal(a[:, 20:], b[:, 20:])


def test_time_limit_stops_with_checkpoint_and_resume_continues(tiny_data, tmp_path):
    out = tmp_path / "run"
    summary = train(tiny_config("based-tiny", max_minutes=1e-4, max_steps=10), tiny_data, out, progress=False,
                    tensorboard=False)
    assert 1 <= summary["step"] < 10 and summary["val_loss"] is not None
    assert ckpt.latest_checkpoint(out / "checkpoints").name == f"step_{summary['step']:08d}"
    assert (out / "model" / "config.json").is_file()
    summary = train(tiny_config("based-tiny", max_steps=10), tiny_data, out, resume=True, progress=False,
                    tensorboard=False)
    assert summary["step"] == 10
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 10


def test_bf16_autocast_training(tiny_data, tmp_path):
    summary = train(tiny_config("jrt-tiny", precision="bf16", max_steps=4, eval_interval=4, save_interval=4),
                    tiny_data, tmp_path / "o", progress=False, tensorboard=False)
    assert summary["step"] == 4 and np.isfinite(summary["loss"]) and np.isfinite(summary["val_loss"])


def test_tensorboard_scalars(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_config("based-tiny", max_steps=4, eval_interval=2, log_interval=1), tiny_data, tmp_path / "o",
          progress=False, tensorboard=True)
    acc = EventAccumulator(str(tmp_path / "o" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "val/val_loss"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
