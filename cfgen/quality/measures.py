"""Per-pair quality of a counterfactual beyond L1/L2 (DESIGN §3), and the pack gates.

For every pair (any source):
    changed_fraction   share of pixels that changed visibly (some channel by > CHANGE_THRESHOLD)
When the source knows its causal model (data/base.py CausalModel, e.g. 'shapes'), against
the TRUE counterfactual `truth = renders[y*]` and the renderings of every class from the
same exogenous factors:
    oracle_label       the class whose rendering is nearest to the counterfactual inside the
                       causal region: validity by an oracle that never saw the guiding predictor
    truth_l1           L1 counterfactual -> true counterfactual
    truth_closer       the counterfactual is closer to the truth than to the factual image
    within_recon_bound truth_l1 <= recon_l1 (DiCap Cor. 3.4, see `within_recon_bound`)
    outside_change     share of pixels OUTSIDE the causal region that changed visibly
and, from the guide row's own l1 / recon_l1:
    edit_within_recon  l1 <= recon_l1: the edit is no larger than the model's s = 0 round-trip error,
                       so it may be reconstruction noise rather than an edit (`edit_within_recon`)
When the causal model also knows a concept graph and reads concepts back from pixels (shapes-text's
renderer oracle), every pair is checked against the TRUE intervention do(c = v) on the sample's concept
state, propagated by the graph whatever the method knew of it (`concept_quality`):
    intervened_ok      the intervened concept reads as v
    descendants_ok     every descendant of c reads as the graph's mechanisms say (null: c has none)
    non_descendants_ok every other concept reads as in the factual state (null: there is none)
and truth_l1 / truth_closer / within_recon_bound are taken against the rendering under do(c = v).
CLD, the per-pair minimality score against the run's real images, is in cfgen/quality/cld.py.

All images are uint8 (H, W, C); distances are in [0, 1] intensity units, as in cfgen.quality.distances.
"""

from __future__ import annotations

import numpy as np

from cfgen.data.base import CausalModel
from cfgen.quality.distances import l1

CHANGE_THRESHOLD = 0.1
"""A pixel 'changed' when some channel moved by more than this (in [0, 1]); the shapes noise
(sigma 0.02) and an s = 0 round trip stay well below it."""


def changed_mask(a: np.ndarray, b: np.ndarray, threshold: float = CHANGE_THRESHOLD) -> np.ndarray:
    """(H, W) bool: pixels where some channel differs by more than `threshold`."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2) / 255.0
    return diff > threshold


def changed_fraction(a: np.ndarray, b: np.ndarray, threshold: float = CHANGE_THRESHOLD) -> float:
    return float(changed_mask(a, b, threshold).mean())


def outside_change(factual: np.ndarray, cf: np.ndarray, region: np.ndarray,
                   threshold: float = CHANGE_THRESHOLD) -> float:
    """Share of the pixels outside `region` (H, W bool) that changed; nan if nothing is outside."""
    outside = ~region
    if not outside.any():
        return float("nan")
    return float(changed_mask(factual, cf, threshold)[outside].mean())


def nearest_render(image: np.ndarray, renders: np.ndarray, region: np.ndarray) -> int:
    """The class c minimising mean |image - renders[c]| over the causal region.

    `renders` (K, H, W, C) are the images of the same exogenous factors under each
    class: the renderer is the oracle, so a counterfactual counts as class c when,
    where the causal feature lives, it looks most like c drawn in its place.
    """
    diff = np.abs(renders.astype(np.float64) - image.astype(np.float64)[None])  # (K, H, W, C)
    return int(np.argmin(diff[:, region].mean(axis=(1, 2))))


EDIT_WITHIN_RECON_WARN_RATE = 0.1
"""The end-of-run summary warns when more than this share of the written pairs has l1 <= recon_l1."""


def edit_within_recon(l1_value: float, recon_l1: float) -> bool:
    """The counterfactual differs from the factual image no more than the unguided (s = 0) round trip
    does (l1 <= recon_l1): the 'edit' is within the model's own reconstruction error, maybe noise."""
    return bool(l1_value <= recon_l1)


