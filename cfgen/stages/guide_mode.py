"""What a guide mode is to the guide stage's shard loop: one interface, chosen once per run.

    mode = open_mode(cfg, classes, refs)                       # stages/guide.py: the one place that asks
    result = mode.batch(models, grid, rows, factual, noise)    # per batch: a BatchResult, whichever mode

The two modes: `classifier_guide.ClassifierGuide` (guidance toward a class y*, with DiME's ladder of scales)
and `text_guide.TextGuide` (do() on the concepts of each caption, CSG). The loop (stages/guide.py) reads
the input shards, hands each batch to the mode, and writes what comes back; it never asks which mode it
holds. A new mode is a class with these three methods in a module of its own, and one line in
`guide.open_mode`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cfgen.models.runtime import Models


@dataclass
class BatchResult:
    """Per pair j of one batch; a factual image may have several pairs (several targets, several do()s)."""
    source: np.ndarray       # the factual image of pair j: an index into the batch's rows
    fields: list[dict]       # pair j's own manifest columns: its do() (intervention, edits, concept, the
                             # concept states), its captions (text), and its id where it is not the factual id
    cf_label: np.ndarray     # y*: the class after the do() (the factual label where the do() keeps it)
    recon: np.ndarray        # uint8 reconstruction of pair j's factual image
    cf: np.ndarray           # uint8 counterfactual
    scale: np.ndarray        # the guidance scale pair j's counterfactual was made with (K.json guidance_scale)
    p_cf: np.ndarray         # p(y* | stored counterfactual); NaN where the run has no predictor
    flipped: np.ndarray      # the predictor's top class on the stored counterfactual is y*
    finite: np.ndarray       # False where the UNet or the predictor produced NaN/inf for the pair
    mask_fraction: np.ndarray | None  # share of the image the edit could touch; None: no mask, the whole image


class GuideMode(Protocol):
    """A guide mode: built (and its settings checked against the data) before any work, then one `batch`
    per batch of factual images."""

    def refusal(self, row: dict) -> str | None:
        """Why this mode cannot make pairs of the sample `row` (its failed row's error), or None."""

    def first_guess(self, steps: int) -> int:
        """The fewest UNet evaluations an input image can cost on a grid of `steps` steps: the progress bar's
        first guess, a lower bound so that it runs ahead rather than lags."""

    def batch(self, models: Models, grid: list[int], rows: list[dict], factual: np.ndarray,
              noise: np.ndarray) -> BatchResult:
        """The pairs of a batch: `rows` the factual images' manifest rows, `factual` their uint8 pixels
        (B, H, W, C), `noise` their inversions u (B, C, H, W) as the invert stage stored them."""
