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


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = MAX_NEW_TOKENS,
    stop: str = STOP,
    add_special_tokens: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts`` in one left-padded batch, each cut at the first ``stop``.

    Input ids ``[B, T]`` (left padded, attention mask ``[B, T]``) go through ``model.generate``; a row stops
    at a token containing ``stop`` or at EOS, at most ``max_new_tokens`` new tokens. Returns the decoded new
    text of each row (special tokens skipped) up to, not including, ``stop``.
    """
    if not prompts:
        return []
    if tokenizer.padding_side != "left":
        tokenizer.padding_side = "left"
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    device = next(model.parameters()).device
    input_ids = enc["input_ids"].to(device)
    attention_mask = enc["attention_mask"].to(device)
    prompt_len = input_ids.shape[1]
    from transformers import StoppingCriteriaList

    stopper = _NewlineStop(tokenizer, prompt_len, stop)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        stopping_criteria=StoppingCriteriaList([stopper]),
        pad_token_id=tokenizer.pad_token_id,
    )
    texts = tokenizer.batch_decode(out[:, prompt_len:].tolist(), skip_special_tokens=True)
    return [t.split(stop)[0] for t in texts]
