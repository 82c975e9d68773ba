"""Base-to-novel evaluation as CoOp / CoCoOp do it, worst-group accuracy, and the paired statistics.

- the classes of the source's class list are sorted by index; the first ceil(n/2)
  are the *base* classes, the rest the *novel* ones;
- each seed draws K shots per base class (numpy's default_rng(seed)) from the
  pool of pairs outside the evaluation split; prompts are trained on those only;
- every evaluation image is classified within its own half: an image of a base
  class among the base classes, one of a novel class among the novel classes;
  base accuracy is the accuracy on the base-class images, novel accuracy on the
  novel-class images, HM = 2BN / (B + N);
- worst-group accuracy (DESIGN §9): the minimum over the (group, class) cells of
  the evaluation images of the accuracy in that cell (groups = the source's
  `SampleRef.group`, e.g. the shapes environment; a source without groups gives
  one group, so it is the worst-class accuracy); reported over the base classes'
  cells (`worst_base`: what learning on base-class shots can fix), the novel
  classes' cells (`worst_novel`: what carries over to classes never trained on)
  and all cells (`worst_group`, the minimum of the two);
- each figure is reported as mean and sample standard deviation (ddof=1) over
  the seeds; HM is computed per seed, then averaged;
- a method is compared with its learner's baseline (lambda = 0, same seed, shots,
  initialisation and batch order) by the paired difference d_s = m(method, s) -
  m(baseline, s): mean(d) with a 95% Student-t interval on n - 1 degrees of
  freedom, mean(d) ± t_{0.975, n-1} sd(d) / sqrt(n) (`paired_difference`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cfgen.errors import ConfigError

METRICS = ("worst_base", "worst_novel", "base", "novel", "hm", "worst_group")
"""The per-seed figures of a row, in table order."""


def split_classes(class_ids: list[int]) -> tuple[list[int], list[int]]:
    """(base, novel): sorted ids, the first ceil(n/2) are base."""
    ids = sorted(set(class_ids))
    k = math.ceil(len(ids) / 2)
    return ids[:k], ids[k:]


def sample_shots(labels: np.ndarray, pool: np.ndarray, classes: list[int], shots: int, seed: int,
                 names: dict[int, str] | None = None, where: str = "") -> np.ndarray:
    """Indices of `shots` samples per class in `classes`, drawn from the boolean `pool`; sorted."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        candidates = np.flatnonzero(pool & (labels == c))
        if len(candidates) < shots:
            name = (names or {}).get(c, c)
            raise ConfigError(f"tune.shots={shots} but class {name!r} has only {len(candidates)} training pairs{where}")
        chosen.append(rng.choice(candidates, size=shots, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    if target.numel() == 0:
        return float("nan")
    return float((logits.argmax(dim=1) == target).float().mean())


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2.0 * base * new / (base + new)


def cell_name(group: str, class_name: str) -> str:
    """The key of a (group, class) cell: 'sand/circle', or the class alone for a source without groups."""
    return f"{group}/{class_name}" if group else class_name


def cell_accuracies(correct: np.ndarray, groups: list[str] | np.ndarray, labels: np.ndarray,
                    names: dict[int, str] | None = None) -> dict[str, float]:
    """Accuracy in every (group, class) cell present; keys by `cell_name`, sorted by (group, class)."""
    correct = np.asarray(correct, dtype=bool)
    groups = np.asarray(groups, dtype=object)
    labels = np.asarray(labels)
    out = {}
    for g, c in sorted({(str(g), int(c)) for g, c in zip(groups, labels)}):
        m = (groups == g) & (labels == c)
        out[cell_name(g, (names or {}).get(c, str(c)))] = float(correct[m].mean())
    return out


def worst_group(cells: dict[str, float]) -> float:
    """Worst-group accuracy: the minimum cell accuracy (nan without cells)."""
    return min(cells.values()) if cells else float("nan")


def split_metrics(correct: np.ndarray, labels: np.ndarray, groups: list[str] | np.ndarray, base: list[int],
                  names: dict[int, str] | None = None) -> dict:
    """Per-seed figures of one method: base, novel, hm, worst_group and the cell accuracies.

    `correct[i]`: image i was classified right within its own half (base or novel classes).
    """
    correct = np.asarray(correct, dtype=bool)
    labels = np.asarray(labels)
    is_base = np.isin(labels, base)
    b = float(correct[is_base].mean()) if is_base.any() else float("nan")
    n = float(correct[~is_base].mean()) if (~is_base).any() else float("nan")
    cells = cell_accuracies(correct, groups, labels, names)
    groups = np.asarray(groups, dtype=object)
    base_cells = cell_accuracies(correct[is_base], groups[is_base], labels[is_base], names)
    novel_cells = cell_accuracies(correct[~is_base], groups[~is_base], labels[~is_base], names)
    return {"worst_base": worst_group(base_cells), "worst_novel": worst_group(novel_cells), "base": b, "novel": n,
            "hm": harmonic_mean(b, n), "worst_group": worst_group(cells), "cells": cells}


def mean_std(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std}


def summarize(per_seed: list[dict[str, float]], keys: tuple[str, ...] = METRICS) -> dict[str, dict[str, float]]:
    """[{"base": b, "novel": n, "hm": h, "worst_group": w}, ...] over seeds -> {key: {mean, std}}."""
    return {k: mean_std([r[k] for r in per_seed]) for k in keys}


def paired_difference(method: list[float], baseline: list[float], confidence: float = 0.95) -> dict:
    """Paired difference d_s = method[s] - baseline[s] over seeds, with a Student-t interval.

    Returns n, mean, sd (ddof=1), t (the t_{(1+confidence)/2, n-1} quantile), half_width =
    t * sd / sqrt(n), low, high. With one seed there is no interval (sd, t, half_width, low,
    high are None).
    """
    from scipy import stats

    d = np.asarray(method, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError("paired_difference: give one value per seed for the method and its baseline")
    n, mean = len(d), float(d.mean())
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "t": None, "half_width": None, "low": None, "high": None}
    sd = float(d.std(ddof=1))
    t = float(stats.t.ppf(0.5 + confidence / 2.0, n - 1))
    half = t * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "t": t, "half_width": half, "low": mean - half, "high": mean + half}


def _pm(m: dict | None) -> str:
    return "" if m is None else f"{m['mean']:.3f} ± {m['std']:.3f}"


def _delta(d: dict | None) -> str:
    if d is None:
        return ""
    if d["low"] is None:
        return f"{d['mean']:+.3f}"
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


TABLE_COLUMNS = (("worst_base", "worst base"), ("delta:worst_base", "Δ worst base"), ("base", "base"),
                 ("novel", "novel"), ("worst_novel", "worst novel"), ("hm", "HM"), ("delta:hm", "Δ HM"))
"""The table's columns, worst-group first: (metrics key, or 'delta:<key>' for a paired difference; header)."""


def table_cells(row: dict) -> list[str]:
    """One row of the table as strings, in TABLE_COLUMNS order (a row of an older metrics.json
    without a figure shows it empty)."""
    delta = row.get("delta") or {}
    return [_delta(delta.get(k[6:])) if k.startswith("delta:") else _pm(row.get(k)) for k, _ in TABLE_COLUMNS]


def format_captured(metrics: dict) -> list[str]:
    lines = []
    lw = max([22] + [len(c["label"]) for c in metrics.get("captured", [])])
    for c in metrics.get("captured", []):
        share = "n/a (the true counterfactuals gain nothing)" if c["share"] is None else f"{c['share']:.2f}"
        near = c.get("generated_minus_nearest")
        lines.append(f"  {c['label']:<{lw}} Δ worst base: generated {c['delta_generated']:+.3f}, true "
                     f"{c['delta_true']:+.3f}: share captured {share}"
                     + (f"; generated - nearest {_delta(near)}" if near else ""))
    if lines:
        lines.insert(0, "share of the true counterfactuals' gain that cfgen's pairs capture (Δ worst base, "
                        "mean over seeds), and generated - nearest-real (paired, 95% t):")
    return lines


def format_table(metrics: dict) -> str:
    """The table `cfgen tune` prints, from the metrics.json structure (train.py)."""
    p = metrics["protocol"]
    seeds = ", ".join(map(str, p["seeds"]))
    where = f"the {p['eval_split']!r} split" if p["eval_split"] else "every sample that is not a shot"
    sel = p.get("selection", {})
    chosen = ("lr / epochs / lambda chosen per seed and row on held-out pairs of the shot pool (criterion in "
              "metrics.json: protocol.selection)" if sel.get("mode") == "validation" else
              "hyper-parameters fixed in advance in the config")
    lines = [(f"base-to-novel accuracy on {where} ({p['eval_images']} images, {len(p['cells'])} (group, class) "
              f"cells), {p['shots']} shots per base class; mean ± std over seeds {seeds}; {chosen}"),
             ("worst base / worst novel: the worst (group, class) cell of the base / novel classes. "
              "Δ = row - its learner's baseline (no pairs; same seed, shots, init, batch order): "
              "mean [95% paired t interval]")]
    widths = [15, 25, 15, 15, 15, 15, 25]
    lw = max([28] + [len(r["label"]) + 1 for r in metrics["rows"].values()])  # the label column fits the longest
    lines.append(f"{'method':<{lw}}" + "".join(f"{h:>{w}}  " if not k.startswith("delta:") else f"{h:<{w}}  "
                                              for (k, h), w in zip(TABLE_COLUMNS, widths)) + f"{'s/seed':>7}")
    for r in (metrics["rows"][k] for k in metrics["order"]):
        cells = table_cells(r)
        lines.append(f"{r['label']:<{lw}}" + "".join(f"{c:>{w}}  " if not k.startswith("delta:") else f"{c:<{w}}  "
                                                   for c, (k, _), w in zip(cells, TABLE_COLUMNS, widths))
                     + f"{r['seconds']['mean']:>7.1f}")
    return "\n".join(lines + format_captured(metrics))
