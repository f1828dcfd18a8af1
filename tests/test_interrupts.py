"""SIGINT and SIGTERM stop a grid of worker processes within seconds, with the finished runs kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc (Linux)")

SCRIPT = textwrap.dedent(
    """
    import sys
    from jrt.synthetics.config import ModelSpec, RunConfig, SDTask, TrainSpec
    from jrt.synthetics.train import run_grid

    task = SDTask(pairs=((2, 3),), test_pairs=((2, 3),), vocab_size=24)
    quick = TrainSpec.authors(lr=5e-3, max_steps=2, num_train=16, num_test=8)
    endless = TrainSpec.authors(lr=5e-3, max_steps=10**7, num_train=16, num_test=8)
    spec = ModelSpec.authors("based", 16, 2)
    grid = [RunConfig("sd", "based", task, spec, quick, 0)]
    grid += [RunConfig("sd", "based", task, spec, endless, seed) for seed in (1, 2, 3)]
    if __name__ == "__main__":
        run_grid(grid, sys.argv[1], workers=2, threads=1, progress=False, log=lambda m: print(m, flush=True))
    """
)


def _children(pid: int) -> list[int]:
    """Child processes of ``pid``, from /proc (field 4 of /proc/N/stat is the parent)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.isdigit() and int(fields[1]) == pid:
            found.append(int(entry))
    return found


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_worker_pool_and_keeps_finished_runs(tmp_path, sig):
    results = tmp_path / "results.jsonl"
    script = tmp_path / "grid.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, str(script), str(results)]
    if sig == signal.SIGTERM:  # through the CLI's handler, as `jrt reproduce` gets it
        cmd = [sys.executable, "-c", "import runpy, signal, sys, jrt.cli as c; c._sigterm_interrupts(); "
               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')", str(script),
               str(results)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        _interrupt_and_check(proc, results, sig)
    finally:  # never leave the endless runs behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _running(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _interrupt_and_check(proc: subprocess.Popen, results, sig: int) -> None:
    deadline = time.monotonic() + 300
    while not (results.exists() and results.read_text().strip()):  # the quick run has finished
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the first run never finished"
        time.sleep(0.2)
    workers = _children(proc.pid)
    assert workers, "no worker processes"
    time.sleep(1.0)  # both workers are inside endless runs now
    t0 = time.monotonic()
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert time.monotonic() - t0 < 30
    assert proc.returncode != 0
    time.sleep(0.5)
    alive = [pid for pid in workers if _running(pid)]
    assert not alive, f"workers still running: {alive}"
    assert len(results.read_text().strip().splitlines()) == 1  # the finished run is kept, nothing else written
