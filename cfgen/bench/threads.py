"""`make bench-threads`: does a thread setting survive a second job on the same cores?

    python -m cfgen.bench.threads --config pipelines/digits.toml --limit 128

For each candidate setting it times `cfgen run` (invert + guide + pack) on the first --limit
samples, once alone and then two copies side by side, and prints one table row: both wall
times, their ratio (1.0 = the second job cost nothing, 2.0 = the cores were simply shared,
more = the two jobs fight) and the alone time against torch's old default. The candidates:

- torch's default before the thread policy: one thread per core, OpenMP's own wait policy
  (libgomp spins about 3 ms at every barrier before it sleeps: GOMP_SPINCOUNT=300000);
- one thread; half the cores (when that is neither one nor all of them);
- one thread per core with idle threads sleeping at once (OMP_WAIT_POLICY=PASSIVE);
- one thread per core spinning ~100 us (GOMP_SPINCOUNT=10000) and ~10 us (1000: cfgen's default).
(KMP_BLOCKTIME is Intel OpenMP's spin setting; torch's CPU wheel ships GNU libgomp, which ignores it.)

Run it on an otherwise idle machine; the load average is printed before and after, since another
job running meanwhile distorts every figure. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cfgen.threads import WAIT_SETTINGS, available_cores


def candidates(cores: int) -> list[tuple[str, int, dict]]:
    """(label, --threads, environment) of each setting measured."""
    rows = [(f"torch default before ({cores} threads, spin 3 ms)", cores, {"GOMP_SPINCOUNT": "300000"}),
            ("1 thread", 1, {})]
    if 1 < cores // 2 < cores:
        rows.append((f"{cores // 2} threads (half the cores)", cores // 2, {"GOMP_SPINCOUNT": "1000"}))
    rows += [(f"{cores} threads, OMP_WAIT_POLICY=PASSIVE", cores, {"OMP_WAIT_POLICY": "PASSIVE"}),
             (f"{cores} threads, GOMP_SPINCOUNT=10000", cores, {"GOMP_SPINCOUNT": "10000"}),
             (f"{cores} threads, GOMP_SPINCOUNT=1000 (default)", cores, {"GOMP_SPINCOUNT": "1000"})]
    return rows


def _command(config: Path, limit: int, out: Path, threads: int) -> list[str]:
    return [sys.executable, "-m", "cfgen", "run", "--config", str(config), "--set", f"data.limit={limit}",
            "--out", str(out), "--overwrite", "--threads", str(threads)]


def _environment(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in WAIT_SETTINGS and k != "OMP_NUM_THREADS"}
    env.update(extra)
    return env


def timed(commands: list[list[str]], env: dict) -> float:
    """Wall seconds until every command (started together) has finished; a failure is an error."""
    start = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c in commands]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(commands[0])} failed ({p.returncode}): {err.strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def measure(config: Path, limit: int, work: Path) -> dict:
    cores = available_cores()
    rows = []
    load_before = os.getloadavg()
    for label, threads, extra in candidates(cores):
        env = _environment(extra)
        alone = timed([_command(config, limit, work / "alone", threads)], env)
        pair = timed([_command(config, limit, work / f"side{k}", threads) for k in (1, 2)], env)
        rows.append({"setting": label, "threads": threads, "env": extra, "alone_s": alone, "side_by_side_s": pair,
                     "ratio": pair / alone})
        print(f"  {label}: alone {alone:.1f} s, side by side {pair:.1f} s", file=sys.stderr, flush=True)
    for row in rows:
        row["alone_vs_before"] = row["alone_s"] / rows[0]["alone_s"]
    return {"config": str(config), "limit": limit, "cores": cores, "load_before": load_before,
            "load_after": os.getloadavg(), "rows": rows}


def format_table(r: dict) -> str:
    lines = [f"cfgen run --config {r['config']} --set data.limit={r['limit']} on {r['cores']} cores "
             f"(load average before {r['load_before'][0]:.2f}, after {r['load_after'][0]:.2f})",
             f"{'setting':50s} {'alone':>8s} {'2 side by side':>15s} {'ratio':>6s} {'alone vs before':>16s}"]
    for row in r["rows"]:
        lines.append(f"{row['setting']:50s} {row['alone_s']:7.1f}s {row['side_by_side_s']:14.1f}s "
                     f"{row['ratio']:6.2f} {row['alone_vs_before']:16.2f}")
    lines.append(json.dumps(r))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("pipelines/digits.toml"))
    parser.add_argument("--limit", type=int, default=128, help="samples per run (data.limit)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cfgen-threads-") as tmp:
        print(format_table(measure(args.config, args.limit, Path(tmp))))


if __name__ == "__main__":
    main()
