"""Stage 3: write the pair shards (the public output contract) and their manifest.

    cfgen pack --config pipelines/digits.toml

RUN/pairs/pairs-<i>.tar (one per guide shard), each sample K with exactly:
    K.png  K.txt  K.cls            the factual image, its caption, its class index
    K.cf.png  K.cf.txt  K.cf.cls   the counterfactual, its caption, its class index
    K.json                         contract.PAIR_FIELDS, the same schema everywhere
(the images K.jpg / K.webp with pack.image_format = 'jpeg' / 'webp', re-encoded from the guide shards'
PNGs at pack.image_quality; 'png' copies their bytes) and beside them manifest.parquet (one row per input
sample, failures included), stats.json, sizes.json ({"pairs-000000.tar": n, ...}, which open_clip reads)
and the dataset card README.md (cfgen/card.py). Pairs that fail a gate (pack.require_flip, min_p_cf, max_l1,
max_recon_l1) are rows with status 'rejected', every failed gate in `error`, and
are not written; stats.json counts them by first reason (`errors`) and by gate
(`rejected_by_gate`). `flip_rate` is over the pairs whose do() changes the class; text mode's do()s that
keep it (environment, size) are `class_kept_rate`'s. The quality columns of cfgen/quality/measures.py are filled here
for every guided pair, with edit_within_recon (l1 <= recon_l1; stats.json: edit_within_recon_rate)
and cld (cfgen/quality/cld.py, against the run's own factual images by class, read from the guide shards
once, when the first pair needs them; stats.json: mean_cld); where the source knows its causal model
(shapes) stats.json adds oracle_flip_rate, truth_closer_rate, within_recon_bound_rate,
mean_truth_l1, mean_outside_change.
"""

from __future__ import annotations

import json
import resource
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cfgen import distributed
from cfgen.quality.cld import References
from cfgen.config import Config
from cfgen.card import write_card
from cfgen.contract import GUIDE, IMAGE_EXTENSIONS, INVERT, PAIRS, ROW_SCHEMA, pair_json
from cfgen.data.images import decode_image, encode_image
from cfgen.data.sources import list_samples, load_class_names, open_source
from cfgen.quality.distances import mean
from cfgen.concepts import class_concept as concept_of_class
from cfgen.quality.measures import changed_fraction, concept_quality, edit_within_recon, gate_failures, pair_quality, rate
from cfgen.runstate import claim, require_upstream, run_lock
from cfgen.shards import atomic_tar, atomic_write_json, read_rows, sample_digest
from cfgen.stages.common import (advance, error_reason, finished_inputs, mark_unread, run_shards, samples_until_error,
                                 stage_rows, upstream_rows)


def run_pack(cfg: Config, run_dir: Path, overwrite: bool = False) -> dict | None:
    """Write this rank's pair shards; after a barrier rank 0 merges and returns the stats."""
    with run_lock(run_dir, cfg):
        return _pack(cfg, run_dir, overwrite)


