"""Judge a run's pairs with a classifier that is NOT the guiding predictor.

    cfgen evaluate runs/digits

Reads RUN/pairs/*.tar with webdataset (as any consumer would) and reports:
- the independent judge: an RBF SVM (scikit-learn) fitted on the data source's own labelled images
  (the run's config, RUN/pairs/config.toml, names the source), whatever samples the run processed,
  with its accuracy on held-out images of the source, so the flip rate can be trusted and does not
  depend on the run's size (`reference_judge`; `cfgen sweep` uses the same judge);
- oracle flip rate: the share of counterfactuals the judge assigns to y*;
- minimality: mean L1 factual -> counterfactual, against the mean L1 from each
  factual image to its nearest *real* image of the target class among the judge's source images (a
  counterfactual that changes less than swapping in the closest real example
  of y* is a minimal edit, not a replacement).
The figures are also written to RUN/evaluate/judge.json (with the digest of the manifest they
were measured on), where `cfgen report` finds them, and the dataset card RUN/pairs/README.md is
rewritten to quote them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cfgen.card import write_card
from cfgen.config import Config
from cfgen.contract import PAIRS, image_keys
from cfgen.data.images import decode_png
from cfgen.errors import InputError
from cfgen.quality.judge_record import manifest_digest, result_path
from cfgen.shards import atomic_write_json, file_digest

JUDGE_IMAGES = 2000
"""At most this many source images fit the judge, and as many are held out (a fixed draw beyond that):
enough for an SVM on small images, seconds to fit, whatever the size of the source."""
JUDGE_VALUES = 1 << 26
"""...and at most this many pixel values on each side (large images: the SVM holds them as float64)."""


def write_result(run_dir: Path, result: dict) -> Path:
    """judge.json, then the dataset card again: it quotes the judge's figure (cfgen/card.py)."""
    path = result_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**result, "manifest_sha256": manifest_digest(run_dir)})
    if all((PAIRS.dir(run_dir) / f).is_file() for f in ("config.toml", "stats.json")):
        write_card(run_dir)
    return path


def fit_judge(images: np.ndarray, labels):
    """The independent judge: an RBF SVM on flattened [0, 1] pixels (scikit-learn), fitted here."""
    from sklearn.svm import SVC

    return SVC(kernel="rbf", gamma="scale", C=10.0).fit(flat(images), labels)


@dataclass
class Judge:
    """The independent judge and the source images it was fitted and checked on."""
    model: object               # the fitted SVC
    fit_images: int
    heldout_images: int
    heldout_accuracy: float     # nan when the source holds nothing out
    images: np.ndarray          # uint8 (N, H, W, C): every image above, fitted and held out (the real-image pool)
    labels: np.ndarray


