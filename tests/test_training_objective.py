"""Objective masks and loss, optimiser groups, schedule and training configs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jrt.training.config import TRAIN_PRESETS, build_config, config_from_dict, parse_overrides
from jrt.training.objective import IGNORE, ObjectiveBatch, make_batch, objective_loss
from jrt.training.optim import WarmupCosineSchedule, build_optimizer, param_groups

MASK = 99


def _windows(B: int = 4, T: int = 64, vocab: int = 90, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(seed))


def test_prefix_mlm_positions_and_targets():
    w = _windows()
    b = make_batch(w, objective="prefix_mlm", prefix_len=24, mask_prob=0.5, mask_token_id=MASK, seed=3)
    T = 64
    pos = torch.arange(T)
    assert b.input_ids.shape == b.targets.shape == (4, T)
    assert torch.equal(b.prefix_lengths, torch.full((4,), 24))
    # decoder positions: next-token targets, inputs untouched, never masked-LM
    dec = pos >= 24
    assert torch.equal(b.targets[:, dec], w[:, 1:][:, dec])
    assert torch.equal(b.input_ids[:, dec], w[:, :-1][:, dec])
    assert not b.is_mlm[:, dec].any()
    # prefix: masked positions carry the mask id and the original token at the same position as target
    pre = b.is_mlm
    assert pre.any()
    assert (b.input_ids[pre] == MASK).all()
    assert torch.equal(b.targets[pre], w[:, :-1][pre])
    # unmasked prefix positions keep their token and get no loss
    keep = (~pre) & (pos < 24)
    assert torch.equal(b.input_ids[keep], w[:, :-1][keep])
    assert (b.targets[keep] == IGNORE).all()
    assert b.ntp_count == 4 * (T - 24)
    assert b.mlm_count == int(pre.sum())


def test_mask_rate_and_token_zero_eligible():
    T = 512
    w = torch.zeros(64, T + 1, dtype=torch.long)  # every token is id 0
    w[:, 1::2] = 7
    b = make_batch(w, objective="prefix_mlm", prefix_len=256, mask_prob=0.15, mask_token_id=MASK)
    rate = b.is_mlm[:, :256].float().mean().item()
    assert abs(rate - 0.15) < 0.01
    # id 0 gets masked too (the authors' filter dropped it)
    zeros = w[:, :-1] == 0
    assert (b.is_mlm & zeros).sum() > 0.1 * zeros[:, :256].sum()
    assert (b.targets[b.is_mlm & zeros] == 0).all()


def test_masks_depend_on_sequence_key_only():
    w = _windows(B=6)
    keys = [(0, i) for i in range(10, 16)]
    full = make_batch(w, keys, prefix_len=32, mask_token_id=MASK, seed=5)
    part = make_batch(w[3:], keys[3:], prefix_len=32, mask_token_id=MASK, seed=5)
    assert torch.equal(full.is_mlm[3:], part.is_mlm)
    other_seed = make_batch(w, keys, prefix_len=32, mask_token_id=MASK, seed=6)
    assert not torch.equal(full.is_mlm, other_seed.is_mlm)


def test_random_prefix_in_range():
    w = _windows(B=32)
    b = make_batch(w, random_prefix=True, prefix_min=4, prefix_max=40, mask_token_id=MASK)
    assert int(b.prefix_lengths.min()) >= 4 and int(b.prefix_lengths.max()) <= 40
    assert len(set(b.prefix_lengths.tolist())) > 5
    for row in range(32):
        m = int(b.prefix_lengths[row])
        assert not b.is_mlm[row, m:].any()
        assert (b.targets[row, m:] != IGNORE).all()


def test_ntp_objective_and_clean_prefix():
    w = _windows()
    b = make_batch(w, objective="ntp")
    assert b.prefix_lengths.tolist() == [0] * w.shape[0] and b.prefix_lengths.dtype == torch.long
    assert not b.is_mlm.any()
    assert torch.equal(b.targets, w[:, 1:]) and torch.equal(b.input_ids, w[:, :-1])
    clean = make_batch(w, prefix_len=10, mask=False)
    assert torch.equal(clean.input_ids, w[:, :-1]) and clean.mlm_count == 0
    assert (clean.targets[:, :10] == IGNORE).all()


@pytest.mark.parametrize("prefix", [64, 65, 1000, -1])
def test_prefix_longer_than_sequence_is_an_error(prefix):
    with pytest.raises(ValueError, match="prefix"):
        make_batch(_windows(), prefix_len=prefix, mask_token_id=MASK)
    with pytest.raises(ValueError, match="prefix_len"):
        build_config("jrt-tiny", overrides={"seq_len": 64, "prefix_len": max(prefix, 64)})


def test_missing_mask_id_is_an_error():
    with pytest.raises(ValueError, match="mask_token_id"):
        make_batch(_windows(), prefix_len=8)


def test_loss_matches_reference_and_splits_additively():
    torch.manual_seed(0)
    w = _windows(B=6, T=32)
    b = make_batch(w, prefix_len=12, mask_prob=0.3, mask_token_id=MASK)
    logits = torch.randn(6, 32, 100, dtype=torch.float64)
    loss, stats = objective_loss(logits, b, mlm_weight=0.25)
    ce = F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), ignore_index=IGNORE, reduction="none")
    ce = ce.view(6, 32)
    ntp_mask = (b.targets != IGNORE) & ~b.is_mlm
    ref = ce[ntp_mask].mean() + 0.25 * ce[b.is_mlm].mean()
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-6
    # micro-batches normalised by the global counts add up to the full-batch loss
    parts = 0.0
    for sl in (slice(0, 2), slice(2, 6)):
        mb = ObjectiveBatch(b.input_ids[sl], b.targets[sl], b.is_mlm[sl], b.prefix_lengths[sl])
        part, _ = objective_loss(logits[sl], mb, 0.25, ntp_norm=b.ntp_count, mlm_norm=b.mlm_count)
        parts += part.item()
    assert abs(parts - loss.item()) / loss.item() < 1e-6  # float32 losses
    assert abs(stats["ntp_sum"].item() - ce[ntp_mask].sum().item()) / ce[ntp_mask].sum().item() < 1e-6


def test_loss_rejects_targets_outside_vocab():
    b = make_batch(_windows(vocab=90), objective="ntp")
    with pytest.raises(ValueError, match="vocabulary"):
        objective_loss(torch.randn(4, 64, 50), b)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied


def test_param_groups():
    m = _Tiny()
    groups = param_groups(m, 0.1, decay_embeddings=True)
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    assert id(m.lin.weight) in decay and id(m.emb.weight) in decay
    assert {id(m.lin.bias), id(m.norm.weight), id(m.norm.bias)} <= no_decay
    assert sum(len(g["params"]) for g in groups) == 5  # tied weight once
    groups = param_groups(m, 0.1, decay_embeddings=False)
    assert id(m.emb.weight) in {id(p) for p in groups[1]["params"]}
    opt = build_optimizer(m, build_config("jrt-tiny"))
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0


def test_warmup_cosine_schedule():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
    s = WarmupCosineSchedule(opt, lr=8e-4, min_lr=8e-5, warmup_steps=600, max_steps=60_000, init_lr=1e-6)
    assert s.lr_at(0) == pytest.approx(1e-6)
    assert s.lr_at(300) == pytest.approx(1e-6 + (8e-4 - 1e-6) / 2)
    assert s.lr_at(600) == pytest.approx(8e-4)
    mid = 600 + (60_000 - 600) // 2
    assert s.lr_at(mid) == pytest.approx((8e-4 + 8e-5) / 2, rel=1e-4)
    assert s.lr_at(60_000) == pytest.approx(8e-5) and s.lr_at(70_000) == pytest.approx(8e-5)
    assert s.apply(600) == pytest.approx(8e-4) and opt.param_groups[0]["lr"] == pytest.approx(8e-4)
    assert all(s.lr_at(i) >= s.lr_at(i + 1) for i in range(600, 60_000, 997))
    assert math.isfinite(s.lr_at(10**9))


def test_published_presets():
    p = build_config("jrt-360m")
    assert (p.seq_len, p.prefix_len, p.global_batch_size, p.lr, p.min_lr) == (2048, 1024, 256, 8e-4, 8e-5)
    assert (p.warmup_steps, p.max_steps, p.mlm_weight, p.mask_prob, p.objective) == (600, 60_000, 0.25, 0.15,
                                                                                      "prefix_mlm")
    q = build_config("jrt-1.3b")
    assert (q.warmup_steps, q.max_steps) == (1000, 100_000)
    assert build_config("based-360m").objective == "ntp"
    assert {"jrt-tiny", "based-tiny", "attn-tiny", "jrt-360m", "based-1.3b"} <= set(TRAIN_PRESETS)


def test_config_file_and_overrides(tmp_path):
    yml = tmp_path / "run.yaml"
    yml.write_text("seq_len: 128\nprefix_len: 64\nmodel_overrides:\n  swa_window: 8\n")
    cfg = build_config("jrt-tiny", yml, parse_overrides(["lr=1e-3", "max_minutes=2.5", "deterministic=true"]))
    assert (cfg.seq_len, cfg.prefix_len, cfg.lr, cfg.max_minutes, cfg.deterministic) == (128, 64, 1e-3, 2.5, True)
    assert cfg.model_overrides == {"swa_window": 8}
    js = tmp_path / "run.json"
    js.write_text(json.dumps(cfg.to_dict()))
    assert build_config(None, js) == cfg == config_from_dict(cfg.to_dict())
    with pytest.raises(ValueError, match="unknown training option"):
        build_config("jrt-tiny", overrides={"learning_rate": 1})
    with pytest.raises(ValueError, match="expects int"):
        build_config("jrt-tiny", overrides={"seq_len": "abc"})
    uneven = build_config("jrt-tiny", overrides={"global_batch_size": 6, "micro_batch_size": 4})
    assert uneven.batch_split(1) == (3, 2) and uneven.batch_split(2) == (3, 1) and uneven.batch_split(3) == (2, 1)
    assert build_config("jrt-tiny").batch_split(2) == (4, 1)  # every *-tiny preset under torchrun on 2 processes
    with pytest.raises(ValueError, match="cannot be split over 4 processes"):
        uneven.batch_split(4)
    with pytest.raises(ValueError, match="unknown training preset"):
        build_config("nope")
