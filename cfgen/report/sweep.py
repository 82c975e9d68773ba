"""`cfgen sweep`: validity and minimality at fixed guidance scales, and with escalation.

    cfgen sweep --config pipelines/shapes.toml --scales 1,2,4,8,16 --limit 300
    cfgen sweep --config pipelines/digits.toml --scales 1,2,4,8,16 --limit 300

The first `limit` samples are inverted once (into RUN/sweep/invert/, apart from
the run's own shards), then guided at each scale alone -- no escalation -- and
once more with the configured escalation (guide.scale, then guide.escalation),
which is what `cfgen run` does. Per row: the guiding predictor's flip rate, the
flip rate by an independent oracle (shapes: the renderer, quality.nearest_render;
other sources: `cfgen evaluate`'s judge, an RBF SVM fitted on the source's own images), mean L1
factual -> counterfactual and, where the true counterfactual is known, the mean
L1 to it, the share closer to it than to the factual image and the share of
pixels changed outside the causal region, the mean CLD (cfgen/quality/cld.py, against the swept factual
images by class) and the share of pairs whose edit is no larger than the s = 0 round trip's
error (l1 <= recon_l1). Writes RUN/sweep/sweep.json (which
`cfgen report` draws as the flip-rate-vs-scale curve) and prints the table.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from cfgen.quality.cld import References, batch_cld
from cfgen.config import Config
from cfgen.contract import INVERT
from cfgen.data.sources import load_class_names, open_source
from cfgen.diffusion import MASK_SOURCES, inversion_trajectory
from cfgen.errors import ConfigError, InputError
from cfgen.report.evaluate import flat, reference_judge
from cfgen.quality.distances import l1, mean
from cfgen.quality.measures import changed_fraction, edit_within_recon, pair_quality
from cfgen.shards import atomic_write_json
from cfgen.tensors import to_model_space

ESCALATION = "escalation"


def sweep_dir(run_dir: Path) -> Path:
    return run_dir / "sweep"


def _load_inverted(cfg: Config, directory: Path) -> tuple[list[dict], np.ndarray, np.ndarray]:
    from cfgen.stages.invert import read_inverted

    samples = read_inverted(directory)
    if not samples:
        raise InputError(f"nothing was inverted in {INVERT.dir(directory)}")
    arrays = [s.arrays(cfg) for s in samples]
    return [s.meta for s in samples], np.stack([a for a, _ in arrays]), np.stack([n for _, n in arrays])


def _row(causal, scale, metas, factual, cf, recon, targets, p_cf, flipped, judge, refs, seconds) -> dict:
    n = len(metas)
    l1s = [l1(factual[j], cf[j]) for j in range(n)]
    cld = batch_cld(factual, cf, [m["label"] for m in metas], targets, refs, [m["origin"] for m in metas])
    if judge is None:  # the causal model is known: quality columns against the truth
        q = [pair_quality(causal, m["origin"], int(targets[j]), factual[j], cf[j], recon[j]) for j, m in enumerate(metas)]
        oracle = np.array([d["oracle_flipped"] for d in q])
        truth = {"mean_truth_l1": float(np.mean([d["truth_l1"] for d in q])),
                 "truth_closer_rate": float(np.mean([d["truth_closer"] for d in q])),
                 "within_recon_bound_rate": float(np.mean([d["within_recon_bound"] for d in q])),
                 "mean_outside_change": float(np.nanmean([d["outside_change"] for d in q]))}
    else:
        oracle = judge.predict(flat(cf)) == targets
        truth = {"mean_truth_l1": None, "truth_closer_rate": None, "within_recon_bound_rate": None,
                 "mean_outside_change": None}
    return {"scale": scale, "samples": n, "flip_rate": float(np.mean(flipped)), "mean_p_cf": float(np.mean(p_cf)),
            "oracle_flip_rate": float(np.mean(oracle)),
            "mean_l1": float(np.mean(l1s)),
            "mean_changed_fraction": float(np.mean([changed_fraction(factual[j], cf[j]) for j in range(n)])),
            **truth, "mean_cld": mean(cld),
            "edit_within_recon_rate": float(np.mean([edit_within_recon(l1s[j], l1(factual[j], recon[j]))
                                                     for j in range(n)])),
            "seconds": seconds}


def parse_masks(text: str, cfg: Config) -> list[dict]:
    """--masks 'off,x0,x0:0.3,gradient' -> guide.mask overrides per variant ('' = the configured one alone).

    A variant is 'off', a mask source, or source:tau (guide.mask_threshold); the other mask settings
    are the config's."""
    if not text.strip():
        return [{"mask": cfg.guide.mask, "mask_threshold": cfg.guide.mask_threshold}]
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        source, _, tau = item.partition(":")
        if source not in ("off", *MASK_SOURCES) or (source == "off" and tau):
            raise ConfigError(f"--masks: expected off, {', '.join(MASK_SOURCES)} or SOURCE:TAU; got {item!r}")
        try:
            threshold = float(tau) if tau else cfg.guide.mask_threshold
        except ValueError:
            raise ConfigError(f"--masks: {item!r}: the threshold after ':' must be a number") from None
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"--masks: {item!r}: the threshold must be in [0, 1]")
        out.append({"mask": source, "mask_threshold": threshold})
    return out


