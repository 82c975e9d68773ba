"""Stage 1, abduction: DDIM-invert each input image to its exogenous noise u.

    cfgen invert --config pipelines/digits.toml [--out runs/digits]

Input shard i is samples [i*shard_size, (i+1)*shard_size) of `list_samples`.
Output RUN/invert/invert-<i>.tar holds, per decodable sample K:
    K.png        the factual image exactly as inverted (uint8, lossless)
    K.noise.npy  u = x_{T_inv}, float32 (C, H, W)
    K.json       id, label, label_name, origin, seed, steps, t_inv, grid
Samples that cannot be decoded (or whose inversion is not finite) are rows
with status 'failed' in invert-<i>.parquet; the others go on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from cfgen.config import Config
from cfgen.data.images import ImageDecodeError, encode_png
from cfgen.data.sources import list_samples, load_class_names
from cfgen.diffusion import invert, timestep_grid
from cfgen.models.loading import Models, load_models
from cfgen.shards import atomic_tar, npy_bytes, tar_path
from cfgen.stages.common import batches, make_row, run_shards
from cfgen.targets import sample_seed
from cfgen.tensors import to_model_space

PREFIX = "invert"


def eps_fn(models: Models):
    return lambda x, t: models.unet(x, t).sample


def invert_dir(run_dir: Path) -> Path:
    return run_dir / "invert"


def run_invert(cfg: Config, run_dir: Path, overwrite: bool = False) -> Path:
    refs = list_samples(cfg)
    classes = load_class_names(cfg)
    models = load_models(cfg)
    grid = timestep_grid(models.num_train_timesteps, cfg.invert.steps, cfg.invert.t_inv)
    out_dir = invert_dir(run_dir)
    size = cfg.data.shard_size
    n_shards = max(1, math.ceil(len(refs) / size))

    def process(index: int) -> list[dict]:
        rows, good = [], []
        for ref in refs[index * size:(index + 1) * size]:
            base = dict(id=ref.id, shard=index, origin=ref.origin, label=ref.label,
                        label_name=classes[ref.label] if ref.label >= 0 else None,
                        seed=sample_seed(cfg.pipeline.seed, ref.id))
            if ref.error:
                rows.append(make_row(**base, status="failed", error=ref.error))
                continue
            try:
                pixels = ref.load()
            except ImageDecodeError as exc:
                rows.append(make_row(**base, status="failed", error=str(exc)))
                continue
            rows.append(make_row(**base, status="ok"))
            good.append((len(rows) - 1, pixels))
        with atomic_tar(tar_path(out_dir, PREFIX, index)) as tar:
            for batch in batches(good, cfg.invert.batch_size):
                x0 = to_model_space(torch.from_numpy(np.stack([p for _, p in batch]))).to(models.device)
                u = invert(eps_fn(models), x0, models.alphas_cumprod, grid).float().cpu()
                finite = torch.isfinite(u).flatten(1).all(1)
                for (row_i, pixels), noise, ok in zip(batch, u.numpy(), finite.tolist()):
                    row = rows[row_i]
                    if not ok:
                        row.update(status="failed", error="non-finite noise from the UNet during inversion")
                        continue
                    meta = {k: row[k] for k in ("id", "label", "label_name", "origin", "seed")}
                    meta.update(steps=cfg.invert.steps, t_inv=cfg.invert.t_inv, grid=grid)
                    tar.write({"__key__": row["id"], "png": encode_png(pixels), "noise.npy": npy_bytes(noise),
                               "json": json.dumps(meta, sort_keys=True).encode()})
        return rows

    run_shards("invert", cfg, out_dir, PREFIX, list(range(n_shards)), process, overwrite)
    return out_dir
