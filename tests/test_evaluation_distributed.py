"""``jrt eval`` over several processes: ``torchrun --nproc_per_node 2 -m jrt.evaluation`` on gloo (CPU) gives the
generations and summary of one process, example by example; each rank resumes from its own file, and a run
restarted with another number of processes redoes nothing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jrt.evaluation import read_results
from jrt.evaluation.distributed import RankInfo, results_files
from recall_fixtures import tiny_llama, write_recall_files


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(argv: list[str], nproc: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if nproc == 1:
        cmd = [sys.executable, "-m", "jrt.evaluation", *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", "-m", "jrt.evaluation", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _key(r: dict) -> tuple[str, str, str]:
    return r["task"], r["mode"], r["id"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("dist-eval")
    folder = root / "llama"
    tiny_llama().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, write_recall_files(root / "recall", n=5), root


def _argv(setup, out: Path) -> list[str]:
    folder, recall, _ = setup
    return ["--model", str(folder), "--tasks", "fda,squad", "--batch-size", "2", "--max-new-tokens", "6",
            "--data-dir", str(recall), "--output", str(out), "--no-progress"]


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_resume(setup) -> None:
    root = setup[2]
    one, two = root / "one", root / "two"
    res = _run(_argv(setup, one), 1)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _run(_argv(setup, two), 2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| fda |" in res.stdout and res.stdout.count("| fda |") == 1  # only rank 0 prints the table

    files = results_files(two)
    assert [p.name for p in files] == ["results.rank0.jsonl", "results.rank1.jsonl"]
    per_rank = [read_results(p) for p in files]
    assert all(per_rank) and not {_key(r) for r in per_rank[0]} & {_key(r) for r in per_rank[1]}
    single = {_key(r): r for r in read_results(one / "results.jsonl")}
    merged = {_key(r): r for rows in per_rank for r in rows}
    assert merged.keys() == single.keys() and len(single) == 2 * 2 * 5
    for key, r in single.items():
        assert (merged[key]["generation"], merged[key]["correct"]) == (r["generation"], r["correct"]), key

    def rows(path: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(path.read_text())["results"]]

    assert rows(two / "summary.json") == rows(one / "summary.json")

    # resume: a second 2-process run and a 1-process run on the same folder redo nothing
    sizes = [p.stat().st_size for p in files]
    assert _run(_argv(setup, two), 2).returncode == 0
    assert _run(_argv(setup, two), 1).returncode == 0
    assert [p.stat().st_size for p in files] == sizes
    assert read_results(two / "results.jsonl") == []
    assert rows(two / "summary.json") == rows(one / "summary.json")


def test_rank_info(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = RankInfo.from_env()
    assert (info.rank, info.world_size, info.is_main) == (1, 3, False)
    assert [i for i in range(7) if info.owns(i)] == [1, 4]
    assert info.results_name() == "results.rank1.jsonl" and info.device("cuda") == "cuda:1"
    assert RankInfo().results_name() == "results.jsonl" and RankInfo().device("cuda") == "cuda"
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="not in"):
        RankInfo.from_env()
