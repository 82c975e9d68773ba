"""`cfgen verify RUN_DIR`: re-read every pair shard and check it against the contract.

    cfgen verify runs/digits        # exit 0: all good; exit 1: problems listed by shard and key

Checks: every tar reads to the end; every sample has exactly the contract
members, its images in the run's pack.image_format (K.png, K.jpg or K.webp);
both images decode as that format; K.json parses, has exactly the contract keys with
their types (null only where the contract allows it), and agrees with K.cls / K.cf.cls;
keys are dot-free and unique; per-shard counts match sizes.json; every sample has an 'ok'
manifest row and every 'ok' row a sample; each sample's members match the checksum its row
recorded when it was written (a label changed consistently in K.json and K.cls
is caught here); K.json agrees with the row; the captions are what the run's
config (pairs/config.toml) makes: pack.caption of the class names, or in text
mode the concept graph's captions of the states before and after the pair's
do() (so shards captioned under another graph are caught).
"""

from __future__ import annotations

import io
import json
import tomllib
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from cfgen.contract import IMAGE_EXTENSIONS, NULLABLE_FIELDS, PAIR_FIELDS, PAIRS, image_keys, pair_members
from cfgen.errors import InputError, ShardError, UserError
from cfgen.shards import read_samples, sample_digest


PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
"""An image member's extension -> the format PIL must find in it."""


def _check_sample(sample: dict, image_format: str | None) -> list[str]:
    """`image_format`: the run's pack.image_format (None: whichever the sample's images say)."""
    problems = []
    members = sorted(k for k in sample if k != "__key__")
    try:
        ext = image_keys(sample)[0] if image_format is None else IMAGE_EXTENSIONS[image_format]
    except KeyError:
        ext = "png"
    expected = pair_members({v: k for k, v in IMAGE_EXTENSIONS.items()}[ext])
    if members != sorted(expected):
        missing = sorted(set(expected) - set(members))
        extra = sorted(set(members) - set(expected))
        problems.append(f"members: missing {missing}, unexpected {extra}")
    for name in (ext, f"cf.{ext}"):
        if name in sample:
            try:
                with Image.open(io.BytesIO(sample[name])) as img:
                    if img.format != PIL_FORMATS[ext]:
                        problems.append(f"{name}: {img.format}, not {PIL_FORMATS[ext]}")
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
            bad = [k for k, t in PAIR_FIELDS.items()
                   if type(meta[k]) is not t and not (meta[k] is None and k in NULLABLE_FIELDS)]
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


def _against_row(sample: dict, meta: dict | None, row: dict | None, captions: Captions | None) -> list[str]:
    """A pair against its manifest row: checksum, K.json values, captions as the run's config makes them."""
    if row is None:
        return ["no ok row in manifest.parquet"]
    problems = []
    if row.get("sha256") and sample_digest(sample) != row["sha256"]:
        problems.append("members differ from the checksum in manifest.parquet (changed after writing)")
    if isinstance(meta, dict):
        changed = [k for k in MANIFEST_FIELDS if k in meta and k in row and meta[k] != row[k]]
        changed += [k for k in ("concepts_before", "concepts_after")  # a map column: (key, value) pairs
                    if isinstance(meta.get(k), dict) and row.get(k) is not None and meta[k] != dict(row[k])]
        if changed:
            problems.append(f"json differs from manifest.parquet in {changed}")
        if captions is not None:
            problems += captions.problems(sample, meta)
    return problems


MANIFEST_FIELDS = ("label", "label_name", "cf_label", "cf_label_name", "target_strategy", "guidance_scale", "seed",
                   "p_cf", "flipped", "l1", "l2", "recon_l1", "concept", "changes_class", "class_kept", "intervened_ok",
                   "descendants_ok", "non_descendants_ok")
"""K.json fields that the manifest row of the pair also holds, and must agree with."""


class Captions:
    """K.txt and K.cf.txt as the run's config (pairs/config.toml) makes them: pack.caption of the class names,
    or in text mode the concept graph's captions of the states before and after each pair's do()."""

    def __init__(self, caption: str, graph=None):
        self.caption, self.graph = caption, graph

    @classmethod
    def of_run(cls, out: Path) -> tuple[Captions | None, str | None]:
        """(the run's Captions, None), or (None, why they cannot be checked)."""
        from cfgen.config import load_config

        path = out / "config.toml"
        if not path.is_file():
            return None, None  # made before the config was written beside the pairs: nothing to check against
        try:
            cfg = load_config(path)
            if cfg.guide.mode != "text":
                return cls(cfg.pack.caption), None
            from cfgen.data.sources import open_source
            from cfgen.stages.text_guide import load_graph

            return cls(cfg.pack.caption, load_graph(cfg, open_source(cfg))), None
        except UserError as exc:
            return None, f"config.toml: the captions cannot be checked: {exc}"

    def problems(self, sample: dict, meta: dict) -> list[str]:
        """What K.json's fields say the captions are, against K.txt and K.cf.txt (a field K.json lacks is
        reported by the schema check)."""
        if self.graph is None:
            fields = {"txt": "label_name", "cf.txt": "cf_label_name"}
            return [f"{m}: not the caption pack.caption makes of {field}" for m, field in fields.items()
                    if m in sample and field in meta
                    and sample[m] != self.caption.format(label_name=meta[field]).encode()]
        if "edits" not in meta:
            return []
        try:
            record = json.loads(meta["edits"])
            after = dict(record["final_concept_states"])
            before = {**after, record["target_concept_name"]: record["original_value"],
                      **{c["concept_name"]: c["original_value"] for c in record["propagated_changes"]}}
            expected = {"txt": ("the state before the do()", self.graph.caption(before)),
                        "cf.txt": ("final_concept_states", self.graph.caption(after))}
        except (KeyError, TypeError, ValueError, UserError):
            return ["json: edits is not a do() record the concept graph can caption"]
        return [f"{m}: not the caption the concept graph makes of {what}" for m, (what, text) in expected.items()
                if m in sample and sample[m] != text.encode()]


def _pack_settings(out: Path) -> tuple[str | None, str | None]:
    """(pack.caption, pack.image_format) of the run's config.toml; None where it does not say (an older run's
    config has no image_format: PNG, as it was then)."""
    path = out / "config.toml"
    try:
        pack = tomllib.loads(path.read_text(encoding="utf-8"))["pack"]
    except (OSError, KeyError, ValueError):
        return None, None
    return pack.get("caption"), pack.get("image_format", "png")


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
    rows = ({r["id"]: r for r in pq.read_table(manifest_file).to_pylist() if r["status"] == "ok"}
            if manifest_file.is_file() else None)
    if rows is None:
        problems.append("manifest.parquet: missing")
    captions, why = Captions.of_run(out)
    if why:
        problems.append(why)
    _, image_format = _pack_settings(out)
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
                found = _check_sample(sample, image_format)
                if rows is not None:
                    found += _against_row(sample, _meta(sample), rows.get(key), captions)
                problems += [f"{tar.name}: {key}: {p}" for p in found]
        except ShardError as exc:
            problems.append(f"{tar.name}: unreadable: {exc}")
        checked += count
        if sizes is not None and sizes.get(tar.name) != count:
            problems.append(f"{tar.name}: {count} samples, sizes.json says {sizes.get(tar.name)}")
    if rows is not None and set(rows) - seen:
        problems.append(f"manifest.parquet: {len(set(rows) - seen)} ok rows not in the shards")
    return checked, problems


def _meta(sample: dict) -> dict | None:
    try:
        meta = json.loads(sample["json"])
    except (KeyError, ValueError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None
