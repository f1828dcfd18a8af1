"""The training loop: one process on a CPU, or many under torchrun (DDP / FSDP2), with exact resume.

Per optimizer step ``s`` every rank reads its slice of global batch ``s`` (:class:`~jrt.training.data.
BatchSampler`), builds the objective's inputs and targets, and runs ``grad_accum`` micro-batches. Each
micro-batch loss is normalised by the *global* number of next-token and masked-LM targets of the step (summed
over ranks first), so the gradient is that of the global-batch mean whatever the world size or accumulation:
``torchrun --nproc_per_node 2`` gives the loss curve of one process with the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from jrt.models.factory import (
    build_model,
    count_parameters,
    default_objective,
    forward_logits,
    mask_token_id,
    vocab_size,
)
from jrt.training import checkpoint as ckpt
from jrt.training.config import TrainConfig
from jrt.training.data import BatchSampler, TokenDataset, read_index
from jrt.training.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    gather_objects,
    init_distributed,
    shutdown,
    wrap_model,
)
from jrt.training.metrics import METRICS_FILE, MetricsLogger, format_duration, truncate_metrics
from jrt.training.objective import IGNORE, ObjectiveBatch, make_batch, objective_loss
from jrt.training.optim import WarmupCosineSchedule, build_optimizer

#: Options that must not change between a checkpoint and the run resuming from it.
RESUME_KEYS = ("model", "model_overrides", "objective", "seq_len", "prefix_len", "random_prefix", "prefix_min",
               "prefix_max", "mask_prob", "global_batch_size", "seed")


def train(
    cfg: TrainConfig,
    data_dir: str | Path,
    output_dir: str | Path,
    *,
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
    tensorboard: bool = True,
) -> dict[str, Any]:
    """Run (or resume) training; returns a summary (steps, last loss, last validation loss, paths).

    Call it in every process of a torchrun job: the process group is set up from the environment.
    """
    cfg.validate()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    info = init_distributed(device)
    try:
        return Trainer(cfg, data_dir, output_dir, info, resume=resume, progress=progress,
                       tensorboard=tensorboard).run()
    finally:
        shutdown()
        torch.set_num_threads(threads)  # the run's settings do not leak into the caller
        torch.use_deterministic_algorithms(deterministic)


class Trainer:
    """State of one training run (see :func:`train`)."""

    def __init__(self, cfg: TrainConfig, data_dir: str | Path, output_dir: str | Path, info: DistInfo, *,
                 resume: bool = False, progress: bool = True, tensorboard: bool = True):
        self.cfg, self.info = cfg, info
        self.out = Path(output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.progress = progress and info.is_main
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.objective = cfg.objective or default_objective(cfg.model)

        # data
        self.index = read_index(data_dir)
        self.train_ds = TokenDataset(data_dir, cfg.seq_len, "train")
        try:
            self.val_ds: TokenDataset | None = TokenDataset(data_dir, cfg.seq_len, "val")
        except ValueError as err:
            self._say(f"warning: no validation loss: {err}")
            self.val_ds = None
        self.micro, self.accum = cfg.batch_split(info.world_size)
        if self.micro != cfg.micro_batch_size:
            self._say(f"micro-batch {self.micro} sequences per process (micro_batch_size {cfg.micro_batch_size}, "
                      f"per-process batch {cfg.global_batch_size // info.world_size}), {self.accum} accumulation "
                      "step(s)")
        self.sampler = BatchSampler(len(self.train_ds), cfg.global_batch_size, cfg.seed, info.rank,
                                    info.world_size)

        # model (same initial weights on every rank)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, cfg.model_overrides)
        self._check_vocab(model)
        self.raw = model.to(info.device)
        self.raw.train()
        self.model = wrap_model(self.raw, info, cfg.distributed)
        self.fwd: nn.Module = torch.compile(self.model) if cfg.compile else self.model
        self.optimizer = build_optimizer(self.raw, cfg)
        self.schedule = WarmupCosineSchedule(self.optimizer, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps,
                                             cfg.warmup_init_lr)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and info.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(info.device.type, dtype=torch.bfloat16)) if bf16 \
            else contextlib.nullcontext
        self.n_params = count_parameters(self.raw)
        # the batches carry the prefix of every objective (zeros for next-token only); the forward takes it when
        # the model reads a prefix (JRT models) or the objective has one
        self.takes_prefix = self.objective == "prefix_mlm" or getattr(self.raw.config, "model_type", "") == "jrt"

        self.start_step = 0
        existing = ckpt.latest_checkpoint(self.ckpt_root)
        if existing is not None and not resume:
            raise ValueError(f"{self.out} already has checkpoints ({existing.name}); pass --resume to continue "
                             "or choose another output folder")
        if resume and existing is not None:
            self._resume_latest_intact()
        elif resume:
            self._say(f"no checkpoint in {self.ckpt_root}: starting from scratch")
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            metrics = self.out / METRICS_FILE
            if self.start_step == 0 and metrics.exists():
                metrics.unlink()
            truncate_metrics(metrics, self.start_step)
            (self.out / "train_config.json").write_text(json.dumps(self._saved_config(), indent=2))
        barrier(info)
        self.logger = MetricsLogger(self.out, tensorboard) if info.is_main else None

    # ------------------------------------------------------------------------------------------ setup

    def _say(self, msg: str) -> None:
        if self.info.is_main:
            from tqdm.auto import tqdm

            tqdm.write(msg)

    def _check_vocab(self, model: nn.Module) -> None:
        V = vocab_size(model)
        data_vocab, max_id = int(self.index["vocab_size"]), int(self.index["max_token_id"])
        if data_vocab > V or max_id >= V:
            raise ValueError(
                f"tokenizer/model vocabulary mismatch: the data was tokenized with a vocabulary of {data_vocab} "
                f"(largest id {max_id}) but model {self.cfg.model!r} has vocab_size {V}"
            )
        if self.objective == "prefix_mlm":
            mid = mask_token_id(model)
            if mid is None:
                raise ValueError(f"model {self.cfg.model!r} has no mask_token_id: the prefix masked-LM objective "
                                 "needs one (use objective=ntp)")
            if mid < data_vocab:
                raise ValueError(f"mask token id {mid} is a real token of the data's tokenizer (vocabulary "
                                 f"{data_vocab}): the masked-LM inputs would be ambiguous")
            if not mid < V:
                raise ValueError(f"mask token id {mid} is outside the model's vocabulary ({V})")
            self.mask_id: int | None = mid
        else:
            self.mask_id = None

    def _saved_config(self) -> dict[str, Any]:
        d = self.cfg.to_dict()
        d["objective"] = self.objective
        return d

    def _resume_latest_intact(self) -> None:
        """Resume from the newest checkpoint whose files are intact; a corrupt one (truncated weights, a bad
        ``trainer_state.json``) is skipped with a log line. Incompatible settings are an error, not skipped."""
        first_error: ckpt.CorruptFileError | None = None
        for _, path in reversed(ckpt.list_checkpoints(self.ckpt_root)):
            try:
                self._resume(path)
                return
            except ckpt.CorruptFileError as err:
                first_error = first_error or err
                self._say(f"warning: {err}; falling back to an older checkpoint")
        raise ValueError(f"no intact checkpoint in {self.ckpt_root} (newest: {first_error})")

    def _resume(self, path: Path) -> None:
        where = str(path)
        state = ckpt.read_trainer_state(path)
        saved = state.get("config", {})
        current = self._saved_config()
        diff = [k for k in RESUME_KEYS if saved.get(k) != current.get(k)]
        if diff:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff)
            raise ValueError(f"checkpoint {where} is incompatible with this run ({detail})")
        if state.get("num_sequences") != len(self.train_ds):
            raise ValueError(f"checkpoint {where} was trained on different data ({state.get('num_sequences')} "
                             f"training sequences, now {len(self.train_ds)})")
        step = int(state["step"])
        if state.get("data", {}).get("sequences_consumed") != self.sampler.position(step)["sequences_consumed"]:
            raise ValueError(f"checkpoint {where} has an inconsistent data position")
        weights = ckpt.load_model_weights(path)
        opt_state = ckpt.load_torch_file(path / "optimizer.pt", where)
        rng = ckpt.load_torch_file(path / "rng.pt", where)
        if not isinstance(rng, list) or not rng:
            raise ckpt.CorruptFileError(f"checkpoint {where} is corrupt: bad rng.pt")
        if self.cfg.distributed == "fsdp" and self.info.enabled:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.raw, weights, options=opts)
            set_optimizer_state_dict(self.raw, self.optimizer, opt_state, options=opts)
        else:
            ckpt.apply_model_weights(self.raw, weights, where)
            try:
                self.optimizer.load_state_dict(opt_state)
            except (ValueError, KeyError, RuntimeError) as err:
                raise ValueError(f"checkpoint {where} has an incompatible optimizer state: {err}") from err
        self.schedule.load_state_dict(state["scheduler"])
        ckpt.restore_rng(rng[self.info.rank % len(rng)])
        self.start_step = step
        self._say(f"resumed from {path} at step {step}")

    # ------------------------------------------------------------------------------------------ steps

    def _batch(self, windows: torch.Tensor, keys: list[tuple[int, int]], *, mask: bool = True,
               objective: str | None = None) -> ObjectiveBatch:
        c = self.cfg
        return make_batch(
            windows, keys, objective=objective or self.objective, prefix_len=c.prefix_len,
            random_prefix=c.random_prefix and mask, prefix_min=c.prefix_min, prefix_max=c.prefix_max,
            mask_prob=c.mask_prob, mask_token_id=self.mask_id, seed=c.seed, mask=mask,
        )

    def _forward(self, model: nn.Module, input_ids: torch.Tensor, prefix_lengths: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` of ``input_ids [B, T]`` with the batch's ``prefix_lengths [B]``."""
        return forward_logits(model, input_ids, prefix_lengths if self.takes_prefix else None)

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step (all micro-batches); returns the global-batch loss terms."""
        c, info = self.cfg, self.info
        lr = self.schedule.apply(step)
        keys = self.sampler.rank_indices(step)
        windows = self.train_ds.batch([i for _, i in keys])
        batch = self._batch(windows, keys).to(info.device)
        counts = all_reduce_sum(torch.tensor([batch.ntp_count, batch.mlm_count], dtype=torch.float64,
                                             device=info.device), info).cpu()
        ntp_norm, mlm_norm = float(counts[0]), float(counts[1])
        sums = torch.zeros(2, dtype=torch.float64)
        mb = self.micro
        for a in range(self.accum):
            sl = slice(a * mb, (a + 1) * mb)
            micro = ObjectiveBatch(batch.input_ids[sl], batch.targets[sl], batch.is_mlm[sl], batch.prefix_lengths[sl])
            sync = a == self.accum - 1 or not hasattr(self.model, "no_sync")
            with (contextlib.nullcontext() if sync else self.model.no_sync()):
                with self.autocast():
                    logits = self._forward(self.fwd, micro.input_ids, micro.prefix_lengths)
                loss, stats = objective_loss(logits, micro, c.mlm_weight, ntp_norm, mlm_norm)
                (loss * info.world_size).backward()
            sums += torch.stack([stats["ntp_sum"].double().cpu(), stats["mlm_sum"].double().cpu()])
        if c.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), c.grad_clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.last_step = step + 1
        sums = all_reduce_sum(sums.to(info.device), info).cpu()
        ntp = float(sums[0]) / max(ntp_norm, 1.0)
        mlm = float(sums[1]) / max(mlm_norm, 1.0)
        out = {"loss": ntp + c.mlm_weight * mlm if self.objective == "prefix_mlm" else ntp, "ntp_loss": ntp,
               "lr": lr, "grad_norm": float(grad_norm)}
        if self.objective == "prefix_mlm":
            out["mlm_loss"] = mlm
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss on the first ``eval_batches * micro_batch_size`` validation sequences (fixed masks,
        float32): ``val_loss`` (the training objective) and ``val_ntp_loss`` (next-token loss on positions
        ``>= prefix_len`` with a clean prefix, comparable across JRT-RNN and the baselines)."""
        assert self.val_ds is not None
        c, info = self.cfg, self.info
        n = min(len(self.val_ds), c.eval_batches * c.micro_batch_size)
        n -= n % info.world_size  # the same number of forward passes on every rank (FSDP needs it)
        if n == 0:
            return {}
        mine = list(range(info.rank, n, info.world_size))
        model = self.raw if self.cfg.distributed == "ddp" else self.fwd
        was_training = self.raw.training
        self.raw.eval()
        sums = torch.zeros(6, dtype=torch.float64)  # ntp sum/count, mlm sum/count, decoder sum/count
        dec_prefix = c.prefix_len if c.prefix_len < c.seq_len else 0
        for start in range(0, len(mine), self.micro):
            idx = mine[start: start + self.micro]
            windows = self.val_ds.batch(idx)
            keys = [(-1, i) for i in idx]
            batch = self._batch(windows, keys).to(info.device)
            with self.autocast():
                logits = self._forward(model, batch.input_ids, batch.prefix_lengths).float()
            ce = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE,
                                 reduction="none").view_as(batch.targets).double()
            valid = batch.targets != IGNORE
            is_ntp, is_mlm = valid & ~batch.is_mlm, valid & batch.is_mlm
            clean = make_batch(windows, keys, objective="prefix_mlm", prefix_len=dec_prefix, mask=False,
                               seed=c.seed).to(info.device)
            if self.objective == "prefix_mlm":
                with self.autocast():
                    logits = self._forward(model, clean.input_ids, clean.prefix_lengths).float()
            dec = F.cross_entropy(logits.flatten(0, 1), clean.targets.flatten(), ignore_index=IGNORE,
                                  reduction="sum").double()
            sums += torch.stack([(ce * is_ntp).sum().cpu(), is_ntp.sum().double().cpu(), (ce * is_mlm).sum().cpu(),
                                 is_mlm.sum().double().cpu(), dec.cpu(),
                                 (clean.targets != IGNORE).sum().double().cpu()])
        sums = all_reduce_sum(sums.to(info.device), info).cpu()
        if was_training:
            self.raw.train()
        ntp = float(sums[0] / sums[1].clamp(min=1))
        mlm = float(sums[2] / sums[3].clamp(min=1))
        out = {"val_loss": ntp + c.mlm_weight * mlm if self.objective == "prefix_mlm" else ntp,
               "val_ntp_loss": float(sums[4] / sums[5].clamp(min=1))}
        if self.objective == "prefix_mlm":
            out["val_mlm_loss"] = mlm
        return out

    def save(self, step: int) -> Path | None:
        """Write checkpoint ``step`` (collective: every rank calls it; rank 0 writes)."""
        info = self.info
        rng_states = gather_objects(ckpt.capture_rng(), info)
        model_state: dict[str, torch.Tensor] | None = None
        if self.cfg.distributed == "fsdp" and info.enabled:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(self.raw, options=opts)
            opt_state = get_optimizer_state_dict(self.raw, self.optimizer, options=opts)
        else:
            opt_state = self.optimizer.state_dict()
        path = None
        if info.is_main:
            trainer_state = {
                "scheduler": self.schedule.state_dict(), "data": self.sampler.position(step),
                "num_sequences": len(self.train_ds), "world_size": info.world_size,
                "tokens": step * self.cfg.tokens_per_step, "config": self._saved_config(),
            }
            path = ckpt.save_checkpoint(self.ckpt_root, step, self.raw, model_state, opt_state, trainer_state,
                                        rng_states, self.cfg.keep_last)
        barrier(info)
        return path

    # ------------------------------------------------------------------------------------------ loop

    def _validate(self, step: int) -> dict[str, float]:
        """Evaluate, log a validation row for ``step`` and print it."""
        val = self.evaluate()
        if not val:
            self._say("warning: fewer validation sequences than ranks: no validation loss")
            self.val_ds = None
            return val
        if self.logger is not None:
            self.logger.log({"step": step, **val, "tokens": step * self.cfg.tokens_per_step})
        self._say(f"step {step} | val_loss {val['val_loss']:.4f} | val_ntp_loss {val['val_ntp_loss']:.4f}")
        return val

    def run(self) -> dict[str, Any]:
        c, info = self.cfg, self.info
        from tqdm.auto import tqdm

        self._say(f"training {c.model} ({self.n_params / 1e6:.2f}M parameters, objective {self.objective}) "
                  f"on {len(self.train_ds)} sequences of {c.seq_len} tokens; world size {info.world_size}, "
                  f"grad accumulation {self.accum}, device {info.device}")
        bar = tqdm(total=c.max_steps, initial=self.start_step, desc="train", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        t0 = time.time()
        last_t, last_step = t0, self.start_step
        last: dict[str, Any] = {}
        last_val: dict[str, float] = {}
        step = self.start_step
        saved_at = -1
        if self.val_ds is not None and c.eval_at_start and step == 0:
            self._validate(0)
        while step < c.max_steps:
            metrics = self.train_step(step)
            step += 1
            bar.update(1)
            elapsed = time.time() - t0
            stop = c.max_minutes is not None and elapsed >= c.max_minutes * 60
            stop = bool(broadcast_object(stop, info))
            final = stop or step == c.max_steps
            if step % c.log_interval == 0 or step == 1 or final:
                now = time.time()
                tps = (step - last_step) * c.tokens_per_step / max(now - last_t, 1e-9)
                per_step = (now - t0) / max(step - self.start_step, 1)
                eta = (c.max_steps - step) * per_step
                if c.max_minutes is not None:
                    eta = min(eta, max(0.0, c.max_minutes * 60 - (now - t0)))
                last = {"step": step, **metrics, "tokens_per_s": tps, "tokens": step * c.tokens_per_step,
                        "elapsed_s": now - t0}
                last_t, last_step = now, step
                if self.logger is not None:
                    self.logger.log(last)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{tps:,.0f}")
                self._say(f"step {step}/{c.max_steps} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
                          f"{tps:,.0f} tok/s | ETA {format_duration(eta)}")
            if self.val_ds is not None and (step % c.eval_interval == 0 or final):
                last_val = self._validate(step)
            if step % c.save_interval == 0 or final:
                self.save(step)
                saved_at = step
            if stop:
                self._say(f"time limit of {c.max_minutes} min reached at step {step}")
                break
        bar.close()
        if saved_at != step and step > self.start_step:
            self.save(step)
        self._export_final()
        if self.logger is not None:
            self.logger.close()
        return {"step": step, "loss": last.get("loss"), "val_loss": last_val.get("val_loss"),
                "val_ntp_loss": last_val.get("val_ntp_loss"), "output": str(self.out),
                "checkpoint": str(self.ckpt_root / ckpt.step_dir_name(step)), "parameters": self.n_params}

    def _export_final(self) -> None:
        """The final weights as a plain ``save_pretrained`` folder: ``OUT/model``."""
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        if self.info.is_main and latest is not None:
            from jrt.training.checkpoint import save_pretrained_atomic

            if self.cfg.distributed == "fsdp" and self.info.enabled:
                state = ckpt.load_model_weights(latest)
                save_pretrained_atomic(self.raw, self.out / "model", state_dict=state)
            else:
                save_pretrained_atomic(self.raw, self.out / "model")
        barrier(self.info)