def within_recon_bound(truth_l1: float, recon_l1: float) -> bool:
    """DiCap Corollary 3.4 as checked here, per pair and in L1: if the abduction-prediction
    round trip reconstructs the factual image to within tau = recon_l1 (the s = 0 path), the
    counterfactual should be within tau of the true counterfactual, i.e. truth_l1 <= recon_l1.
    (The corollary is an expectation under Theorem 3.2's identifiability conditions; the rate at
    which single pairs satisfy it measures how far a trained model is from those conditions.)"""
    return bool(truth_l1 <= recon_l1)


def truth_metrics(factual: np.ndarray, cf: np.ndarray, recon: np.ndarray, renders: np.ndarray,
                  region: np.ndarray, target: int) -> dict:
    """The manifest columns that need the true counterfactual `renders[target]`."""
    truth_l1 = l1(cf, renders[target])
    oracle = nearest_render(cf, renders, region)
    return {"oracle_label": oracle, "oracle_flipped": oracle == target, "truth_l1": truth_l1,
            "truth_closer": truth_l1 < l1(cf, factual),
            "within_recon_bound": within_recon_bound(truth_l1, l1(factual, recon)),
            "outside_change": outside_change(factual, cf, region)}


def gate_failures(row: dict, min_p_cf: float, max_l1: float, max_recon_l1: float,
                  require_flip: bool = False) -> list[str]:
    """The gates a guided pair fails, each as 'reason: detail', in a fixed order (empty: keep it).
    require_flip holds a do() that changes the class to a flip, and one that keeps it (text mode's
    do(environment)) to the class kept, both as the guiding predictor sees them."""
    out = []
    if require_flip and row.get("changes_class") is False:
        if not row["class_kept"]:
            out.append("class_not_kept")
    elif require_flip and not row["flipped"]:
        out.append("not_flipped")
    if row["p_cf"] < min_p_cf:
        out.append(f"p_cf_below_min: {row['p_cf']:.3f} < {min_p_cf}")
    if row["l1"] > max_l1:
        out.append(f"l1_above_max: {row['l1']:.4f} > {max_l1}")
    if row["recon_l1"] > max_recon_l1:
        out.append(f"recon_l1_above_max: {row['recon_l1']:.4f} > {max_recon_l1}")
    return out


def pair_quality(causal: CausalModel | None, origin: str, cf_label: int, factual: np.ndarray, cf: np.ndarray,
                 recon: np.ndarray) -> dict:
    """All quality columns of one guided pair for the manifest (the truth columns need a causal model)."""
    out = {"changed_fraction": changed_fraction(factual, cf)}
    if causal is not None:
        out.update(truth_metrics(factual, cf, recon, causal.renders(origin), causal.region(origin), cf_label))
    return out


def concept_quality(causal, origin: str, concept: str, value: str, factual: np.ndarray, cf: np.ndarray,
                    recon: np.ndarray) -> dict:
    """The concept checks of one pair under the true do(concept = value) (module docstring)."""
    truth, iv = causal.intervene(origin, concept, value)
    read = causal.read_concepts(cf)
    desc, others = causal.graph.descendants(concept), causal.graph.non_descendants(concept)
    truth_l1 = l1(cf, truth)
    return {"intervened_ok": read[concept] == iv.after[concept],
            "descendants_ok": all(read[d] == iv.after[d] for d in desc) if desc else None,
            "non_descendants_ok": all(read[n] == iv.before[n] for n in others) if others else None,
            "truth_l1": truth_l1, "truth_closer": truth_l1 < l1(cf, factual),
            "within_recon_bound": within_recon_bound(truth_l1, l1(factual, recon))}


def rate(values) -> float:
    """Share of True among the non-null values (nan when there are none)."""
    values = [bool(v) for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")
