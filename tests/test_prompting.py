"""JRT-Prompt templates: the published strings for sample records, repeats=k, read_twice."""

from __future__ import annotations

import pytest

from jrt.prompting import MODES, TEMPLATES, build_prompt, mode_repeats, read_twice, task_format
from jrt.tasks import Example, TaskSpec, get_task


def _design(task: str, mode: str, r: dict[str, str]) -> str:
    """The published templates (docs/design.md, section 5), written out literally for one record."""
    if task in ("fda", "swde"):
        text, key = r["context"], r["key"]
        return f"{text} {key}:" if mode == "default" else f"Information about {key}. {text}\n{text} {key}:"
    if task == "squad":
        cloze_text = f"{r['context']} {r['cloze']}"
        return cloze_text if mode == "default" else f"{r['question']} {r['context']}\n{cloze_text}"
    ctx, question, orig = r["context"], r["cloze"], r["question"]
    return f"{ctx}. {question}" if mode == "default" else f"{orig} {ctx}.\n{ctx}. {question}"


RECORD = {
    "context": "The Eiffel Tower {is} in Paris (France). It was built in 1889",
    "key": "year built",
    "question": "When was the Eiffel Tower built?",
    "cloze": "The Eiffel Tower was built in",
}


@pytest.mark.parametrize("task", ["fda", "swde", "squad", "nq", "nq_512", "triviaqa", "drop"])
@pytest.mark.parametrize("mode", MODES)
def test_templates_equal_design_strings(task: str, mode: str) -> None:
    assert build_prompt(task, RECORD, mode) == _design(task, mode, RECORD)
    assert TEMPLATES[task][mode].format(**RECORD) == _design(task, mode, RECORD)


@pytest.mark.parametrize("task", ["fda", "squad", "nq"])
def test_context_appears_once_or_twice_question_before_first_copy(task: str) -> None:
    once, twice = build_prompt(task, RECORD, "default"), build_prompt(task, RECORD, "twice")
    assert once.count(RECORD["context"]) == 1 and twice.count(RECORD["context"]) == 2
    intro = RECORD["key"] if task == "fda" else RECORD["question"]
    assert twice.index(intro) < twice.index(RECORD["context"])


def test_repeats_k() -> None:
    for k in (1, 2, 3, 5):
        prompt = task_format("nq").render(RECORD, k)
        assert prompt.count(RECORD["context"]) == k
    three = task_format("fda").render(RECORD, 3)
    c, key = RECORD["context"], RECORD["key"]
    assert three == f"Information about {key}. {c}\n{c}\n{c} {key}:"
    assert build_prompt("fda", RECORD, "repeat3") == three
    assert build_prompt("fda", RECORD, "twice") == build_prompt("fda", RECORD, repeats=2)
    assert mode_repeats("default") == 1 and mode_repeats("twice") == 2 and mode_repeats("repeat4") == 4


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_repeats(bad) -> None:
    with pytest.raises(ValueError, match="repeats"):
        task_format("fda").render(RECORD, bad)


@pytest.mark.parametrize("mode", ["thrice", "repeat0", "repeat", ""])
def test_bad_mode(mode: str) -> None:
    with pytest.raises(ValueError, match="mode"):
        mode_repeats(mode)


def test_unknown_task_and_missing_field() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        build_prompt("hotpotqa", RECORD)
    with pytest.raises(ValueError, match="'key'"):
        build_prompt("fda", {"context": "x"})


def test_read_twice() -> None:
    out = read_twice("Paris is in France.", "Where is Paris?")
    assert out == "Where is Paris? Paris is in France.\nParis is in France.\nQuestion: Where is Paris?\nAnswer:"
    assert read_twice("doc", "q?", repeats=1) == "doc\nQuestion: q?\nAnswer:"
    assert read_twice("doc {x}", "q?", repeats=3, separator=" | ", cue=" A:") == "q? doc {x} | doc {x} | doc {x} A:"
    with pytest.raises(ValueError):
        read_twice("doc", "q", repeats=0)


def test_example_fields_render() -> None:
    ex = Example("fda", "1", "Applicant: Acme", ["Acme"], key="applicant")
    spec: TaskSpec = get_task("fda")
    assert build_prompt(spec.name, ex.fields(), "default") == "Applicant: Acme applicant:"
    assert build_prompt(spec.name, ex.fields("Acme"), "twice") == "Information about applicant. Acme\nAcme applicant:"
