"""What every stage shares: the shard loop, and reading a previous stage's shards.

A stage is a function `process(index) -> rows` that writes one output tar
(through `shards.atomic_tar`) and returns one manifest row per input sample. The
loop here skips finished shards, commits the per-shard parquet and then the done
marker (contract.Stage.marker), and shows progress.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from cfgen import distributed
from cfgen.config import Config
from cfgen.contract import ROW_SCHEMA, Stage
from cfgen.diffusion import timestep_grid
from cfgen.errors import ConfigError, FailFast, InputError, ShardError
from cfgen.shards import atomic_write_json, atomic_write_rows, file_digest, read_rows, read_samples


def config_grid(cfg: Config, num_train_timesteps: int) -> list[int]:
    """The DDIM grid of this config; a grid the schedule cannot hold is a config error."""
    try:
        return timestep_grid(num_train_timesteps, cfg.invert.steps, cfg.invert.t_inv)
    except ValueError as exc:
        raise ConfigError(f"invert.steps: {exc}") from None


def finished_inputs(stage: Stage, run_dir: Path) -> list[int]:
    """The finished shards of the stage a later stage reads; none is an error naming the command to run."""
    indices = stage.finished(run_dir)
    if not indices:
        raise InputError(f"no finished {stage.name} shards in {stage.dir(run_dir)}; run `cfgen {stage.name}` first")
    return indices


def samples_until_error(path: Path, broken: list[str]):
    """The samples of an input shard up to the point where it is corrupt or truncated.

    The error message lands in `broken`; the samples before it are processed as usual.
    """
    try:
        yield from read_samples(path)
    except ShardError as exc:
        broken.append(str(exc))


def mark_unread(rows: list[dict], seen: set[str], broken: list[str]) -> None:
    """Rows still 'ok' whose sample never came out of the input shard become failures."""
    why = f"lost in a corrupt input shard: {broken[0]}" if broken else "missing from the input shard"
    for row in rows:
        if row["status"] == "ok" and row["id"] not in seen:
            row.update(status="failed", error=why, sha256=None)


def stage_rows(stage: Stage, run_dir: Path) -> list[dict]:
    """Every manifest row of a stage's finished shards, in shard order."""
    return [r for i in stage.finished(run_dir) for r in read_rows(stage.rows(run_dir, i))]


def failure_summary(stage: Stage, run_dir: Path) -> dict:
    """Inputs, failures and failure reasons over a stage's finished shards."""
    rows = stage_rows(stage, run_dir)
    failed = [r for r in rows if r["status"] == "failed"]
    return {"count": len(rows), "failed": len(failed),
            "errors": dict(Counter(error_reason(r["error"]) for r in failed))}


def error_reason(error: str | None) -> str:
    """The part of an error message before the first ':' (paths and details dropped), for counting."""
    return (error or "").split(":")[0].strip() or "unknown"


def damage(stage: Stage, run_dir: Path, index: int) -> str | None:
    """Why a finished shard cannot be trusted (its tar or parquet missing, or the tar's bytes not those
    its marker recorded), or None."""
    tar, rows = stage.tar(run_dir, index), stage.rows(run_dir, index)
    if not tar.is_file() or not rows.is_file():
        return f"{(tar if not tar.is_file() else rows).name} is missing"
    try:
        recorded = json.loads(stage.marker(run_dir, index).read_text()).get("sha256")
    except ValueError:
        return f"{stage.marker(run_dir, index).name} is unreadable"
    if recorded != file_digest(tar):
        return f"{tar.name} differs from the checksum its marker recorded"
    return None


def run_shards(stage: Stage, cfg: Config, run_dir: Path, indices: list[int],
               process: Callable[[int], list[dict]]) -> list[int]:
    """Run `process` on this rank's unfinished shards; returns the indices it processed.

    The caller has claimed the stage folder (runstate.claim: same fingerprint, or --overwrite emptied
    it). A finished shard whose files were damaged since is said so and redone.
    """
    out_dir = stage.dir(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = distributed.my_shards(indices)
    for i in mine:
        if stage.marker(run_dir, i).is_file() and (why := damage(stage, run_dir, i)):
            tqdm.write(f"{stage.name}: shard {i} is damaged ({why}); redoing it", file=sys.stderr)
            stage.marker(run_dir, i).unlink()
    todo = [i for i in mine if not stage.marker(run_dir, i).is_file()]
    for i in todo:  # leftovers of a killed run: never read, removed before the shard is redone
        for p in out_dir.glob(f"{stage.stem(i)}*.tmp"):
            p.unlink(missing_ok=True)
    skipped = len(mine) - len(todo)
    if skipped:
        tqdm.write(f"{stage.name}: {skipped} shard(s) already done, skipping", file=sys.stderr)
    desc = stage.name if distributed.world_size() == 1 else f"{stage.name} [rank {distributed.rank()}]"
    if distributed.world_size() > 1 and not mine:
        tqdm.write(f"{desc}: none of the {len(indices)} shard(s) is this rank's; waiting for the others",
                   file=sys.stderr)
    for i in tqdm(todo, desc=desc, unit="shard", position=distributed.rank(), disable=not todo):
        start = time.perf_counter()
        rows = process(i)
        if cfg.pipeline.fail_fast:
            bad = next((r for r in rows if r["status"] == "failed"), None)
            if bad is not None:
                raise FailFast(f"{stage.name} shard {i}: sample {bad['id']} ({bad['origin']}): {bad['error']}")
        atomic_write_rows(stage.rows(run_dir, i), rows, ROW_SCHEMA)
        counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "rejected")}
        # The marker is written last: its presence means the tar and parquet are complete.
        atomic_write_json(stage.marker(run_dir, i), {
            "shard": i, "count": len(rows), **counts, "seconds": time.perf_counter() - start,
            "sha256": file_digest(stage.tar(run_dir, i))})
    # Every rank waits here, a rank with no shard of its own included (more ranks than shards): the next
    # stage reads every rank's shards. Then rank 0 must see them all -- it will not, on several machines
    # whose run directories are not one shared filesystem; say so rather than merge a part.
    distributed.barrier()
    if distributed.is_main():
        missing = sorted(set(indices) - set(stage.finished(run_dir)))
        if missing:
            raise ShardError(f"{stage.name}: after every rank finished, {len(missing)} of {len(indices)} shard(s) "
                             f"are missing from {out_dir} (first: {stage.stem(missing[0])}); with several "
                             "machines the run directory must be one shared filesystem")
    return todo
