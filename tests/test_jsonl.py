"""The project's one JSON-lines reader/appender: torn-line rule, fresh-line appends, errors naming file and line."""

from __future__ import annotations

import pytest

from jrt.jsonl import JSONLError, append_jsonl, read_jsonl, write_jsonl


def test_roundtrip_and_missing_file(tmp_path):
    path = tmp_path / "sub" / "r.jsonl"
    assert read_jsonl(path) == []
    append_jsonl(path, {"a": 1})
    append_jsonl(path, [{"a": 2}, {"a": "é"}])
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": "é"}]


def test_torn_last_line_is_dropped_and_cut_with_repair(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert path.read_text().endswith('{"a": ')  # reading alone changes nothing
    assert read_jsonl(path, repair=True) == [{"a": 1}, {"a": 2}]
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'


def test_append_after_complete_line_without_newline_starts_a_fresh_line(tmp_path):
    # a kill between the record and its newline: the record is whole, the next append must not fuse with it
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}')
    append_jsonl(path, {"a": 3})
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 3}]


def test_append_after_torn_line_keeps_later_records(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": ')
    append_jsonl(path, {"a": 3})
    with pytest.raises(JSONLError, match=r"r\.jsonl line 2: not valid JSON"):
        read_jsonl(path)  # the torn line is no longer last: it is reported, never silently fused or skipped
    path.write_text('{"a": 1}\n{"a": ')
    read_jsonl(path, repair=True)
    append_jsonl(path, {"a": 3})
    assert read_jsonl(path) == [{"a": 1}, {"a": 3}]


@pytest.mark.parametrize(("text", "message"), [
    ('{"a": 1}\nnot json\n{"a": 2}\n', "line 2: not valid JSON"),
    ('[1, 2]\n', "line 1: expected a JSON object, got list"),
    ('{"a": 1}\n\n\xff\n', "line 3: not valid JSON"),
])
def test_malformed_lines_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "r.jsonl"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(JSONLError, match=message):
        read_jsonl(path)
    assert str(path) in str(pytest.raises(JSONLError, read_jsonl, path).value)


def test_required_keys(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"task": "x"}\n{}\n')
    with pytest.raises(JSONLError, match="line 2: record lacks 'task'"):
        read_jsonl(path, required=("task",))


def test_write_jsonl_replaces_atomically(tmp_path):
    path = tmp_path / "r.jsonl"
    append_jsonl(path, [{"a": 1}, {"a": 2}])
    write_jsonl(path, [{"a": 9}])
    assert read_jsonl(path) == [{"a": 9}]
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]
