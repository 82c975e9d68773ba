"""What every stage shares: the row schema of the manifest and the shard loop.

A stage is a function `process(index) -> rows` that writes one output tar
(through `shards.atomic_tar`) and returns one row per input sample. The loop
here skips finished shards, commits the per-shard parquet and then the done
marker, and shows progress.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import pyarrow as pa
from tqdm import tqdm

from cfgen import distributed
from cfgen.config import Config, ConfigError, write_resolved
from cfgen.diffusion import timestep_grid
from cfgen.shards import (ShardError, atomic_write_json, atomic_write_rows, finished_indices, is_done,
                          marker_path, read_rows, read_samples, rows_path, shard_stem, tar_path)

# One row per input sample, in every stage's parquet and in manifest.parquet.
ROW_SCHEMA = pa.schema([
    ("id", pa.string()),            # the sample key (dot-free)
    ("shard", pa.int32()),          # shard index
    ("origin", pa.string()),        # source path or digits:<i>
    ("status", pa.string()),        # ok | failed | rejected
    ("error", pa.string()),         # why, when not ok
    ("label", pa.int32()),
    ("label_name", pa.string()),
    ("cf_label", pa.int32()),
    ("cf_label_name", pa.string()),
    ("target_strategy", pa.string()),
    ("guidance_scale", pa.float64()),
    ("seed", pa.int64()),
    ("p_cf", pa.float64()),
    ("flipped", pa.bool_()),
    ("l1", pa.float64()),
    ("l2", pa.float64()),
    ("recon_l1", pa.float64()),
    # quality (cfgen/quality.py), filled by pack; the truth columns only where the causal model is known
    ("changed_fraction", pa.float64()),     # share of pixels changed visibly
    ("oracle_label", pa.int32()),           # the renderer oracle's class of the counterfactual
    ("oracle_flipped", pa.bool_()),         # oracle_label == cf_label
    ("truth_l1", pa.float64()),             # L1 counterfactual -> true counterfactual
    ("truth_closer", pa.bool_()),           # closer to the true counterfactual than to the factual
    ("within_recon_bound", pa.bool_()),     # truth_l1 <= recon_l1 (DiCap Cor. 3.4)
    ("outside_change", pa.float64()),       # share of pixels outside the causal region changed
])


def config_grid(cfg: Config, num_train_timesteps: int) -> list[int]:
    """The DDIM grid of this config; a grid the schedule cannot hold is a config error."""
    try:
        return timestep_grid(num_train_timesteps, cfg.invert.steps, cfg.invert.t_inv)
    except ValueError as exc:
        raise ConfigError(f"invert.steps: {exc}") from None


def make_row(**values) -> dict:
    row = {name: None for name in ROW_SCHEMA.names}
    unknown = set(values) - set(row)
    if unknown:
        raise KeyError(f"not manifest columns: {sorted(unknown)}")
    row.update(values)
    return row


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
            row.update(status="failed", error=why)


class FailFast(RuntimeError):
    """--fail-fast: a sample failed; its shard was not committed."""


def failure_summary(directory: Path, prefix: str) -> dict:
    """Inputs, failures and failure reasons over a stage's finished shards."""
    rows = [r for i in finished_indices(directory, prefix) for r in read_rows(rows_path(directory, prefix, i))]
    failed = [r for r in rows if r["status"] == "failed"]
    return {"count": len(rows), "failed": len(failed),
            "errors": dict(Counter(error_reason(r["error"]) for r in failed))}


def error_reason(error: str | None) -> str:
    """The part of an error message before the first ':' (paths and details dropped), for counting."""
    return (error or "").split(":")[0].strip() or "unknown"


def run_shards(stage: str, cfg: Config, out_dir: Path, prefix: str, indices: list[int],
               process: Callable[[int], list[dict]], overwrite: bool = False) -> list[int]:
    """Run `process` on this rank's unfinished shards; returns the indices it processed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        write_resolved(cfg, out_dir)
    mine = distributed.my_shards(indices)
    if overwrite:
        for i in mine:
            for p in (marker_path(out_dir, prefix, i), rows_path(out_dir, prefix, i), tar_path(out_dir, prefix, i)):
                p.unlink(missing_ok=True)
    todo = [i for i in mine if not is_done(out_dir, prefix, i)]
    for i in todo:  # leftovers of a killed run: never read, removed before the shard is redone
        for p in out_dir.glob(f"{shard_stem(prefix, i)}*.tmp"):
            p.unlink(missing_ok=True)
    skipped = len(mine) - len(todo)
    if skipped:
        tqdm.write(f"{stage}: {skipped} shard(s) already done, skipping", file=sys.stderr)
    desc = stage if distributed.world_size() == 1 else f"{stage} [rank {distributed.rank()}]"
    for i in tqdm(todo, desc=desc, unit="shard", position=distributed.rank(), disable=not todo):
        start = time.perf_counter()
        rows = process(i)
        if cfg.pipeline.fail_fast:
            bad = next((r for r in rows if r["status"] == "failed"), None)
            if bad is not None:
                raise FailFast(f"{stage} shard {i}: sample {bad['id']} ({bad['origin']}): {bad['error']}")
        atomic_write_rows(rows_path(out_dir, prefix, i), rows, ROW_SCHEMA)
        counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "rejected")}
        # The marker is written last: its presence means the tar and parquet are complete.
        atomic_write_json(marker_path(out_dir, prefix, i), {
            "shard": i, "count": len(rows), **counts, "seconds": time.perf_counter() - start})
    return todo
