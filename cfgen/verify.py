"""`cfgen verify RUN_DIR`: re-read every pair shard and check it against the contract.

    cfgen verify runs/digits        # exit 0: all good; exit 1: problems listed by shard and key

Checks: every tar reads to the end; every sample has exactly the contract
members; both PNGs decode; K.json parses, has exactly the contract keys with
their types, and agrees with K.cls / K.cf.cls; keys are dot-free and unique;
per-shard counts match sizes.json; the set of samples matches the manifest's
'ok' rows.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from cfgen.contract import PAIR_FIELDS, PAIRS
from cfgen.errors import InputError, ShardError
from cfgen.shards import read_samples


def _check_sample(sample: dict) -> list[str]:
    problems = []
    members = sorted(k for k in sample if k != "__key__")
    if members != sorted(PAIRS.members):
        missing = sorted(set(PAIRS.members) - set(members))
        extra = sorted(set(members) - set(PAIRS.members))
        problems.append(f"members: missing {missing}, unexpected {extra}")
    for name in ("png", "cf.png"):
        if name in sample:
            try:
                with Image.open(io.BytesIO(sample[name])) as img:
                    if img.format != "PNG":
                        problems.append(f"{name}: {img.format}, not PNG")
                    img.load()
            except Exception as exc:  # any decoder failure is a problem to report, not a crash
                problems.append(f"{name}: does not decode ({type(exc).__name__})")
    meta = None
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError):
            problems.append("json: not valid JSON")
    if isinstance(meta, dict):
        if list(meta) != list(PAIR_FIELDS):
            problems.append(f"json: keys {sorted(meta)} differ from the contract")
        else:
            bad = [k for k, t in PAIR_FIELDS.items() if type(meta[k]) is not t]
            if bad:
                problems.append(f"json: wrong types for {bad}")
            elif meta["id"] != sample["__key__"]:
                problems.append("json: id differs from the key")
        for member, field in (("cls", "label"), ("cf.cls", "cf_label")):
            if member in sample and field in meta:
                try:
                    if int(sample[member]) != meta[field]:
                        problems.append(f"{member}: {sample[member]!r} differs from json {field}")
                except ValueError:
                    problems.append(f"{member}: not an integer")
    elif meta is not None:
        problems.append("json: not an object")
    return problems


def verify_run(run_dir: Path) -> tuple[int, list[str]]:
    """(samples checked, problems as 'shard: key: problem' lines)."""
    out = PAIRS.dir(run_dir)
    tars = sorted(out.glob(f"{PAIRS.prefix}-*.tar"))
    if not tars:
        raise InputError(f"no pair shards in {out}")
    problems: list[str] = []
    sizes_file, manifest_file = out / "sizes.json", out / "manifest.parquet"
    sizes = json.loads(sizes_file.read_text()) if sizes_file.is_file() else None
    if sizes is None:
        problems.append("sizes.json: missing")
    seen: set[str] = set()
    checked = 0
    for tar in tars:
        count = 0
        try:
            for sample in read_samples(tar):
                key = sample["__key__"]
                count += 1
                if "." in key or key in seen:
                    problems.append(f"{tar.name}: {key}: key has a dot or is duplicated")
                seen.add(key)
                problems += [f"{tar.name}: {key}: {p}" for p in _check_sample(sample)]
        except ShardError as exc:
            problems.append(f"{tar.name}: unreadable: {exc}")
        checked += count
        if sizes is not None and sizes.get(tar.name) != count:
            problems.append(f"{tar.name}: {count} samples, sizes.json says {sizes.get(tar.name)}")
    if manifest_file.is_file():
        ok = {r["id"] for r in pq.read_table(manifest_file, columns=["id", "status"]).to_pylist()
              if r["status"] == "ok"}
        if ok != seen:
            problems.append(f"manifest.parquet: {len(ok - seen)} ok rows not in the shards, "
                            f"{len(seen - ok)} samples without an ok row")
    else:
        problems.append("manifest.parquet: missing")
    return checked, problems
