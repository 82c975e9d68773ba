"""The training-free consumer of cue-flip pairs: project the cue out of every image feature (DESIGN §10).

A cue-flip pair (x_i, y_i) -> (x_i^cf, y_i) keeps the class and every other factor and changes the
cue, so the difference of its frozen, L2-normalised features is the cue's direction plus noise:

    D      = [f(x_i^cf) - f(x_i)]_i          (n, d), over the shots' cue-flip pairs (never test images)
    U      = the top-k right singular vectors of D (k, d), orthonormal rows (no centring: a pair's
             difference is already a direction, and the mean difference is the cue's first one)
    f'(x)  = normalise((I - U^T U) f(x))     every image: shots, pool, evaluation
    class  = argmax_c f'(x) . t_c            the zero-shot prompts' text features t_c (normalised)

k is chosen on the pool, never on test: from tune.select.project_k, the k with the best selection
criterion (select.py: 0.5 accuracy of the held-out factual images + 0.5 accuracy of their
counterfactuals, each with its own label), ties to the smaller k (the one that removes least);
k = 0 is zero-shot itself. With tune.select.mode = 'fixed' the largest k of the grid is used.

    u = cue_directions(diffs, k)                      # (k, d)
    learner = Projected(zero_shot_text, u)            # an ImageSideLearner: train.class_logits applies
    k, scores = choose_k(diffs, grid, zero_shot_text, val, scorer)
"""

from __future__ import annotations

from typing import Callable

import torch

from cfgen.tune.heads import ImageSideLearner
from cfgen.tune.losses import normalize
from cfgen.tune.select import Validation, criterion


def cue_directions(diffs: torch.Tensor, k: int) -> torch.Tensor:
    """(k, d): the top-k right singular vectors of the pair differences `diffs` (n, d); k <= rank."""
    k = min(k, *diffs.shape)
    if k == 0:
        return diffs.new_zeros((0, diffs.shape[1]))
    return torch.linalg.svd(diffs.double(), full_matrices=False).Vh[:k].to(diffs.dtype)


def project_out(f: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """normalise((I - U^T U) f) row by row: f (N, d), u (k, d) orthonormal rows."""
    return normalize(f - (f @ u.t()) @ u)


class Projected(ImageSideLearner):
    """Zero-shot classification of the features with the cue subspace `u` removed."""

    kind = "project"

    def __init__(self, zero_shot_text: torch.Tensor, u: torch.Tensor):
        super().__init__(zero_shot_text)
        self.register_buffer("directions", u.to(zero_shot_text.device, zero_shot_text.dtype).contiguous())

    def image_features(self, f: torch.Tensor) -> torch.Tensor:
        return project_out(f, self.directions)


def choose_k(diffs: torch.Tensor, grid: list[int], zero_shot_text: torch.Tensor, val: Validation | None,
             logits: Callable) -> tuple[int, dict[str, float]]:
    """The k of `grid` with the best criterion on `val` (ties: smaller k); without val, max(grid)."""
    if val is None:
        return max(grid), {}
    best, best_k, scores = -1.0, 0, {}
    for k in sorted(set(grid)):
        score = criterion(Projected(zero_shot_text, cue_directions(diffs, k)), val, logits)
        scores[f"k={k}"] = round(score, 6)
        if score > best:
            best, best_k = score, k
    return best_k, scores
