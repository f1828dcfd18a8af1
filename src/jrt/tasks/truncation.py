"""Context truncation to a token budget, centred on the answer or keeping the first tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Truncated:
    """A context cut to a token budget.

    Attributes:
        text: the kept text (a contiguous slice of the original context).
        n_tokens: tokens in the original context.
        n_kept: tokens in ``text``.
        truncated: whether anything was cut.
    """

    text: str
    n_tokens: int
    n_kept: int
    truncated: bool


def find_answer(context: str, answers: Sequence[str]) -> tuple[int, int] | None:
    """Character span ``(start, end)`` of the first gold answer (in list order) found in ``context``.

    Matching is case-insensitive; the earliest occurrence of that answer is returned, or None.
    """
    lowered = context.lower()
    for answer in answers:
        if not answer:
            continue
        idx = lowered.find(answer.lower())
        if idx >= 0:
            return idx, idx + len(answer)
    return None


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def truncate_context(
    context: str,
    answers: Sequence[str],
    tokenizer: Any,
    budget: int,
    centre_on_answer: bool = True,
) -> Truncated:
    """Cut ``context`` to at most ``budget`` tokens of ``tokenizer``.

    With ``centre_on_answer`` the window of ``budget`` tokens is centred on the first occurrence of the
    answer (clamped to the document), so the answer is kept whenever it fits; otherwise (or when no answer
    occurs) the first ``budget`` tokens are kept. The kept text is a slice of the original string (found
    through the tokenizer's offsets), and it is re-encoded to make sure it respects the budget.

    Args:
        context: the document.
        answers: gold answers (the first one found in the document is the centre).
        tokenizer: a Hugging Face tokenizer (a fast one gives exact character offsets).
        budget: the token budget (``>= 1``).
        centre_on_answer: centre on the answer (FDA, SWDE, SQuAD, NQ) or keep the start (TriviaQA, DROP).
    """
    if budget < 1:
        raise ValueError(f"token budget must be >= 1, got {budget}")
    try:
        enc = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    except (NotImplementedError, TypeError, ValueError):
        ids, offsets = _encode(tokenizer, context), None
    n = len(ids)
    if n <= budget:
        return Truncated(context, n, n, False)
    start = 0
    span = find_answer(context, answers) if centre_on_answer else None
    if span is not None:
        if offsets is not None:
            first = next((i for i, (_, e) in enumerate(offsets) if e > span[0]), n - 1)
            last = next((i for i, (s, _) in enumerate(offsets) if s >= span[1]), n)
        else:  # slow tokenizer: locate by encoding the prefix
            first = len(_encode(tokenizer, context[: span[0]]))
            last = first + len(_encode(tokenizer, context[span[0] : span[1]]))
        mid = (first + last) // 2
        start = max(0, min(mid - budget // 2, n - budget))
    end = start + budget
    while end > start:
        if offsets is not None:
            text = context[offsets[start][0] : offsets[end - 1][1]]
        else:
            text = tokenizer.decode(ids[start:end])
        kept = len(_encode(tokenizer, text))
        if kept <= budget:
            return Truncated(text, n, kept, True)
        end -= kept - budget  # boundary merges made it longer: shrink and retry
    return Truncated("", n, 0, True)
