"""Training the rows of one learner in lockstep, with checkpoints for selection.

A *row* here is one configuration of one table row: an objective, a lambda, a learning
rate and the image that plays x^cf for each shot. Every row of a learner kind (the
table's rows, times the selection grid's learning rates and lambdas) starts from the
same initialisation and takes the same batches in the same order; per step the prompts
of all prompt-learner rows go through the frozen text encoder in one call and the loss
is the sum of the rows' losses, so each row's parameters get exactly its own gradient
(rows share nothing): the same training as one run per row, at a fraction of the calls.

At each checkpoint epoch `on_checkpoint(epoch, learners)` is called (no grad), which is
how selection (select.py) scores the rows on the held-out part of the pool without a
second run: an epoch budget of the grid is a checkpoint of one run whose cosine schedule
spans the grid's longest budget.

    rows = [RowRun("augment", lam=1.0, lr=1e-3, cf_feat=fcf)]
    learners, infos, seconds = fit_rows(vlm, task, "linear", rows, feat, y, y_cf, t, seed,
                                        epochs=200, checkpoints=[10, 50, 200], on_checkpoint=score)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from cfgen.errors import ConfigError
from cfgen.tune.heads import IMAGE_LEARNERS
from cfgen.tune.losses import (augment_loss, cfvlm_loss, cosine_logits, dicap_loss, dicap_sym_loss, normalize)
from cfgen.tune.prompts import PromptLearner, encode_prompts

PROMPT_LEARNERS = ("coop", "coop_csc", "cocoop")


@dataclass
class RowRun:
    """One trained configuration: its objective, lambda (0 with 'dicap' = the learner's baseline),
    learning rate, and what plays x^cf for the shots (N, D), in the shots' order."""

    objective: str
    lam: float
    cf_feat: torch.Tensor
    lr: float = 0.002


def loss_scale(t, vlm) -> float:
    """1 / tau of the losses: tune.temperature, or the VLM's own logit scale."""
    return 1.0 / t.temperature if t.temperature > 0 else vlm.logit_scale


def needs_cf(objective: str, lam: float) -> bool:
    return objective == "cfvlm" or lam != 0


def new_learner(vlm, task, t, kind: str, gen: torch.Generator, zero_shot_text: torch.Tensor) -> nn.Module:
    """A fresh learner of `kind`: a PromptLearner, or an image-side learner started at zero-shot."""
    if kind in IMAGE_LEARNERS:  # (the linear head is solved by solve_heads, but can be built here too)
        if kind == "adapter":
            return IMAGE_LEARNERS[kind](zero_shot_text, generator=gen)
        return IMAGE_LEARNERS[kind](zero_shot_text)
    if kind not in PROMPT_LEARNERS:
        raise ConfigError(f"tune.learners: unknown learner {kind!r}")
    return PromptLearner(vlm, task.names, t.n_ctx, t.ctx_init, conditional=kind == "cocoop", generator=gen,
                         class_specific=kind == "coop_csc")


def is_prompt(learner: nn.Module) -> bool:
    return isinstance(learner, PromptLearner)


def prompt_requests(learner: PromptLearner, objective: str, lam: float, f: torch.Tensor, fcf: torch.Tensor,
                    classes: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The prompts one batch of one row needs: the class prompts (CoCoOp: as each factual image
    sees them, then, when the objective uses x^cf, as each counterfactual image sees them)."""
    reqs = [learner.class_prompts(f if learner.conditional else None, classes)]
    if learner.conditional and needs_cf(objective, lam):
        reqs.append(learner.class_prompts(fcf, classes))
    return reqs


@dataclass
class Vectors:
    """What a learner scores a batch with: class vectors for x (C, D) or per image (B, C, D), for x^cf
    (None: the same), the (mapped) image features, and a per-class bias (None: none); cos units."""

    text: torch.Tensor
    text_cf: torch.Tensor | None
    f: torch.Tensor
    fcf: torch.Tensor
    bias: torch.Tensor | None = None


def class_vectors(learner: nn.Module, feats: list[torch.Tensor], f: torch.Tensor, fcf: torch.Tensor,
                  classes: torch.Tensor) -> Vectors:
    """The learner's `Vectors` for one batch. feats: the encoded `prompt_requests` of a prompt
    learner ([] for an image-side learner)."""
    if not is_prompt(learner):
        return Vectors(learner.class_features(classes=classes), None, learner.image_features(f),
                       learner.image_features(fcf), learner.class_bias(classes))
    text = normalize(feats[0])
    if not learner.conditional:
        return Vectors(text, None, f, fcf)
    c = len(classes)
    text_cf = normalize(feats[1]).view(len(fcf), c, -1) if len(feats) > 1 else None
    return Vectors(text.view(len(f), c, -1), text_cf, f, fcf)


def row_loss(t, objective: str, lam: float, scale: float, v: Vectors, y: torch.Tensor,
             ycf: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The loss of one batch of one row (losses.py). y, ycf are positions among the training classes
    (ycf = -1: the counterfactual's class is not one of them)."""
    text, text_cf, f, fcf = v.text, v.text_cf, v.f, v.fcf
    bias = 0.0 if v.bias is None else v.bias
    cos = cosine_logits(f, text) + bias
    rows = torch.arange(len(y), device=y.device)
    text_true = text[rows, y] if text.dim() == 3 else text[y]
    if objective == "dicap" and not needs_cf(objective, lam):
        return dicap_loss(cos, y, cos[rows, y], None, scale, lam)
    cos_cf = cosine_logits(fcf, text if text_cf is None else text_cf) + bias
    valid = ycf >= 0
    if objective == "dicap":
        return dicap_loss(cos, y, cos[rows, y], cos_cf[rows, y], scale, lam)
    if objective == "cfvlm":
        return cfvlm_loss(cos, y, f, text_true, cos_cf[rows, ycf.clamp(min=0)], cos_cf[rows, y], valid, scale,
                          t.alpha, t.beta, t.gamma, t.margin_csd, t.margin_fcd)
    if objective == "augment":
        return augment_loss(cos, y, cos_cf, ycf, valid, scale, lam, t.invariance)
    if objective == "dicap_sym":
        return dicap_sym_loss(cos, y, cos_cf, ycf, valid, scale, lam)
    raise ConfigError(f"tune.objectives: unknown objective {objective!r}")


def learner_loss(learner: nn.Module, row: RowRun, t, scale: float, f: torch.Tensor, fcf: torch.Tensor,
                 y: torch.Tensor, ycf: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The loss of one batch of one learner alone (fit_rows does the same for many at once)."""
    reqs = prompt_requests(learner, row.objective, row.lam, f, fcf, classes) if is_prompt(learner) else []
    feats = encode_prompts([learner], reqs) if reqs else []
    return row_loss(t, row.objective, row.lam, scale, class_vectors(learner, feats, f, fcf, classes), y, ycf)


def optimizer_for(learner: nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum for prompts (CoOp's); Adam for the image side, whose parameters
    (a head's rows, an adapter's weights) sit at very different scales from a context vector."""
    params = [p for p in learner.parameters() if p.requires_grad]
    if is_prompt(learner):
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr)


def solve_heads(task, rows: list[RowRun], feat: torch.Tensor, label: torch.Tensor, cf_label: torch.Tensor, t,
                zero_shot_text: torch.Tensor, scale: float, max_iter: int = 500,
                n_images: int | None = None) -> tuple[list[nn.Module], list[dict]]:
    """The linear head's loss is convex in its weights (a logistic regression's cross-entropies and L2
    term; DiCap's pairwise terms and CF-VLM's hinges are convex in them too), so each row is solved
    to convergence, full batch, by L-BFGS from the zero-shot start: no learning rate or epochs to
    choose, and the same answer whatever the batch order. Returns the heads and their final losses.
    n_images: the number of distinct factual images the L2 term is weighed by (default: the rows of feat;
    with both kinds of pairs each shot comes twice, once per kind, and still counts once)."""
    from cfgen.tune.heads import LinearHead

    device = zero_shot_text.device
    f = normalize(feat.float()).to(device)
    base_pos = {int(c): i for i, c in enumerate(task.base)}
    y = torch.tensor([base_pos[int(c)] for c in label], device=device)
    ycf = torch.tensor([base_pos.get(int(c), -1) for c in cf_label], device=device)
    classes = task.base.to(device)
    heads, infos = [], []
    for r in rows:
        head = LinearHead(zero_shot_text)
        fcf = normalize(r.cf_feat.float()).to(device)
        opt = torch.optim.LBFGS([head.delta, head.bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                                history_size=20, line_search_fn="strong_wolfe")
        info: dict = {}

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss, parts = row_loss(t, r.objective, r.lam, scale, class_vectors(head, [], f, fcf, classes), y, ycf)
            if t.head_c > 0:  # a logistic regression's L2 term, scikit-learn's weighting (heads.py)
                loss = loss + head.penalty(classes, scale) / (2.0 * t.head_c * (n_images or len(f)))
            info.update(parts, loss=loss.item())
            loss.backward()
            return loss

        opt.step(closure)
        info["iterations"] = opt.state[head.delta]["n_iter"]
        heads.append(head)
        infos.append(info)
    return heads, infos


def fit_rows(vlm, task, kind: str, rows: list[RowRun], feat: torch.Tensor, label: torch.Tensor,
             cf_label: torch.Tensor, t, seed: int, epochs: int, zero_shot_text: torch.Tensor,
             checkpoints: list[int] | None = None,
             on_checkpoint: Callable[[int, list[nn.Module]], None] | None = None
             ) -> tuple[list[nn.Module], list[dict], float]:
    """Train one learner of `kind` per row on the K-shot pairs of the base classes, in lockstep.

    feat (N, D) the shots' factual features; label / cf_label (N,) class ids; a cosine schedule
    over `epochs`. Returns the learners (as after the last epoch), each row's last-batch losses,
    and the seconds the group took.
    """
    gen = torch.Generator().manual_seed(seed)
    learners = [new_learner(vlm, task, t, kind, gen if i == 0 else torch.Generator().manual_seed(seed),
                            zero_shot_text) for i in range(len(rows))]
    device = vlm.device
    f = normalize(feat.float()).to(device)
    fcfs = [normalize(r.cf_feat.float()).to(device) for r in rows]
    base_pos = {int(c): i for i, c in enumerate(task.base)}
    y = torch.tensor([base_pos[int(c)] for c in label], device=device)
    ycf = torch.tensor([base_pos.get(int(c), -1) for c in cf_label], device=device)
    classes = task.base.to(device)
    n = len(f)
    total_steps = epochs * math.ceil(n / t.batch_size)
    opts = [optimizer_for(learner, r.lr) for learner, r in zip(learners, rows)]
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total_steps) for o in opts]
    scale = loss_scale(t, vlm)
    checkpoints = sorted(set(checkpoints or []))
    start = time.perf_counter()
    last: list[dict] = [{} for _ in rows]
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, t.batch_size):  # the last, smaller batch is kept
            b = order[s: s + t.batch_size].to(device)
            reqs = [prompt_requests(learner, r.objective, r.lam, f[b], fcf[b], classes) if is_prompt(learner) else []
                    for learner, r, fcf in zip(learners, rows, fcfs)]
            flat = [q for rq in reqs for q in rq]
            prompt_learners = [lr for lr in learners if is_prompt(lr)]
            feats = encode_prompts(prompt_learners, flat) if flat else []
            total, k = 0.0, 0
            for i, (learner, r, fcf) in enumerate(zip(learners, rows, fcfs)):
                v = class_vectors(learner, feats[k: k + len(reqs[i])], f[b], fcf[b], classes)
                k += len(reqs[i])
                loss, last[i] = row_loss(t, r.objective, r.lam, scale, v, y[b], ycf[b])
                total = total + loss
            for o in opts:
                o.zero_grad(set_to_none=True)
            total.backward()
            for o, sch in zip(opts, scheds):
                o.step()
                sch.step()
        if on_checkpoint is not None and epoch in checkpoints:
            with torch.no_grad():
                on_checkpoint(epoch, learners)
    for info in last:
        info["epochs"] = epochs
    return learners, last, time.perf_counter() - start
