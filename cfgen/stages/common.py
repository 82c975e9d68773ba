"""What every stage shares: the row schema of the manifest and the shard loop.

A stage is a function `process(index) -> rows` that writes one output tar
(through `shards.atomic_tar`) and returns one row per input sample. The loop
here skips finished shards, commits the per-shard parquet and then the done
marker, and shows progress.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import pyarrow as pa
from tqdm import tqdm

from cfgen import distributed
from cfgen.config import Config, write_resolved
from cfgen.shards import (atomic_write_json, atomic_write_rows, is_done, marker_path, rows_path,
                          tar_path)

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
])


def make_row(**values) -> dict:
    row = {name: None for name in ROW_SCHEMA.names}
    unknown = set(values) - set(row)
    if unknown:
        raise KeyError(f"not manifest columns: {sorted(unknown)}")
    row.update(values)
    return row


def run_shards(stage: str, cfg: Config, out_dir: Path, prefix: str, indices: list[int],
               process: Callable[[int], list[dict]], overwrite: bool = False) -> list[int]:
    """Run `process` on this rank's unfinished shards; returns the indices it processed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, out_dir)
    mine = distributed.my_shards(indices)
    if overwrite:
        for i in mine:
            for p in (marker_path(out_dir, prefix, i), rows_path(out_dir, prefix, i), tar_path(out_dir, prefix, i)):
                p.unlink(missing_ok=True)
    todo = [i for i in mine if not is_done(out_dir, prefix, i)]
    skipped = len(mine) - len(todo)
    if skipped:
        tqdm.write(f"{stage}: {skipped} shard(s) already done, skipping")
    for i in tqdm(todo, desc=stage, unit="shard"):
        start = time.perf_counter()
        rows = process(i)
        atomic_write_rows(rows_path(out_dir, prefix, i), rows, ROW_SCHEMA)
        counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "rejected")}
        # The marker is written last: its presence means the tar and parquet are complete.
        atomic_write_json(marker_path(out_dir, prefix, i), {
            "shard": i, "count": len(rows), **counts, "seconds": time.perf_counter() - start})
    return todo


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]