def _pack(cfg: Config, run_dir: Path, overwrite: bool) -> dict | None:
    indices = finished_inputs(GUIDE, run_dir)
    refs = list_samples(cfg)  # the input list both fingerprints digest, listed once
    require_upstream(GUIDE, cfg, run_dir, refs)
    claim(PAIRS, cfg, run_dir, overwrite, refs)
    caption = cfg.pack.caption
    fmt, quality = cfg.pack.image_format, cfg.pack.image_quality
    ext = IMAGE_EXTENSIONS[fmt]
    causal = open_source(cfg).causal
    graph = getattr(causal, "graph", None)  # a causal model over concepts (shapes-text) checks each do()
    class_concept = concept_of_class(graph, load_class_names(cfg)) if graph is not None else None
    references: list[References] = []  # read once, when the first shard needs them (not on a no-op rerun)

    def process(index: int) -> list[dict]:
        rows = read_rows(GUIDE.rows(run_dir, index))
        by_id = {r["id"]: r for r in rows}
        with atomic_tar(PAIRS.tar(run_dir, index)) as tar:
            broken: list[str] = []
            seen: set[str] = set()
            for sample in samples_until_error(GUIDE.tar(run_dir, index), broken):
                advance(1)
                row = by_id.get(sample["__key__"])
                if row is None or row["status"] != "ok":
                    continue
                seen.add(row["id"])
                written_as, row["sha256"] = row["sha256"], None  # from here on: the pair's own sample
                if written_as is not None and sample_digest(sample) != written_as:
                    row.update(status="failed", error=f"damaged input sample: its checksum differs from "
                                                      f"{GUIDE.rows(run_dir, index).name}")
                    continue
                size, ch = cfg.data.image_size, cfg.data.channels
                try:
                    meta = json.loads(sample["json"])
                    factual, cf, recon = (decode_image(sample[m], size, ch) for m in ("png", "cf.png", "recon.png"))
                except (KeyError, ValueError) as exc:
                    row.update(status="failed", error=f"unreadable guide sample: {type(exc).__name__}: {exc}")
                    continue
                concept, value = intervened(meta, class_concept)
                if concept == class_concept or concept is None:  # a class change: the class renderings judge it
                    row.update(pair_quality(causal, row["origin"], meta["cf_label"], factual, cf, recon))
                else:
                    row["changed_fraction"] = changed_fraction(factual, cf)
                if concept is not None:
                    row.update(concept_quality(causal, row["origin"], concept, value, factual, cf, recon))
                row["edit_within_recon"] = edit_within_recon(row["l1"], row["recon_l1"])
                if not references:
                    references.append(cld_references(cfg, run_dir, indices))
                row["cld"] = references[0].pair(factual, cf, row["label"], meta["cf_label"], row["origin"])
                failed = gate_failures(row, cfg.pack.min_p_cf, cfg.pack.max_l1, cfg.pack.max_recon_l1,
                                       cfg.pack.require_flip)
                if failed:
                    row.update(status="rejected", error="; ".join(failed))
                    continue
                # text mode's own captions (the edited one for K.cf.txt), else pack.caption of each class
                row["caption"] = meta.get("caption") or caption.format(label_name=meta["label_name"])
                row["cf_caption"] = meta.get("cf_caption") or caption.format(label_name=meta["cf_label_name"])
                # what the source's oracle read back (null without one): K.json says what happened, not only what was asked
                meta.update({k: row[k] for k in ("intervened_ok", "descendants_ok", "non_descendants_ok")})
                pair = {
                    "__key__": meta["id"],
                    ext: sample["png"] if fmt == "png" else encode_image(factual, fmt, quality),
                    "txt": row["caption"].encode(), "cls": str(meta["label"]).encode(),
                    f"cf.{ext}": sample["cf.png"] if fmt == "png" else encode_image(cf, fmt, quality),
                    "cf.txt": row["cf_caption"].encode(), "cf.cls": str(meta["cf_label"]).encode(),
                    "json": pair_json(meta),
                }
                row["sha256"] = sample_digest(pair)
                tar.write(pair)
        mark_unread(rows, seen, broken)
        return rows

    run_shards(PAIRS, cfg, run_dir, indices, process, sizes=upstream_rows(GUIDE, run_dir))  # ends on a barrier: every rank's shards are written
    return merge(run_dir, cfg) if distributed.is_main() else None


def concept_stats(ok: list[dict], class_concept: str | None) -> dict:
    """The concept checks' rates, over all pairs and per intervened concept (the comparison table's rows;
    a classifier pair's do(label) counts as its class concept's)."""
    def rates(rows: list[dict]) -> dict:
        return {"pairs": len(rows), "intervened_rate": rate(r["intervened_ok"] for r in rows),
                "descendants_rate": rate(r["descendants_ok"] for r in rows),
                "non_descendants_rate": rate(r["non_descendants_ok"] for r in rows),
                "mean_truth_l1": mean(r["truth_l1"] for r in rows), "mean_l1": mean(r["l1"] for r in rows)}
    by: dict[str, list[dict]] = {}
    for r in ok:
        by.setdefault(intervened(r, class_concept)[0], []).append(r)
    return {"all": rates(ok), **{c: rates(rows) for c, rows in sorted(by.items())}}


def intervened(meta: dict, class_concept: str | None) -> tuple[str | None, str | None]:
    """(concept, value) of a pair's do() for the concept checks: the text path's own; a classifier pair's
    do(label = y*) is do(class concept = y*); (None, None) where the source knows no concept graph."""
    if class_concept is None:
        return None, None
    record = json.loads(meta["edits"])
    concept = record["target_concept_name"]
    return (class_concept if concept == "label" else concept), record["new_value"]


def cld_references(cfg: Config, run_dir: Path, indices: list[int]) -> References:
    """The real images CLD measures against: the factual images of the guide shards `indices`
    (every rank reads the same ones, in shard order, so every rank gets the same sets)."""
    refs = References()
    size, ch = cfg.data.image_size, cfg.data.channels
    for index in indices:
        rows = {r["id"]: r for r in read_rows(GUIDE.rows(run_dir, index))}
        for sample in samples_until_error(GUIDE.tar(run_dir, index), []):  # damage is reported by process
            row = rows.get(sample["__key__"])
            if row is None or row["status"] != "ok" or "png" not in sample:
                continue
            if not refs.wants(row["label"], row["origin"]):
                continue
            if row["sha256"] is not None and sample_digest(sample) != row["sha256"]:
                continue  # damaged: process makes it a failure row
            try:
                refs.add(row["label"], row["origin"], decode_image(sample["png"], size, ch))
            except ValueError:
                continue  # an unreadable image becomes a failure row in process; it is no reference
    return refs


