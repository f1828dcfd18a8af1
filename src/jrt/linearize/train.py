"""``jrt linearize``: turn a Llama-family teacher into a recurrent student in two stages.

1. **Attention transfer** (teacher frozen): one teacher forward per batch; in every layer the student mixer reads
   the teacher's layer input and is trained to reproduce the teacher's softmax-attention output (MSE, mean over
   layers). Only the new parameters train (feature maps, window gates).
2. **Low-rank fine-tuning** with ``peft`` LoRA on the attention projections (plus the encoder projections in
   ``jrt`` mode): next-token loss, plus ``0.25 x`` masked-LM loss on the prefix in ``jrt`` mode
   (:mod:`jrt.training.objective`, the loss of ``jrt train``).

Outputs in ``OUT``: ``metrics.jsonl``, ``checkpoints/step_*`` (atomic, :mod:`jrt.training.checkpoint`; they hold
only the trained parameters), ``delta.safetensors`` (the trained parameters with the teacher's fingerprint),
``model/`` (``save_pretrained`` + tokenizer, rebuilt from the delta exactly as ``jrt linearize apply`` does) and
``summary.json`` (tokens, wall time, held-out perplexities).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jrt.linearize.configuration import MODES, LinearizedConfig, check_teacher_type
from jrt.linearize.modeling import LinearizedForCausalLM
from jrt.training import checkpoint as ckpt
from jrt.training.data import BatchSampler, TokenDataset, read_index
from jrt.training.metrics import METRICS_FILE, MetricsLogger, truncate_metrics
from jrt.training.objective import make_batch, objective_loss

DELTA_FORMAT = "jrt-linearize-delta"
DELTA_VERSION = 1
#: Substrings of the names of the parameters a linearization trains (and a delta holds).
TRAINED_KEYS = ("feature_q", "feature_k", "window_gate", "lora_")
_PEFT_PREFIX = "base_model.model."


@dataclass
class LinearizeConfig:
    """Options of one linearization run (saved in checkpoints; a resume must match them)."""

    teacher: str
    gguf_file: str | None = None
    mode: str = "based"
    feature_dim: int = 16
    window: int = 64
    seq_len: int = 512
    batch_size: int = 4
    transfer_fraction: float = 0.5  # share of the token/time budget spent on attention transfer
    max_tokens: int | None = None
    max_minutes: float | None = None
    lr_transfer: float = 1e-2
    lr_finetune: float = 5e-4
    warmup_steps: int = 10
    lora_rank: int = 8
    lora_alpha: int = 16
    prefix_min_fraction: float = 0.125  # jrt mode: prefix length drawn in [min, max] x seq_len
    prefix_max_fraction: float = 0.75
    mlm_weight: float = 0.25
    mask_prob: float = 0.15
    mask_token_id: int | None = None
    save_every: int = 50
    eval_windows: int = 16
    seed: int = 0

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if (self.max_tokens is None) == (self.max_minutes is None):
            raise ValueError("give exactly one of --max-tokens and --max-minutes")
        if self.max_tokens is not None and self.max_tokens < 2 * self.tokens_per_step:
            raise ValueError(f"--max-tokens {self.max_tokens} is less than two steps of {self.tokens_per_step} tokens")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"--max-minutes must be positive, got {self.max_minutes}")
        if self.feature_dim < 1:
            raise ValueError(f"--feature-dim must be >= 1, got {self.feature_dim}")
        if not 0 <= self.window < self.seq_len:
            raise ValueError(f"--window {self.window} must be in [0, {self.seq_len}) (smaller than the training "
                             f"context --seq-len {self.seq_len})")
        if not 0.0 < self.transfer_fraction < 1.0:
            raise ValueError(f"transfer_fraction must be in (0, 1), got {self.transfer_fraction}")

    @property
    def reads_prefix(self) -> bool:
        """Whether the student reads a non-causal prefix (``mode="jrt"``)."""
        return self.mode == "jrt"

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size


# ---------------------------------------------------------------------------------------------- teacher


def resolve_teacher(name: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(folder or id, gguf file)`` of a teacher (``smollm2-135m`` resolves to the packaged GGUF), after checking
    from its configuration alone that it is a supported family (one-line ``ValueError`` otherwise)."""
    from transformers import AutoConfig

    from jrt.models.loading import resolve_model_source

    source, gguf = resolve_model_source(name, gguf_file)
    try:
        config = AutoConfig.from_pretrained(source, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"could not load the teacher {name!r}: {first}") from None
    check_teacher_type(getattr(config, "model_type", None))
    return source, gguf


