"""Bad command-line input, table-driven: every case exits with the expected code, prints no traceback, and its
one-line message ``jrt COMMAND: error: ...`` starts with the expected words. Cases run in-process through
``jrt.cli.main`` (fast); the fixtures they need (a tiny model folder, a prepared data folder, broken official
checkpoints, non-UTF-8 and binary inputs) are built once per module."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import jrt.cli
from recall_fixtures import write_recall_files

TINY_OFFICIAL = {
    "model_type": "gpt2", "vocab_size": 100, "pad_vocab_size_multiple": 8, "n_embd": 32, "n_layer": 4,
    "n_head": 4, "n_inner": 64, "rms_norm": True, "activation_function": "swiglu", "alt_mixer_layers": [1],
    "alt_mixer_2_layers": [2],
    "alt_mixer": {"_target_": "based.models.mixers.prefix_linear_attention.PrefixLinearAttention",
                  "feature_dim": 4, "num_heads": 4},
    "alt_mixer_2": {"_target_": "based.models.mixers.slide_attention.SlidingAttention", "window_size": 8},
}


def _official(folder: Path, config=TINY_OFFICIAL, weights: dict[str, bytes] | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    for name, blob in (weights or {}).items():
        (folder / name).write_bytes(blob)
    return folder


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, str]:
    """Paths the cases refer to as ``{name}`` (the data-prepare and eval cases need the offline GPT-2
    tokenizer of the shared data folder)."""
    from jrt.paths import data_path

    if not data_path("tokenizers", "gpt2").is_dir():
        pytest.skip("offline GPT-2 tokenizer not found (set JRT_DATA_DIR)")
    root = tmp_path_factory.mktemp("cli-errors")
    paths: dict[str, Path] = {"tmp": root}
    paths["file"] = root / "a-file"
    paths["file"].write_text("not a folder\n")
    paths["recall"] = write_recall_files(root / "recall")
    from jrt.models import JRTConfig, JRTForCausalLM

    model = JRTForCausalLM(JRTConfig.from_preset("jrt-tiny"))
    paths["model"] = root / "model"
    model.save_pretrained(paths["model"])
    paths["truncated_model"] = root / "truncated-model"
    model.save_pretrained(paths["truncated_model"])
    weights = paths["truncated_model"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    # eval outputs whose results.jsonl holds a hand-made bad record
    for name, record in (("bad_record_obj", "{}"), ("bad_record_list", "[1, 2]")):
        paths[name] = root / name
        paths[name].mkdir()
        (paths[name] / "results.jsonl").write_text(record + "\n")
    # task data that is not UTF-8
    paths["latin1_recall"] = write_recall_files(root / "latin1-recall")
    fda = paths["latin1_recall"] / "fda.jsonl"
    fda.write_bytes(b'{"id": "x", "text": "caf\xe9"}\n' + fda.read_bytes())
    # prepared token data with a hand-edited index.json
    from jrt.training.prepare import write_token_dataset

    paths["data"] = root / "data"
    write_token_dataset([[1, 2, 3, 4, 5] * 20] * 10, paths["data"], vocab_size=50257, eos_id=50256)
    paths["bad_index"] = root / "bad-index"
    write_token_dataset([[1, 2, 3, 4, 5] * 20] * 10, paths["bad_index"], vocab_size=50257, eos_id=50256)
    index = json.loads((paths["bad_index"] / "index.json").read_text())
    (paths["bad_index"] / "index.json").write_text(json.dumps({**index, "dtype": "float64"}))
    # configs and inputs of `jrt train` / `jrt data prepare`
    paths["bad_yaml"] = root / "bad.yaml"
    paths["bad_yaml"].write_text("model: jrt-tiny\nlr: [1e-3\n")
    paths["binary"] = root / "binary.txt"
    paths["binary"].write_bytes(b"some text\n" + bytes(range(256)))
    paths["latin1"] = root / "latin1.txt"
    paths["latin1"].write_bytes(b"first line\ncaf\xe9 au lait\n")
    paths["latin1_jsonl"] = root / "latin1.jsonl"
    paths["latin1_jsonl"].write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    # broken official checkpoints
    good_bin = root / "good.bin"
    torch.save({"x": torch.zeros(2)}, good_bin)
    ok = good_bin.read_bytes()
    paths["off_list"] = _official(root / "off-list", config=[1, 2], weights={"pytorch_model.bin": ok})
    paths["off_layers"] = _official(root / "off-layers", config={**TINY_OFFICIAL, "alt_mixer_layers": [9]},
                                    weights={"pytorch_model.bin": ok})
    paths["off_truncated_bin"] = _official(root / "off-tbin", weights={"pytorch_model.bin": ok[: len(ok) // 2]})
    paths["off_garbage_bin"] = _official(root / "off-gbin", weights={"pytorch_model.bin": b"garbage" * 50})
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(64)}, str(root / "x.safetensors"))
    st = (root / "x.safetensors").read_bytes()
    paths["off_truncated_st"] = _official(root / "off-tst", weights={"model.safetensors": st[: len(st) - 100]})
    paths["off_index"] = _official(root / "off-index", weights={"pytorch_model.bin.index.json": b'{"metadata": {}}'})
    paths["off_ok"] = _official(root / "off-ok", weights={"pytorch_model.bin": ok})
    return {k: str(v) for k, v in paths.items()}


EVAL = ["eval", "--tasks", "fda", "--limit", "1", "--max-new-tokens", "2", "--no-progress"]
TRAIN = ["train", "--data", "{data}", "--output", "{tmp}/run", "--no-progress", "--preset", "jrt-tiny"]

#: (id, argv, exit code, regular expression matched at the start of the message after "error: ").
CASES = [
    # output paths (checked before any work)
    ("eval-output-file", EVAL + ["--model", "{model}", "--data-dir", "{recall}", "--output", "{file}"], 2,
     r"--output .* is an existing file, not a folder"),
    ("eval-output-under-file", EVAL + ["--model", "{model}", "--data-dir", "{recall}", "--output", "{file}/o"], 2,
     r"--output .*: .*a-file is a file, not a folder"),
    ("train-output-file", ["train", "--data", "{data}", "--output", "{file}", "--preset", "jrt-tiny"], 2,
     r"--output .* is an existing file"),
    ("reproduce-out-file", ["reproduce", "--out", "{file}"], 2, r"--out .* is an existing file"),
    ("prepare-output-file", ["data", "prepare", "--input", "{latin1}", "--output", "{file}"], 2,
     r"--output .* is an existing file"),
    ("bench-decode-json-folder", ["bench", "decode", "--json", "{tmp}"], 2, r"--json .* is a folder, not a file"),
    ("bench-decode-json-under-file", ["bench", "decode", "--json", "{file}/x.json"], 2, r"--json .*a-file is a file"),
    ("eval-threads", EVAL + ["--model", "{model}", "--output", "{tmp}/o", "--threads", "-1"], 2,
     r"--threads must be >= 1, got -1"),
    ("bench-threads", ["bench", "decode", "--threads", "0"], 2, r"--threads must be >= 1, got 0"),
    # training configuration
    ("train-bad-yaml", ["train", "--data", "{data}", "--output", "{tmp}/run", "--config", "{bad_yaml}"], 2,
     r"config file .*bad\.yaml is not valid YAML \(.* at line \d+, column \d+\)"),
    ("train-bad-yaml-override", TRAIN + ["model_overrides={swa_window: 32"], 2,
     r"override model_overrides='\{swa_window: 32' is not valid YAML"),
    ("train-override-typo", TRAIN + ["model_overrides={swa_windw: 32}"], 2,
     r"unknown model_overrides key 'swa_windw' \(did you mean 'swa_window'\?\)"),
    ("train-baseline-override-typo", TRAIN + ["model=attn-tiny", "model_overrides={hiden_size: 32}"], 2,
     r"unknown llama config field 'hiden_size' \(did you mean 'hidden_size'\?\)"),
    ("train-option-typo", TRAIN + ["warmup_step=3"], 2,
     r"unknown training option 'warmup_step' \(did you mean 'warmup_steps'\?\)"),
    ("train-negative-window", TRAIN + ["model_overrides={swa_window: -3}"], 2, r"swa_window must be an int >= 0"),
    ("train-negative-rms-eps", TRAIN + ["model_overrides={rms_norm_eps: -1e-5}"], 2,
     r"rms_norm_eps must be a finite number >= 0"),
    ("train-num-threads", TRAIN + ["num_threads=-1"], 2, r"num_threads must be >= 1, got -1"),
    ("train-model-typo", TRAIN + ["model=jrt-tinyy"], 2, r"unknown model preset 'jrt-tinyy' \(did you mean"),
    ("train-bad-index", ["train", "--data", "{bad_index}", "--output", "{tmp}/run", "--preset", "jrt-tiny"], 2,
     r".*index\.json is corrupt: dtype must be uint16 or uint32, got 'float64'"),
    # data preparation: one text rule for every input kind
    ("prepare-binary", ["data", "prepare", "--input", "{binary}", "--output", "{tmp}/p1", "--workers", "1",
                        "--no-progress"], 2, r".*binary\.txt: NUL byte at byte offset 10: not a text file"),
    ("prepare-latin1", ["data", "prepare", "--input", "{latin1}", "--output", "{tmp}/p2", "--workers", "1",
                        "--no-progress"], 2, r".*latin1\.txt: not UTF-8 text \(byte 0xe9 at byte offset 14\)"),
    ("prepare-latin1-jsonl", ["data", "prepare", "--input", "{latin1_jsonl}", "--output", "{tmp}/p3",
                              "--workers", "1", "--no-progress"], 2,
     r".*latin1\.jsonl: not UTF-8 text \(byte 0xe9 at byte offset 28\)"),
    # conversion of the authors' checkpoints
    ("convert-into-source", ["convert", "official", "{off_ok}", "{off_ok}"], 2, r"output .* is the source folder"),
    ("convert-inside-source", ["convert", "official", "{off_ok}", "{off_ok}/hf"], 2, r"output .* is inside the source"),
    ("convert-out-file", ["convert", "official", "{off_ok}", "{file}"], 2, r"OUT .* is an existing file"),
    ("convert-config-list", ["convert", "official", "{off_list}", "{tmp}/c1"], 2,
     r".*config\.json must hold a JSON object, got list"),
    ("convert-layers-range", ["convert", "official", "{off_layers}", "{tmp}/c2"], 2,
     r"official config field alt_mixer_layers holds 9: layer indices must be ints in \[0, n_layer\) = \[0, 4\)"),
    ("convert-truncated-bin", ["convert", "official", "{off_truncated_bin}", "{tmp}/c3"], 2,
     r"checkpoint .* is corrupt: cannot read pytorch_model\.bin"),
    ("convert-garbage-bin", ["convert", "official", "{off_garbage_bin}", "{tmp}/c4"], 2,
     r"checkpoint .* is corrupt: cannot read pytorch_model\.bin"),
    ("convert-truncated-safetensors", ["convert", "official", "{off_truncated_st}", "{tmp}/c5"], 2,
     r"checkpoint .* is corrupt: cannot read model\.safetensors"),
    ("convert-index-without-map", ["convert", "official", "{off_index}", "{tmp}/c6"], 2,
     r".*pytorch_model\.bin\.index\.json has no \"weight_map\" object"),
    # evaluation
    ("eval-truncated-weights", EVAL + ["--model", "{truncated_model}", "--data-dir", "{recall}", "--output",
                                       "{tmp}/e1"], 2,
     r"could not load model .*: a safetensors weights file is truncated or corrupt"),
    ("eval-missing-local-model", EVAL + ["--model", "{tmp}/no-such-model", "--data-dir", "{recall}", "--output",
                                         "{tmp}/e2"], 2, r"model folder not found: .*no-such-model"),
    ("eval-resume-record-object", EVAL + ["--model", "{model}", "--data-dir", "{recall}", "--output",
                                          "{bad_record_obj}"], 2, r".*results\.jsonl line 1: record lacks 'task'"),
    ("eval-resume-record-list", EVAL + ["--model", "{model}", "--data-dir", "{recall}", "--output",
                                        "{bad_record_list}"], 2,
     r".*results\.jsonl line 1: expected a JSON object, got list"),
    ("eval-latin1-task-file", EVAL + ["--model", "{model}", "--data-dir", "{latin1_recall}", "--output",
                                      "{tmp}/e3"], 2, r".*fda\.jsonl:1: not UTF-8 text"),
]


@pytest.mark.parametrize(("argv", "code", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(w, argv, code, message, capsys):
    args = [re.sub(r"\{(\w+)\}", lambda m: w.get(m.group(1), m.group(0)), a) for a in argv]
    capsys.readouterr()
    rc = jrt.cli.main(args)
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    prefix = f"jrt {args[0]}: error: "
    assert lines[0].startswith(prefix), err
    assert re.match(message, lines[0][len(prefix):]), err


def test_unwritable_output_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    # a read-only file system (or a folder without write permission; root ignores permissions, so simulated)
    monkeypatch.setattr(jrt.cli.os, "access", lambda path, mode: False)
    assert jrt.cli.main(["bench", "decode", "--json", str(tmp_path / "rows.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jrt bench: error: --json") and "is not writable" in err and "read-only file system" in err
    assert jrt.cli.main(["reproduce", "--out", str(tmp_path)]) == 2
    assert "--out" in capsys.readouterr().err
