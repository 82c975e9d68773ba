"""Shared fixtures: small real runs of the digits pipeline on the shipped models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "pipelines" / "digits.toml"
# 40 samples in shards of 16: three shards, the last one partial. A two-rung ladder: the shipped one
# (to 64) is what the demo measures; these tests check the contract, resume and scale, not the ladder.
SMALL = ["data.limit=40", "data.shard_size=16", "invert.batch_size=7", "guide.batch_size=7",
         "guide.escalation=[4.0, 16.0]"]


def run_pipeline(run_dir: Path, overrides: list[str] | None = None) -> dict:
    from cfgen.config import load_config
    from cfgen.stages.guide import run_guide
    from cfgen.stages.invert import run_invert
    from cfgen.stages.pack import run_pack

    cfg = load_config(DIGITS, SMALL + (overrides or []))
    run_invert(cfg, run_dir)
    run_guide(cfg, run_dir)
    return run_pack(cfg, run_dir)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("digits_run")
    return run_dir, run_pipeline(run_dir)
