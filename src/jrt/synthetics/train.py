"""The small-model trainer of the synthetic lab, and grid execution (in-process, worker processes or Ray).

:func:`train_run` trains one :class:`~jrt.synthetics.config.RunConfig` and returns a JSON-ready result.
:func:`run_grid` runs a list of configs, appending each result to a JSONL file the moment its run ends,
and skipping configs whose ``run_id`` is already in that file, so an interrupted grid resumes where it
stopped.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from jrt.jsonl import append_jsonl, read_jsonl
from jrt.synthetics.config import RunConfig
from jrt.synthetics.data import IGNORE_INDEX, SyntheticBatch, sd_prediction_sets

#: Seed offsets that keep the train, validation and test sets of one run disjoint streams.
_VALID_SEED_OFFSET = 1_000_003
_TEST_SEED_OFFSET = 2_000_029


def resolve_device(device: str) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available); CUDA asked for but absent
    is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or auto") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use cpu, cuda or auto")
    return dev


def masked_loss_and_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Cross-entropy on labelled positions only.

    Args:
        logits: ``[N, T, V]``; labels: ``[N, T]`` aligned with the logits, -100 = no loss.

    Returns:
        ``(mean loss over labelled positions, number correct, number labelled)``.
    """
    keep = labels != IGNORE_INDEX
    sel_logits = logits[keep]
    sel_labels = labels[keep]
    if sel_labels.numel() == 0:
        raise ValueError("batch has no labelled positions")
    loss = F.cross_entropy(sel_logits.float(), sel_labels)
    hits = int((sel_logits.argmax(dim=-1) == sel_labels).sum())
    return loss, hits, int(sel_labels.numel())


def _forward(model: torch.nn.Module, batch: SyntheticBatch) -> torch.Tensor:
    return model(batch.input_ids, prefix_lengths=batch.prefix_lengths)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: SyntheticBatch, batch_size: int, device: torch.device) -> tuple[int, int]:
    """``(correct, labelled)`` over all labelled positions of ``data`` (per answer: per query for MQAR)."""
    was_training = model.training
    model.eval()
    hits = total = 0
    for start in range(0, len(data), batch_size):
        chunk = data.slice(start, start + batch_size).to(device)
        _, h, n = masked_loss_and_hits(_forward(model, chunk), chunk.labels)
        hits += h
        total += n
    model.train(was_training)
    return hits, total


