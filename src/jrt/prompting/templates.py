"""JRT-Prompt templates: single read (``default``) and read-twice (``twice``) prompts for the recall tasks.

Every prompt has the same shape::

    intro + separator.join([context] * repeats) + cue

``repeats = 1`` with no intro is the ``default`` prompt; ``repeats = 2`` with the intro is the JRT-Prompt
(``twice``) prompt of the paper: the question goes before the first copy of the context and again at the
end, the context appears exactly twice. ``repeats = k > 2`` keeps the intro and adds copies, for studying
more than two reads.

Field names used by the templates (see :class:`jrt.tasks.Example`):

- ``context``: the (truncated) document;
- ``key``: the attribute to extract (FDA, SWDE);
- ``question``: the natural-language question, put before the first copy in ``twice`` mode;
- ``cloze``: the cue the model completes at the end (SQuAD, NQ, TriviaQA, DROP).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: Version of the prompt text (templates and context truncation): bump it when a prompt changes, so that an
#: evaluation run does not resume with prompts built differently (``jrt eval`` records it in ``run.json``).
PROMPT_FORMAT_VERSION = 1

#: The two prompting modes of the paper.
MODES: tuple[str, ...] = ("default", "twice")


@dataclass(frozen=True)
class PromptFormat:
    """How one task family lays out a prompt with ``repeats`` copies of the context.

    Attributes:
        intro: put before the first copy when ``repeats >= 2`` (e.g. ``"{question} "``).
        separator: put between two copies of the context (e.g. ``"\\n"``).
        cue: put after the last copy (e.g. ``" {key}:"``).
    """

    intro: str
    separator: str
    cue: str

    def render(self, fields: Mapping[str, str], repeats: int = 1) -> str:
        """The prompt for ``fields`` with the context read ``repeats`` times (``repeats >= 1``)."""
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
        if "context" not in fields:
            raise ValueError("prompt fields lack 'context'")
        intro = self.intro.format_map(_Fields(fields)) if repeats >= 2 else ""
        sep = self.separator.format_map(_Fields(fields))
        cue = self.cue.format_map(_Fields(fields))
        return intro + sep.join([fields["context"]] * repeats) + cue

    def template(self, repeats: int) -> str:
        """The template string (with ``{field}`` placeholders) for ``repeats`` copies."""
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        intro = self.intro if repeats >= 2 else ""
        return intro + self.separator.join(["{context}"] * repeats) + self.cue


class _Fields(dict):
    """``str.format_map`` helper that names the missing field in a ``ValueError``."""

    def __init__(self, fields: Mapping[str, str]):
        super().__init__(fields)

    def __missing__(self, key: str) -> str:
        raise ValueError(f"prompt template needs field {key!r}, which the example does not have")


#: Prompt layout per template family (docs/design.md, section 5).
FORMATS: dict[str, PromptFormat] = {
    # FDA and SWDE: "{text} {key}:" / "Information about {key}. {text}\n{text} {key}:"
    "kv": PromptFormat(intro="Information about {key}. ", separator="\n", cue=" {key}:"),
    # SQuAD: "{cloze text}" / "{question} {context}\n{cloze text}", the cloze text being context + cloze
    "squad": PromptFormat(intro="{question} ", separator="\n", cue=" {cloze}"),
    # NQ, TriviaQA, DROP: "{ctx}. {question}" / "{orig_question} {ctx}.\n{ctx}. {question}"
    "qa": PromptFormat(intro="{question} ", separator=".\n", cue=". {cloze}"),
}

#: Template family of each task (NQ variants share ``nq``'s).
TASK_FAMILY: dict[str, str] = {
    "fda": "kv",
    "swde": "kv",
    "squad": "squad",
    "nq": "qa",
    "nq_512": "qa",
    "nq_1024": "qa",
    "nq_2048": "qa",
    "triviaqa": "qa",
    "drop": "qa",
}

#: The table of templates per task and mode (docs/design.md, section 5; unified field names).
TEMPLATES: dict[str, dict[str, str]] = {
    task: {"default": FORMATS[family].template(1), "twice": FORMATS[family].template(2)}
    for task, family in TASK_FAMILY.items()
}


def mode_repeats(mode: str) -> int:
    """Number of context copies for a mode name: ``default`` -> 1, ``twice`` -> 2, ``repeat<k>`` -> k."""
    if mode == "default":
        return 1
    if mode == "twice":
        return 2
    if mode.startswith("repeat") and mode[len("repeat"):].isdigit() and int(mode[len("repeat"):]) >= 1:
        return int(mode[len("repeat"):])
    raise ValueError(f"unknown mode {mode!r}: use 'default', 'twice' or 'repeat<k>' (k >= 1)")


def task_format(task: str) -> PromptFormat:
    """The :class:`PromptFormat` of a task name (``fda``, ``swde``, ``squad``, ``nq*``, ``triviaqa``, ``drop``)."""
    try:
        return FORMATS[TASK_FAMILY[task]]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASK_FAMILY)}") from None


def build_prompt(task: str, fields: Mapping[str, str], mode: str = "default", repeats: int | None = None) -> str:
    """The prompt for one example of ``task``.

    Args:
        task: task name (see :data:`TASK_FAMILY`).
        fields: ``context`` plus the task's fields (``key``; or ``question`` and ``cloze``).
        mode: ``default`` (one read), ``twice`` (JRT-Prompt) or ``repeat<k>``.
        repeats: overrides the mode's number of copies when given.
    """
    k = mode_repeats(mode) if repeats is None else repeats
    return task_format(task).render(fields, k)


def read_twice(
    context: str,
    question: str,
    *,
    repeats: int = 2,
    separator: str = "\n",
    cue: str = "\nQuestion: {question}\nAnswer:",
) -> str:
    """JRT-Prompt for a user's own document: the question, the document ``repeats`` times, the question again.

    ``read_twice("Paris is in France.", "Where is Paris?")`` gives
    ``"Where is Paris? Paris is in France.\\nParis is in France.\\nQuestion: Where is Paris?\\nAnswer:"``.
    With ``repeats=1`` the leading question is left out (the single-read baseline).

    Args:
        context: the document text.
        question: the question to answer from it.
        repeats: how many times the document is read (``>= 1``).
        separator: put between two copies of the document.
        cue: put after the last copy; ``{question}`` is replaced by the question.
    """
    if not isinstance(context, str) or not isinstance(question, str):
        raise ValueError("context and question must be strings")
    fmt = PromptFormat(intro="{question} ", separator=separator.replace("{", "{{").replace("}", "}}"), cue=cue)
    return fmt.render({"context": context, "question": question}, repeats)
