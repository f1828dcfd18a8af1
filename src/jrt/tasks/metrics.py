"""Recall-task metrics: ``contains`` (the paper's), exact match and token F1 (SQuAD-style normalisation)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence


def _check_golds(golds: Sequence[str]) -> None:
    if isinstance(golds, str) or not golds:
        raise ValueError("golds must be a non-empty list of strings")


def contains(prediction: str, golds: Sequence[str]) -> bool:
    """True when any gold answer occurs in ``prediction``, case-insensitively, as a plain substring.

    This is the recall tasks' metric (``re.search(re.escape(gold), prediction, re.IGNORECASE)`` in
    lm-evaluation-harness): regex characters in answers are literal, an empty gold never matches.
    """
    _check_golds(golds)
    return any(
        bool(gold) and re.search(re.escape(gold), prediction, flags=re.IGNORECASE) is not None for gold in golds
    )


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Sequence[str]) -> bool:
    """True when the normalised prediction equals a normalised gold answer."""
    _check_golds(golds)
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(gold) for gold in golds)


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """Best bag-of-tokens F1 (in [0, 1]) between the normalised prediction and any gold answer."""
    _check_golds(golds)
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        gold_tokens = normalize_answer(gold).split()
        if not pred_tokens or not gold_tokens:
            best = max(best, float(pred_tokens == gold_tokens))
            continue
        common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        if common == 0:
            continue
        precision, recall = common / len(pred_tokens), common / len(gold_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best
