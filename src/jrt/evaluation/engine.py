"""Evaluation engine: prompt preparation (truncation that fits the model) and batched greedy generation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from jrt.prompting.templates import mode_repeats, task_format
from jrt.tasks.registry import Example, TaskSpec
from jrt.tasks.truncation import truncate_context

#: Generation settings of the paper: greedy, stop at the first newline, at most 48 new tokens.
MAX_NEW_TOKENS = 48
STOP = "\n"


@dataclass
class Prepared:
    """One example ready for generation.

    Attributes:
        example: the source example.
        mode: prompting mode (``default``, ``twice``, ``repeat<k>``).
        prompt: the rendered prompt.
        prompt_tokens: its length in model tokens.
        context_tokens: kept context length in truncation-tokenizer tokens.
        truncated: the context was cut to the task budget.
        fit_truncated: the context was cut further so that the prompt fits the model's maximum length.
    """

    example: Example
    mode: str
    prompt: str
    prompt_tokens: int
    context_tokens: int
    truncated: bool
    fit_truncated: bool


def prepare(
    spec: TaskSpec,
    example: Example,
    mode: str,
    model_tokenizer: Any,
    truncation_tokenizer: Any | None = None,
    max_length: int | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    budget: int | None = None,
) -> Prepared:
    """Truncate ``example``'s context and render its prompt for ``mode``.

    The context is cut to ``spec.budget`` (``context_length - answer_length``) tokens of
    ``truncation_tokenizer`` (GPT-2 in the paper), centred on the answer or keeping the start. When the
    rendered prompt plus ``max_new_tokens`` does not fit ``max_length`` model tokens (e.g. a doubled prompt on a
    1024-position model) the budget is lowered until it fits: such examples are flagged ``fit_truncated``,
    never dropped.
    """
    tok = truncation_tokenizer or model_tokenizer
    fmt = task_format(spec.name)
    repeats = mode_repeats(mode)
    cur = spec.budget if budget is None else budget
    first = None
    fit = False
    while True:
        cut = truncate_context(example.context, example.answers, tok, cur, spec.centre_on_answer)
        first = first or cut
        prompt = fmt.render(example.fields(cut.text), repeats).strip()
        n_prompt = len(model_tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if max_length is None or n_prompt + max_new_tokens <= max_length:
            break
        over = n_prompt + max_new_tokens - max_length
        new_budget = min(cut.n_kept, cur) - max(1, math.ceil(over / repeats))
        if new_budget < 1:
            raise ValueError(
                f"{spec.name}/{example.id}: prompt does not fit the model's {max_length} positions "
                f"even with an empty context"
            )
        cur, fit = new_budget, True
    return Prepared(example, mode, prompt, n_prompt, cut.n_kept, first.truncated or fit, fit)


class _NewlineStop:
    """Stopping criterion: a row is done once it has generated a token that contains the stop string.

    Returns a ``[B]`` bool tensor (transformers finishes rows individually and pads them afterwards).
    """

    def __init__(self, tokenizer: Any, prompt_len: int, stop: str = STOP):
        self.prompt_len = prompt_len
        self.stop_ids = stop_token_ids(tokenizer, stop)
        self.stop_ids_t: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.stop_ids_t is None or self.stop_ids_t.device != input_ids.device:
            self.stop_ids_t = torch.tensor(sorted(self.stop_ids), device=input_ids.device, dtype=input_ids.dtype)
        new = input_ids[:, self.prompt_len :]
        if new.shape[1] == 0:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return torch.isin(new, self.stop_ids_t).any(dim=1)


_STOP_CACHE: dict[tuple[int, int, str, str], frozenset[int]] = {}


def stop_token_ids(tokenizer: Any, stop: str = STOP) -> frozenset[int]:
    """Ids of every vocabulary token whose text contains ``stop`` (cached per tokenizer)."""
    key = (id(tokenizer), len(tokenizer), str(getattr(tokenizer, "name_or_path", "")), stop)
    if key not in _STOP_CACHE:
        ids = range(len(tokenizer))
        texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)
        _STOP_CACHE[key] = frozenset(i for i, t in zip(ids, texts) if stop in t)
    return _STOP_CACHE[key]


#: New tokens per ``generate`` call between two removals of finished rows from a batch.
ROUND_TOKENS = 8


def _cache_of(output: Any) -> tuple[str | None, Any]:
    """``(name, cache)`` of a ``generate(..., return_dict_in_generate=True)`` output; the name is the keyword that
    passes it back to ``generate`` (``cache`` since transformers 5, ``past_key_values`` before)."""
    for key in ("cache", "past_key_values", "cache_params"):
        value = getattr(output, key, None)
        if value is not None:
            return key, value
    return None, None


def rows_selectable(cache: Any) -> bool:
    """Whether finished rows can be removed from ``cache`` in place (``batch_select_indices`` on the cache and,
    for ``transformers``' layered caches, on every layer; recurrent layers of some versions lack it)."""
    if cache is None or not callable(getattr(cache, "batch_select_indices", None)):
        return False
    layers = getattr(cache, "layers", None)
    if layers is None or type(cache).__name__ == "JRTCache":
        return True
    return all(callable(getattr(layer, "batch_select_indices", None)) for layer in layers)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return {int(i) for i in ids}


@torch.inference_mode()
def _generate_in_rounds(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, step: int,
    done_ids: set[int], common: dict[str, Any],
) -> dict[int, list[int]]:
    """The new token ids of each row of the left-padded ``input_ids [B, T]`` (``attention_mask [B, T]``), by row
    index: ``model.generate`` in rounds of ``step`` new tokens, the rows that produced a token of ``done_ids``
    leaving the batch and its cache after each round (see :func:`generate`)."""
    device = input_ids.device
    prompt_len = input_ids.shape[1]
    finished: dict[int, list[int]] = {}
    rows = torch.arange(input_ids.shape[0], device=device)  # original index of each live row
    cache_kwargs: dict[str, Any] = {}
    produced = 0
    while rows.numel() and produced < max_new_tokens:
        k = min(step, max_new_tokens - produced)
        last_round = k == max_new_tokens - produced
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=k,
                             return_dict_in_generate=not last_round, **cache_kwargs, **common)
        seq = out if last_round else out.sequences
        added = seq.shape[1] - input_ids.shape[1]
        produced += added
        new = seq[:, prompt_len:].tolist()
        is_done = [last_round or added < k or any(t in done_ids for t in row) for row in new]
        for i, d in enumerate(is_done):
            if d:
                finished.setdefault(int(rows[i]), new[i])
        if all(is_done):
            break
        key, cache = _cache_of(out)
        if not rows_selectable(cache):  # cannot drop rows: finish the batch in one call from its cache
            step = max_new_tokens
        elif any(is_done):
            index = torch.tensor([i for i, d in enumerate(is_done) if not d], device=device)
            cache.batch_select_indices(index)
            rows, seq = rows[index], seq[index]
            attention_mask = attention_mask[index]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(seq.shape[0], added)], dim=1)
        input_ids = seq
        cache_kwargs = {key: cache} if key is not None else {}  # no cache returned: the next call re-reads all
    return finished


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = MAX_NEW_TOKENS,
    stop: str = STOP,
    add_special_tokens: bool = False,
    round_tokens: int | None = ROUND_TOKENS,
) -> list[str]:
    """Greedy continuations of ``prompts`` in one left-padded batch, each cut at the first ``stop``.

    Input ids ``[B, T]`` (left padded, attention mask ``[B, T]``) go through ``model.generate``; a row stops
    at a token containing ``stop`` or at EOS, at most ``max_new_tokens`` new tokens. Returns the decoded new
    text of each row (special tokens skipped) up to, not including, ``stop``.

    With ``B > 1`` and a cache that supports it (``transformers``' ``DynamicCache``, :class:`jrt.models.JRTCache`),
    decoding runs in rounds of ``round_tokens`` new tokens: after each round the finished rows leave the batch
    and its cache, and ``generate`` continues the remaining rows from the cache, so a batch no longer decodes
    every row until its longest answer ends. Each row's tokens are the same as in one ``generate`` call (greedy,
    same cache contents). ``round_tokens=None`` uses one call; a cache without row selection finishes the batch
    in one call after the first round.
    """
    if not prompts:
        return []
    if tokenizer.padding_side != "left":
        tokenizer.padding_side = "left"
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    device = next(model.parameters()).device
    input_ids = enc["input_ids"].to(device)
    attention_mask = enc["attention_mask"].to(device)
    from transformers import StoppingCriteriaList

    stopper = _NewlineStop(tokenizer, input_ids.shape[1], stop)
    common = {
        "do_sample": False,
        "num_beams": 1,
        "stopping_criteria": StoppingCriteriaList([stopper]),
        "pad_token_id": tokenizer.pad_token_id,
    }
    n = len(prompts)
    step = max_new_tokens if round_tokens is None or n == 1 else max(1, round_tokens)
    finished = _generate_in_rounds(model, input_ids, attention_mask, max_new_tokens, step,
                                   stopper.stop_ids | _eos_ids(model, tokenizer), common)
    texts = tokenizer.batch_decode([finished.get(i, []) for i in range(n)], skip_special_tokens=True)
    return [t.split(stop)[0] for t in texts]
