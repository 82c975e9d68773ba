"""Stage 2, action + prediction: guided reverse DDIM from u toward y*.

    cfgen guide --config pipelines/digits.toml [--set guide.scale=6]

Reads RUN/invert/invert-<i>.tar and writes RUN/guide/guide-<i>.tar with, per K:
    K.png        the factual image          K.cf.png     the counterfactual
    K.recon.png  the s = 0 reconstruction   K.json       labels, scale, metrics
For each sample: y* is chosen from the predictor's view of the factual image
(targets.py); the s = 0 path gives the reconstruction; the guided path runs at
guide.scale and, for the samples the predictor says did not flip, again at
each scale of guide.escalation in turn (DiME's escalation): each sample keeps
the first scale that flips it. p_cf and `flipped` are read from the
counterfactual *as stored* (after uint8 rounding), so a consumer re-scoring
the PNG sees the same numbers.

With guide.mask (localized edits, diffusion.localized_reverse) the guided path
is confined to where it departs from the factual image's own inversion
trajectory, recomputed here once per image; outside, the pair's pixels are
the factual image's. With guide.target = 'all' or guide.top_k > 1 an image
gets one pair per target, keyed <id>_to_<y*>; the s = 0 path runs once per image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cfgen.config import Config
from cfgen.contract import GUIDE, GUIDE_FIELDS, INVERT
from cfgen.data.images import decode_image, encode_png
from cfgen.data.sources import list_samples, load_class_names
from cfgen.diffusion import (EditMask, TopStep, Trajectory, guided_reverse, inversion_trajectory, localized_reverse,
                             reference_steps, top_step)
from cfgen.errors import ConfigError, InputError
from cfgen.quality.distances import l1, l2
from cfgen.models.loading import load_models
from cfgen.models.runtime import Models
from cfgen.overlap import BackgroundWriter, chunks, prefetched
from cfgen.runstate import claim, require_upstream, run_lock
from cfgen.sections import ESCALATION, GUIDED_PASS, RECON, TARGETS, TOP_STEP, TRAJECTORY, section
from cfgen.shards import atomic_tar, npy_load, read_rows, sample_digest
from cfgen.stages.common import (UnetProgress, config_grid, finished_inputs, mark_unread, run_shards, samples_until_error,
                                 upstream_rows)
from cfgen.stages.text_guide import (TextGuideResult, checked_graph, edits_json, intervention_text, pair_key,
                                     text_guide_batch)
from cfgen.targets import choose_target_sets, resolve_fixed_target, targets_per_image
from cfgen.tensors import to_model_space, to_uint8


def class_intervention(label_name: str, cf_label_name: str) -> dict:
    """The do() columns of a classifier-path pair: do(label = y*), recorded as the text path records a do(),
    with no propagated changes (the classifier path knows no graph) and the one concept it knows, the label."""
    record = {"target_concept_name": "label", "original_value": label_name, "new_value": cf_label_name,
              "propagated_changes": [], "final_concept_states": {}}
    return {"intervention": f"do(label={cf_label_name})", "edits": json.dumps(record, sort_keys=True),
            "concept": "label", "concepts_before": {"label": label_name}, "concepts_after": {"label": cf_label_name}}


def verdicts(label: int, cf_label: int, top_is_target: bool) -> dict:
    """What the guiding predictor says happened to the class: a do() that changes it (cf_label != label)
    `flipped` when the predictor's top class is now cf_label; a do() that keeps it (text mode's do(environment),
    do(size)) is no flip, and `class_kept` when the predictor still gives the class."""
    changes = cf_label != label
    return {"changes_class": changes, "flipped": changes and top_is_target, "class_kept": not changes and top_is_target}


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


def run_guide(cfg: Config, run_dir: Path, overwrite: bool = False, models: Models | None = None) -> Path:
    """Guide every inverted sample into RUN/guide/ (resuming a killed run). `models`: already loaded (and
    warmed up) ones, as `cfgen run` and `cfgen bench` pass; else loaded here."""
    with run_lock(run_dir, cfg):
        return _guide(cfg, run_dir, overwrite, models)


def _guide(cfg: Config, run_dir: Path, overwrite: bool, models: Models | None) -> Path:
    classes = load_class_names(cfg)
    text = cfg.guide.mode == "text"
    try:
        fixed = None if text else resolve_fixed_target(cfg.guide.target, classes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    indices = finished_inputs(INVERT, run_dir)
    refs = list_samples(cfg)  # the input list both fingerprints digest, listed once
    graph = checked_graph(cfg, refs) if text else None
    concepts = {r.id: r.concepts for r in refs} if text else {}
    require_upstream(INVERT, cfg, run_dir, refs)
    models = models or load_models(cfg)
    grid = config_grid(cfg, models.num_train_timesteps)
    claim(GUIDE, cfg, run_dir, overwrite, refs)  # last: a refusal above leaves no record of this run

    def parse(samples: list[dict]) -> list[tuple[dict, np.ndarray, np.ndarray]]:
        """Decode a batch of invert samples (on the prefetch thread); bad ones become failed rows."""
        good = []
        for sample in samples:
            row = by_id.get(sample["__key__"])
            if row is None:  # a sample the invert stage has no row for: not ours to guess about
                continue
            seen.add(row["id"])
            written_as, row["sha256"] = row["sha256"], None  # from here on: this stage's own sample
            row.update(target_strategy=cfg.guide.target)
            missing = [m for m in ("png", "noise.npy") if m not in sample]
            if missing:
                row.update(status="failed", error=f"input sample is missing members: {', '.join(missing)}")
                continue
            if written_as is not None and sample_digest(sample) != written_as:
                row.update(status="failed", error=f"damaged input sample: its checksum differs from "
                                                  f"{INVERT.rows(run_dir, row['shard']).name}")
                continue
            try:
                meta = json.loads(sample["json"])
                made_with = (meta["grid"], meta["steps"], meta["t_inv"])
            except (KeyError, TypeError, ValueError):
                row.update(status="failed", error="input sample has no readable json member")
                continue
            if made_with[0] != grid:
                raise InputError(f"invert shards in {INVERT.dir(run_dir)} were made with steps={made_with[1]}, "
                                  f"t_inv={made_with[2]}; the config says steps={cfg.invert.steps}, "
                                  f"t_inv={cfg.invert.t_inv}: re-run `cfgen invert --overwrite`")
            if fixed is not None and fixed == row["label"]:
                row.update(status="failed", error="factual label is already the fixed target")
                continue
            try:
                pixels = decode_image(sample["png"], cfg.data.image_size, cfg.data.channels)
                noise = npy_load(sample["noise.npy"]).astype(np.float32)
            except ValueError as exc:
                row.update(status="failed", error=f"unreadable input sample: {exc}")
                continue
            good.append((row, pixels, noise))
        return good

    per_image = 0 if text else targets_per_image(cfg.guide.target, cfg.guide.top_k, len(classes))

    def write(tar, batch_rows: list[dict], factual: np.ndarray, res: GuideResult | TextGuideResult) -> None:
        """Metrics, PNG encoding and tar writing (on the writer thread). With several targets per image each
        factual row gives way to one row per pair, keyed <id>_to_<y*> (dot-free), in `pairs_of`; in text
        mode every pair is keyed <id>_do_<concept>_<value>."""
        for j, b in enumerate(res.source):
            y = int(res.targets[j])
            fid = batch_rows[b]["id"]
            if text:
                iv = res.interventions[j]
                row = dict(batch_rows[b], id=pair_key(fid, iv), intervention=intervention_text(iv),
                           edits=edits_json(iv), caption=res.captions[j], cf_caption=res.cf_captions[j],
                           concept=iv.concept, concepts_before={c: iv.before[c] for c in graph.concepts},
                           concepts_after={c: iv.after[c] for c in graph.concepts})
            else:
                row = batch_rows[b] if per_image == 1 else dict(batch_rows[b], id=f"{fid}_to_{y}")
                row.update(class_intervention(batch_rows[b]["label_name"], classes[y]))
            pairs_of.setdefault(fid, []).append(row)
            if not res.finite[j]:
                row.update(status="failed", error="non-finite output from the UNet or the predictor")
                continue
            masked = text and cfg.text.csg and cfg.text.preserve or not text and cfg.guide.mask != "off"
            row.update(cf_label=y, cf_label_name=classes[y],
                       guidance_scale=cfg.text.edit_scale if text else float(res.scale[j]),
                       p_cf=float(res.p_cf[j]), **verdicts(row["label"], y, bool(res.flipped[j])),
                       l1=l1(factual[b], res.cf[j]), l2=l2(factual[b], res.cf[j]),
                       recon_l1=l1(factual[b], res.recon[j]),
                       mask_fraction=float(res.mask_fraction[j]) if masked else None)
            meta = {k: row[k] for k in GUIDE_FIELDS}
            meta.update(t_inv=cfg.invert.t_inv, steps=cfg.invert.steps)
            sample = {"__key__": row["id"], "png": encode_png(factual[b]), "cf.png": encode_png(res.cf[j]),
                      "recon.png": encode_png(res.recon[j]), "json": json.dumps(meta, sort_keys=True).encode()}
            row["sha256"] = sample_digest(sample)
            tar.write(sample)

    by_id: dict[str, dict] = {}
    seen: set[str] = set()
    pairs_of: dict[str, list[dict]] = {}  # factual id -> its pair rows (written by `write`)

    def process(index: int) -> list[dict]:
        rows = read_rows(INVERT.rows(run_dir, index))
        by_id.clear()
        by_id.update((r["id"], r) for r in rows)
        broken: list[str] = []
        seen.clear()
        pairs_of.clear()
        samples = samples_until_error(INVERT.tar(run_dir, index), broken)
        with atomic_tar(GUIDE.tar(run_dir, index)) as tar, BackgroundWriter() as writer:
            for good in prefetched(chunks(samples, cfg.guide.batch_size), parse):
                if not good:
                    continue
                progress.start(len(good))
                batch_rows = [r for r, _, _ in good]
                factual = np.stack([p for _, p, _ in good])
                labels, seeds = [r["label"] for r in batch_rows], [r["seed"] for r in batch_rows]
                if text:
                    res = text_guide_batch(models, cfg, graph, classes, grid, factual,
                                           [concepts[r["id"]] for r in batch_rows], labels, seeds)
                else:
                    res = guide_batch(models, cfg, classes, grid, factual, np.stack([n for _, _, n in good]),
                                      labels, seeds)
                writer.submit(write, tar, batch_rows, factual, res)
                progress.done()
        mark_unread(rows, seen, broken)
        # one row per pair; a factual image that never reached the guided path keeps its own (failed) row
        return [pair for r in rows for pair in pairs_of.get(r["id"], [r])]

    progress = UnetProgress(models.unet, first_guess=_least_evals(cfg, per_image, len(grid) - 1))
    try:
        run_shards(GUIDE, cfg, run_dir, indices, process, sizes=upstream_rows(INVERT, run_dir))
    finally:
        progress.close()
    return GUIDE.dir(run_dir)


def _least_evals(cfg: Config, pairs: int, steps: int) -> int:
    """The fewest UNet evaluations an input image can cost (every pair done at its first scale): the progress
    bar's first guess, a lower bound so that it runs ahead rather than lags (text mode: its reconstruction)."""
    mask = edit_mask(cfg)
    if pairs == 0:
        return steps
    return pairs * steps + (steps - 1) + (0 if mask is None else reference_steps(steps, mask))
