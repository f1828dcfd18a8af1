"""Atomic, resumable training checkpoints.

``OUT/checkpoints/step_00001000/`` holds:

- ``config.json`` + ``model.safetensors`` (``save_pretrained``: loadable with ``from_pretrained``);
- ``optimizer.pt`` (AdamW state), ``rng.pt`` (torch / CUDA / numpy / Python RNG states of every rank);
- ``trainer_state.json`` (step, schedule, data position, run config, world size).

A checkpoint is written into ``.tmp-step_...`` and renamed when complete, so a crash never leaves a
half-written ``step_*`` folder; older ones beyond ``keep_last`` are removed after the rename. For fault
injection in tests, ``JRT_TRAIN_KILL_AT_STEP=k`` SIGKILLs the process in the middle of writing step ``k``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from jrt.tensor_files import CorruptFileError, read_tensor_file

STEP_RE = re.compile(r"^step_(\d{8})$")
KILL_ENV = "JRT_TRAIN_KILL_AT_STEP"
STATE_FILE = "trainer_state.json"
CHECKPOINT_VERSION = 1


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(ckpt_root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``ckpt_root``, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = STEP_RE.match(d.name)
        if m and d.is_dir() and (d / STATE_FILE).is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1][1] if ckpts else None


# ---------------------------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """This process's RNG states in types that ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": _py_state_to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_lists(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


# ---------------------------------------------------------------------------------------------- save


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _save_pretrained(model: nn.Module, path: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
    """``save_pretrained`` without transformers' per-save progress bar."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        model.save_pretrained(path, state_dict=state_dict)
        return
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path, state_dict=state_dict)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _remove_stale(folder: Path, *patterns: str) -> None:
    """Remove temporaries left by a process killed while writing (one writer per run folder: rank 0)."""
    if not folder.is_dir():
        return
    for pattern in patterns:
        for stale in folder.glob(pattern):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def save_pretrained_atomic(model: nn.Module, target: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``model.save_pretrained`` into a temporary folder renamed onto ``target`` (replacing it)."""
    target = Path(target)
    _remove_stale(target.parent, f".tmp-{target.name}-*", f".old-{target.name}-*")
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    _save_pretrained(model, tmp, state_dict)
    _fsync_tree(tmp)
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    _fsync_dir(target.parent)


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    model: nn.Module,
    model_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically (call on rank 0 only); returns its folder.

    ``model`` provides ``save_pretrained``; ``model_state`` replaces its own state dict when given (full
    state of a sharded model). ``trainer_state`` must be JSON-serialisable.
    """
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    _remove_stale(root, ".tmp-step_*")
    tmp = root / f".tmp-{final.name}"
    _save_pretrained(model, tmp, model_state)
    torch.save(optimizer_state, tmp / "optimizer.pt")
    if os.environ.get(KILL_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die with a half-written checkpoint
    torch.save(rng_states, tmp / "rng.pt")
    state = {"version": CHECKPOINT_VERSION, "step": step, **trainer_state}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. the final save after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old_step, old in list_checkpoints(root)[:-keep_last]:
        if old_step != step:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------- load


def read_trainer_state(path: str | Path, pretraining: bool = True) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint, checked field by field: version, step and config always, the
    pretraining trainer's scheduler and data position with ``pretraining`` (other trainers check their own).

    Raises:
        CorruptFileError: missing, not JSON, or a (hand-edited) field of the wrong type or range.
    """
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CorruptFileError(f"checkpoint {path} is incomplete: no {STATE_FILE}") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(f"checkpoint {path} is corrupt: {STATE_FILE} is not valid JSON ({err})") from err
    if not isinstance(state, dict):
        raise CorruptFileError(f"checkpoint {path} is corrupt: {STATE_FILE} is not a JSON object")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CorruptFileError(f"checkpoint {path} has version {state.get('version')}, expected {CHECKPOINT_VERSION}")

    def check(name: str, ok: bool, expected: str, value: Any) -> None:
        if not ok:
            raise CorruptFileError(f"checkpoint {path} is corrupt: {STATE_FILE} field {name} must be {expected}, "
                                   f"got {value!r}")

    def is_count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    step = state.get("step")
    check("step", is_count(step), "an int >= 0", step)
    check("config", isinstance(state.get("config"), dict), "an object", state.get("config"))
    if not pretraining:  # another trainer (jrt linearize) checks its own fields
        return state
    for name in ("scheduler", "data"):
        check(name, isinstance(state.get(name), dict), "an object", state.get(name))
    consumed = state["data"].get("sequences_consumed")
    check("data.sequences_consumed", is_count(consumed), "an int >= 0", consumed)
    check("num_sequences", is_count(state.get("num_sequences")), "an int >= 0", state.get("num_sequences"))
    last = state["scheduler"].get("last_step")
    check("scheduler.last_step", is_count(last), "an int >= 0", last)
    return state


def load_model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors`` (or its shards) in ``path``; ``ValueError`` when corrupt."""
    path = Path(path)
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise ValueError(f"checkpoint {path} has no model*.safetensors")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(read_tensor_file(f, path))
    return sd


def apply_model_weights(model: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Load ``sd`` into ``model`` exactly; keys missing from ``sd`` must be tied to loaded ones."""
    own = model.state_dict()
    unexpected = sorted(set(sd) - set(own))
    if unexpected:
        raise ValueError(f"checkpoint {where} is incompatible with the model: unexpected weights {unexpected[:5]}")
    for key, tensor in sd.items():
        if own[key].shape != tensor.shape:
            raise ValueError(
                f"checkpoint {where} is incompatible with the model: {key} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(own[key].shape)}"
            )
    missing = set(own) - set(sd)
    loaded_ptrs = {own[k].data_ptr() for k in sd}
    untied = sorted(k for k in missing if own[k].data_ptr() not in loaded_ptrs)
    if untied:
        raise ValueError(f"checkpoint {where} is incompatible with the model: missing weights {untied[:5]}")
    with torch.no_grad():
        for key, tensor in sd.items():
            own[key].copy_(tensor)


def load_torch_file(path: Path, where: str) -> Any:
    """A ``torch.save`` file of a checkpoint (``ValueError`` when missing or corrupt, see :mod:`jrt.tensor_files`)."""
    return read_tensor_file(path, where)
