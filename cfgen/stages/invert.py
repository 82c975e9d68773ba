"""Stage 1, abduction: DDIM-invert each input image to its exogenous noise u.

    cfgen invert --config pipelines/digits.toml [--out runs/digits]

Input shard i is samples [i*shard_size, (i+1)*shard_size) of `list_samples`.
Output RUN/invert/invert-<i>.tar holds, per decodable sample K:
    K.png        the factual image exactly as inverted (uint8, lossless)
    K.noise.npy  u = x_{T_inv}, float32 (C, H, W): in latent space for latent models
    K.json       id, label, label_name, origin, seed, steps, t_inv, grid
Samples that cannot be decoded (or whose inversion is not finite) are rows
with status 'failed' in invert-<i>.parquet; the others go on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cfgen.config import Config
from cfgen.contract import INVERT, INVERT_FIELDS, make_row
from cfgen.data.images import ImageDecodeError, decode_image, encode_png
from cfgen.data.sources import list_samples, load_class_names
from cfgen.diffusion import invert
from cfgen.models.loading import load_models
from cfgen.models.runtime import Models
from cfgen.errors import InputError
from cfgen.overlap import BackgroundWriter, chunks, prefetched
from cfgen.runstate import claim, run_lock
from cfgen.shards import atomic_tar, npy_bytes, npy_load, read_samples, sample_digest
from cfgen.stages.common import UnetProgress, advance, config_grid, run_shards
from cfgen.targets import sample_seed
from cfgen.tensors import to_model_space


def run_invert(cfg: Config, run_dir: Path, overwrite: bool = False, models: Models | None = None) -> Path:
    """Invert every input into RUN/invert/ (resuming a killed run). `models`: already loaded ones (`cfgen
    run` loads them once for every stage); else loaded here, without the predictor, which inversion never reads."""
    with run_lock(run_dir, cfg):
        return _invert(cfg, run_dir, overwrite, models)


def _invert(cfg: Config, run_dir: Path, overwrite: bool, models: Models | None) -> Path:
    refs = list_samples(cfg)
    if not refs:
        raise InputError(f"no input samples: data.source={cfg.data.source!r} lists none"
                         + (f" in split {cfg.data.use_split!r}" if cfg.data.use_split else ""))
    classes = load_class_names(cfg)
    captions = {ref.id: ref.caption for ref in refs}
    if cfg.guide.mode == "text":  # the graph and its concepts are checked before any work
        from cfgen.stages.text_guide import checked_graph

        checked_graph(cfg, refs)
    models = models or load_models(cfg, predictor=False)
    grid = config_grid(cfg, models.num_train_timesteps)
    claim(INVERT, cfg, run_dir, overwrite, refs)  # last: a refusal above leaves no record of this run
    size = cfg.data.shard_size
    n_shards = max(1, math.ceil(len(refs) / size))

    def decode(batch: list, index: int) -> list[tuple[dict, np.ndarray | None]]:
        """Rows (ok or failed) and pixels for a batch of refs; runs on the prefetch thread."""
        out = []
        for ref in batch:
            row = make_row(id=ref.id, factual_id=ref.id, shard=index, origin=ref.origin, label=ref.label,
                           label_name=classes[ref.label] if ref.label >= 0 else None,
                           seed=sample_seed(cfg.pipeline.seed, ref.id), t_inv=cfg.invert.t_inv,
                           steps=cfg.invert.steps, status="ok")
            pixels = None
            if ref.error:
                row.update(status="failed", error=ref.error)
            else:
                try:
                    pixels = ref.load()
                except ImageDecodeError as exc:
                    row.update(status="failed", error=str(exc))
            out.append((row, pixels))
        return out

    def write(tar, done: list[tuple[dict, np.ndarray, np.ndarray]]) -> None:
        for row, pixels, noise in done:
            meta = {k: row[k] for k in INVERT_FIELDS}
            meta.update(steps=cfg.invert.steps, t_inv=cfg.invert.t_inv, grid=grid)
            sample = {"__key__": row["id"], "png": encode_png(pixels), "noise.npy": npy_bytes(noise),
                      "json": json.dumps(meta, sort_keys=True).encode()}
            row["sha256"] = sample_digest(sample)
            tar.write(sample)

    def process(index: int) -> list[dict]:
        rows = []
        with atomic_tar(INVERT.tar(run_dir, index)) as tar, BackgroundWriter() as writer:
            shard_refs = refs[index * size:(index + 1) * size]
            for decoded in prefetched(chunks(shard_refs, cfg.invert.batch_size), lambda b: decode(b, index)):
                rows.extend(row for row, _ in decoded)
                good = [(row, px) for row, px in decoded if px is not None]
                if not good:
                    advance(len(decoded))
                    continue
                progress.start(len(decoded))
                x0 = to_model_space(torch.from_numpy(np.stack([px for _, px in good]))).to(models.device)
                eps = models.eps
                if cfg.guide.mode == "text":  # abduction under each sample's own caption (cfgen/csg.py)
                    states = models.text_states([captions[row["id"]] for row, _ in good])
                    eps = lambda x, t: models.eps(x, t, states)  # noqa: E731
                u = invert(eps, models.encode(x0), models.alphas_cumprod, grid).cpu().numpy()
                done = []
                for (row, px), noise in zip(good, u):
                    if not np.isfinite(noise).all():
                        row.update(status="failed", error="non-finite noise from the UNet during inversion")
                        continue
                    done.append((row, px, noise))
                writer.submit(write, tar, done)
                progress.done()
        return rows

    progress = UnetProgress(models.unet, first_guess=len(grid) - 1)  # inversion: one UNet pass a grid step
    try:
        run_shards(INVERT, cfg, run_dir, list(range(n_shards)), process,
                   sizes=lambda i: len(refs[i * size:(i + 1) * size]))
    finally:
        progress.close()
    return INVERT.dir(run_dir)


@dataclass
class Inverted:
    """One sample of a finished invert shard, as stored (for cfgen sweep and cfgen bench)."""

    meta: dict     # K.json: id, label, label_name, origin, seed, steps, t_inv, grid
    png: bytes     # the factual image
    noise: bytes   # u, a .npy

    def arrays(self, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
        """(factual uint8 (H, W, C), u float32 (C, H, W))."""
        return (decode_image(self.png, cfg.data.image_size, cfg.data.channels),
                npy_load(self.noise).astype(np.float32))


def read_inverted(run_dir: Path) -> list[Inverted]:
    """Every sample of the run's finished invert shards, in shard order."""
    return [Inverted(json.loads(s["json"]), s["png"], s["noise.npy"])
            for i in INVERT.finished(run_dir) for s in read_samples(INVERT.tar(run_dir, i))]
