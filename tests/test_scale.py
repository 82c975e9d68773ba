"""Scale-out and resume: 2 processes == 1 process, and kill -9 anywhere then restart == uninterrupted."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import DIGITS, SMALL

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tars(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "pairs").glob("pairs-*.tar"))}


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


BARRIER_SCRIPT = """
import pathlib, sys, time
from cfgen import distributed
out = pathlib.Path(sys.argv[1])
distributed.barrier()                      # the first one also joins the group
if distributed.rank() == 1:
    time.sleep(2)
    (out / "rank1").write_text("written")
distributed.barrier()                      # rank 0 must not pass before rank 1 wrote
if distributed.rank() == 0:
    (out / "rank0").write_text("saw rank 1" if (out / "rank1").exists() else "passed early")
"""


def test_the_barrier_waits_for_every_rank(tmp_path):
    """accelerate's wait_for_everyone returns at once on a GPU-less `--multi_gpu` launch (PartialState says
    one process); cfgen's barrier must hold rank 0 back until rank 1 arrives, or the merge misses shards."""
    script = tmp_path / "barrier.py"
    script.write_text(BARRIER_SCRIPT)
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(script), str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "rank0").read_text() == "saw rank 1"


@pytest.mark.parametrize("extra,shards", [([], 3), (["data.limit=10"], 1)], ids=["3-shards", "1-shard"])
def test_two_processes_give_byte_identical_shards(tmp_path, extra, shards):
    """Rank 1 of a one-shard run has nothing to do in any stage: it must still reach every barrier."""
    # Same per-process thread count in both runs: float reductions may round differently with
    # the number of CPU threads, which is a property of the hardware setup, not of the sharding.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "cfgen", "run", "--config", str(DIGITS), *_sets(SMALL + extra)]
    single = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    accelerate = Path(sys.executable).with_name("accelerate")
    # --multi_gpu selects accelerate's torchrun launcher; with no GPU each rank runs on the CPU (gloo).
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           *args, "--out", str(tmp_path / "two")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[rank 1]" in out.stderr  # really two processes
    one, two = _tars(tmp_path / "one"), _tars(tmp_path / "two")
    assert list(one) == [f"pairs-{i:06d}.tar" for i in range(shards)]
    assert list(two) == list(one)
    for name in one:
        assert two[name] == one[name], name
    a = pq.read_table(tmp_path / "one" / "pairs" / "manifest.parquet").to_pylist()
    b = pq.read_table(tmp_path / "two" / "pairs" / "manifest.parquet").to_pylist()
    assert a == b


def test_sigkill_then_restart_equals_uninterrupted(tmp_path):
    from conftest import run_pipeline

    overrides = ["data.limit=48", "data.shard_size=8", "invert.batch_size=8", "guide.batch_size=8"]
    reference = tmp_path / "reference"
    run_pipeline(reference, overrides)

    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "cfgen", "run", "--config", str(DIGITS), "--out", str(run_dir),
           *_sets(SMALL + overrides)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    marker = run_dir / "guide" / "_state" / "guide-000001_stats.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # part-way through the guide stage
    proc.wait()
    assert marker.exists(), "the run should have been killed part-way, after two guide shards"
    assert not (run_dir / "pairs" / "stats.json").exists()

    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "invert: 6 shard(s) already done" in out.stderr
    assert re.search(r"guide: [2-5] shard\(s\) already done", out.stderr)  # finished guide shards kept
    assert _tars(run_dir) == _tars(reference)
    assert not list(run_dir.rglob("*.tmp")), "no temporary file may be left"


@pytest.mark.parametrize("stage", ["invert", "guide"])
def test_half_written_temporary_is_never_read(tmp_path, stage):
    """A leftover .tmp from a killed run is ignored and cleaned; the shard is redone."""
    from conftest import run_pipeline

    run_dir = tmp_path / "run"
    run_pipeline(run_dir)
    prefix = stage
    done = run_dir / stage / "_state" / f"{prefix}-000001_stats.json"
    done.unlink()  # shard 1 looks unfinished...
    (run_dir / stage / f"{prefix}-000001.tar.tmp").write_bytes(b"half a tar")  # ...with a torn temp file
    before = _tars(run_dir)
    run_pipeline(run_dir)
    assert done.exists()
    assert not list(run_dir.rglob("*.tmp"))
    assert _tars(run_dir) == before