def mask_label(variant: dict) -> str:
    return "off" if variant["mask"] == "off" else f"{variant['mask']} tau={variant['mask_threshold']:g}"


def run_sweep(cfg: Config, run_dir: Path, scales: list[float], limit: int = 300, overwrite: bool = False,
              masks: list[dict] | None = None) -> dict:
    """Rows per mask variant (`parse_masks`; default the configured mask): each scale alone, then escalation."""
    from cfgen.models.loading import load_models
    from cfgen.stages.common import config_grid
    from cfgen.stages.classifier_guide import Localized, counterfactuals, edit_mask, guide_batch
    from cfgen.stages.invert import run_invert

    if len(scales) < 1 or any(s < 0 for s in scales):
        raise ConfigError("sweep: --scales needs one or more scales >= 0")
    masks = masks or parse_masks("", cfg)
    out = sweep_dir(run_dir)
    cfg = copy.deepcopy(cfg)
    cfg.data.limit = limit
    models = load_models(cfg)
    run_invert(cfg, out, overwrite=overwrite, models=models)
    metas, factual, noise = _load_inverted(cfg, out)
    classes = load_class_names(cfg)
    grid = config_grid(cfg, models.num_train_timesteps)
    causal = open_source(cfg).causal
    judge = None if causal is not None else reference_judge(cfg).model  # cfgen evaluate's judge
    labels, seeds = [m["label"] for m in metas], [m["seed"] for m in metas]
    refs = References.of(zip(labels, [m["origin"] for m in metas], factual))  # CLD's real images
    bs = cfg.guide.batch_size

    def guided(c: Config):
        """Per pair (guide_batch, in batches): the factual image's index, cf, scale kept, p_cf, flipped, targets,
        recon, mask share. With several targets per image (guide.target = 'all', top_k) an image has several."""
        parts = [guide_batch(models, c, classes, grid, factual[i:i + bs], noise[i:i + bs], labels[i:i + bs],
                             seeds[i:i + bs]) for i in range(0, len(metas), bs)]
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        src = np.concatenate([p.source + i for p, i in zip(parts, range(0, len(metas), bs))])
        return (src, cat("cf"), cat("scale"), cat("p_cf"), cat("flipped"), cat("targets"), cat("recon"),
                cat("mask_fraction"))

    trajectories = {}  # batch start -> the factual inversion trajectory of the pairs, shared by the variants

    def trajectory(i: int, images: np.ndarray):
        if i not in trajectories:
            x0 = to_model_space(torch.from_numpy(np.require(images[i:i + bs], requirements="W"))).to(models.device)
            trajectories[i] = inversion_trajectory(models.eps, models.encode(x0), models.alphas_cumprod, grid)
        return trajectories[i]

    rows = []
    for variant in masks:
        c = copy.deepcopy(cfg)
        c.guide.mask, c.guide.mask_threshold = variant["mask"], variant["mask_threshold"]
        mask = edit_mask(c)
        t0 = time.perf_counter()
        src, cf, used, p_cf, flipped, targets, recon, share = guided(c)  # also gives y* and the s = 0 recon
        pair_metas, pair_factual, pair_noise = [metas[k] for k in src], factual[src], noise[src]
        esc = _row(causal, ESCALATION, pair_metas, pair_factual, cf, recon, targets, p_cf, flipped, judge, refs,
                   time.perf_counter() - t0)
        esc.update(ladder=[cfg.guide.scale, *cfg.guide.escalation], mask=mask_label(variant),
                   mean_mask_fraction=float(np.mean(share)) if mask else None,
                   scales_kept={f"{k:g}": int(v) for k, v in zip(*np.unique(used, return_counts=True))})
        for s in scales:
            t0 = time.perf_counter()
            parts = []
            for i in range(0, len(pair_metas), bs):
                u = torch.from_numpy(pair_noise[i:i + bs]).to(models.device)
                y = torch.from_numpy(targets[i:i + bs]).to(models.device)
                localized = None if mask is None else Localized(trajectory(i, pair_factual), mask)
                parts.append(counterfactuals(models, u, y, grid, [s], cfg.guide.confidence, localized=localized))
            cf, _, p_cf, flipped, share = (np.concatenate(a) for a in zip(*parts))
            row = _row(causal, s, pair_metas, pair_factual, cf, recon, targets, p_cf, flipped, judge, refs,
                       time.perf_counter() - t0)
            row.update(mask=mask_label(variant), mean_mask_fraction=float(np.mean(share)) if mask else None)
            rows.append(row)
        rows.append(esc)
    result = {"pipeline": cfg.pipeline.name, "samples": len(metas), "t_inv": cfg.invert.t_inv,
              "steps": cfg.invert.steps, "confidence": cfg.guide.confidence,
              "mean_recon_l1": float(np.mean([l1(pair_factual[j], recon[j]) for j in range(len(recon))])),
              "oracle": "renderer (nearest class rendering in the causal region)" if judge is None
              else "RBF SVM on clean train-split images",
              "rows": rows}
    atomic_write_json(out / "sweep.json", result)
    return result


