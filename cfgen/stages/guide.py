"""Stage 2, action + prediction: the guide stage's shard loop, whichever guide mode makes the pairs.

    cfgen guide --config pipelines/digits.toml [--set guide.scale=6]
    cfgen guide --config pipelines/shapes-text.toml              # guide.mode = "text"

Reads RUN/invert/invert-<i>.tar and writes RUN/guide/guide-<i>.tar with, per pair K:
    K.png        the factual image          K.cf.png     the counterfactual
    K.recon.png  the reconstruction         K.json       labels, the do(), scale, metrics
The pairs come from the guide mode, chosen once (open_mode): classifier guidance toward a class y*
(stages/classifier_guide.py) or do() on a caption's concepts (stages/text_guide.py). Both return a
BatchResult (stages/guide_mode.py), so what is here -- decoding the inputs, the per-pair rows and
metrics, the tar, resuming a killed run -- never asks which mode it runs. A factual image may give
several pairs, each with its own row; one that never reached a mode keeps its own (failed) row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from cfgen.config import Config
from cfgen.contract import GUIDE, GUIDE_FIELDS, INVERT
from cfgen.data.images import decode_image, encode_png
from cfgen.data.sources import list_samples, load_class_names
from cfgen.errors import InputError
from cfgen.quality.distances import l1, l2
from cfgen.models.loading import load_models
from cfgen.models.runtime import Models
from cfgen.overlap import BackgroundWriter, chunks, prefetched
from cfgen.runstate import claim, require_upstream, run_lock
from cfgen.shards import atomic_tar, npy_load, read_rows, sample_digest
from cfgen.stages.classifier_guide import ClassifierGuide
from cfgen.stages.common import (UnetProgress, config_grid, finished_inputs, mark_unread, run_shards, samples_until_error,
                                 upstream_rows)
from cfgen.stages.guide_mode import BatchResult, GuideMode
from cfgen.stages.text_guide import TextGuide


def open_mode(cfg: Config, classes: list[str], refs: list) -> GuideMode:
    """The guide mode of guide.mode, its settings checked against the classes and the input samples `refs`:
    the one place the stage asks which mode it runs."""
    if cfg.guide.mode == "text":
        return TextGuide(cfg, classes, refs)
    return ClassifierGuide(cfg, classes)


def verdicts(label: int, cf_label: int, top_is_target: bool) -> dict:
    """What the guiding predictor says happened to the class: a do() that changes it (cf_label != label)
    `flipped` when the predictor's top class is now cf_label; a do() that keeps it (text mode's do(environment),
    do(size)) is no flip, and `class_kept` when the predictor still gives the class."""
    changes = cf_label != label
    return {"changes_class": changes, "flipped": changes and top_is_target, "class_kept": not changes and top_is_target}


def run_guide(cfg: Config, run_dir: Path, overwrite: bool = False, models: Models | None = None) -> Path:
    """Guide every inverted sample into RUN/guide/ (resuming a killed run). `models`: already loaded (and
    warmed up) ones, as `cfgen run` and `cfgen bench` pass; else loaded here."""
    with run_lock(run_dir, cfg):
        return _guide(cfg, run_dir, overwrite, models)


def _guide(cfg: Config, run_dir: Path, overwrite: bool, models: Models | None) -> Path:
    classes = load_class_names(cfg)
    indices = finished_inputs(INVERT, run_dir)
    refs = list_samples(cfg)  # the input list both fingerprints digest, listed once
    mode = open_mode(cfg, classes, refs)
    require_upstream(INVERT, cfg, run_dir, refs)
    models = models or load_models(cfg)
    grid = config_grid(cfg, models.num_train_timesteps)
    claim(GUIDE, cfg, run_dir, overwrite, refs)  # last: a refusal above leaves no record of this run
    progress = UnetProgress(models.unet, first_guess=mode.first_guess(len(grid) - 1))
    shards = GuideShards(cfg, run_dir, classes, mode, models, grid, progress)
    try:
        run_shards(GUIDE, cfg, run_dir, indices, shards.process, sizes=upstream_rows(INVERT, run_dir))
    finally:
        progress.close()
    return GUIDE.dir(run_dir)


@dataclass
class GuideShards:
    """One guide shard at a time: its invert samples decoded ahead on a thread, each batch's pairs made by
    the mode, and written behind on another thread."""
    cfg: Config
    run_dir: Path
    classes: list[str]
    mode: GuideMode
    models: Models
    grid: list[int]
    progress: UnetProgress

    def process(self, index: int) -> list[dict]:
        """Guide shard `index`; returns its manifest rows: one per pair, and a factual image that never
        reached the mode keeps its own (failed) row."""
        rows = read_rows(INVERT.rows(self.run_dir, index))
        by_id = {r["id"]: r for r in rows}
        seen: set[str] = set()   # ids whose samples came out of the input tar (the prefetch thread adds them)
        broken: list[str] = []
        pairs_of: dict[str, list[dict]] = {}  # factual id -> its pair rows (the writer thread adds them)
        samples = samples_until_error(INVERT.tar(self.run_dir, index), broken)
        parse = partial(self.parse, by_id, seen)
        with atomic_tar(GUIDE.tar(self.run_dir, index)) as tar, BackgroundWriter() as writer:
            for good in prefetched(chunks(samples, self.cfg.guide.batch_size), parse):
                if not good:
                    continue
                self.progress.start(len(good))
                batch_rows = [r for r, _, _ in good]
                factual = np.stack([p for _, p, _ in good])
                res = self.mode.batch(self.models, self.grid, batch_rows, factual, np.stack([n for _, _, n in good]))
                writer.submit(self.write, tar, batch_rows, factual, res, pairs_of)
                self.progress.done()
        mark_unread(rows, seen, broken)
        return [pair for r in rows for pair in pairs_of.get(r["id"], [r])]

    def parse(self, by_id: dict[str, dict], seen: set[str],
              samples: list[dict]) -> list[tuple[dict, np.ndarray, np.ndarray]]:
        """Decode a batch of invert samples (on the prefetch thread): (row, pixels, noise) per good one; a bad
        one fails its row, a sample the invert stage has no row for is not ours to guess about."""
        good = []
        for sample in samples:
            row = by_id.get(sample["__key__"])
            if row is None:
                continue
            seen.add(row["id"])
            written_as, row["sha256"] = row["sha256"], None  # from here on: this stage's own sample
            row.update(target_strategy=self.cfg.guide.target)
            try:
                good.append((row, *self._decode(sample, row, written_as)))
            except _Refused as exc:
                row.update(status="failed", error=str(exc))
        return good

    def _decode(self, sample: dict, row: dict, written_as: str | None) -> tuple[np.ndarray, np.ndarray]:
        """The pixels and the noise u of one invert sample, or _Refused with its row's error."""
        missing = [m for m in ("png", "noise.npy") if m not in sample]
        if missing:
            raise _Refused(f"input sample is missing members: {', '.join(missing)}")
        if written_as is not None and sample_digest(sample) != written_as:
            raise _Refused(f"damaged input sample: its checksum differs from "
                           f"{INVERT.rows(self.run_dir, row['shard']).name}")
        try:
            meta = json.loads(sample["json"])
            made_with = (meta["grid"], meta["steps"], meta["t_inv"])
        except (KeyError, TypeError, ValueError):
            raise _Refused("input sample has no readable json member") from None
        if made_with[0] != self.grid:
            cfg = self.cfg
            raise InputError(f"invert shards in {INVERT.dir(self.run_dir)} were made with steps={made_with[1]}, "
                             f"t_inv={made_with[2]}; the config says steps={cfg.invert.steps}, "
                             f"t_inv={cfg.invert.t_inv}: re-run `cfgen invert --overwrite`")
        refusal = self.mode.refusal(row)
        if refusal is not None:
            raise _Refused(refusal)
        try:
            pixels = decode_image(sample["png"], self.cfg.data.image_size, self.cfg.data.channels)
            noise = npy_load(sample["noise.npy"]).astype(np.float32)
        except ValueError as exc:
            raise _Refused(f"unreadable input sample: {exc}") from None
        return pixels, noise

    def write(self, tar, batch_rows: list[dict], factual: np.ndarray, res: BatchResult,
              pairs_of: dict[str, list[dict]]) -> None:
        """Metrics, PNG encoding and tar writing (on the writer thread): each pair's row is its factual
        image's row with the mode's columns of the pair (its id, its do()) and the measured ones."""
        for j, b in enumerate(res.source):
            row = dict(batch_rows[b], **res.fields[j])
            pairs_of.setdefault(batch_rows[b]["id"], []).append(row)
            if not res.finite[j]:
                row.update(status="failed", error="non-finite output from the UNet or the predictor")
                continue
            y = int(res.cf_label[j])
            row.update(cf_label=y, cf_label_name=self.classes[y], guidance_scale=float(res.scale[j]),
                       p_cf=float(res.p_cf[j]), **verdicts(row["label"], y, bool(res.flipped[j])),
                       l1=l1(factual[b], res.cf[j]), l2=l2(factual[b], res.cf[j]),
                       recon_l1=l1(factual[b], res.recon[j]),
                       mask_fraction=None if res.mask_fraction is None else float(res.mask_fraction[j]))
            meta = {k: row[k] for k in GUIDE_FIELDS}
            meta.update(t_inv=self.cfg.invert.t_inv, steps=self.cfg.invert.steps)
            sample = {"__key__": row["id"], "png": encode_png(factual[b]), "cf.png": encode_png(res.cf[j]),
                      "recon.png": encode_png(res.recon[j]), "json": json.dumps(meta, sort_keys=True).encode()}
            row["sha256"] = sample_digest(sample)
            tar.write(sample)


class _Refused(Exception):
    """An input sample this stage cannot guide: its row fails with this message, the shard goes on."""
