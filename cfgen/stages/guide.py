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
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cfgen.config import Config, ConfigError
from cfgen.data.images import decode_image, encode_png
from cfgen.data.sources import load_class_names
from cfgen.diffusion import guided_reverse, timestep_grid
from cfgen.metrics import l1, l2
from cfgen.models.loading import Models, load_models
from cfgen.shards import (atomic_tar, finished_indices, npy_load, read_rows, read_samples,
                          rows_path, tar_path)
from cfgen.stages.common import batches, run_shards
from cfgen.stages.invert import PREFIX as INVERT_PREFIX
from cfgen.stages.invert import eps_fn, invert_dir
from cfgen.targets import choose_targets, resolve_fixed_target
from cfgen.tensors import to_model_space, to_uint8

PREFIX = "guide"


def guide_dir(run_dir: Path) -> Path:
    return run_dir / "guide"


@torch.no_grad()
def predict_clean(models: Models, x: torch.Tensor) -> torch.Tensor:
    """Predictor probabilities on clean images (t = 0)."""
    t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    return torch.softmax(models.classifier(x, t).float(), dim=-1)


def counterfactuals(models: Models, u: torch.Tensor, targets: torch.Tensor, grid: list[int],
                    scales: list[float], confidence: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Guided reverse with per-sample escalation.

    Returns uint8 images, the scale each sample kept, p(y*) on the stored
    image, and whether the predictor's top class on it is y*.
    """
    n = u.shape[0]
    images = np.zeros((n, u.shape[2], u.shape[3], u.shape[1]), dtype=np.uint8)
    used = np.zeros(n, dtype=np.float64)
    p_cf = np.zeros(n, dtype=np.float64)
    flipped_all = np.zeros(n, dtype=bool)
    pending = torch.arange(n)
    for s in scales:
        x = guided_reverse(eps_fn(models), models.classifier, u[pending], models.alphas_cumprod, grid,
                           target=targets[pending], scale=s)
        stored = to_uint8(x)
        probs = predict_clean(models, to_model_space(torch.from_numpy(stored)).to(models.device))
        idx = pending.numpy()
        images[idx], used[idx] = stored, s
        p_cf[idx] = probs.gather(1, targets[pending][:, None]).squeeze(1).cpu().numpy()
        flipped = (probs.argmax(1) == targets[pending]).cpu()
        flipped_all[idx] = flipped.numpy()
        pending = pending[~(flipped & (torch.from_numpy(p_cf[idx]) >= confidence))]
        if len(pending) == 0:
            break
    return images, used, p_cf, flipped_all


def run_guide(cfg: Config, run_dir: Path, overwrite: bool = False) -> Path:
    classes = load_class_names(cfg)
    try:
        fixed = resolve_fixed_target(cfg.guide.target, classes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    src = invert_dir(run_dir)
    indices = finished_indices(src, INVERT_PREFIX)
    if not indices:
        raise ConfigError(f"no finished invert shards in {src}; run `cfgen invert` first")
    models = load_models(cfg)
    grid = timestep_grid(models.num_train_timesteps, cfg.invert.steps, cfg.invert.t_inv)
    scales = [cfg.guide.scale, *cfg.guide.escalation]
    out_dir = guide_dir(run_dir)

    def process(index: int) -> list[dict]:
        rows = read_rows(rows_path(src, INVERT_PREFIX, index))
        by_id = {r["id"]: r for r in rows}
        good = []
        for sample in read_samples(tar_path(src, INVERT_PREFIX, index)):
            meta = json.loads(sample["json"])
            if meta["grid"] != grid:
                raise ConfigError(f"invert shards in {src} were made with steps={meta['steps']}, "
                                  f"t_inv={meta['t_inv']}; the config says steps={cfg.invert.steps}, "
                                  f"t_inv={cfg.invert.t_inv}: re-run `cfgen invert --overwrite`")
            row = by_id[meta["id"]]
            row.update(target_strategy=cfg.guide.target)
            if fixed is not None and fixed == row["label"]:
                row.update(status="failed", error="factual label is already the fixed target")
                continue
            try:
                pixels = decode_image(sample["png"], cfg.data.image_size, cfg.data.channels)
                noise = npy_load(sample["noise.npy"]).astype(np.float32)
            except (ValueError, KeyError) as exc:
                row.update(status="failed", error=f"unreadable invert sample: {exc}")
                continue
            good.append((row, pixels, noise))
        with atomic_tar(tar_path(out_dir, PREFIX, index)) as tar:
            for batch in batches(good, cfg.guide.batch_size):
                batch_rows = [r for r, _, _ in batch]
                factual = np.stack([p for _, p, _ in batch])
                x0 = to_model_space(torch.from_numpy(factual)).to(models.device)
                u = torch.from_numpy(np.stack([n for _, _, n in batch])).to(models.device)
                labels = torch.tensor([r["label"] for r in batch_rows], device=models.device)
                targets = choose_targets(cfg.guide.target, predict_clean(models, x0), labels,
                                         [r["seed"] for r in batch_rows], classes)
                recon = to_uint8(guided_reverse(eps_fn(models), None, u, models.alphas_cumprod, grid))
                cf, used, p_cf, flipped = counterfactuals(models, u, targets, grid, scales, cfg.guide.confidence)
                for j, row in enumerate(batch_rows):
                    if not np.isfinite(p_cf[j]):
                        row.update(status="failed", error="non-finite output from the predictor")
                        continue
                    y = int(targets[j])
                    row.update(cf_label=y, cf_label_name=classes[y], guidance_scale=float(used[j]),
                               p_cf=float(p_cf[j]), flipped=bool(flipped[j]),
                               l1=l1(factual[j], cf[j]), l2=l2(factual[j], cf[j]),
                               recon_l1=l1(factual[j], recon[j]))
                    meta = {k: row[k] for k in ("id", "label", "label_name", "cf_label", "cf_label_name",
                                                "target_strategy", "guidance_scale", "seed", "p_cf",
                                                "flipped", "l1", "l2", "recon_l1")}
                    meta.update(t_inv=cfg.invert.t_inv, steps=cfg.invert.steps)
                    tar.write({"__key__": row["id"], "png": encode_png(factual[j]), "cf.png": encode_png(cf[j]),
                               "recon.png": encode_png(recon[j]), "json": json.dumps(meta, sort_keys=True).encode()})
        return rows

    run_shards("guide", cfg, out_dir, PREFIX, indices, process, overwrite)
    return out_dir
