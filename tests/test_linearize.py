"""Linearizing a tiny random Llama teacher with grouped-query attention (``jrt.linearize``, ``jrt linearize``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import jrt  # noqa: F401  (registers the Auto classes)
from jrt.cli import main
from jrt.paths import data_path

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from jrt.linearize.train import (  # noqa: E402
    LinearizeConfig,
    Linearizer,
    build_student,
    read_delta,
)
from jrt.training.prepare import write_token_dataset  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
GPT2 = data_path("tokenizers", "gpt2")


def tiny_teacher(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50304, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256)
    return LlamaForCausalLM(config).eval()


def save_teacher(folder: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer

    tiny_teacher(seed).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(GPT2)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    if not GPT2.is_dir():
        pytest.skip("the offline GPT-2 tokenizer is not available")
    return save_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 500, (int(torch.randint(50, 300, (1,), generator=g)),), generator=g).tolist()
            for _ in range(200)]
    out = tmp_path_factory.mktemp("data")
    write_token_dataset(docs, out, vocab_size=50257, eos_id=50256, val_fraction=0.05)
    return out


def student(mode: str, window: int = 4, seed: int = 0) -> torch.nn.Module:
    model = build_student(tiny_teacher(seed), mode, feature_dim=4, window=window, mask_token_id=50257)
    with torch.no_grad():  # trained-looking feature maps and gates
        for layer in model.model.layers:
            layer.self_attn.feature_q.add_(0.1 * torch.randn_like(layer.self_attn.feature_q))
            if layer.self_attn.window_gate is not None:
                layer.self_attn.window_gate.normal_()
    return model.eval()


def test_teacher_mode_equals_the_teacher():
    teacher = tiny_teacher()
    model = build_student(teacher, "based", feature_dim=4, window=4, mask_token_id=None)
    ids = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        out = model.model(ids, transfer=True)
        logits = model.lm_head(out.last_hidden_state)
        ref = teacher(ids).logits
    assert (logits - ref).abs().max() < 1e-4
    assert len(out.transfer_losses) == 2 and out.attentions is None


@pytest.mark.parametrize("mode", ["based", "jrt"])
@pytest.mark.parametrize("window", [0, 4])
def test_incremental_decoding_equals_full_forward(mode, window):
    model = student(mode, window)
    ids = torch.randint(0, 1000, (2, 21))
    with torch.no_grad():
        full = model(ids, use_cache=False, prefix_lengths=7 if mode == "jrt" else None).logits
        cache = model.make_cache(2)
        parts = [model(ids[:, :7], cache=cache).logits, model(ids[:, 7:12], cache=cache).logits]
        parts += [model(ids[:, i: i + 1], cache=cache).logits for i in range(12, 21)]
    inc = torch.cat(parts, dim=1)
    assert ((inc - full).abs().max() / full.abs().max()) < 1e-4


def test_state_size_constant():
    model = student("jrt", window=4)
    sizes = []
    for t in (16, 512):
        cache = model.make_cache(1)
        with torch.no_grad():
            model(torch.randint(0, 1000, (1, t)), cache=cache)
            model(torch.randint(0, 1000, (1, 1)), cache=cache)
        sizes.append(cache.nbytes())
    assert sizes[0] == sizes[1] == model.state_size_bytes(1)


@pytest.mark.parametrize("mode", ["based", "jrt"])
def test_left_padded_batch_equals_single_prompts(mode):
    model = student(mode, window=4)
    prompts = [torch.randint(0, 1000, (n,)) for n in (13, 6)]
    width = 13
    ids = torch.full((2, width), 50256)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = p, 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, use_cache=False).logits
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=50256)
        for b, p in enumerate(prompts):
            alone = model(p[None], use_cache=False).logits[0]
            assert (batch[b, width - len(p):] - alone).abs().max() < 1e-4
            gen_alone = model.generate(p[None], max_new_tokens=5, do_sample=False, pad_token_id=50256)
            assert torch.equal(gen[b, width:], gen_alone[0, len(p):])


def linearize_cli(teacher_dir, data_dir, out, *extra: str) -> int:
    return main(["linearize", "--teacher", str(teacher_dir), "--data", str(data_dir), "--output", str(out),
                 "--feature-dim", "4", "--window", "8", "--seq-len", "32", "--batch-size", "2", "--no-progress",
                 *extra])


def test_transfer_loss_falls_and_apply_rebuilds_bitwise(teacher_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    assert linearize_cli(teacher_dir, data_dir, out, "--mode", "jrt", "--max-tokens", str(64 * 40)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    transfer = [r["transfer_loss"] for r in rows if "transfer_loss" in r]
    assert len(transfer) == 20 and sum(transfer[-3:]) < sum(transfer[:3])
    assert any("mlm_loss" in r for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == 64 * 40 and summary["val_ppl_student"] > 1
    tensors, meta = read_delta(out / "delta.safetensors")
    assert any("lora_A" in k for k in tensors) and any("feature_q" in k for k in tensors)
    assert main(["linearize", "apply", "--teacher", str(teacher_dir), "--delta", str(out / "delta.safetensors"),
                 "--output", str(tmp_path / "applied")]) == 0
    a = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "applied").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert type(model).__name__ == "LinearizedForCausalLM" and model.config.mode == "jrt"
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def _subprocess(teacher_dir, data_dir, out, *extra, env=None):
    cmd = [sys.executable, "-m", "jrt", "linearize", "--teacher", str(teacher_dir), "--data", str(data_dir),
           "--output", str(out), "--mode", "based", "--feature-dim", "4", "--window", "8", "--seq-len", "32",
           "--batch-size", "2", "--max-tokens", str(64 * 10), "--save-every", "2", "--threads", "1",
           "--no-progress", *extra]
    full_env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)


def test_resume_after_kill_continues_exactly(teacher_dir, data_dir, tmp_path):
    straight = _subprocess(teacher_dir, data_dir, tmp_path / "a")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _subprocess(teacher_dir, data_dir, tmp_path / "b", env={"JRT_TRAIN_KILL_AT_STEP": "6"})
    assert killed.returncode != 0  # SIGKILLed while writing step 6 (after the switch to fine-tuning at step 5)
    resumed = _subprocess(teacher_dir, data_dir, tmp_path / "b", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, _ = read_delta(tmp_path / "a" / "delta.safetensors")
    b, _ = read_delta(tmp_path / "b" / "delta.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    rows_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(r).items() if k != "elapsed_s"} for r in rows_a]
    assert strip == [{k: v for k, v in json.loads(r).items() if k != "elapsed_s"} for r in rows_b]


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err  # may also hold transformers' loading bars and warnings
    lines = [line for line in err.splitlines() if line.startswith("jrt linearize: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_input_is_one_line_error(teacher_dir, data_dir, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    capsys.readouterr()
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100)).save_pretrained(gpt2)
    err = _one_line_error(capsys, linearize_cli(gpt2, data_dir, tmp_path / "o1", "--max-tokens", "640"))
    assert "llama" in err and "qwen2" in err and "mistral" in err
    _one_line_error(capsys, linearize_cli(teacher_dir, tmp_path / "missing", tmp_path / "o2", "--max-tokens", "640"))
    err = _one_line_error(capsys, linearize_cli(teacher_dir, data_dir, tmp_path / "o3", "--max-tokens", "640",
                                                "--window", "64"))
    assert "window" in err
    out = tmp_path / "run"
    assert linearize_cli(teacher_dir, data_dir, out, "--max-tokens", str(64 * 2)) == 0
    capsys.readouterr()
    other = save_teacher(tmp_path / "other", seed=1)
    err = _one_line_error(capsys, main(["linearize", "apply", "--teacher", str(other), "--delta",
                                        str(out / "delta.safetensors"), "--output", str(tmp_path / "x")]))
    assert "another teacher" in err


def test_linearizer_refuses_existing_run_without_resume(teacher_dir, data_dir, tmp_path):
    cfg = LinearizeConfig(teacher=str(teacher_dir), feature_dim=4, window=8, seq_len=32, batch_size=2,
                          max_tokens=64 * 2)
    Linearizer(cfg, data_dir, tmp_path, progress=False).run()
    with pytest.raises(ValueError, match="--resume"):
        Linearizer(cfg, data_dir, tmp_path, progress=False)


def test_decode_bench_of_teacher_and_student(tmp_path):
    """`jrt bench decode --pretrained`: the teacher's KV cache grows with the context, the student's state does not
    (no timing assertions)."""
    from jrt.bench import decode

    tiny_teacher().save_pretrained(tmp_path / "teacher")
    student("based").save_pretrained(tmp_path / "student")
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--pretrained", f"teacher={tmp_path / 'teacher'}", str(tmp_path / "student"),
                 "--contexts", "16", "64", "--batches", "1", "--steps", "2", "--warmup", "0",
                 "--json", str(out)]) == 0
    rows = {(r["model"], r["context"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("teacher", 16), ("teacher", 64), ("student", 16), ("student", 64)}
    # KV cache: 2 (k, v) x 2 layers x 2 KV heads x 8 dims x T x 4 bytes
    assert rows[("teacher", 64)]["state_bytes"] - rows[("teacher", 16)]["state_bytes"] == 2 * 2 * 2 * 8 * 48 * 4
    assert rows[("student", 16)]["state_bytes"] == rows[("student", 64)]["state_bytes"] > 0
    with pytest.raises(ValueError, match="given twice"):
        decode.parse_pretrained(["a=x", "a=y"])


def test_held_out_perplexity_of_teacher_and_students(teacher_dir, data_dir, tmp_path, capsys):
    """`jrt linearize perplexity`: the teacher and each student on the same validation windows, with bootstrap
    intervals; equal to the training-time perplexity function on the same windows."""
    from jrt.linearize.train import perplexity
    from jrt.training.data import TokenDataset

    for mode in ("based", "jrt"):
        student(mode).save_pretrained(tmp_path / mode)
    out = tmp_path / "ppl"
    assert main(["linearize", "perplexity", "--teacher", str(teacher_dir), "--data", str(data_dir), "--output",
                 str(out), "--student", str(tmp_path / "based"), "--student", f"J={tmp_path / 'jrt'}",
                 "--seq-len", "32", "--windows", "5", "--no-progress"]) == 0
    result = json.loads((out / "perplexity.json").read_text())
    assert set(result) == {"teacher", "based", "J"} and result["J"]["prefix"] and not result["based"]["prefix"]
    windows = TokenDataset(data_dir, 32, "val").batch(list(range(5)))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "jrt")
    assert result["J"]["ppl"] == pytest.approx(perplexity(model, windows, prefix=True), rel=1e-5)
    for r in result.values():
        assert r["windows"] == 5 and r["ci"][0] <= r["ppl"] <= r["ci"][1]
    assert "teacher: perplexity" in capsys.readouterr().out
    assert main(["linearize", "perplexity", "--teacher", str(teacher_dir), "--data", str(data_dir), "--output",
                 str(out), "--windows", "0"]) == 2