def load_teacher_tokenizer(name: str, gguf_file: str | None = None) -> Any:
    """The teacher's tokenizer (for ``jrt data prepare --tokenizer``)."""
    from jrt.models.loading import load_tokenizer

    return load_tokenizer(*resolve_teacher(name, gguf_file))


def load_teacher(name: str, gguf_file: str | None = None) -> tuple[nn.Module, Any]:
    """The teacher causal LM (float32, eval, frozen) and its tokenizer; unsupported architectures are refused
    before any weight is loaded."""
    from jrt.models.loading import load_model, load_tokenizer

    source, gguf = resolve_teacher(name, gguf_file)
    model = load_model(source, gguf, dtype="float32")
    for p in model.parameters():
        p.requires_grad_(False)
    return model, load_tokenizer(source, gguf)


def teacher_fingerprint(teacher: nn.Module) -> str:
    """SHA-256 of the teacher's architecture fields and every weight (a delta only applies to its teacher)."""
    digest = hashlib.sha256()
    cfg = teacher.config
    for field in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "intermediate_size"):
        digest.update(f"{field}={getattr(cfg, field, None)};".encode())
    for key, tensor in sorted(teacher.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def default_mask_token_id(teacher: nn.Module, tokenizer: Any) -> int:
    """A masked-LM input id that no document holds: the first unused embedding row, else a special token that is
    not BOS/EOS/PAD (``add_special_tokens=False`` data never contains it)."""
    vocab = teacher.config.vocab_size
    if vocab > len(tokenizer):
        return len(tokenizer)
    reserved = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    for token_id in sorted(tokenizer.all_special_ids, reverse=True):
        if token_id not in reserved and 0 <= token_id < vocab:
            return int(token_id)
    raise ValueError("the teacher's tokenizer has no spare special token for the jrt masked-LM objective; "
                     "pass --mask-token-id")


def build_student(teacher: nn.Module, mode: str, feature_dim: int, window: int, mask_token_id: int | None,
                  max_prefix_length: int = 1024) -> LinearizedForCausalLM:
    """The student with the teacher's weights (encoder projections copied from ``k_proj``/``v_proj``) and freshly
    initialised feature maps (deterministic)."""
    check_teacher_type(teacher.config.model_type)
    config = LinearizedConfig(teacher=teacher.config.to_dict(), mode=mode, feature_dim=feature_dim, window=window,
                              mask_token_id=mask_token_id, max_prefix_length=max_prefix_length)
    student = LinearizedForCausalLM(config)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    new = [k for k in missing if not any(s in k for s in ("feature_", "window_gate", "_enc_proj"))]
    if unexpected or new:
        raise ValueError(f"the teacher's weights do not map onto the student: missing {new[:3]}, "
                         f"unexpected {list(unexpected)[:3]}")
    for layer in student.model.layers:
        layer.self_attn.copy_encoder_from_teacher()
        layer.self_attn.reset_feature_maps(torch.Generator().manual_seed(1234 + layer.self_attn.layer_idx))
    student.tie_weights()
    return student.float()


def lora_config(mode: str, rank: int, alpha: int):
    """The ``peft`` LoRA configuration of stage 2: the attention projections (and encoder projections)."""
    from peft import LoraConfig

    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["k_enc_proj", "v_enc_proj"] if mode == "jrt" else [])
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none")


