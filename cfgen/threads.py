"""How many CPU threads torch may use: the thread policy every `cfgen` command applies at its start.

    cfgen run --config pipelines/digits.toml                # the default, said once on stderr when work starts
    cfgen run --config pipelines/digits.toml --threads 1    # or pipeline.threads = 1, or OMP_NUM_THREADS=1

Why a policy: torch's own default is one intra-op thread per core in *every* process. Two
processes on the same cores (a CI runner, a workstation running a training job, a CPU
`accelerate launch` with several processes) then run twice as many threads as cores, and
OpenMP's worker threads spin while they wait for each other: measured on a 2-core machine, two
digits runs side by side took 4.3x as long as one alone (docs/performance.md#threads).

The thread count, first rule that applies:
  1. `--threads N` on the command line;
  2. OMP_NUM_THREADS in the environment (the user's explicit choice; torch reads it too);
  3. `pipeline.threads = N` in the config (0 = no choice);
  4. the cores this process may run on (os.sched_getaffinity) divided by the processes launched
     on this machine (LOCAL_WORLD_SIZE, set by torchrun / accelerate launch; 1 when unset), at
     least 1.
The intra-op pool gets that many threads, and so does the inter-op pool where torch still allows
it (only before any inter-op work has started: once per process).

Waiting threads: `prepare_environment` (called before torch is imported) cuts how long GNU
OpenMP's idle threads spin before they sleep, from ~3 ms to ~10 us (GOMP_SPINCOUNT=1000), unless
the user set any OpenMP wait setting; that is what keeps two runs on shared cores from collapsing
while one run alone keeps its speed (sleeping at once, OMP_WAIT_POLICY=PASSIVE, cost a run alone
~12%; the measured table is in docs/performance.md#threads).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Mapping

WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
"""OpenMP's wait settings (the standard one, libgomp's, Intel's): any of them set means the user chose."""
DEFAULT_WAIT = {"GOMP_SPINCOUNT": "1000"}
"""Unless the user chose: libgomp (torch's CPU wheels on Linux) spins ~10 us, not ~3 ms, before a waiting
thread sleeps. Other OpenMP runtimes ignore it (there: OMP_WAIT_POLICY=PASSIVE or KMP_BLOCKTIME=0)."""


@dataclass(frozen=True)
class ThreadPolicy:
    threads: int   # intra-op (and, where still allowed, inter-op) threads
    source: str    # where the number came from, as printed: '--threads', 'OMP_NUM_THREADS', ...


def _positive_int(text: str | None) -> int | None:
    """A thread count as the environment spells it ('4', or OpenMP's nested list '4,2': the first level);
    None when unset, empty, not a number or < 1 (then the next rule decides)."""
    if not text:
        return None
    try:
        value = int(text.split(",")[0].strip())
    except ValueError:
        return None
    return value if value >= 1 else None


def available_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or taskset's share, not the
    machine's), os.cpu_count() where the platform has no affinity call."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve(flag: int | None, configured: int, env: Mapping[str, str], cores: int) -> ThreadPolicy:
    """The thread count by the rules of the module docstring: a pure function of its inputs."""
    if flag is not None and flag >= 1:
        return ThreadPolicy(flag, "--threads")
    omp = _positive_int(env.get("OMP_NUM_THREADS"))
    if omp is not None:
        return ThreadPolicy(omp, "OMP_NUM_THREADS")
    if configured >= 1:
        return ThreadPolicy(configured, "pipeline.threads")
    local = _positive_int(env.get("LOCAL_WORLD_SIZE")) or 1
    source = f"{cores} cores" + (f" / LOCAL_WORLD_SIZE {local}" if local > 1 else "")
    return ThreadPolicy(max(1, cores // local), source)


def prepare_environment(env: dict | None = None) -> None:
    """Before torch is imported (OpenMP reads these when it loads): a short spin, unless the user set any
    OpenMP wait setting."""
    env = os.environ if env is None else env
    if not any(key in env for key in WAIT_SETTINGS):
        env.update(DEFAULT_WAIT)


class _Applied:
    """What this process has already done: the inter-op pool can be sized once, the line printed once."""
    interop: bool = False
    policy: ThreadPolicy | None = None  # set by `configure` (the command line); None: nothing to announce
    printed: bool = False


def apply(policy: ThreadPolicy) -> None:
    """Size torch's pools. The inter-op pool only if nothing has used it yet (torch refuses afterwards)."""
    import torch

    torch.set_num_threads(policy.threads)
    if not _Applied.interop:
        _Applied.interop = True
        try:
            torch.set_num_interop_threads(policy.threads)
        except RuntimeError:  # inter-op work already ran in this process (e.g. a caller's): keep its pool
            pass


def configure(flag: int | None = None, configured: int = 0) -> ThreadPolicy:
    """Resolve the policy from this process's environment and affinity and apply it (a command's first step);
    `announce` says it when the work starts."""
    policy = resolve(flag, configured, os.environ, available_cores())
    apply(policy)
    _Applied.policy = policy
    return policy


def announce() -> None:
    """One line on stderr with the configured policy, once per process, when the work starts: after the
    checks, so that a user error stays the one line it is promised to be. Rank 0 only (every rank of a
    launch resolves alike); nothing when no command configured a policy (the Python API leaves torch's
    threads to its caller)."""
    from cfgen import distributed

    policy = _Applied.policy
    if policy is None or _Applied.printed or not distributed.is_main():
        return
    _Applied.printed = True
    wait = "; ".join(f"{k}={os.environ[k]}" for k in WAIT_SETTINGS if k in os.environ)
    print(f"threads: {policy.threads} CPU thread(s) for torch ({policy.source}" + (f"; {wait}" if wait else "")
          + "); change with --threads N or OMP_NUM_THREADS", file=sys.stderr)