def reference_judge(cfg: Config) -> Judge:
    """The judge of `cfg`'s data source, the same whichever samples a run processed: the source's samples
    (data.use_split, only_classes, class_limit, limit and repeat do not apply) split as `cfgen train
    classifier` splits them (data.split's 'test' ids held out, else a seeded stratified share), each side
    at most JUDGE_IMAGES (a fixed draw)."""
    import torch

    from cfgen.data.sources import list_samples
    from cfgen.trainkit import split_train_test

    cfg = copy.deepcopy(cfg)
    d = cfg.data
    d.use_split, d.only_classes, d.class_limit, d.limit, d.repeat = "", [], 0, 0, 1
    refs = [r for r in list_samples(cfg) if not r.error and r.label >= 0]
    labels = np.array([r.label for r in refs], dtype=np.int64)
    try:
        fit, held = (m.numpy() for m in split_train_test(cfg, torch.from_numpy(labels), [r.id for r in refs]))
    except ValueError:  # a class too small to stratify: fit on everything, hold nothing out
        fit, held = np.ones(len(refs), dtype=bool), np.zeros(len(refs), dtype=bool)
    cap = max(1, min(JUDGE_IMAGES, JUDGE_VALUES // (d.image_size ** 2 * d.channels)))
    rng = np.random.default_rng(0)
    sides = []
    for mask in (fit, held):
        chosen = np.flatnonzero(mask)
        if len(chosen) > cap:
            chosen = np.sort(rng.choice(chosen, cap, replace=False))
        images, kept = [], []
        for i in chosen:
            try:
                images.append(refs[i].load())
                kept.append(i)
            except ValueError:
                continue  # an unreadable file is no reference (a run makes it a failed row)
        sides.append((images, labels[kept]))
    (fit_x, fit_y), (held_x, held_y) = sides
    if len(np.unique(fit_y)) < 2:
        raise InputError(f"the judge needs readable, labelled images of two classes or more to fit on; "
                         f"data.source={d.source!r} gives {len(fit_y)} of {len(np.unique(fit_y))}")
    model = fit_judge(np.stack(fit_x), fit_y)
    accuracy = float((model.predict(flat(np.stack(held_x))) == held_y).mean()) if held_x else float("nan")
    return Judge(model, len(fit_x), len(held_x), accuracy, np.stack(fit_x + held_x), np.concatenate([fit_y, held_y]))


def run_config(run_dir: Path) -> Config:
    """The config a run's pairs were packed with (RUN/pairs/config.toml): it names the data source."""
    from cfgen.config import load_config

    path = PAIRS.dir(run_dir) / "config.toml"
    if not path.is_file():
        raise InputError(f"no {path}: the judge is fitted on the data source the run's config names; "
                         "re-run `cfgen pack`")
    return load_config(path)


def flat(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float (N, H*W*C) in [0, 1]: what the judge reads."""
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def load_pairs(run_dir: Path) -> dict[str, np.ndarray]:
    """Every pair of a run, read with webdataset as any consumer would."""
    import webdataset as wds

    urls = sorted(str(p) for p in PAIRS.dir(run_dir).glob(f"{PAIRS.prefix}-*.tar"))
    if not urls:
        raise InputError(f"no pair shards in {PAIRS.dir(run_dir)}; run `cfgen pack` first")
    factual, cf, labels, cf_labels, factual_ids = [], [], [], [], []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        image, cf_image = image_keys(sample)  # png, jpg or webp: pack.image_format
        factual.append(decode_png(sample[image]))
        cf.append(decode_png(sample[cf_image]))
        labels.append(int(sample["cls"]))
        cf_labels.append(int(sample["cf.cls"]))
        factual_ids.append(json.loads(sample["json"]).get("factual_id", sample["__key__"]))
    return {"factual": np.stack(factual), "cf": np.stack(cf), "label": np.array(labels),
            "cf_label": np.array(cf_labels), "factual_id": np.array(factual_ids, dtype=object)}


def evaluate_pairs(run_dir: Path) -> dict:
    data = load_pairs(Path(run_dir))
    judge = reference_judge(run_config(Path(run_dir)))
    n = len(data["label"])
    f, c = flat(data["factual"]), flat(data["cf"])
    said = judge.model.predict(c) == data["cf_label"]
    changes = data["label"] != data["cf_label"]  # a do() that keeps the class (text mode) is no flip
    oracle_flip = float(said[changes].mean()) if changes.any() else float("nan")
    kept = {"judge_class_kept_rate": float(said[~changes].mean())} if (~changes).any() else {}
    l1 = np.abs(f - c).mean(axis=1)
    real, real_label = flat(judge.images), judge.labels
    nearest = np.full(n, np.nan)
    for y in np.unique(data["cf_label"]):
        pool = real[real_label == y]
        rows = np.where(data["cf_label"] == y)[0]
        step = max(1, JUDGE_VALUES // 8 // max(1, pool.size))  # a bounded block of |f_i - r| at a time
        for lo in range(0, len(rows) if len(pool) else 0, step):
            # mean |f_i - r| over pixels for every real image r of class y; keep the closest
            part = rows[lo:lo + step]
            nearest[part] = np.abs(f[part][:, None, :] - pool[None, :, :]).mean(axis=2).min(axis=1)
    return {"pairs": n, "factual_images": len(np.unique(data["factual_id"])),
            "judge": "SVC(rbf) on the data source's images", "judge_fit_images": judge.fit_images,
            "judge_heldout_images": judge.heldout_images, "judge_heldout_accuracy": judge.heldout_accuracy,
            "oracle_flip_rate": oracle_flip, "mean_l1": float(l1.mean()),
            "mean_nearest_target_l1": float(np.nanmean(nearest)),
            "l1_over_nearest": float(l1.mean() / np.nanmean(nearest)), **kept}


def judge_line(r: dict) -> str:
    """What the judge was fitted on and how well it does on the source's held-out images."""
    return (f"{r['judge']}: fitted on {r['judge_fit_images']} images, held-out accuracy "
            f"{r['judge_heldout_accuracy']:.3f} on {r['judge_heldout_images']}")


def format_report(r: dict) -> str:
    return "\n".join([
        f"pairs                                   {r['pairs']} (of {r['factual_images']} factual images)",
        f"independent judge                       {judge_line(r)}",
        f"flip rate by the judge                  {r['oracle_flip_rate']:.3f}"
        + (f" (class-changing pairs; class kept {r['judge_class_kept_rate']:.3f} on the others)"
           if "judge_class_kept_rate" in r else ""),
        f"mean L1 factual -> counterfactual       {r['mean_l1']:.4f}",
        f"mean L1 factual -> nearest real y* img  {r['mean_nearest_target_l1']:.4f}",
        f"ratio                                   {r['l1_over_nearest']:.3f}",
    ])
