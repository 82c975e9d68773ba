"""Choosing learning rate, epochs and lambda without the evaluation split (DESIGN §10).

The criterion is fixed before any test table is run (tune.select, docs/tune.md):

    validation = the shot pool's pairs of the base classes whose factual image is not one
                 of this seed's shots (the pool lies outside tune.eval_split; with no
                 eval_split, these images are also left out of the seed's evaluation)
    criterion  = 0.5 * accuracy(validation factual images, label y)
               + 0.5 * accuracy(their generated counterfactuals, label y*; y* a base class),
                 each image classified among the base classes
    ties       the first grid point in order: smaller lr, then fewer epochs, then smaller
               lambda (the configuration that moves least from zero-shot)

The factual images of the pool carry the training split's cue; their counterfactuals
keep the cue and change the class, so the second half is what a cue-reading learner
fails. Every row of a seed is scored on the same images, whatever its cf source.

    grid = grid_for(t, "linear", "augment")        # Grid(lrs, epochs, lams)
    val = validation_set(data, pool, shots, base)
    picker = Picker(configs, val, classes, scorer)  # on_checkpoint for fit.fit_rows
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from cfgen.errors import InputError

CRITERION = ("0.5 * accuracy of the validation factual images (label y) + 0.5 * accuracy of their generated "
             "counterfactuals (label y*, only y* a base class), each among the base classes; validation = the "
             "shot pool's base-class pairs whose factual image is not a shot of the seed; ties -> smaller lr, "
             "then fewer epochs, then smaller lambda")


@dataclass(frozen=True)
class Grid:
    lrs: tuple[float, ...]
    epochs: tuple[int, ...]
    lams: tuple[float, ...]

    @property
    def longest(self) -> int:
        return max(self.epochs)


def uses_lambda(objective: str | None) -> bool:
    """Objectives of the form L1 + lambda * (...); CF-VLM has its own fixed weights; a baseline none."""
    return objective in ("dicap", "augment", "dicap_sym")


def grid_for(t, kind: str, objective: str | None) -> Grid:
    """The configurations a row of learner `kind` and `objective` (None: the baseline) is chosen from."""
    s = t.select
    image = kind in ("linear", "adapter")
    if kind == "linear":  # solved to convergence (fit.solve_heads): lr 0 and epochs 0 stand for 'solved'
        lams = s.image_lam if s.mode == "validation" else [t.lam]
        return Grid((0.0,), (0,), tuple(sorted(lams)) if uses_lambda(objective) else (0.0,))
    if s.mode == "fixed":
        lr = t.image_lr if image else t.lr
        epochs = t.image_epochs if image else (t.cocoop_epochs or t.epochs) if kind == "cocoop" else t.epochs
        return Grid((lr,), (epochs,), (t.lam if uses_lambda(objective) else 0.0,))
    lrs = s.image_lr if image else s.lr
    epochs = s.image_epochs if image else s.cocoop_epochs if kind == "cocoop" else s.epochs
    lams = (s.image_lam if image else s.lam) if uses_lambda(objective) else [0.0]
    return Grid(tuple(sorted(lrs)), tuple(sorted(epochs)), tuple(sorted(lams)))


@dataclass
class Validation:
    """Held-out images for the criterion: normalised features and positions among the base classes."""

    feat: torch.Tensor
    label: torch.Tensor
    cf_feat: torch.Tensor
    cf_label: torch.Tensor
    factual_ids: list[str]


def validation_set(factual_ids: list[str], feat: torch.Tensor, cf_feat: torch.Tensor, label: np.ndarray,
                   cf_label: np.ndarray, pool: np.ndarray, shots: np.ndarray, base: list[int]) -> Validation:
    """The pool's base-class pairs whose factual image is not a shot (pairs of a shot's image, made
    for another target, are left out too: they share its pixels)."""
    shot_images = {factual_ids[i] for i in shots}
    keep = [i for i in np.flatnonzero(pool & np.isin(label, base)) if factual_ids[i] not in shot_images]
    if not keep:
        raise InputError("tune.select.mode='validation': no pair of the pool is left for validation after the "
                         "shots; make more pairs, lower tune.shots, or set tune.select.mode='fixed'")
    pos = {c: i for i, c in enumerate(base)}
    cf_ok = [i for i in keep if int(cf_label[i]) in pos]
    # one factual image may carry several pairs (several targets): score each image once
    first = list(dict.fromkeys(factual_ids[i] for i in keep))
    by_image = {factual_ids[i]: i for i in reversed(keep)}
    img_idx = torch.tensor([by_image[i] for i in first])
    return Validation(feat=feat[img_idx].float(), label=torch.tensor([pos[int(label[i])] for i in img_idx]),
                      cf_feat=cf_feat[torch.tensor(cf_ok, dtype=torch.long)].float() if cf_ok else feat[:0].float(),
                      cf_label=torch.tensor([pos[int(cf_label[i])] for i in cf_ok], dtype=torch.long),
                      factual_ids=first)


Scorer = Callable[[nn.Module, torch.Tensor], torch.Tensor]
"""(learner, features (N, D)) -> logits (N, C) among the base classes."""


def criterion(learner: nn.Module, val: Validation, logits: Scorer) -> float:
    acc_f = float((logits(learner, val.feat).argmax(1).cpu() == val.label).float().mean())
    if len(val.cf_label) == 0:
        return acc_f
    acc_cf = float((logits(learner, val.cf_feat).argmax(1).cpu() == val.cf_label).float().mean())
    return 0.5 * acc_f + 0.5 * acc_cf


@dataclass
class Choice:
    """The best configuration of one table row so far, and its learner's state."""

    score: float = -1.0
    key: tuple = ()
    state: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)  # "lr=..,epochs=..,lam=.." -> criterion

    def offer(self, score: float, key: tuple, learner: nn.Module) -> None:
        lr, epochs, lam = key
        self.scores[f"lr={lr:g},epochs={epochs},lam={lam:g}"] = round(score, 6)
        if score > self.score or (score == self.score and key < self.key):
            self.score, self.key = score, key
            self.state = copy.deepcopy({k: v.detach() for k, v in learner.state_dict().items()})

    def record(self) -> dict:
        lr, epochs, lam = self.key
        return {"lr": lr, "epochs": epochs, "lam": lam, "criterion": round(self.score, 6), "scores": self.scores}


class Picker:
    """on_checkpoint for fit.fit_rows: scores every trained configuration at each checkpoint
    epoch and keeps, per table row, the best learner state.

    configs[i] = (row index in the table's group, lr, lam) of the i-th learner fit_rows trains."""

    def __init__(self, configs: list[tuple[int, float, float]], val: Validation | None, logits: Scorer,
                 n_rows: int):
        self.configs, self.val, self.logits = configs, val, logits
        self.choices = [Choice() for _ in range(n_rows)]

    def __call__(self, epoch: int, learners: list[nn.Module]) -> None:
        for (row, lr, lam), learner in zip(self.configs, learners):
            score = criterion(learner, self.val, self.logits) if self.val is not None else 0.0
            self.choices[row].offer(score, (lr, epoch, lam), learner)
