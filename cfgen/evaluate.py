"""Judge a run's pairs with a classifier that is NOT the guiding predictor.

    cfgen evaluate runs/digits

Reads RUN/pairs/*.tar with webdataset (as any consumer would) and reports:
- the independent judge: an RBF SVM (scikit-learn) fitted on the factual
  images, with its 5-fold cross-validated accuracy on them, so the flip rate
  can be trusted;
- oracle flip rate: the share of counterfactuals the judge assigns to y*;
- minimality: mean L1 factual -> counterfactual, against the mean L1 from each
  factual image to its nearest *real* image of the target class (a
  counterfactual that changes less than swapping in the closest real example
  of y* is a minimal edit, not a replacement).
The figures are also written to RUN/evaluate/judge.json (with the digest of the manifest they
were measured on), where `cfgen report` finds them, and the dataset card RUN/pairs/README.md is
rewritten to quote them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cfgen.contract import PAIRS, image_keys
from cfgen.data.images import decode_png
from cfgen.errors import InputError
from cfgen.shards import atomic_write_json, file_digest


def result_path(run_dir: Path) -> Path:
    """Where `cfgen evaluate` leaves its figures: outside pairs/, which readers open as a dataset."""
    return Path(run_dir) / "evaluate" / "judge.json"


def manifest_digest(run_dir: Path) -> str | None:
    """sha256 of RUN/pairs/manifest.parquet: a re-pack changes it, so a reader can tell stale figures."""
    manifest = PAIRS.dir(run_dir) / "manifest.parquet"
    return file_digest(manifest) if manifest.is_file() else None


def write_result(run_dir: Path, result: dict) -> Path:
    """judge.json, then the dataset card again: it quotes the judge's figure (cfgen/card.py)."""
    from cfgen.card import write_card

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
    from sklearn.model_selection import cross_val_score

    data = load_pairs(Path(run_dir))
    n = len(data["label"])
    f, c = flat(data["factual"]), flat(data["cf"])
    # each factual image once (several pairs may share one): the judge's training set and the real-image pool
    first = np.sort(np.unique(data["factual_id"], return_index=True)[1])  # in shard order
    real, real_label = f[first], data["label"][first]
    judge = fit_judge(data["factual"][first], real_label)
    # stratified k-fold needs k members of every class present
    folds = min(5, int(np.unique(real_label, return_counts=True)[1].min()))
    cv_acc = float(cross_val_score(judge, real, real_label, cv=folds).mean()) if folds >= 2 else float("nan")
    said = judge.predict(c) == data["cf_label"]
    changes = data["label"] != data["cf_label"]  # a do() that keeps the class (text mode) is no flip
    oracle_flip = float(said[changes].mean()) if changes.any() else float("nan")
    kept = {"judge_class_kept_rate": float(said[~changes].mean())} if (~changes).any() else {}
    l1 = np.abs(f - c).mean(axis=1)
    nearest = np.empty(n)
    for y in np.unique(data["cf_label"]):
        pool = real[real_label == y]
        rows = np.where(data["cf_label"] == y)[0]
        if len(pool) == 0:
            nearest[rows] = np.nan
            continue
        # mean |f_i - r| over pixels for every real image r of class y; keep the closest
        dists = np.abs(f[rows][:, None, :] - pool[None, :, :]).mean(axis=2)
        nearest[rows] = dists.min(axis=1)
    return {"pairs": n, "factual_images": len(first), "judge": "SVC(rbf) on factual images", "judge_cv_accuracy": cv_acc, "judge_cv_folds": folds,
            "oracle_flip_rate": oracle_flip, "mean_l1": float(l1.mean()),
            "mean_nearest_target_l1": float(np.nanmean(nearest)),
            "l1_over_nearest": float(l1.mean() / np.nanmean(nearest)), **kept}


def format_report(r: dict) -> str:
    return "\n".join([
        f"pairs                                   {r['pairs']} (of {r['factual_images']} factual images)",
        f"independent judge                       {r['judge']}, {r['judge_cv_folds']}-fold accuracy {r['judge_cv_accuracy']:.3f}",
        f"flip rate by the judge                  {r['oracle_flip_rate']:.3f}"
        + (f" (class-changing pairs; class kept {r['judge_class_kept_rate']:.3f} on the others)"
           if "judge_class_kept_rate" in r else ""),
        f"mean L1 factual -> counterfactual       {r['mean_l1']:.4f}",
        f"mean L1 factual -> nearest real y* img  {r['mean_nearest_target_l1']:.4f}",
        f"ratio                                   {r['l1_over_nearest']:.3f}",
    ])
