"""The six recall tasks: specification, loading (Hugging Face Hub or local files) and example schema."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jrt.prompting.templates import TASK_FAMILY


@dataclass
class Example:
    """One recall question, in the project's task schema.

    Attributes:
        task: task name.
        id: unique id within the task.
        context: the document (untruncated until :func:`jrt.evaluation.prepare` cuts it).
        answers: gold answers; ``contains`` counts a hit when any of them is in the generation.
        key: the attribute to extract (FDA, SWDE).
        question: the natural-language question (put before the first copy in ``twice`` mode).
        cloze: the cue completed at the end of the prompt (SQuAD, NQ, TriviaQA, DROP).
    """

    task: str
    id: str
    context: str
    answers: list[str]
    key: str = ""
    question: str = ""
    cloze: str = ""

    def fields(self, context: str | None = None) -> dict[str, str]:
        """Template fields (``context`` replaced by a truncated one when given)."""
        return {
            "context": self.context if context is None else context,
            "key": self.key,
            "question": self.question,
            "cloze": self.cloze,
        }


class RecordError(ValueError):
    """A raw record lacks a field or has a wrong type (the loader adds file and line)."""


def _text(raw: dict[str, Any], *names: str, required: bool = True) -> str:
    for name in names:
        if name in raw and raw[name] is not None:
            value = raw[name]
            if not isinstance(value, str):
                raise RecordError(f"field {name!r} must be a string, got {type(value).__name__}")
            return value
    if required:
        raise RecordError(f"missing field {' or '.join(repr(n) for n in names)}")
    return ""


def _answers(raw: dict[str, Any]) -> list[str]:
    for name in ("answers", "answer", "value"):
        if name not in raw or raw[name] is None:
            continue
        value = raw[name]
        if isinstance(value, dict) and "text" in value:  # SQuAD-style {"text": [...], "answer_start": [...]}
            value = value["text"]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RecordError(f"field {name!r} must be a string or a list of strings")
        answers = [v.strip() for v in value if v.strip()]
        if not answers:
            raise RecordError(f"field {name!r} has no non-empty answer")
        return list(dict.fromkeys(answers))
    raise RecordError("missing field 'answers' (or 'value')")


def standin_cloze(question: str) -> str:
    """The cue for a record that has a plain question and no cloze: ``"Q: <q>?\nA:"``.

    (An instruction-tuned model such as SmolLM2 answers ``Question: ... Answer:`` with a newline or EOS,
    which ends the generation; ``Q:/A:`` on separate lines gets an inline answer.)
    """
    q = question.strip()
    if not q.endswith("?"):
        q += "?"
    return f"Q: {q}\nA:"


def convert_kv(task: str, raw: dict[str, Any], index: int) -> Example:
    """FDA / SWDE: ``{"doc_id"?, "key", "value" | "answers", "text"}`` (the authors' and the stand-ins' fields).

    When ``text`` already ends with ``"<key>:"`` (the authors' pre-rendered prompt), that cue is removed.
    """
    text, key = _text(raw, "text", "context"), _text(raw, "key").strip()
    text = text.strip()
    if key and text.endswith(f"{key}:"):
        text = text[: -len(key) - 1].rstrip()
    ident = raw.get("id") or f"{raw.get('doc_id', index)}:{key}"
    return Example(task, str(ident), text, _answers(raw), key=key)


def convert_squad(task: str, raw: dict[str, Any], index: int) -> Example:
    """SQuAD: the authors' ``{"context", "question", "text" (cloze text), "value"}``, or SQuAD-style
    ``{"id", "context", "question", "answers"}`` (the stand-in: the cue becomes ``Q: q?\\nA:``)."""
    context, question = _text(raw, "context").strip(), _text(raw, "question").strip()
    cloze = _text(raw, "cloze", required=False).strip()
    text = _text(raw, "text", required=False).strip()
    if not cloze and text:
        cloze = text[len(context) :].strip() if text.startswith(context) else text
    if not cloze:
        cloze = standin_cloze(question)
    ident = raw.get("id", raw.get("doc_id", index))
    return Example(task, str(ident), context, _answers(raw), question=question, cloze=cloze)


def convert_qa(task: str, raw: dict[str, Any], index: int) -> Example:
    """NQ / TriviaQA / DROP: the authors' ``{"context", "question" (cloze), "orig_question", "answers"}``,
    or ``{"id", "context", "question", "answers"}`` with a plain question (the NQ stand-in).

    As in the authors' code, a copy of the cloze at the end of the context and trailing periods are removed.
    """
    context = _text(raw, "context").strip()
    question = _text(raw, "question").strip()
    orig = _text(raw, "orig_question", required=False).strip().strip(":").strip()
    if orig:
        cloze, natural = question, orig
    else:
        cloze, natural = standin_cloze(question), question
    while cloze and context.lower().endswith(cloze.lower()):
        context = context[: -len(cloze)].rstrip()
    context = context.strip().strip(".").strip()
    ident = raw.get("id", raw.get("doc_id", index))
    return Example(task, str(ident), context, _answers(raw), question=natural, cloze=cloze)


_CONVERTERS: dict[str, Callable[[str, dict[str, Any], int], Example]] = {
    "kv": convert_kv,
    "squad": convert_squad,
    "qa": convert_qa,
}


@dataclass(frozen=True)
class TaskSpec:
    """A recall task.

    Attributes:
        name: task name (``fda``, ``swde``, ``squad``, ``nq``, ``nq_512``, ..., ``triviaqa``, ``drop``).
        hf_path: the authors' Hugging Face dataset.
        hf_split: its evaluation split.
        context_length: contexts are cut to ``context_length - answer_length`` tokens.
        answer_length: tokens reserved for the answer.
        centre_on_answer: centre the window on the answer (else keep the first tokens).
        span_metrics: whether exact match and token F1 are reported (single gold span tasks).
        local_names: file stems looked for in ``--data-dir``, in order.
    """

    name: str
    hf_path: str
    hf_split: str = "validation"
    context_length: int = 1000
    answer_length: int = 50
    centre_on_answer: bool = True
    span_metrics: bool = False
    local_names: tuple[str, ...] = field(default_factory=tuple)

    @property
    def family(self) -> str:
        """Template family (``kv``, ``squad`` or ``qa``)."""
        return TASK_FAMILY[self.name]

    @property
    def budget(self) -> int:
        """Context token budget: ``context_length - answer_length``."""
        return self.context_length - self.answer_length

    def convert(self, raw: dict[str, Any], index: int) -> Example:
        """A raw record (Hub row or local JSON object) as an :class:`Example`."""
        if not isinstance(raw, dict):
            raise RecordError(f"record must be a JSON object, got {type(raw).__name__}")
        return _CONVERTERS[self.family](self.name, raw, index)


TASKS: dict[str, TaskSpec] = {
    "fda": TaskSpec("fda", "hazyresearch/based-fda", span_metrics=True, local_names=("fda",)),
    "swde": TaskSpec("swde", "hazyresearch/based-swde-v2", span_metrics=True, local_names=("swde",)),
    "squad": TaskSpec("squad", "hazyresearch/based-squad", span_metrics=True, local_names=("squad",)),
    "nq": TaskSpec("nq", "hazyresearch/based_nq_1024", local_names=("nq",)),
    "nq_512": TaskSpec("nq_512", "hazyresearch/based_nq_512", context_length=512, local_names=("nq_512", "nq")),
    "nq_1024": TaskSpec(
        "nq_1024", "hazyresearch/based_nq_1024", context_length=1024, local_names=("nq_1024", "nq")
    ),
    "nq_2048": TaskSpec(
        "nq_2048", "hazyresearch/based_nq_2048", context_length=2048, local_names=("nq_2048", "nq")
    ),
    "triviaqa": TaskSpec(
        "triviaqa", "hazyresearch/based_triviaqa", centre_on_answer=False, local_names=("triviaqa",)
    ),
    "drop": TaskSpec("drop", "hazyresearch/based_drop", centre_on_answer=False, local_names=("drop",)),
}

_EXTENSIONS = (".jsonl", ".json", ".parquet")


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of a task name; ``ValueError`` listing the known tasks otherwise."""
    try:
        return TASKS[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def parse_tasks(spec: str) -> list[TaskSpec]:
    """``"fda,swde"`` -> task specs (``all`` = fda, swde, squad, nq, triviaqa, drop)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError("no task given")
    if names == ["all"]:
        names = ["fda", "swde", "squad", "nq", "triviaqa", "drop"]
    return [get_task(n) for n in dict.fromkeys(names)]


def local_file(spec: TaskSpec, data_dir: str | Path) -> Path:
    """The local data file of ``spec`` in ``data_dir`` (``<name>.jsonl``, ``.json`` or ``.parquet``)."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder not found: {folder}")
    tried = []
    for stem in spec.local_names:
        for ext in _EXTENSIONS:
            path = folder / f"{stem}{ext}"
            tried.append(path.name)
            if path.is_file():
                return path
    raise FileNotFoundError(f"no data file for task {spec.name!r} in {folder} (looked for {', '.join(tried)})")


def iter_local_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` pairs of a JSONL / JSON / parquet file; ``where`` is ``file:line`` (or ``file:#i``).

    Raises:
        ValueError: a line that is not JSON (with file and line).
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not UTF-8 text ({err.reason})") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                yield f"{path}:{lineno}", record
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text (byte offset {err.start})") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        if isinstance(data, dict):
            data = data.get("data", data.get("examples"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
        for i, record in enumerate(data):
            yield f"{path}:#{i}", record
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("reading parquet needs pyarrow: pip install 'just-read-twice[eval]'") from None
        for i, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:#{i}", record
    else:
        raise ValueError(f"{path}: unsupported file type (use .jsonl, .json or .parquet)")


def _iter_hub_records(spec: TaskSpec) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"loading {spec.hf_path} needs the 'datasets' package (pip install 'just-read-twice[eval]'), "
            "or pass --data-dir with local files"
        ) from None
    try:
        ds = datasets.load_dataset(spec.hf_path, split=spec.hf_split)
    except Exception as err:  # network, missing dataset, ...: one line for the user
        raise ValueError(f"could not load {spec.hf_path} from the Hub ({type(err).__name__}: {err})") from None
    for i, record in enumerate(ds):
        yield f"{spec.hf_path}#{i}", record


@dataclass
class TaskData:
    """Examples of one task, with what the loader skipped.

    Attributes:
        spec: the task.
        examples: kept examples, in file order.
        n_skipped: records skipped because every gold answer has at most one character.
        source: where the records came from (a file path or a Hub dataset).
    """

    spec: TaskSpec
    examples: list[Example]
    n_skipped: int
    source: str


def load_task(spec: TaskSpec | str, data_dir: str | Path | None = None, limit: int | None = None) -> TaskData:
    """Load a task from local files (``data_dir``) or from the authors' Hub dataset.

    Records whose gold answers all have at most one character are skipped (as in the paper), and counted.

    Args:
        spec: the task or its name.
        data_dir: folder with ``<task>.jsonl`` (or ``.json`` / ``.parquet``); None loads from the Hub.
        limit: keep the first ``limit`` examples (``>= 1``), None for all.

    Raises:
        ValueError: bad limit, a line that is not JSON or a record without a required field (file and line).
        FileNotFoundError: no data file for the task in ``data_dir``.
    """
    if isinstance(spec, str):
        spec = get_task(spec)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if data_dir is not None:
        path = local_file(spec, data_dir)
        records, source = iter_local_records(path), str(path)
    else:
        records, source = _iter_hub_records(spec), spec.hf_path
    examples: list[Example] = []
    skipped = 0
    seen: set[str] = set()
    for index, (where, raw) in enumerate(records):
        try:
            example = spec.convert(raw, index)
        except RecordError as err:
            raise ValueError(f"{where}: {err}") from None
        if max(len(a) for a in example.answers) <= 1:
            skipped += 1
            continue
        if example.id in seen:
            example.id = f"{example.id}#{index}"
        seen.add(example.id)
        examples.append(example)
        if limit is not None and len(examples) >= limit:
            break
    return TaskData(spec, examples, skipped, source)