def wrap_lora(student: nn.Module, mode: str, rank: int, alpha: int) -> nn.Module:
    """``peft.get_peft_model`` with the LoRA adapters of stage 2; only the adapters train."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # peft's kaiming init of lora_A: deterministic, global RNG untouched
        return get_peft_model(student, lora_config(mode, rank, alpha))


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters (feature maps, gates, LoRA), named as in the unwrapped student (``peft`` prefix
    removed), detached copies."""
    out = {}
    for name, p in model.named_parameters():
        if any(s in name for s in TRAINED_KEYS):
            key = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
            out[key] = p.detach().clone().contiguous()
    return out


def load_trained_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``state`` (names as :func:`trained_state`) into ``model`` (wrapped or not); every name must exist."""
    params = {}
    for name, p in model.named_parameters():
        key = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
        params[key] = p
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ValueError(f"{where} does not match this student: unknown parameters {unknown[:3]}")
    with torch.no_grad():
        for key, tensor in state.items():
            if params[key].shape != tensor.shape:
                raise ValueError(f"{where} does not match this student: {key} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(params[key].shape)}")
            params[key].copy_(tensor)


# ---------------------------------------------------------------------------------------------- delta


def save_delta(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write the trained parameters and ``meta`` (student options, LoRA, teacher fingerprint) atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(state, str(tmp), metadata={"format": DELTA_FORMAT, "version": str(DELTA_VERSION),
                                         "meta": json.dumps(meta, sort_keys=True)})
    tmp.replace(path)


def read_delta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a delta file; ``ValueError`` for anything else."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"delta file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors delta ({err})") from None
    if header.get("format") != DELTA_FORMAT or header.get("version") != str(DELTA_VERSION):
        raise ValueError(f"{path} is not a jrt linearize delta (format {header.get('format')!r})")
    return tensors, json.loads(header["meta"])


def apply_delta(teacher: nn.Module, delta: str | Path, fingerprint: str | None = None) -> LinearizedForCausalLM:
    """Rebuild the student of ``delta`` from its ``teacher``: build, load the feature maps and adapters, merge the
    adapters into the projections (``peft``'s ``merge_and_unload``). Raises ``ValueError`` when the delta was
    made for another teacher."""
    tensors, meta = read_delta(delta)
    fingerprint = fingerprint or teacher_fingerprint(teacher)
    if meta["teacher_fingerprint"] != fingerprint:
        raise ValueError(f"{delta} was made for another teacher ({meta.get('teacher')!r}, fingerprint "
                         f"{meta['teacher_fingerprint'][:12]}), not this one ({fingerprint[:12]})")
    s = meta["student"]
    student = build_student(teacher, s["mode"], s["feature_dim"], s["window"], s["mask_token_id"],
                            s["max_prefix_length"])
    model: nn.Module = student
    if any("lora_" in k for k in tensors):
        model = wrap_lora(student, s["mode"], meta["lora"]["rank"], meta["lora"]["alpha"])
    load_trained_state(model, tensors, str(delta))
    if model is not student:
        model = model.merge_and_unload()
    return model.eval()


# ---------------------------------------------------------------------------------------------- training


class _TrainedParams(nn.Module):
    """What a checkpoint stores as its "model": only the trained parameters, as ``model.safetensors``."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.state = state

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        from safetensors.torch import save_file

        Path(path).mkdir(parents=True, exist_ok=True)
        save_file(state_dict or self.state, str(Path(path) / "model.safetensors"))


def window_losses(model: nn.Module, windows: torch.Tensor, prefix: bool) -> list[tuple[float, int]]:
    """``(summed next-token loss, tokens)`` of the second half of each window ``[N, T + 1]`` (the first half is
    context; with ``prefix`` the student reads it non-causally as its JRT prefix)."""
    t = windows.shape[1] - 1
    out = []
    with torch.no_grad():
        for row in windows.split(1):
            batch = make_batch(row, objective="prefix_mlm", prefix_len=t // 2, mask=False)
            kwargs = {"prefix_lengths": batch.prefix_lengths} if prefix else {}
            logits = model(input_ids=batch.input_ids, use_cache=False, **kwargs).logits
            _, stats = objective_loss(logits, batch)
            out.append((float(stats["ntp_sum"]), int(batch.ntp_count)))
    return out


def perplexity(model: nn.Module, windows: torch.Tensor, prefix: bool) -> float:
    """Perplexity over the second halves of the windows ``[N, T + 1]`` (see :func:`window_losses`)."""
    losses = window_losses(model, windows, prefix)
    return math.exp(sum(s for s, _ in losses) / max(sum(n for _, n in losses), 1))


def held_out_perplexity(models: dict[str, nn.Module], data_dir: str | Path, seq_len: int = 512,
                        windows: int | None = None, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Perplexity of each model on the validation split of a ``jrt data prepare`` folder, on the same windows of
    ``seq_len + 1`` tokens (the first ``windows``, default all), with a 95% bootstrap interval over windows.
    A ``jrt``-mode student reads each window's first half as its prefix. Returns ``{name: {"ppl", "ci",
    "windows", "tokens"}}``."""
    from tqdm.auto import tqdm

    from jrt.stats import bootstrap_ratio

    val = TokenDataset(data_dir, seq_len, "val")
    n = len(val) if windows is None else min(windows, len(val))
    if n < 1:
        raise ValueError(f"{data_dir} has no validation window of {seq_len + 1} tokens")
    batch = val.batch(list(range(n)))
    out = {}
    for name, model in tqdm(models.items(), desc="perplexity", unit="model", disable=not progress):
        prefix = getattr(model.config, "mode", None) == "jrt"
        losses = window_losses(model.eval(), batch, prefix)
        ratio, low, high = bootstrap_ratio([s for s, _ in losses], [c for _, c in losses])
        out[name] = {"ppl": math.exp(ratio), "ci": [math.exp(low), math.exp(high)], "windows": n,
                     "tokens": sum(c for _, c in losses), "prefix": prefix}
    return out


class Linearizer:
    """One run: ``Linearizer(cfg, data_dir, out).run()``; ``resume=True`` continues from the latest checkpoint."""

    def __init__(self, cfg: LinearizeConfig, data_dir: str | Path, output: str | Path, *, resume: bool = False,
                 progress: bool = True) -> None:
        cfg.validate()
        self.cfg, self.out, self.progress = cfg, Path(output), progress
        self.ckpt_root = self.out / "checkpoints"
        existing = ckpt.latest_checkpoint(self.ckpt_root)
        if existing is not None and not resume:
            raise ValueError(f"{self.out} already has checkpoints ({existing.name}); pass --resume to continue "
                             "or choose another output folder")
        index = read_index(data_dir)  # FileNotFoundError / ValueError for a missing or half-written corpus
        self.data = TokenDataset(data_dir, cfg.seq_len, "train")
        self.val = TokenDataset(data_dir, cfg.seq_len, "val")
        self.teacher, self.tokenizer = load_teacher(cfg.teacher, cfg.gguf_file)
        vocab = self.teacher.config.vocab_size
        if int(index["max_token_id"]) >= vocab or int(index["vocab_size"]) > vocab:
            raise ValueError(f"{data_dir} was tokenized with a vocabulary of {index['vocab_size']} but the teacher has "
                             f"{vocab}: prepare the data with the teacher's tokenizer (jrt linearize tokenizer)")
        if cfg.reads_prefix and cfg.mask_token_id is None:
            cfg.mask_token_id = default_mask_token_id(self.teacher, self.tokenizer)
        self.fingerprint = teacher_fingerprint(self.teacher)
        self.student = build_student(self.teacher, cfg.mode, cfg.feature_dim, cfg.window, cfg.mask_token_id)
        self.model: nn.Module = self.student
        self.sampler = BatchSampler(len(self.data), cfg.batch_size, cfg.seed)
        self.step, self.stage, self.stage2_start, self.elapsed = 0, 1, None, 0.0
        self._set_stage(1)
        if resume and existing is not None:
            self._resume(existing)
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = self.out / METRICS_FILE
        if self.step == 0 and metrics.exists():
            metrics.unlink()
        truncate_metrics(metrics, self.step)
        (self.out / "linearize_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        self.logger = MetricsLogger(self.out, tensorboard=False)

    # -------------------------------------------------------------------------------------- state

    def _set_stage(self, stage: int) -> None:
        """Freeze all but the parameters of ``stage`` and make its optimizer."""
        if stage == 2 and self.model is self.student:
            for p in self.student.parameters():
                p.requires_grad_(False)
            self.model = wrap_lora(self.student, self.cfg.mode, self.cfg.lora_rank, self.cfg.lora_alpha)
        elif stage == 1:
            for name, p in self.student.named_parameters():
                p.requires_grad_(any(s in name for s in ("feature_q", "feature_k", "window_gate")))
        self.stage = stage
        params = [p for p in self.model.parameters() if p.requires_grad]
        lr = self.cfg.lr_transfer if stage == 1 else self.cfg.lr_finetune
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.base_lr = lr

    def _trainer_state(self) -> dict[str, Any]:
        return {"stage": self.stage, "stage2_start": self.stage2_start, "elapsed": self.elapsed,
                "config": asdict(self.cfg), "teacher_fingerprint": self.fingerprint}

    def save(self) -> Path:
        return ckpt.save_checkpoint(self.ckpt_root, self.step, _TrainedParams(trained_state(self.model)), None,
                                    self.optimizer.state_dict(), self._trainer_state(), [ckpt.capture_rng()],
                                    keep_last=2)

    def _resume(self, path: Path) -> None:
        state = ckpt.read_trainer_state(path, pretraining=False)
        if state.get("stage") not in (1, 2) or not isinstance(state.get("teacher_fingerprint"), str):
            raise ckpt.CorruptFileError(f"checkpoint {path} is corrupt: trainer_state.json needs stage 1 or 2 and "
                                        "a teacher_fingerprint")
        if state["teacher_fingerprint"] != self.fingerprint:
            raise ValueError(f"checkpoint {path} was made with another teacher")
        saved = dict(state["config"])
        for key in ("mode", "feature_dim", "window", "seq_len", "batch_size", "lora_rank", "lora_alpha", "seed",
                    "transfer_fraction", "mask_token_id"):
            if saved.get(key) != getattr(self.cfg, key):
                raise ValueError(f"cannot resume {path}: {key} was {saved.get(key)!r}, now {getattr(self.cfg, key)!r}")
        if state["stage"] == 2:
            self._set_stage(2)
        load_trained_state(self.model, ckpt.load_model_weights(path), f"checkpoint {path}")
        self.optimizer.load_state_dict(ckpt.load_torch_file(path / "optimizer.pt", str(path)))
        ckpt.restore_rng(ckpt.load_torch_file(path / "rng.pt", str(path))[0])
        self.step, self.stage2_start, self.elapsed = int(state["step"]), state["stage2_start"], state["elapsed"]

    # -------------------------------------------------------------------------------------- steps

    def _stage_done(self) -> bool:
        """Whether stage 1's share of the budget is spent."""
        c = self.cfg
        if c.max_tokens is not None:
            return self.step >= int(c.transfer_fraction * c.max_tokens) // c.tokens_per_step
        return self.elapsed >= c.transfer_fraction * c.max_minutes * 60

    def _all_done(self) -> bool:
        c = self.cfg
        if c.max_tokens is not None:
            return self.step >= c.max_tokens // c.tokens_per_step
        return self.elapsed >= c.max_minutes * 60

    def _windows(self) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        keys = self.sampler.global_indices(self.step)
        return self.data.batch([i for _, i in keys]), keys

    def train_step(self) -> dict[str, float]:
        c = self.cfg
        windows, keys = self._windows()
        since = self.step - (self.stage2_start or 0)
        lr = self.base_lr * min(1.0, (since + 1) / c.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        if self.stage == 1:
            out = self.student.model(input_ids=windows[:, :-1], transfer=True, use_cache=False)
            loss = torch.stack(out.transfer_losses).mean()
            row = {"transfer_loss": float(loss.detach())}
        else:
            batch = make_batch(
                windows, keys, objective="prefix_mlm" if c.reads_prefix else "ntp", random_prefix=True,
                prefix_min=max(1, int(c.prefix_min_fraction * c.seq_len)), prefix_max=int(c.prefix_max_fraction *
                                                                                       c.seq_len),
                mask_prob=c.mask_prob, mask_token_id=c.mask_token_id, seed=c.seed,
            )
            logits = self.model(input_ids=batch.input_ids, prefix_lengths=batch.prefix_lengths, use_cache=False).logits
            loss, stats = objective_loss(logits, batch, mlm_weight=c.mlm_weight)
            row = {"ntp_loss": float(stats["ntp_sum"]) / max(batch.ntp_count, 1)}
            if c.reads_prefix:
                row["mlm_loss"] = float(stats["mlm_sum"]) / max(batch.mlm_count, 1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.optimizer.step()
        self.step += 1
        return {"step": self.step, "stage": self.stage, "loss": float(loss.detach()), **row, "lr": lr,
                "grad_norm": float(grad_norm), "tokens": self.step * c.tokens_per_step}

    def evaluate(self) -> dict[str, float]:
        """Held-out perplexity (second half of ``eval_windows`` validation windows) of the student and teacher."""
        n = min(self.cfg.eval_windows, len(self.val))
        windows = self.val.batch(list(range(n)))
        self.model.eval()
        student = perplexity(self.model, windows, prefix=self.cfg.reads_prefix)
        teacher = perplexity(self.teacher, windows, prefix=False)
        return {"val_windows": n, "val_ppl_student": student, "val_ppl_teacher": teacher}

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        c = self.cfg
        total = c.max_tokens // c.tokens_per_step if c.max_tokens is not None else None
        bar = tqdm(total=total, initial=self.step, disable=not self.progress, desc=f"linearize {c.mode}",
                   unit="step")
        started = time.perf_counter() - self.elapsed
        while not self._all_done():
            if self.stage == 1 and self._stage_done():
                self.save()
                self.stage2_start = self.step
                self._set_stage(2)
            row = self.train_step()
            self.elapsed = time.perf_counter() - started
            row["elapsed_s"] = round(self.elapsed, 1)
            self.logger.log(row)
            bar.update(1)
            bar.set_postfix(stage=self.stage, loss=f"{row['loss']:.4g}")
            if self.step % c.save_every == 0:
                self.save()
        bar.close()
        self.save()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Write the delta, rebuild the student from it (as ``apply`` does) into ``model/`` and the summary."""
        c = self.cfg
        meta = {"teacher": c.teacher, "teacher_fingerprint": self.fingerprint,
                "student": {"mode": c.mode, "feature_dim": c.feature_dim, "window": c.window,
                            "mask_token_id": c.mask_token_id, "max_prefix_length": 1024},
                "lora": {"rank": c.lora_rank, "alpha": c.lora_alpha}, "steps": self.step,
                "tokens": self.step * c.tokens_per_step}
        delta = self.out / "delta.safetensors"
        save_delta(delta, trained_state(self.model), meta)
        final = apply_delta(self.teacher, delta, self.fingerprint)
        ckpt.save_pretrained_atomic(final, self.out / "model")
        self.tokenizer.save_pretrained(str(self.out / "model"))
        self.model = final
        scores = self.evaluate()
        summary = {"mode": c.mode, "steps": self.step, "tokens": self.step * c.tokens_per_step,
                   "transfer_steps": self.stage2_start if self.stage2_start is not None else self.step,
                   "wall_s": round(self.elapsed, 1), "threads": torch.get_num_threads(), **scores}
        self.logger.log({"step": self.step, **scores})
        self.logger.close()
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
