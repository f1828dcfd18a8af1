"""Recall tasks: loading (local files, offline stand-ins), truncation, metrics, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from jrt.tasks import (
    TASKS,
    contains,
    exact_match,
    find_answer,
    get_task,
    load_task,
    parse_tasks,
    token_f1,
    truncate_context,
)


@pytest.fixture(scope="module")
def gpt2(request):
    from jrt.paths import data_path

    folder = data_path("tokenizers", "gpt2")
    if not folder.is_dir():
        pytest.skip(f"offline GPT-2 tokenizer not found: {folder}")
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.model_max_length = int(1e12)
    return tok


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- metric


def test_contains_case_and_multiple_golds() -> None:
    assert contains("The answer is PARIS, France", ["paris"])
    assert contains("it was in 1973.", ["October 1973", "1973"])
    assert not contains("it was in 1974.", ["October 1973", "1973"])
    assert not contains("", ["x"])


def test_contains_regex_characters_are_literal() -> None:
    assert contains("costs $12.50 (approx.)", ["$12.50 (approx.)"])
    assert not contains("costs $12550", ["$12.50"])  # '.' is not a wildcard
    assert contains("see [a-z]+ here", ["[A-Z]+"])
    assert not contains("abc", ["[a-z]+"])
    assert contains("C++ and C#", ["c++"])
    assert not contains("anything", [""])  # an empty gold never matches


def test_contains_rejects_bad_golds() -> None:
    with pytest.raises(ValueError):
        contains("x", [])
    with pytest.raises(ValueError):
        contains("x", "x")  # a bare string is a bug, not a list of golds


def test_exact_match_and_f1() -> None:
    assert exact_match("The Eiffel Tower.", ["eiffel tower"])
    assert not exact_match("Eiffel Tower in Paris", ["eiffel tower"])
    assert token_f1("Eiffel Tower in Paris", ["the Eiffel Tower"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("nothing", ["Eiffel"]) == 0.0
    assert token_f1("x", ["y", "x"]) == 1.0


# ---------------------------------------------------------------- truncation


def test_truncation_keeps_answer_and_budget(gpt2) -> None:
    filler = " ".join(f"word{i}" for i in range(600))
    context = f"{filler} The secret code is XQ-7781 indeed. {filler}"
    for budget in (16, 64, 300, 950):
        cut = truncate_context(context, ["XQ-7781"], gpt2, budget)
        assert cut.truncated and cut.n_kept <= budget
        assert len(gpt2(cut.text, add_special_tokens=False)["input_ids"]) <= budget
        assert "XQ-7781" in cut.text and cut.text in context
        assert cut.n_kept >= budget - 2  # uses the budget (boundary merges may cost a token)


def test_truncation_centred_and_clamped(gpt2) -> None:
    words = [f"w{i}" for i in range(2000)]
    cut = truncate_context(" ".join(words), ["w1000"], gpt2, 101)
    pieces = cut.text.split()
    mid = pieces.index("w1000")
    assert abs(mid - len(pieces) / 2) < len(pieces) * 0.1  # centred
    start = truncate_context(" ".join(words), ["w3"], gpt2, 101)
    assert start.text.startswith("w0")  # clamped at the document start
    end = truncate_context(" ".join(words), ["w1999"], gpt2, 101)
    assert end.text.endswith("w1999")  # clamped at the end
    first = truncate_context(" ".join(words), ["w1000"], gpt2, 101, centre_on_answer=False)
    assert first.text.startswith("w0") and "w1000" not in first.text.split()


def test_truncation_no_op_and_case_insensitive(gpt2) -> None:
    cut = truncate_context("short text", ["short"], gpt2, 950)
    assert not cut.truncated and cut.text == "short text"
    assert find_answer("Made by ACME corp", ["zzz", "acme"]) == (8, 12)
    assert find_answer("nothing", ["zzz"]) is None
    with pytest.raises(ValueError):
        truncate_context("x", ["x"], gpt2, 0)


def test_shared_standins_load_and_keep_answers(shared_data: Path, gpt2) -> None:
    recall = shared_data / "recall"
    for name in ("fda", "swde", "squad", "nq", "nq_512", "nq_2048"):
        data = load_task(name, recall, limit=20)
        assert len(data.examples) == 20 and data.source.endswith(".jsonl")
        spec = data.spec
        for ex in data.examples:
            assert ex.context and ex.answers
            cut = truncate_context(ex.context, ex.answers, gpt2, spec.budget, spec.centre_on_answer)
            assert cut.n_kept <= spec.budget
            assert find_answer(cut.text, ex.answers) is not None, (name, ex.id)
    fda = load_task("fda", recall, limit=1).examples[0]
    assert fda.key == "510(k) number" and fda.id == "K062105:510(k) number"
    nq = load_task("nq", recall, limit=1).examples[0]
    assert nq.cloze.startswith("Q: ") and nq.cloze.endswith("?\nA:") and nq.question in nq.cloze


def test_task_registry() -> None:
    assert {"fda", "swde", "squad", "nq", "nq_512", "nq_1024", "nq_2048", "triviaqa", "drop"} <= set(TASKS)
    assert get_task("nq_512").budget == 462 and get_task("fda").budget == 950
    assert not get_task("drop").centre_on_answer
    assert [t.name for t in parse_tasks("fda, squad,fda")] == ["fda", "squad"]
    assert len(parse_tasks("all")) == 6
    with pytest.raises(ValueError, match="unknown task 'hotpot'"):
        parse_tasks("fda,hotpot")


# ---------------------------------------------------------------- local files and bad input


def test_local_formats_and_author_fields(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "context": "Alice met Bob in Rome.", "question": "where did alice meet bob",
         "answers": ["Rome"]},
        {"id": "b", "context": "Tiny.", "question": "q", "answers": ["x"]},  # one-character answer: skipped
    ]
    _write_jsonl(tmp_path / "nq.jsonl", rows)
    data = load_task("nq_1024", tmp_path)
    assert [e.id for e in data.examples] == ["a"] and data.n_skipped == 1
    assert data.examples[0].context == "Alice met Bob in Rome"  # trailing period stripped, as the authors do
    # the authors' schema: cloze question plus orig_question, cloze copy at the end of the context removed
    authors = {"context": "Bob lives in Oslo. Bob lives in", "question": "Bob lives in",
               "orig_question": "where does bob live:", "answers": ["Oslo"]}
    (tmp_path / "drop.json").write_text(json.dumps([authors]))
    ex = load_task("drop", tmp_path).examples[0]
    assert (ex.context, ex.cloze, ex.question) == ("Bob lives in Oslo", "Bob lives in", "where does bob live")
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"doc_id": "d", "key": "k", "value": "vv", "text": "k: vv k:"}]),
                   tmp_path / "swde.parquet")
    ex = load_task("swde", tmp_path).examples[0]
    assert ex.context == "k: vv" and ex.answers == ["vv"] and ex.id == "d:k"


def test_bad_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    good = {"doc_id": "d", "key": "k", "value": "vv", "text": "t"}
    (tmp_path / "fda.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"fda\.jsonl:2: not valid JSON"):
        load_task("fda", tmp_path)
    _write_jsonl(tmp_path / "fda.jsonl", [good, {"doc_id": "d", "key": "k", "text": "t"}])
    with pytest.raises(ValueError, match=r"fda\.jsonl:2: missing field 'answers'"):
        load_task("fda", tmp_path)
    _write_jsonl(tmp_path / "fda.jsonl", [{"key": "k", "value": "vv"}])
    with pytest.raises(ValueError, match=r"fda\.jsonl:1: missing field 'text'"):
        load_task("fda", tmp_path)


def test_missing_file_and_bad_limit(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no data file for task 'squad'"):
        load_task("squad", tmp_path)
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        load_task("squad", tmp_path / "nope")
    with pytest.raises(ValueError, match="--limit"):
        load_task("squad", tmp_path, limit=0)
