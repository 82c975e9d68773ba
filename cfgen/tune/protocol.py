"""Base-to-novel evaluation as CoOp / CoCoOp do it.

- the class ids found in the shards are sorted; the first ceil(n/2) are the
  *base* classes, the rest the *novel* ("new") ones;
- each seed draws K shots per base class (numpy's default_rng(seed)) from the
  training pool; prompts are trained on those only;
- base accuracy is measured on held-out samples of base classes, classifying
  among the base classes; novel accuracy on samples of novel classes, among the
  novel classes; HM = 2BN / (B + N);
- each figure is reported as mean and sample standard deviation (ddof=1) over
  the seeds; HM is computed per seed, then averaged.

The held-out samples are those whose id the data.split CSV marks with
`tune.eval_split` (the shots then come from the other ids), or, with
`tune.eval_split = ""`, every sample not drawn as a shot.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cfgen.config import ConfigError


def split_classes(class_ids: list[int]) -> tuple[list[int], list[int]]:
    """(base, novel): sorted ids, the first ceil(n/2) are base."""
    ids = sorted(set(class_ids))
    k = math.ceil(len(ids) / 2)
    return ids[:k], ids[k:]


def sample_shots(labels: np.ndarray, pool: np.ndarray, classes: list[int], shots: int, seed: int,
                 names: dict[int, str] | None = None) -> np.ndarray:
    """Indices of `shots` samples per class in `classes`, drawn from the boolean `pool`; sorted."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        candidates = np.flatnonzero(pool & (labels == c))
        if len(candidates) < shots:
            name = (names or {}).get(c, c)
            raise ConfigError(f"tune.shots={shots} but class {name!r} has only {len(candidates)} training pairs")
        chosen.append(rng.choice(candidates, size=shots, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    if target.numel() == 0:
        return float("nan")
    return float((logits.argmax(dim=1) == target).float().mean())


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2.0 * base * new / (base + new)


def mean_std(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std}


def summarize(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """[{"base": b, "new": n}, ...] over seeds -> {"base": {mean, std}, "new": ..., "hm": ...}."""
    return {"base": mean_std([r["base"] for r in per_seed]),
            "new": mean_std([r["new"] for r in per_seed]),
            "hm": mean_std([harmonic_mean(r["base"], r["new"]) for r in per_seed])}


def format_table(metrics: dict[str, dict], seeds: list[int]) -> str:
    """The base / new / HM table, mean ± std over the seeds."""
    lines = [f"base-to-novel accuracy, mean ± std over seeds {', '.join(map(str, seeds))}",
             f"{'method':<12}{'base':>17}{'new':>17}{'HM':>17}"]
    for method, m in metrics.items():
        cells = "".join(f"{m[k]['mean']:>9.3f} ± {m[k]['std']:.3f}" for k in ("base", "new", "hm"))
        lines.append(f"{method:<12}{cells}")
    return "\n".join(lines)
