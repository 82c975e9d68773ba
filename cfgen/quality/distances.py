"""Per-pair distances between uint8 images, in [0, 1] intensity units."""

from __future__ import annotations

import numpy as np


def l1(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference, images scaled to [0, 1]."""
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean() / 255.0)


def l2(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square difference, images scaled to [0, 1]."""
    return float(np.sqrt(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()) / 255.0)


def mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")
