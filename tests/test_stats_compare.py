"""Intervals (jrt.stats) and the run comparison of `jrt eval-compare`."""

from __future__ import annotations

import json
import random

import pytest

from jrt.cli import main
from jrt.evaluation.compare import compare, format_compare
from jrt.evaluation.runner import summarize
from jrt.stats import paired_bootstrap


def test_paired_bootstrap_matches_the_normal_approximation():
    """For 0/1 scores with many examples the percentile interval approaches mean +- 1.96 * sd / sqrt(n)."""
    rng = random.Random(3)
    a = [rng.random() < 0.3 for _ in range(2000)]
    b = [x or rng.random() < 0.2 for x in a]  # b = a plus some extra hits: a paired gain
    mean, low, high = paired_bootstrap(a, b, resamples=4000, seed=1)
    diffs = [float(y) - float(x) for x, y in zip(a, b)]
    sd = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5
    half = 1.959964 * sd / len(diffs) ** 0.5
    assert mean == pytest.approx(sum(diffs) / len(diffs))
    assert low == pytest.approx(mean - half, abs=0.15 * half) and high == pytest.approx(mean + half, abs=0.15 * half)
    assert paired_bootstrap(a, b, resamples=4000, seed=1) == (mean, low, high)  # seeded: reproducible


def test_paired_bootstrap_rejects_unpaired_input():
    with pytest.raises(ValueError, match="same number"):
        paired_bootstrap([1, 0], [1])
    with pytest.raises(ValueError, match="no paired"):
        paired_bootstrap([], [])


def _records(name_seed: int, n: int = 40, p_default: float = 0.2, p_twice: float = 0.5) -> list[dict]:
    rng = random.Random(name_seed)
    out = []
    for i in range(n):
        for mode, p in (("default", p_default), ("twice", p_twice)):
            hit = rng.random() < p
            out.append({"task": "fda", "mode": mode, "id": f"e{i}", "correct": hit, "exact_match": hit,
                        "f1": float(hit), "seconds": 1.0, "prompt_tokens": 10})
    return out


def test_summary_gain_is_paired_by_id():
    records = _records(0)
    summary = summarize(records, "m")
    (gain,) = summary["gains"]
    by_id = {(r["mode"], r["id"]): r["correct"] for r in records}
    expected = 100 * sum(by_id[("twice", f"e{i}")] - by_id[("default", f"e{i}")] for i in range(40)) / 40
    assert gain["n_paired"] == 40 and gain["paired_gain"] == pytest.approx(expected)
    assert gain["gain_ci"][0] <= gain["paired_gain"] <= gain["gain_ci"][1]
    # a twice row whose id has no default row is left out of the pairing
    extra = summarize(records + [{"task": "fda", "mode": "twice", "id": "lonely", "correct": True}], "m")
    assert extra["gains"][0]["n_paired"] == 40


def test_compare_against_the_first_run(tmp_path, capsys):
    teacher, student = _records(0, p_default=0.6, p_twice=0.7), _records(1, p_default=0.0, p_twice=0.0)
    result = compare({"teacher": teacher, "student": student})
    rows = {(a["task"], a["mode"]): a for a in result["against_first"]}
    hits = sum(r["correct"] for r in teacher if r["mode"] == "default")
    assert rows[("fda", "default")]["paired_gain"] == pytest.approx(-100 * hits / 40)
    table = format_compare(result)
    assert "| student | fda | 40/40 | 0.0 / 0.0 |" in table and "Each run against `teacher`" in table
    for name, records in (("t", teacher), ("s", student)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["eval-compare", str(tmp_path / "t"), str(tmp_path / "s"), "--names", "teacher,student",
                 "--json", str(tmp_path / "c.json")]) == 0
    assert "| teacher | fda | 40/40 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "c.json").read_text())["against_first"]


@pytest.mark.parametrize("args,message", [
    (["eval-compare", "{tmp}/missing"], "run folder not found"),
    (["eval-compare", "{tmp}"], "holds no results.jsonl"),
    (["eval-compare", "{tmp}", "{tmp}", "--names", "a"], "--names gives 1 names for 2 runs"),
])
def test_compare_bad_input_is_one_line(tmp_path, capsys, args, message):
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bootstrap_ratio():
    from jrt.stats import bootstrap_ratio

    num, den = [3.0, 5.0, 4.0, 8.0], [1.0, 2.0, 1.0, 4.0]
    ratio, low, high = bootstrap_ratio(num, den, resamples=2000)
    assert ratio == pytest.approx(20.0 / 8.0) and min(n / d for n, d in zip(num, den)) <= low <= ratio <= high
    with pytest.raises(ValueError):
        bootstrap_ratio([], [])
