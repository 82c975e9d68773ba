"""`cfgen bench`: how fast the guide stage runs, and where the time goes.

    cfgen bench --config pipelines/digits.toml --samples 1024

From one run on the same samples and models it measures:
- end to end: the guide stage's shard loop (read the invert shard, decode,
  compute, encode PNGs, write the tar and parquet), pairs/s;
- compute alone: the same `guide_batch` calls on tensors already in memory
  (UNet forward + predictor forward/backward, escalation included), pairs/s;
- efficiency = end-to-end / compute (1.0 means I/O and bookkeeping are hidden);
- a reference that works the way the public implementations (Diff-SCM, DiME,
  ACE) do: one sample at a time, fp32, decode -> compute -> encode -> write with
  no overlap; speedup_vs_reference = end-to-end / reference.
On a GPU it also prints the UNet forward's achieved TFLOP/s against the
device's dense bf16 peak. The last line is one JSON object.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cfgen.config import Config
from cfgen.contract import GUIDE
from cfgen.data.images import encode_png
from cfgen.data.sources import load_class_names
from cfgen.models.loading import load_models
from cfgen.models.runtime import Models
from cfgen.stages.common import config_grid
from cfgen.stages.guide import guide_batch, run_guide
from cfgen.stages.invert import Inverted, read_inverted, run_invert

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _arrays(cfg: Config, samples: list[Inverted]) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    arrays = [s.arrays(cfg) for s in samples]
    return (np.stack([a for a, _ in arrays]), np.stack([n for _, n in arrays]),
            [s.meta["label"] for s in samples], [s.meta["seed"] for s in samples])


def _warm_up(models: Models, cfg: Config, classes, grid, samples: list[Inverted]) -> None:
    """One guide_batch at the full batch size and one at the shard's remainder size."""
    bs = cfg.guide.batch_size
    sizes = {min(bs, len(samples)), (min(cfg.data.shard_size, len(samples)) % bs) or bs}
    for size in sorted(sizes):
        guide_batch(models, cfg, classes, grid, *(a[:size] for a in _arrays(cfg, samples[:size])))
    _sync(models.device)


def _compute_only(models: Models, cfg: Config, classes, grid, samples: list[Inverted]) -> float:
    factual, noise, labels, seeds = _arrays(cfg, samples)
    bs = cfg.guide.batch_size
    start = time.perf_counter()
    for k in range(0, len(samples), bs):
        guide_batch(models, cfg, classes, grid, factual[k:k + bs], noise[k:k + bs], labels[k:k + bs],
                    seeds[k:k + bs])
    _sync(models.device)
    return len(samples) / (time.perf_counter() - start)


def _reference(models: Models, cfg: Config, classes, grid, samples: list[Inverted]) -> float:
    """One sample at a time, fp32, no overlap: decode, compute, encode, write, repeat."""
    import tarfile

    fp32 = dataclasses.replace(models, dtype=torch.float32)
    buf = io.BytesIO()
    guide_batch(fp32, cfg, classes, grid, *_arrays(cfg, samples[:1]))  # warm at batch 1, as the others
    _sync(models.device)
    start = time.perf_counter()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for s in samples:
            factual, noise = (a[None] for a in s.arrays(cfg))
            res = guide_batch(fp32, cfg, classes, grid, factual, noise, [s.meta["label"]], [s.meta["seed"]])
            for name, img in (("png", factual[0]), ("cf.png", res.cf[0]), ("recon.png", res.recon[0])):
                data = encode_png(img)
                info = tarfile.TarInfo(f"{s.meta['id']}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return len(samples) / (time.perf_counter() - start)


def _unet_tflops(models: Models, cfg: Config) -> tuple[float, float | None]:
    """Achieved TFLOP/s of the UNet forward at the guide batch size, and the device's bf16 peak."""
    from torch.utils.flop_counter import FlopCounterMode

    bs, c, s = cfg.guide.batch_size, cfg.data.channels, cfg.data.image_size
    x = torch.randn(bs, *models.sample_shape(c, s), device=models.device)  # latents for latent models
    t = torch.full((bs,), 10, dtype=torch.long, device=models.device)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            models.eps(x, t)
        flops = counter.get_total_flops()
        for _ in range(3):
            models.eps(x, t)
        _sync(models.device)
        reps = 20
        start = time.perf_counter()
        for _ in range(reps):
            models.eps(x, t)
        _sync(models.device)
    achieved = flops * reps / (time.perf_counter() - start) / 1e12
    peak = None
    if models.device.type == "cuda":
        name = torch.cuda.get_device_name(models.device)
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    return achieved, peak


def run_bench(cfg: Config, samples: int = 1024, reference_samples: int = 32, work_dir: Path | None = None) -> dict:
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, limit=samples))
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        run_dir = Path(tmp)
        models = load_models(cfg)
        run_invert(cfg, run_dir, models=models)  # the input of the guide stage; not timed
        resident = read_inverted(run_dir)
        classes = load_class_names(cfg)
        grid = config_grid(cfg, models.num_train_timesteps)
        # Both timed passes start warm: the first call at a batch shape pays one-off costs (oneDNN
        # primitive creation, CUDA context and cuDNN autotuning, torch.compile) that a real run
        # amortises over its whole dataset.
        _warm_up(models, cfg, classes, grid, resident)
        run_guide(cfg, run_dir, models=models)  # end to end, timed per shard by the stage itself
        e2e_seconds = sum(json.loads(GUIDE.marker(run_dir, i).read_text())["seconds"] for i in GUIDE.finished(run_dir))
    n = len(resident)
    pairs_per_s = n / e2e_seconds
    compute_pairs_per_s = _compute_only(models, cfg, classes, grid, resident)
    reference_pairs_per_s = _reference(models, cfg, classes, grid, resident[:reference_samples])
    tflops, peak = _unet_tflops(models, cfg)
    result = {
        "device": str(models.device) if models.device.type == "cpu" else torch.cuda.get_device_name(models.device),
        "dtype": str(models.dtype).replace("torch.", ""),
        "samples": n, "batch_size": cfg.guide.batch_size, "steps": cfg.invert.steps,
        "pairs_per_s": pairs_per_s,
        "compute_pairs_per_s": compute_pairs_per_s,
        "efficiency": pairs_per_s / compute_pairs_per_s,
        "reference_pairs_per_s": reference_pairs_per_s,
        "speedup_vs_reference": pairs_per_s / reference_pairs_per_s,
        "unet_tflops": tflops,
        "unet_mfu": (tflops / peak) if peak else None,
    }
    return result


def format_bench(r: dict) -> str:
    lines = [
        f"device {r['device']} ({r['dtype']}), {r['samples']} samples, batch {r['batch_size']}, {r['steps']} steps",
        f"end to end (guide stage)        {r['pairs_per_s']:10.1f} pairs/s",
        f"compute alone (resident)        {r['compute_pairs_per_s']:10.1f} pairs/s",
        f"efficiency (end to end/compute) {r['efficiency']:10.3f}",
        f"reference (1 at a time, fp32)   {r['reference_pairs_per_s']:10.2f} pairs/s",
        f"speed-up vs reference           {r['speedup_vs_reference']:10.1f}x",
        f"UNet forward                    {r['unet_tflops'] * 1e3:10.2f} GFLOP/s"
        + (f" = {r['unet_mfu']:.1%} of bf16 peak" if r["unet_mfu"] else ""),
        json.dumps(r),
    ]
    return "\n".join(lines)
