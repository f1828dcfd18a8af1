"""The pretraining objective: JRT-RNN's prefix masked-LM + next-token loss, and plain next-token loss.

For a window ``w`` of ``T + 1`` tokens (inputs ``x = w[:T]``) and a prefix length ``M`` (``0 <= M < T``):

- positions ``i < M`` (the prefix, read non-causally by JRT-RNN) are *masked-LM* candidates: each is chosen
  with probability ``mask_prob`` (every token id is eligible, id 0 included), its input is replaced by the
  mask id, and its target is the original token ``x_i`` at the same position;
- positions ``i >= M`` get the *next-token* target ``w[i + 1]``;
- ``L = L_ntp + mlm_weight * L_mlm``, each term the mean cross-entropy over its own positions (for data
  parallel runs, the mean over the whole global batch: pass the global counts).

Randomness (``M`` when drawn, the mask) comes from a generator seeded per sequence by
``(seed, epoch, sequence index)``, so a sequence gets the same mask whichever rank or micro-batch reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class ObjectiveBatch:
    """One micro-batch ready for the model.

    ``input_ids``: ``[B, T]`` (mask id at masked-LM positions); ``targets``: ``[B, T]`` the target of every
    position (``IGNORE`` where there is none); ``is_mlm``: ``[B, T]`` bool, True where the target is a
    masked-LM target (False: next-token); ``prefix_lengths``: ``[B]`` int64, the non-causal prefix of each row
    (zeros for plain next-token).
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    is_mlm: torch.Tensor
    prefix_lengths: torch.Tensor

    @property
    def ntp_count(self) -> int:
        return int(((self.targets != IGNORE) & ~self.is_mlm).sum())

    @property
    def mlm_count(self) -> int:
        return int(((self.targets != IGNORE) & self.is_mlm).sum())

    def to(self, device: torch.device | str) -> ObjectiveBatch:
        return ObjectiveBatch(
            self.input_ids.to(device), self.targets.to(device), self.is_mlm.to(device),
            self.prefix_lengths.to(device),
        )


def sequence_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator that depends only on ``(seed, epoch, index)``."""
    key = (seed * 1_000_003 + epoch) * 2_147_483_647 + index
    return torch.Generator().manual_seed(key % (2**63 - 1))


def make_batch(
    windows: torch.Tensor,
    keys: list[tuple[int, int]] | None = None,
    *,
    objective: str = "prefix_mlm",
    prefix_len: int = 1024,
    random_prefix: bool = False,
    prefix_min: int = 1,
    prefix_max: int | None = None,
    mask_prob: float = 0.15,
    mask_token_id: int | None = None,
    seed: int = 0,
    mask: bool = True,
) -> ObjectiveBatch:
    """Build the inputs and targets of one micro-batch from token windows ``[B, T + 1]`` (int64).

    ``keys``: the ``(epoch, sequence index)`` of each row, for the per-sequence generators (default
    ``(0, row)``). ``objective="ntp"`` gives next-token targets everywhere and prefix lengths of zero. With
    ``mask=False`` the prefix keeps its tokens and gets no targets (clean evaluation of the decoder part).
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [B, T + 1] with T >= 1, got {tuple(windows.shape)}")
    windows = windows.long()
    B, T = windows.shape[0], windows.shape[1] - 1
    inputs = windows[:, :-1].clone()
    next_tokens = windows[:, 1:]
    if objective == "ntp":  # no prefix: every model reads the whole input causally
        return ObjectiveBatch(inputs, next_tokens.clone(), torch.zeros(B, T, dtype=torch.bool),
                              torch.zeros(B, dtype=torch.long))
    if objective != "prefix_mlm":
        raise ValueError(f"objective must be 'prefix_mlm' or 'ntp', got {objective!r}")
    hi = prefix_max if prefix_max is not None else T - 1
    if random_prefix:
        if not 0 <= prefix_min <= hi < T:
            raise ValueError(f"random prefix range [{prefix_min}, {hi}] must lie in [0, T) = [0, {T})")
    elif not 0 <= prefix_len < T:
        raise ValueError(
            f"prefix length {prefix_len} must be in [0, T) = [0, {T}): the prefix must leave next-token positions"
        )
    if mask and mask_token_id is None:
        raise ValueError("the prefix masked-LM objective needs a mask_token_id")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    keys = keys if keys is not None else [(0, b) for b in range(B)]
    if len(keys) != B:
        raise ValueError(f"got {len(keys)} keys for {B} sequences")
    pos = torch.arange(T)
    prefix = torch.empty(B, dtype=torch.long)
    chosen = torch.zeros(B, T, dtype=torch.bool)
    for b, (epoch, index) in enumerate(keys):
        g = sequence_generator(seed, epoch, index)
        m = int(torch.randint(prefix_min, hi + 1, (1,), generator=g)) if random_prefix else prefix_len
        prefix[b] = m
        chosen[b] = (torch.rand(T, generator=g) < mask_prob) & (pos < m)
    in_prefix = pos[None, :] < prefix[:, None]
    targets = torch.where(in_prefix, torch.full_like(inputs, IGNORE), next_tokens)
    if mask:
        targets = torch.where(chosen, inputs, targets)
        inputs = torch.where(chosen, torch.full_like(inputs, mask_token_id), inputs)
        is_mlm = chosen
    else:
        is_mlm = torch.zeros(B, T, dtype=torch.bool)
    return ObjectiveBatch(inputs, targets, is_mlm, prefix)


def objective_loss(
    logits: torch.Tensor,
    batch: ObjectiveBatch,
    mlm_weight: float = 0.25,
    ntp_norm: float | None = None,
    mlm_norm: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L = sum_ntp CE / ntp_norm + mlm_weight * sum_mlm CE / mlm_norm`` from logits ``[B, T, V]``.

    Norms default to this batch's own counts (a plain mean); pass global counts for gradient accumulation and
    data parallelism so that micro-batch losses add up to the global-batch mean. Returns the loss (float32
    scalar, differentiable) and detached sums ``{"ntp_sum", "mlm_sum"}`` for logging.
    """
    if logits.dim() != 3 or logits.shape[:2] != batch.targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(batch.targets.shape)}")
    V = logits.shape[-1]
    valid = batch.targets != IGNORE
    if valid.any() and int(batch.targets[valid].max()) >= V:
        raise ValueError(
            f"a target token id ({int(batch.targets[valid].max())}) is outside the model's vocabulary ({V}); "
            "the data was tokenized with a larger vocabulary than the model's"
        )
    ce = F.cross_entropy(logits.float().reshape(-1, V), batch.targets.reshape(-1), ignore_index=IGNORE,
                         reduction="none").view_as(batch.targets)
    is_ntp = valid & ~batch.is_mlm
    is_mlm = valid & batch.is_mlm
    ntp_norm = float(ntp_norm if ntp_norm is not None else is_ntp.sum().clamp(min=1))
    mlm_norm = float(mlm_norm if mlm_norm is not None else is_mlm.sum().clamp(min=1))
    weights = is_ntp.float() / max(ntp_norm, 1.0) + is_mlm.float() * (mlm_weight / max(mlm_norm, 1.0))
    loss = (ce * weights).sum()
    stats = {"ntp_sum": (ce.detach() * is_ntp).sum(), "mlm_sum": (ce.detach() * is_mlm).sum()}
    return loss, stats