def format_table(result: dict) -> str:
    def f(v, spec=".3f"):
        return "n/a" if v is None else format(v, spec)

    head = (f"sweep: {result['pipeline']}, {result['samples']} samples, t_inv={result['t_inv']}, "
            f"steps={result['steps']}, mean recon L1 {result['mean_recon_l1']:.4f}; oracle: {result['oracle']}")
    cols = ("mask", "scale", "flip (predictor)", "flip (oracle)", "mean L1", "changed", "mask share",
            "error vs truth", "closer to truth", "outside change", "mean CLD", "seconds")
    lines = [head, " | ".join(cols), " | ".join("---" for _ in cols)]
    for r in result["rows"]:
        scale = "+".join(f"{s:g}" for s in r["ladder"]) if r["scale"] == ESCALATION else f"{r['scale']:g}"
        lines.append(" | ".join([r.get("mask", "off"), scale, f(r["flip_rate"]), f(r["oracle_flip_rate"]),
                                 f(r["mean_l1"], ".4f"), f(r["mean_changed_fraction"]),
                                 f(r.get("mean_mask_fraction")), f(r["mean_truth_l1"], ".4f"),
                                 f(r["truth_closer_rate"]), f(r["mean_outside_change"], ".4f"),
                                 f(r.get("mean_cld")), f"{r['seconds']:.0f}"]))
    return "\n".join(lines)
