"""Stage 3: write the pair shards (the public output contract) and their manifest.

    cfgen pack --config pipelines/digits.toml

RUN/pairs/pairs-<i>.tar (one per guide shard), each sample K with exactly:
    K.png  K.txt  K.cls            the factual image, its caption, its class index
    K.cf.png  K.cf.txt  K.cf.cls   the counterfactual, its caption, its class index
    K.json                         CONTRACT_FIELDS below, the same schema everywhere
and beside them manifest.parquet (one row per input sample, failures
included), stats.json and sizes.json ({"pairs-000000.tar": n, ...}, which
open_clip reads). Pairs that fail a gate (pack.require_flip) are rows with
status 'rejected' and are not written.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cfgen.config import Config, ConfigError
from cfgen.metrics import mean
from cfgen.shards import (atomic_tar, atomic_write_json, finished_indices, marker_path,
                          read_rows, read_samples, rows_path, tar_path)
from cfgen.stages.common import ROW_SCHEMA, run_shards
from cfgen.stages.guide import PREFIX as GUIDE_PREFIX
from cfgen.stages.guide import guide_dir
from cfgen.stages.invert import PREFIX as INVERT_PREFIX
from cfgen.stages.invert import invert_dir

PREFIX = "pairs"

# K.json fields, in this order and with these types, in every sample (HF datasets
# infers its columns from the first samples and fails on a mismatch).
CONTRACT_FIELDS = {
    "id": str, "label": int, "label_name": str, "cf_label": int, "cf_label_name": str,
    "target_strategy": str, "guidance_scale": float, "t_inv": float, "steps": int, "seed": int,
    "p_cf": float, "flipped": bool, "l1": float, "l2": float, "recon_l1": float,
}
CONTRACT_MEMBERS = ("png", "txt", "cls", "cf.png", "cf.txt", "cf.cls", "json")


def pairs_dir(run_dir: Path) -> Path:
    return run_dir / "pairs"


def contract_json(meta: dict) -> bytes:
    """The K.json of a pair: exactly CONTRACT_FIELDS, cast to their types."""
    return json.dumps({k: typ(meta[k]) for k, typ in CONTRACT_FIELDS.items()}).encode()


def run_pack(cfg: Config, run_dir: Path, overwrite: bool = False) -> dict:
    src = guide_dir(run_dir)
    indices = finished_indices(src, GUIDE_PREFIX)
    if not indices:
        raise ConfigError(f"no finished guide shards in {src}; run `cfgen guide` first")
    out_dir = pairs_dir(run_dir)
    caption = cfg.pack.caption

    def process(index: int) -> list[dict]:
        rows = read_rows(rows_path(src, GUIDE_PREFIX, index))
        by_id = {r["id"]: r for r in rows}
        with atomic_tar(tar_path(out_dir, PREFIX, index)) as tar:
            for sample in read_samples(tar_path(src, GUIDE_PREFIX, index)):
                meta = json.loads(sample["json"])
                row = by_id[meta["id"]]
                if cfg.pack.require_flip and not meta["flipped"]:
                    row.update(status="rejected", error="not_flipped")
                    continue
                tar.write({
                    "__key__": meta["id"],
                    "png": sample["png"], "txt": caption.format(label_name=meta["label_name"]).encode(),
                    "cls": str(meta["label"]).encode(),
                    "cf.png": sample["cf.png"], "cf.txt": caption.format(label_name=meta["cf_label_name"]).encode(),
                    "cf.cls": str(meta["cf_label"]).encode(),
                    "json": contract_json(meta),
                })
        return rows

    run_shards("pack", cfg, out_dir, PREFIX, indices, process, overwrite)
    return merge(run_dir)


def _reason(error: str | None) -> str:
    return (error or "").split(":")[0].strip() or "unknown"


def _stage_seconds(directory: Path, prefix: str) -> float:
    total = 0.0
    for i in finished_indices(directory, prefix):
        total += json.loads(marker_path(directory, prefix, i).read_text())["seconds"]
    return total


def merge(run_dir: Path) -> dict:
    """manifest.parquet, sizes.json and stats.json from the finished pair shards."""
    out_dir = pairs_dir(run_dir)
    indices = finished_indices(out_dir, PREFIX)
    rows = [r for i in indices for r in read_rows(rows_path(out_dir, PREFIX, i))]
    manifest = out_dir / "manifest.parquet"
    tmp = manifest.with_name(manifest.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), tmp)
    tmp.replace(manifest)
    ok = [r for r in rows if r["status"] == "ok"]
    sizes = {tar_path(out_dir, PREFIX, i).name: sum(r["status"] == "ok" and r["shard"] == i for r in rows)
             for i in indices}
    atomic_write_json(out_dir / "sizes.json", sizes)
    stats = {
        "count": len(rows),
        "pairs": len(ok),
        "failed": sum(r["status"] == "failed" for r in rows),
        "rejected": sum(r["status"] == "rejected" for r in rows),
        "errors": dict(Counter(_reason(r["error"]) for r in rows if r["status"] != "ok")),
        "flip_rate": mean(float(r["flipped"]) for r in ok),
        "mean_l1": mean(r["l1"] for r in ok),
        "mean_l2": mean(r["l2"] for r in ok),
        "mean_recon_l1": mean(r["recon_l1"] for r in ok),
        "mean_p_cf": mean(r["p_cf"] for r in ok),
        "per_class": dict(sorted(Counter(r["label_name"] for r in ok).items())),
        "per_cf_class": dict(sorted(Counter(r["cf_label_name"] for r in ok).items())),
        "per_scale": {str(k): v for k, v in sorted(Counter(r["guidance_scale"] for r in ok).items())},
        "shards": len(indices),
        "seconds": {"invert": _stage_seconds(invert_dir(run_dir), INVERT_PREFIX),
                    "guide": _stage_seconds(guide_dir(run_dir), GUIDE_PREFIX),
                    "pack": _stage_seconds(out_dir, PREFIX)},
        "pairs_dir": str(out_dir),
    }
    atomic_write_json(out_dir / "stats.json", stats)
    return stats

