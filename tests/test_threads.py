"""The thread policy (cfgen/threads.py) resolves as specified: --threads, then OMP_NUM_THREADS, then
pipeline.threads, then the affinity's cores / LOCAL_WORLD_SIZE; no timing here (the measured table is
`make bench-threads`, docs/performance.md#threads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cfgen.threads import ThreadPolicy, available_cores, prepare_environment, resolve


def test_default_is_the_affinity_divided_by_local_processes():
    assert resolve(None, 0, {}, cores=8) == ThreadPolicy(8, "8 cores")
    assert resolve(None, 0, {"LOCAL_WORLD_SIZE": "4"}, cores=8).threads == 2
    assert resolve(None, 0, {"LOCAL_WORLD_SIZE": "3"}, cores=8).threads == 2   # floor
    assert resolve(None, 0, {"LOCAL_WORLD_SIZE": "16"}, cores=8).threads == 1  # at least one
    assert resolve(None, 0, {"LOCAL_WORLD_SIZE": "garbage"}, cores=8).threads == 8  # unreadable: one process


def test_available_cores_is_the_affinity_mask():
    if hasattr(os, "sched_getaffinity"):
        assert available_cores() == len(os.sched_getaffinity(0))
    assert available_cores() >= 1


def test_config_then_environment_then_flag_win():
    env = {"LOCAL_WORLD_SIZE": "2"}
    assert resolve(None, 3, env, cores=8) == ThreadPolicy(3, "pipeline.threads")
    env["OMP_NUM_THREADS"] = "5"
    assert resolve(None, 3, env, cores=8) == ThreadPolicy(5, "OMP_NUM_THREADS")
    assert resolve(7, 3, env, cores=8) == ThreadPolicy(7, "--threads")


@pytest.mark.parametrize("value", ["", "0", "-2", "many"])
def test_an_unusable_omp_num_threads_falls_through(value):
    assert resolve(None, 0, {"OMP_NUM_THREADS": value}, cores=4).threads == 4


def test_omp_nested_list_takes_the_first_level():
    assert resolve(None, 0, {"OMP_NUM_THREADS": "3,2"}, cores=8).threads == 3


def test_a_short_spin_is_set_unless_the_user_chose_a_wait_setting():
    env: dict = {}
    prepare_environment(env)
    assert env == {"GOMP_SPINCOUNT": "1000"}
    for key, value in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "300000"), ("KMP_BLOCKTIME", "200")):
        env = {key: value}
        prepare_environment(env)
        assert env == {key: value}


def _threads_in_child(args: list[str], env: dict) -> tuple[str, list[str]]:
    """A cfgen command in a fresh process: torch's thread count after the command ran, and the policy's
    stderr lines."""
    code = ("import sys, torch\n"
            "from cfgen import cli\n"
            "sys.argv = ['cfgen', *sys.argv[1:]]\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "print('THREADS', torch.get_num_threads())\n")
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    threads = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("THREADS"))
    return threads, [x for x in out.stderr.splitlines() if x.startswith("threads:")]


def test_a_command_applies_the_policy_and_a_stage_says_it_once(tmp_path):
    """`cfgen evaluate` (on an empty folder: its error) applies the policy silently; `cfgen run` says it once,
    when the first stage starts, for all three stages."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    threads, lines = _threads_in_child(["evaluate", str(tmp_path), "--threads", "1"], env)
    assert threads == "1" and lines == []
    threads, lines = _threads_in_child(["evaluate", str(tmp_path)], {**env, "OMP_NUM_THREADS": "1"})
    assert threads == "1"
    tiny = ["--config", "pipelines/digits.toml", "--out", str(tmp_path / "run"), "--set", "data.limit=2",
            "--set", "invert.steps=2", "--set", "guide.escalation=[]"]
    threads, lines = _threads_in_child(["run", *tiny, "--threads", "1"], env)
    assert threads == "1" and len(lines) == 1 and "1 CPU thread(s) for torch (--threads" in lines[0]
    threads, lines = _threads_in_child(["run", *tiny, "--overwrite"], {**env, "OMP_NUM_THREADS": "1"})
    assert threads == "1" and len(lines) == 1 and "(OMP_NUM_THREADS" in lines[0]


def test_a_user_error_stays_one_line(tmp_path):
    """The policy is said when the work starts: an error found by the checks before it is the only line."""
    out = subprocess.run([sys.executable, "-m", "cfgen", "run", "--config", "pipelines/digits.toml", "--out",
                          str(tmp_path / "run"), "--set", "model.unet=/nonexistent", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_pipeline_threads_is_checked_and_not_fingerprinted():
    from cfgen.config import load_config
    from cfgen.errors import ConfigError
    from cfgen.runstate import STAGE_KEYS

    assert load_config(None, ["pipeline.threads=3"]).pipeline.threads == 3
    with pytest.raises(ConfigError, match="pipeline.threads"):
        load_config(None, ["pipeline.threads=-1"])
    assert all(("pipeline", "threads") not in keys for keys in STAGE_KEYS.values())
