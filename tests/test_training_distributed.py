"""Multi-process behaviour of the trainer, run as real subprocesses:

- a run SIGKILLed while writing checkpoint ``k`` and resumed ends with bitwise the same weights and the same
  loss curve as an uninterrupted run (CPU, float32, deterministic mode);
- ``torchrun --nproc_per_node 2`` with the gloo backend (DDP, and FSDP2 in the slow set) gives the loss curve of
  one process with the same global batch (relative difference < 1e-4 per step).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from jrt.training import checkpoint as ckpt
from jrt.training.config import build_config
from jrt.training.metrics import read_metrics
from jrt.training.prepare import write_token_dataset

VOCAB, EOS = 250, 249
MODEL = {"vocab_size": 256, "mask_token_id": 255, "hidden_size": 32, "intermediate_size": 64,
         "bos_token_id": EOS, "eos_token_id": EOS, "pad_token_id": EOS}


def _docs(n: int = 200, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int((rng.integers(0, 240) + 3 * j) % 240) for j in range(rng.integers(20, 80))] for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens")
    write_token_dataset(_docs(), path, vocab_size=VOCAB, eos_id=EOS, val_fraction=0.1)
    return path


def _config_file(path, **kw):
    values = dict(model="jrt-tiny", model_overrides=MODEL, seq_len=32, prefix_len=16, global_batch_size=4,
                  micro_batch_size=2, lr=1e-2, min_lr=1e-3, warmup_steps=2, max_steps=8, log_interval=1,
                  eval_interval=4, eval_batches=2, save_interval=1, keep_last=3, num_threads=1, deterministic=True)
    values.update(kw)
    path.write_text(json.dumps(build_config(None, None, values).to_dict()))
    return path


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(ckpt.KILL_ENV, None)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _train_cmd(cfg, data, out, *extra):
    return [sys.executable, "-m", "jrt.training.train", "--config", str(cfg), "--data", str(data), "--output",
            str(out), "--no-progress", "--device", "cpu", *extra]


def _curve(out):
    rows = read_metrics(out / "metrics.jsonl")
    drop = {"tokens_per_s", "elapsed_s"}
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def test_sigkill_and_resume_is_bitwise_exact(data, tmp_path):
    cfg = _config_file(tmp_path / "cfg.json")
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = subprocess.run(_train_cmd(cfg, data, full), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(_train_cmd(cfg, data, killed), env=_env(**{ckpt.KILL_ENV: "5"}), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    # died while writing step 5: steps 2-4 are the complete checkpoints (keep_last=3), step 5 a temp folder
    assert [s for s, _ in ckpt.list_checkpoints(killed / "checkpoints")] == [2, 3, 4]
    assert (killed / "checkpoints" / ".tmp-step_00000005").is_dir()
    r = subprocess.run(_train_cmd(cfg, data, killed, "--resume"), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    a = load_file(str(full / "checkpoints" / "step_00000008" / "model.safetensors"))
    b = load_file(str(killed / "checkpoints" / "step_00000008" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _curve(full) == _curve(killed)
    opt_a = torch.load(full / "checkpoints" / "step_00000008" / "optimizer.pt", weights_only=True)
    opt_b = torch.load(killed / "checkpoints" / "step_00000008" / "optimizer.pt", weights_only=True)
    for i, st in opt_a["state"].items():
        assert torch.equal(st["exp_avg_sq"], opt_b["state"][i]["exp_avg_sq"])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_process_gloo_matches_single_process(mode, data, tmp_path):
    cfg = _config_file(tmp_path / "cfg.json", max_steps=4, save_interval=4, eval_interval=2, deterministic=False,
                       distributed=mode)
    single, double = tmp_path / "single", tmp_path / "double"
    r = subprocess.run(_train_cmd(cfg, data, single), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "jrt.training.train",
           *_train_cmd(cfg, data, double)[3:]]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 2, grad accumulation 1" in r.stdout + r.stderr
    one, two = _curve(single), _curve(double)
    assert [row["step"] for row in one] == [row["step"] for row in two]
    for a, b in zip(one, two):
        for key in ("loss", "ntp_loss", "mlm_loss", "val_loss", "val_ntp_loss"):
            if key in a:
                assert abs(a[key] - b[key]) / abs(a[key]) < 1e-4, (a["step"], key, a[key], b[key])
    # rank 0 alone wrote the outputs
    assert len([r for r in read_metrics(double / "metrics.jsonl") if "loss" in r]) == 4