def epoch_batches(
    pools: Sequence[SyntheticBatch], batch_size: int, gen: torch.Generator
) -> list[tuple[int, torch.Tensor]]:
    """One epoch as ``(pool index, row indices)`` batches: every row of every pool once, each batch from one
    pool (its sequences share a length), the batches of all pools shuffled together (the authors' loader)."""
    batches = []
    for i, pool in enumerate(pools):
        perm = torch.randperm(len(pool), generator=gen)
        batches += [(i, perm[s : s + batch_size]) for s in range(0, len(pool), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]


def _pooled_accuracy(pools: Sequence[SyntheticBatch], model: torch.nn.Module, batch_size: int,
                     device: torch.device) -> float:
    hits = total = 0
    for pool in pools:
        h, n = evaluate(model, pool, batch_size, device)
        hits, total = hits + h, total + n
    return hits / max(1, total)


def _order_accuracies(groups: Sequence[tuple[dict[str, Any], SyntheticBatch]], model: torch.nn.Module,
                      batch_size: int, device: torch.device) -> dict[str, float]:
    """Accuracy per order (``meta["order"]``), pooled over the groups of that order: a learning-curve point."""
    counts: dict[str, list[int]] = {}
    for meta, data in groups:
        h, n = evaluate(model, data, batch_size, device)
        c = counts.setdefault(meta["order"], [0, 0])
        c[0], c[1] = c[0] + h, c[1] + n
    return {order: round(h / max(1, n), 5) for order, (h, n) in counts.items()}


@dataclass
class _RunData:
    """The examples of one run: training pools, validation pools (model selection, ``keep_best``), curve groups
    (per-order accuracy along training, for runs that score the final model) and test groups."""

    pools: list[SyntheticBatch]
    valid_pools: list[SyntheticBatch]
    curve_groups: list[tuple[dict[str, Any], SyntheticBatch]]
    test_groups: list[tuple[dict[str, Any], SyntheticBatch]]


def _run_data(cfg: RunConfig) -> _RunData:
    tr = cfg.train
    pools = cfg.task.train_pools(tr.num_train, seed=cfg.seed)
    if tr.overfit:
        groups = [({"pair": None, "order": "train", "seen": True}, pool) for pool in pools]
        return _RunData(pools, pools, [], groups)
    valid_seed = cfg.seed + _VALID_SEED_OFFSET
    valid_pools = cfg.task.train_pools(tr.num_valid, seed=valid_seed) if tr.keep_best else []
    curve = [] if tr.keep_best or tr.eval_every >= tr.max_steps else cfg.task.test_groups(tr.num_valid, valid_seed)
    return _RunData(pools, valid_pools, curve, cfg.task.test_groups(tr.num_test, seed=cfg.seed + _TEST_SEED_OFFSET))


class _Selection:
    """Model selection on the validation pools (``keep_best``): the best checkpoint, early stopping."""

    def __init__(self, train: Any) -> None:
        self.train = train
        self.best_acc, self.best_state, self.best_step, self.bad_evals = -1.0, None, 0, 0

    def update(self, acc: float, step: int, model: torch.nn.Module) -> str | None:
        """Record one validation accuracy; return why training should stop (``"target"``/``"patience"``) or None."""
        if acc > self.best_acc:
            self.best_acc, self.best_step, self.bad_evals = acc, step, 0
            self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.bad_evals += 1
        if self.best_acc >= self.train.target_acc:
            return "target"
        return "patience" if self.bad_evals >= self.train.patience else None


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: SyntheticBatch, grad_clip: float) -> float:
    loss, _, _ = masked_loss_and_hits(_forward(model, batch), batch.labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return float(loss.item())


@torch.no_grad()
def _sd_counts(model: torch.nn.Module, data: SyntheticBatch, batch_size: int,
               device: torch.device) -> tuple[int, int, int, int]:
    """One pass over SD sequences: ``(correct, labelled, answers in the first set, answers in the second)``. The
    right answer is in both sets; a model that only guesses among the short set scores about ``1/|short|``."""
    was_training = model.training
    model.eval()
    hits = total = first = second = 0
    for start in range(0, len(data), batch_size):
        chunk = data.slice(start, start + batch_size).to(device)
        logits = _forward(model, chunk)
        _, h, n = masked_loss_and_hits(logits, chunk.labels)
        in_first, in_second = sd_prediction_sets(chunk.input_ids, logits[:, -1].argmax(dim=-1))
        hits, total = hits + h, total + n
        first, second = first + int(in_first.sum()), second + int(in_second.sum())
    model.train(was_training)
    return hits, total, first, second


def _score(model: torch.nn.Module, groups: Sequence[tuple[dict[str, Any], SyntheticBatch]], batch_size: int,
           device: torch.device, experiment: str) -> list[dict[str, Any]]:
    out = []
    for meta, data in groups:
        if experiment == "sd" and meta["pair"] is not None:
            hits, n, in_first, in_second = _sd_counts(model, data, batch_size, device)
            out.append({**meta, "hits": hits, "n": n, "in_first": in_first, "in_second": in_second})
        else:
            hits, n = evaluate(model, data, batch_size, device)
            out.append({**meta, "hits": hits, "n": n})
        out[-1]["accuracy"] = round(hits / max(1, n), 5)
    return out


def train_run(
    cfg: RunConfig,
    *,
    device: str = "cpu",
    threads: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train one config from scratch and score it per test group.

    Training iterates in epochs over the task's pools (SD: one pool per set-size pair, both orders mixed in
    each; MQAR: one pool), with the optimiser and schedule of :mod:`jrt.training.optim`. Every ``eval_every``
    steps a ``history`` entry records the running loss and either the validation accuracy (``keep_best``) or,
    for runs that score their final model, the accuracy per order on held-out groups of the test pairs
    (``num_valid`` examples each): the learning curve.

    Args:
        cfg: the run; device: ``"cpu"`` (default), ``"cuda"`` or ``"auto"``; threads: ``torch.set_num_threads``
        for this run (None leaves it alone); progress: a tqdm bar over steps; log: one-line messages.

    Returns:
        A JSON-ready dict: ``run_id``, ``config``, ``experiment``, ``model``, ``order`` (``once``/``twice``),
        ``style``, ``lr``, ``seed``, ``state_bytes``, ``num_params``, ``groups`` (per test group: ``pair``,
        ``order``, ``seen``, ``hits``, ``n``, ``accuracy``), ``accuracy`` (pooled over the groups),
        ``best_valid_accuracy``, ``steps``, ``steps_per_epoch``, ``seconds`` (wall), ``cpu_seconds`` (CPU time of
        this process), ``stopped`` (``"target"``, ``"patience"`` or ``"max_steps"``) and ``history`` (per
        evaluation: ``step``, ``loss`` and ``valid_accuracy`` or ``valid_orders`` {order: accuracy}).
    """
    from jrt.synthetics.models import build_lab_model

    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    dev = resolve_device(device)
    torch.manual_seed(cfg.seed)
    t0, c0 = time.perf_counter(), time.process_time()
    data = _run_data(cfg)
    model = build_lab_model(cfg.model, vocab_size=cfg.task.vocab_size, seq_len=cfg.task.seq_len).to(dev)
    eval_bs = max(cfg.train.batch_size, 256)
    fit = _fit(cfg, model, data, dev, eval_bs, progress)
    if fit.selection.best_state is not None:
        model.load_state_dict(fit.selection.best_state)
    groups = _score(model, data.test_groups, eval_bs, dev, cfg.experiment)
    test_acc = sum(g["hits"] for g in groups) / max(1, sum(g["n"] for g in groups))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    if log is not None:
        log(f"{cfg.describe()}: test accuracy {test_acc:.3f} after {fit.steps} steps ({fit.stopped}, "
            f"{seconds:.1f} s)")
    keep_best = cfg.train.keep_best
    return {
        "run_id": cfg.run_id(), "experiment": cfg.experiment, "model": cfg.model_name,
        "order": cfg.task.order_label, "style": cfg.model.style, "lr": cfg.train.lr, "seed": cfg.seed,
        "config": cfg.to_dict(), "state_bytes": int(model.state_size_bytes(cfg.task.seq_len)),
        "num_params": int(sum(p.numel() for p in model.parameters())), "groups": groups,
        "accuracy": round(test_acc, 5),
        "best_valid_accuracy": round(fit.selection.best_acc, 5) if keep_best else None,
        "best_step": fit.selection.best_step if keep_best else fit.steps, "steps": fit.steps,
        "steps_per_epoch": fit.steps_per_epoch, "stopped": fit.stopped, "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2), "device": str(dev), "history": fit.history,
    }


@dataclass
class _Fit:
    """What the training loop hands back: the history, why and when it stopped, the model selection."""

    history: list[dict[str, Any]]
    stopped: str
    steps: int
    steps_per_epoch: int
    selection: _Selection


def _fit(cfg: RunConfig, model: torch.nn.Module, data: _RunData, dev: torch.device, eval_bs: int,
         progress: bool) -> _Fit:
    """The training loop: epochs over the pools, an evaluation every ``eval_every`` steps (and at the end)."""
    from jrt.training.optim import WarmupCosineSchedule, adamw

    tr = cfg.train
    opt = adamw(model, tr.lr, tr.weight_decay, tuple(tr.betas), grouped=tr.grouped_decay, decay_embeddings=False)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(cfg.seed + 17)
    steps_per_epoch = sum(math.ceil(len(p) / tr.batch_size) for p in data.pools)
    schedule = WarmupCosineSchedule(
        opt, tr.lr, tr.lr * tr.min_lr_ratio, tr.warmup_steps, tr.max_steps,
        steps_per_epoch=steps_per_epoch if tr.schedule == "epoch_cosine" else None,
    )
    fit = _Fit([], "max_steps", 0, steps_per_epoch, _Selection(tr))
    running_loss = 0.0
    batches: list[tuple[int, torch.Tensor]] = []
    bar = tqdm(total=tr.max_steps, desc=cfg.describe(), disable=not progress, leave=False, dynamic_ncols=True)
    model.train()
    for step in range(1, tr.max_steps + 1):
        fit.steps = step
        schedule.apply(step - 1)
        if not batches:
            batches = epoch_batches(data.pools, tr.batch_size, gen)
        pool_idx, rows = batches.pop()
        loss_value = _train_step(model, opt, data.pools[pool_idx].index(rows).to(dev), tr.grad_clip)
        running_loss = 0.9 * running_loss + 0.1 * loss_value if step > 1 else loss_value
        bar.update(1)
        if step % tr.eval_every and step != tr.max_steps:
            continue
        entry: dict[str, Any] = {"step": step, "loss": round(running_loss, 5)}
        fit.history.append(entry)
        if data.curve_groups:
            entry["valid_orders"] = _order_accuracies(data.curve_groups, model, eval_bs, dev)
            bar.set_postfix(loss=f"{running_loss:.3f}", **entry["valid_orders"])
        if tr.keep_best:
            entry["valid_accuracy"] = round(_pooled_accuracy(data.valid_pools, model, eval_bs, dev), 5)
            bar.set_postfix(loss=f"{running_loss:.3f}", valid=f"{entry['valid_accuracy']:.3f}")
            reason = fit.selection.update(entry["valid_accuracy"], step, model)
            if reason is not None:
                fit.stopped = reason
                break
    bar.close()
    return fit


# --------------------------------------------------------------------------------------------------
# results file
# --------------------------------------------------------------------------------------------------


def load_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All results in a JSONL file (see :mod:`jrt.jsonl`: a missing file is empty, a torn last line from a crash
    is dropped, any other malformed line is an error naming the file and line)."""
    return read_jsonl(path, repair=True)


def append_result(path: str | os.PathLike, result: dict[str, Any]) -> None:
    """Append one result as a JSON line on a fresh line, flushed and fsynced (see :mod:`jrt.jsonl`)."""
    append_jsonl(path, result)


def _worker(cfg_dict: dict[str, Any], device: str, threads: int | None) -> dict[str, Any]:
    return train_run(RunConfig.from_dict(cfg_dict), device=device, threads=threads, progress=False)


def run_grid(
    grid: Sequence[RunConfig],
    results_path: str | os.PathLike,
    *,
    workers: int = 1,
    device: str = "cpu",
    threads: int | None = None,
    ray_address: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """Run every config not already in ``results_path``; return the results of the whole grid.

    Args:
        grid: the configs (duplicates by ``run_id`` run once).
        results_path: JSONL file; each finished run is appended at once.
        workers: local worker processes (1 = in this process, with a per-step progress bar).
        device: passed to :func:`train_run`.
        threads: torch threads per run (default: all cores for one worker, cores // workers otherwise).
        ray_address: run on a Ray cluster (``"local"`` starts one here; needs the ``ray`` extra).
        progress: show progress bars.
        log: one-line messages (None = silent).

    Returns:
        One result per distinct config of ``grid``, in grid order.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    say = log or (lambda _msg: None)
    done = {r["run_id"]: r for r in load_results(results_path) if "run_id" in r}
    unique: dict[str, RunConfig] = {}
    for cfg in grid:
        unique.setdefault(cfg.run_id(), cfg)
    todo = [cfg for rid, cfg in unique.items() if rid not in done]
    if len(unique) > len(todo):
        say(f"resuming: {len(unique) - len(todo)} of {len(unique)} runs already in {results_path}")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
    bar = tqdm(total=len(todo), desc="runs", disable=not progress or not todo, dynamic_ncols=True)

    def finish(result: dict[str, Any]) -> None:
        append_result(results_path, result)
        done[result["run_id"]] = result
        bar.update(1)
        finished = sum(rid in done for rid in unique)
        say(f"[{finished}/{len(unique)}] {result['model']} {result['order']} state {result['state_bytes']} B: "
            f"accuracy {result['accuracy']:.3f} ({result['stopped']} at step {result['steps']}, "
            f"{result['seconds']:.0f} s)")

    try:
        if ray_address is not None:
            _run_ray(todo, ray_address, device, threads, finish)
        elif workers == 1:
            for cfg in todo:
                finish(train_run(cfg, device=device, threads=threads, progress=progress))
        else:
            _run_processes(todo, workers, device, threads, finish)
    finally:
        bar.close()
    return [done[rid] for rid in unique if rid in done]


def _run_processes(
    todo: Iterable[RunConfig], workers: int, device: str, threads: int | None,
    finish: Callable[[dict[str, Any]], None],
) -> None:
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
    try:
        pending: set[Future] = {pool.submit(_worker, cfg.to_dict(), device, threads) for cfg in todo}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                finish(fut.result())
    except BaseException:
        _terminate(pool)  # an interrupt (SIGINT, or SIGTERM through the CLI) or a failed run: stop now
        raise
    pool.shutdown(wait=True)


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Stop a process pool at once: cancel what has not started and kill the workers running a run (a run's
    result is only written when it ends, so nothing finished is lost)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        proc.terminate()
    for proc in processes:
        proc.join(timeout=10)


def _run_ray(
    todo: Sequence[RunConfig], address: str, device: str, threads: int | None,
    finish: Callable[[dict[str, Any]], None],
) -> None:
    try:
        import ray
    except ImportError as err:  # pragma: no cover - depends on the optional extra
        raise ValueError("--ray needs the optional dependency: pip install 'just-read-twice[ray]'") from err
    started_here = not ray.is_initialized()
    if started_here:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    try:
        num_gpus = 1 if device.startswith("cuda") else 0
        remote = ray.remote(num_cpus=threads or 1, num_gpus=num_gpus)(_worker)
        pending = [remote.remote(cfg.to_dict(), device, threads) for cfg in todo]
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    finish(ray.get(ref))
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started_here:
            ray.shutdown()
