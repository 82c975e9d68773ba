"""Signals across `cfgen tune`'s forked workers and in-process calls of the CLI (a full test run once hung:
a forked worker inherited cfgen's SIGTERM handler, took Pool.terminate's SIGTERM as an exception while
holding the task queue's lock, and the other worker and the parent waited on it forever)."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

from cfgen.tune import train
from conftest import cfgen_here


def _callers_handler(signum, frame):  # a handler of the caller's own, which cfgen must leave in place
    raise AssertionError("not called")


def test_cli_main_leaves_the_callers_signal_handlers_as_they_were(monkeypatch, capsys):
    before = {s: signal.signal(s, _callers_handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for args in (["--help"], ["run", "--config", "no/such/file.toml"]):
            code, _, _ = cfgen_here(monkeypatch, capsys, *args)
            assert code == (0 if args == ["--help"] else 2)
            assert signal.getsignal(signal.SIGTERM) is _callers_handler
            assert signal.getsignal(signal.SIGINT) is _callers_handler
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def _signals_in_worker(setup, seed, kind, log):
    """train_learner's stand-in: what the forked worker running the job does with each signal."""
    return {kind: (os.getpid(), signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))}


def test_forked_tune_workers_die_on_sigterm_and_leave_ctrl_c_to_the_parent(monkeypatch):
    monkeypatch.setattr(train, "train_learner", _signals_in_worker)
    monkeypatch.setattr(train, "seed_figures", lambda setup, seed, results, log: results)
    setup = SimpleNamespace(cfg=SimpleNamespace(tune=SimpleNamespace(learners=["linear", "coop"], seeds=[1, 2],
                                                                        project=[])))
    previous = signal.signal(signal.SIGTERM, _callers_handler)  # as `cfgen tune` has it: SIGTERM is an exception
    try:
        figures = train.run_seeds(setup, lambda line: None, workers=2)
    finally:
        signal.signal(signal.SIGTERM, previous)
    seen = [v for per_seed in figures for v in per_seed.values()]
    assert len(seen) == 4
    assert all(pid != os.getpid() for pid, _, _ in seen)  # forked
    assert all(term == signal.SIG_DFL and sigint == signal.SIG_IGN for _, term, sigint in seen)
