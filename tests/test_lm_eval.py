"""lm-evaluation-harness integration: the jrt_* tasks load, and their ``contains`` equals ``jrt eval``'s."""

from __future__ import annotations

from pathlib import Path

import pytest

from jrt import models
from jrt.evaluation import EvalConfig, evaluate, lm_eval_tasks_dir, read_results
from jrt.tasks import TASKS, load_task
from recall_fixtures import tiny_llama, write_recall_files

lm_eval = pytest.importorskip("lm_eval")

NEW = 48  # the tasks' real generation cap: the agreement is checked on the real settings


def _task_manager(data_dir: Path):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=lm_eval_tasks_dir(), include_defaults=False, metadata={"data_dir": str(data_dir)})


def test_every_task_and_mode_is_defined(tmp_path: Path) -> None:
    tm = _task_manager(tmp_path)
    for name in TASKS:
        assert f"jrt_{name}" in tm.all_tasks and f"jrt_{name}_twice" in tm.all_tasks


def test_agreement_with_jrt_eval(tmp_path: Path, tok) -> None:
    """Same model, same examples: lm-eval's per-example generations and mean ``contains`` equal ours exactly."""
    from lm_eval.models.huggingface import HFLM

    recall = write_recall_files(tmp_path / "recall", n=3)
    model = tiny_llama(max_positions=4096)
    names = ["fda", "nq"]
    ours_dir = tmp_path / "ours"
    evaluate(model, tok, [load_task(n, recall) for n in names],
             EvalConfig(model="tiny", modes=["default", "twice"], batch_size=1, max_new_tokens=NEW,
                        max_length=4096), ours_dir, tok, progress=False)
    ours = {(r["task"], r["mode"], r["id"]): r for r in read_results(ours_dir / "results.jsonl")}

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, max_length=4096, device="cpu")
    tasks = [f"jrt_{n}{suffix}" for n in names for suffix in ("", "_twice")]
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=_task_manager(recall), log_samples=True)
    n_hits = 0
    for task in tasks:
        name, mode = task.removeprefix("jrt_").removesuffix("_twice"), "twice" if task.endswith("_twice") else "default"
        samples = out["samples"][task]
        assert len(samples) == 3
        for s in samples:
            mine = ours[(name, mode, s["doc"]["id"])]
            assert s["filtered_resps"][0] == mine["generation"]
            assert s["contains"] == float(mine["correct"])
            n_hits += int(mine["correct"])
        mean = sum(float(ours[(name, mode, s["doc"]["id"])]["correct"]) for s in samples) / 3
        assert out["results"][task]["contains,none"] == mean
    assert n_hits > 0  # the comparison is not all zeros


def test_jrt_lm_eval_model(tmp_path: Path, tok) -> None:
    """The registered lm-eval model ``jrt`` loads a JRT-RNN checkpoint (GPT-2 tokenizer) and evaluates a task."""
    from lm_eval.api.registry import get_model

    import jrt.evaluation.lm_eval_model  # noqa: F401

    folder = tmp_path / "jrt-tiny"
    models.JRTForCausalLM(models.JRTConfig.from_preset("jrt-tiny")).save_pretrained(folder)
    recall = write_recall_files(tmp_path / "recall", n=2)
    lm = get_model("jrt")(pretrained=str(folder), batch_size=2, device="cpu", max_length=2048)
    out = lm_eval.simple_evaluate(model=lm, tasks=["jrt_squad_twice"], task_manager=_task_manager(recall),
                                  gen_kwargs="max_gen_toks=4")
    assert 0.0 <= out["results"]["jrt_squad_twice"]["contains,none"] <= 1.0
