"""The guide stage's compute for guide.mode = 'classifier': guided reverse DDIM from u toward a class y*.

    cfgen guide --config pipelines/digits.toml [--set guide.scale=6]

For each sample: y* is chosen from the predictor's view of the factual image (targets.py); the s = 0
path gives the reconstruction; the guided path runs at guide.scale and, for the samples the predictor
says did not flip, again at each scale of guide.escalation in turn (DiME's escalation): each sample keeps
the first scale that flips it, and that scale is the pair's guidance_scale. p_cf and `flipped` are read
from the counterfactual *as stored* (after uint8 rounding), so a consumer re-scoring the PNG sees the
same numbers.

With guide.mask (localized edits, diffusion.localized_reverse) the guided path is confined to where it
departs from the factual image's own inversion trajectory, recomputed here once per image; outside, the
pair's pixels are the factual image's. With guide.target = 'all' or guide.top_k > 1 an image gets one
pair per target, keyed <id>_to_<y*>; the s = 0 path runs once per image.

`ClassifierGuide` is this mode behind the guide stage's one interface (stages/guide_mode.py);
`guide_batch` is its compute, which `cfgen bench` and `cfgen sweep` call directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from cfgen.config import Config
from cfgen.diffusion import (EditMask, TopStep, Trajectory, guided_reverse, inversion_trajectory, localized_reverse,
                             reference_steps, top_step)
from cfgen.errors import ConfigError
from cfgen.models.runtime import Models
from cfgen.sections import ESCALATION, GUIDED_PASS, RECON, TARGETS, TOP_STEP, TRAJECTORY, section
from cfgen.stages.guide_mode import BatchResult
from cfgen.targets import choose_target_sets, resolve_fixed_target, targets_per_image
from cfgen.tensors import to_model_space, to_uint8


def class_intervention(label_name: str, cf_label_name: str) -> dict:
    """The do() columns of a classifier-path pair: do(label = y*), recorded as the text path records a do(),
    with no propagated changes (the classifier path knows no graph) and the one concept it knows, the label."""
    record = {"target_concept_name": "label", "original_value": label_name, "new_value": cf_label_name,
              "propagated_changes": [], "final_concept_states": {}}
    return {"intervention": f"do(label={cf_label_name})", "edits": json.dumps(record, sort_keys=True),
            "concept": "label", "concepts_before": {"label": label_name}, "concepts_after": {"label": cf_label_name}}


@torch.no_grad()
def predict_clean(models: Models, x: torch.Tensor) -> torch.Tensor:
    """Predictor probabilities on clean pixel images (t = 0)."""
    return torch.softmax(models.predict(x), dim=-1)


def escalation_jobs(pending: list[int], next_scale: dict[int, int], n_scales: int, width: int,
                    fill: bool) -> list[tuple[int, int]]:
    """The (sample, scale index) passes of one escalation round.

    Every pending sample gets its next untried scale. With `fill`, the rest of the batch (`width`)
    is filled round-robin with the pending samples' scales after that, so the last rounds do not
    run a handful of samples in a batch built for hundreds: on a GPU a pass costs about the same
    for 3 samples as for 64, and the samples finish in fewer rounds.
    """
    jobs = [(i, next_scale[i]) for i in pending]
    depth = 1
    while fill and len(jobs) < width:
        more = [(i, next_scale[i] + depth) for i in pending if next_scale[i] + depth < n_scales]
        if not more:
            break
        jobs += more[: width - len(jobs)]
        depth += 1
    return jobs


def edit_mask(cfg: Config) -> EditMask | None:
    """The localized-edit settings of guide.mask*, or None when guide.mask = 'off'."""
    g = cfg.guide
    if g.mask == "off":
        return None
    return EditMask(source=g.mask, threshold=g.mask_threshold, dilation=g.mask_dilation, blur=g.mask_blur,
                    start=g.mask_start)


@dataclass
class Localized:
    """What localized edits need beside u: the factual inversion trajectory and the mask settings."""
    reference: Trajectory
    mask: EditMask


def counterfactuals(models: Models, u: torch.Tensor, targets: torch.Tensor, grid: list[int],
                    scales: list[float], confidence: float = 0.5, fill: bool | None = None,
                    localized: Localized | None = None, top: TopStep | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                                 np.ndarray]:
    """Guided reverse with per-sample escalation.

    Each sample keeps the first scale, in `scales` order, whose image its predictor calls y* with
    probability >= `confidence` (or that broke: NaN/inf, where escalating cannot help), else the last.
    Returns uint8 images, the scale each sample kept, p(y*) on the stored image, and whether the
    predictor's top class on it is y*, and the share of the image the edit was allowed to touch
    (the last mask's mean with `localized`; 1 without). `fill` (default: on a GPU) fills escalation
    rounds up to the batch's size with later scales of the pending samples (`escalation_jobs`); every
    pass is a per-sample computation, so the result is the same either way, only the work and the
    rounds differ. `top`: the first reverse step of every pair (diffusion.top_step), shared by its scales.
    """
    n = u.shape[0]
    fill = models.device.type == "cuda" if fill is None else fill
    images = None  # (n, H, W, C) uint8 in pixel space, allocated from the first decoded batch
    used = np.zeros(n, dtype=np.float64)
    p_cf = np.zeros(n, dtype=np.float64)
    flipped_all = np.zeros(n, dtype=bool)
    region = np.ones(n, dtype=np.float64)
    next_scale = {i: 0 for i in range(n)}
    pending = list(range(n))
    classifier, gradient = models.guidance
    while pending:
        with section(ESCALATION):
            jobs = escalation_jobs(pending, next_scale, len(scales), n, fill)
            idx = torch.tensor([i for i, _ in jobs])
            job_scales = [float(scales[k]) for _, k in jobs]  # one scale for the whole pass stays a plain float
            s = job_scales[0] if len(set(job_scales)) == 1 else torch.tensor(job_scales, dtype=u.dtype, device=u.device)
            reference = None if localized is None else localized.reference.select(idx)
            first = None if top is None else top.select(idx)
        with section(GUIDED_PASS):
            if localized is None:
                x = guided_reverse(models.eps, classifier, u[idx], models.alphas_cumprod, grid, gradient=gradient,
                                   target=targets[idx], scale=s, top=first)
                share = torch.ones(len(jobs))
            else:
                x, m = localized_reverse(models.eps, classifier, u[idx], reference, models.alphas_cumprod,
                                         grid, localized.mask, gradient=gradient, target=targets[idx], scale=s,
                                         top=first)
                share = m.flatten(1).float().mean(1).cpu()
        with section(ESCALATION):
            x = models.decode(x)  # latent models: back to pixels (identity for pixel models)
            finite = torch.isfinite(x).flatten(1).all(1).cpu()
            stored = to_uint8(x)
            if images is None:
                images = np.zeros((n, *stored.shape[1:]), dtype=np.uint8)
            probs = predict_clean(models, to_model_space(torch.from_numpy(stored)).to(models.device))
            p = probs.gather(1, targets[idx][:, None]).squeeze(1).cpu().double()
            p[~finite] = float("nan")  # a NaN path must not pass as a (clipped) image
            flipped = (probs.argmax(1) == targets[idx]).cpu() & finite
            results = {job: (stored[j], float(p[j]), bool(flipped[j]), float(share[j])) for j, job in enumerate(jobs)}
            still = []
            for i in pending:  # walk each sample's tried scales in order: the first that is done is kept
                finished = False
                while (i, next_scale[i]) in results:
                    k = next_scale[i]
                    images[i], p_cf[i], flipped_all[i], region[i] = results[(i, k)]
                    used[i] = scales[k]
                    next_scale[i] = k + 1
                    if (flipped_all[i] and p_cf[i] >= confidence) or not np.isfinite(p_cf[i]) or k + 1 == len(scales):
                        finished = True
                        break
                if not finished:
                    still.append(i)
            pending = still
    return images, used, p_cf, flipped_all, region


@dataclass
class GuideResult:
    """Per pair: a factual image has T = targets_per_image pairs, rows source * T .. source * T + T - 1."""
    source: np.ndarray       # the factual image (index into the batch) of each pair
    targets: np.ndarray      # y* per pair
    recon: np.ndarray        # uint8 s = 0 reconstructions
    cf: np.ndarray           # uint8 counterfactuals
    scale: np.ndarray        # scale each sample kept
    p_cf: np.ndarray         # p(y* | stored counterfactual)
    flipped: np.ndarray      # y* ranks first on the stored counterfactual
    finite: np.ndarray       # False where the UNet or the predictor produced NaN/inf for the sample
    mask_fraction: np.ndarray  # share of the image the edit could touch (guide.mask; 1.0 when off)


def guide_batch(models: Models, cfg: Config, classes: list[str], grid: list[int], factual: np.ndarray,
                noise: np.ndarray, labels: list[int], seeds: list[int]) -> GuideResult:
    """The compute of the guide stage for one batch: target choice, s = 0 path, guided path.

    Inputs are uint8 factual images (B, H, W, C) and their noise u (B, C, H, W). The reconstruction
    and the factual trajectory are computed once per image, the guided path once per pair.
    """
    x0 = to_model_space(torch.from_numpy(np.require(factual, requirements="W"))).to(models.device)
    u = torch.from_numpy(noise).to(models.device)
    y = torch.tensor(labels, device=models.device)
    with section(TARGETS):
        target_sets = choose_target_sets(cfg.guide.target, cfg.guide.top_k, predict_clean(models, x0), y, seeds,
                                         classes)
    per_image = target_sets.shape[1]
    source = torch.arange(len(labels), device=models.device).repeat_interleave(per_image)
    pair_u, pair_targets = (u if per_image == 1 else u[source]), target_sets.reshape(-1)
    classifier, gradient = models.guidance
    with section(TOP_STEP):  # e and g at u: the same for the reconstruction and every scale of the ladder
        top = top_step(models.eps, classifier, pair_u, models.alphas_cumprod, grid, pair_targets, gradient)
    with section(RECON):
        first_of_image = torch.arange(len(labels), device=models.device) * per_image
        recon_x = models.decode(guided_reverse(models.eps, None, u, models.alphas_cumprod, grid,
                                               top=TopStep(top.eps[first_of_image], None)))
    recon_ok = torch.isfinite(recon_x).flatten(1).all(1).cpu().numpy()
    mask = edit_mask(cfg)
    localized = None
    if mask is not None:
        with section(TRAJECTORY):  # only as far up as the masked steps read it
            path = inversion_trajectory(models.eps, models.encode(x0), models.alphas_cumprod, grid,
                                        steps=reference_steps(len(grid) - 1, mask))
        localized = Localized(path if per_image == 1 else path.select(source), mask)
    cf, used, p_cf, flipped, share = counterfactuals(models, pair_u, pair_targets, grid,
                                                     [cfg.guide.scale, *cfg.guide.escalation], cfg.guide.confidence,
                                                     localized=localized, top=top)
    src = source.cpu().numpy()
    recon = to_uint8(recon_x)
    return GuideResult(src, target_sets.reshape(-1).cpu().numpy(), recon[src], cf, used, p_cf, flipped,
                       recon_ok[src] & np.isfinite(p_cf), share)



class ClassifierGuide:
    """guide.mode = 'classifier' behind the guide stage's interface (stages/guide_mode.py): pairs toward a
    class y*, each at the first scale of the ladder that flips it."""

    def __init__(self, cfg: Config, classes: list[str]):
        try:
            self.fixed = resolve_fixed_target(cfg.guide.target, classes)  # a class index, or None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.cfg, self.classes = cfg, classes
        self.per_image = targets_per_image(cfg.guide.target, cfg.guide.top_k, len(classes))

    def refusal(self, row: dict) -> str | None:
        if self.fixed is not None and self.fixed == row["label"]:
            return "factual label is already the fixed target"
        return None

    def first_guess(self, steps: int) -> int:
        """Every pair done at its first scale, plus the reconstruction and, with a mask, the factual
        trajectory as far up as the masked steps read it."""
        mask = edit_mask(self.cfg)
        return self.per_image * steps + (steps - 1) + (0 if mask is None else reference_steps(steps, mask))

    def batch(self, models: Models, grid: list[int], rows: list[dict], factual: np.ndarray,
              noise: np.ndarray) -> BatchResult:
        res = guide_batch(models, self.cfg, self.classes, grid, factual, noise, [r["label"] for r in rows],
                          [r["seed"] for r in rows])
        fields = []
        for b, y in zip(res.source, res.targets):
            # one target per image keeps the factual id; several are keyed <id>_to_<y*> (dot-free)
            key = {} if self.per_image == 1 else {"id": f"{rows[b]['id']}_to_{y}"}
            fields.append({**key, **class_intervention(rows[b]["label_name"], self.classes[y])})
        masked = self.cfg.guide.mask != "off"
        return BatchResult(res.source, fields, res.targets, res.recon, res.cf, res.scale, res.p_cf, res.flipped,
                           res.finite, res.mask_fraction if masked else None)