def _stage_seconds(stage, run_dir: Path) -> float:
    return sum(json.loads(stage.marker(run_dir, i).read_text())["seconds"] for i in stage.finished(run_dir))


def merge(run_dir: Path, cfg: Config) -> dict:
    """manifest.parquet, sizes.json, stats.json and the dataset card (README.md) from the finished pair shards."""
    out_dir = PAIRS.dir(run_dir)
    indices = PAIRS.finished(run_dir)
    rows = stage_rows(PAIRS, run_dir)
    manifest = out_dir / "manifest.parquet"
    tmp = manifest.with_name(manifest.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), tmp)
    tmp.replace(manifest)
    ok = [r for r in rows if r["status"] == "ok"]
    sizes = {PAIRS.tar(run_dir, i).name: sum(r["status"] == "ok" and r["shard"] == i for r in rows)
             for i in indices}
    atomic_write_json(out_dir / "sizes.json", sizes)
    stats = {
        "count": len(rows),
        "pairs": len(ok),
        "failed": sum(r["status"] == "failed" for r in rows),
        "rejected": sum(r["status"] == "rejected" for r in rows),
        "errors": dict(Counter(error_reason(r["error"]) for r in rows if r["status"] != "ok")),
        # a flip is a class change the predictor sees; a do() that keeps the class is counted as kept, not as a flip
        "flip_rate": mean(float(r["flipped"]) for r in ok if r["changes_class"] is not False),
        "mean_l1": mean(r["l1"] for r in ok),
        "mean_l2": mean(r["l2"] for r in ok),
        "mean_recon_l1": mean(r["recon_l1"] for r in ok),
        "mean_p_cf": mean(r["p_cf"] for r in ok),
        "mean_changed_fraction": mean(r["changed_fraction"] for r in ok),
        "edit_within_recon_rate": rate(r["edit_within_recon"] for r in ok),
        "mean_cld": mean(r["cld"] for r in ok),
        "rejected_by_gate": dict(Counter(error_reason(g) for r in rows if r["status"] == "rejected"
                                         for g in (r["error"] or "").split("; "))),
        "per_class": dict(sorted(Counter(r["label_name"] for r in ok).items())),
        "per_cf_class": dict(sorted(Counter(r["cf_label_name"] for r in ok).items())),
        "per_scale": {str(k): v for k, v in sorted(Counter(r["guidance_scale"] for r in ok).items())},
        "shards": len(indices),
        "seconds": {"invert": _stage_seconds(INVERT, run_dir), "guide": _stage_seconds(GUIDE, run_dir),
                    "pack": _stage_seconds(PAIRS, run_dir)},
        # of the merging process: bounded by one shard's working set, not by the dataset size
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "image_format": cfg.pack.image_format,
    }
    if any(r["changes_class"] is False for r in ok):  # text mode: do()s that keep the class
        kept = [r for r in ok if r["changes_class"] is False]
        stats.update(class_changing_pairs=len(ok) - len(kept), class_keeping_pairs=len(kept),
                     class_kept_rate=mean(float(r["class_kept"]) for r in kept))
    if any(r["mask_fraction"] is not None for r in ok):  # localized edits (guide.mask)
        stats["mean_mask_fraction"] = mean(r["mask_fraction"] for r in ok)
    if any(r["truth_l1"] is not None for r in ok):  # the source knows its causal model
        stats.update({
            "oracle_flip_rate": rate(r["oracle_flipped"] for r in ok),
            "truth_closer_rate": rate(r["truth_closer"] for r in ok),
            "within_recon_bound_rate": rate(r["within_recon_bound"] for r in ok),
            "mean_truth_l1": mean(r["truth_l1"] for r in ok),
            "mean_outside_change": mean(r["outside_change"] for r in ok),
        })
    if any(r["intervened_ok"] is not None for r in ok):  # a concept graph checks each do() (shapes-text)
        graph = getattr(open_source(cfg).causal, "graph", None)
        stats["concepts"] = concept_stats(ok, concept_of_class(graph, load_class_names(cfg)) if graph else None)
    atomic_write_json(out_dir / "stats.json", stats)
    write_card(run_dir, cfg, stats)
    return {**stats, "pairs_dir": str(out_dir)}  # where they are: for the caller, not in stats.json (no local path)

