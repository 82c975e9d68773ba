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
It also counts what a pair costs (UNet evaluations, predictor forwards and
backwards, VAE passes, escalation included, and model FLOPs; UNet evaluations
also per pair the pack gates keep, and with guide.mask = 'off' beside them), the
achieved FLOP/s of the UNet forward and of the whole guided step (on a GPU in
bf16, their share of the device's dense bf16 peak, MFU), and where one guide
batch's time goes (cfgen/bench/step_profile.py: UNet, predictor backward, mask,
escalation bookkeeping). The last line is one JSON object.
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
from cfgen.device import synchronize
from cfgen.data.images import encode_png
from cfgen.data.sources import load_class_names
from cfgen.models.loading import load_models
from cfgen.models.runtime import Models
from cfgen.stages.common import config_grid
from cfgen.stages.classifier_guide import guide_batch
from cfgen.stages.guide import run_guide
from cfgen.stages.invert import Inverted, read_inverted, run_invert
from cfgen.bench.step_profile import format_profile, profile_guide

# Dense (not sparse) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets, most specific
# name first: torch.cuda.get_device_name says e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe",
# "NVIDIA H100 NVL", "NVIDIA A100-SXM4-80GB", "NVIDIA A10G". A GPU not listed gets no MFU, not a guess.
BF16_PEAK_TFLOPS = (
    (r"\bH100\b.*\bPCIe\b", 756.0), (r"\bH100\b.*\bNVL\b", 835.0), (r"\bH100\b", 989.0),
    (r"\bH200\b", 989.0), (r"\bGH200\b", 989.0), (r"\bA100\b", 312.0), (r"\bL40S\b", 362.0),
    (r"\bL4\b", 121.0), (r"\bA10\b", 125.0),
)
"""(pattern, peak) pairs; `bf16_peak` takes the first whose pattern matches the device name."""


class FlopCount:
    """Model FLOPs of everything run inside `with FlopCount() as c:` (forward and backward), in `c.total`.

    torch's FlopCounterMode without its module tracker: the tracker's backward hooks refuse
    `torch.autograd.grad` (the guidance gradient) with "A leaf node was passed to
    _will_engine_execute_node"; the per-op formulas are torch's own (flop_registry).
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        owner = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                formula = flop_registry.get(func._overloadpacket)
                if formula is not None:
                    owner.total += formula(*args, **kwargs, out_val=out)
                return out

        self.total = 0
        self._mode = _Mode()

    def __enter__(self) -> "FlopCount":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def bf16_peak(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name, or None when it is not in the table."""
    import re

    return next((peak for pattern, peak in BF16_PEAK_TFLOPS if re.search(pattern, device_name)), None)


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
    synchronize(models.device)


def _compute_only(models: Models, cfg: Config, classes, grid, samples: list[Inverted]) -> float:
    factual, noise, labels, seeds = _arrays(cfg, samples)
    bs = cfg.guide.batch_size
    start = time.perf_counter()
    for k in range(0, len(samples), bs):
        guide_batch(models, cfg, classes, grid, factual[k:k + bs], noise[k:k + bs], labels[k:k + bs],
                    seeds[k:k + bs])
    synchronize(models.device)
    return len(samples) / (time.perf_counter() - start)


def _reference(models: Models, cfg: Config, classes, grid, samples: list[Inverted]) -> float:
    """One sample at a time, fp32, no overlap: decode, compute, encode, write, repeat."""
    import tarfile

    fp32 = dataclasses.replace(models, dtype=torch.float32)
    buf = io.BytesIO()
    guide_batch(fp32, cfg, classes, grid, *_arrays(cfg, samples[:1]))  # warm at batch 1, as the others
    synchronize(models.device)
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
    bs, c, s = cfg.guide.batch_size, cfg.data.channels, cfg.data.image_size
    x = torch.randn(bs, *models.sample_shape(c, s), device=models.device)  # latents for latent models
    t = torch.full((bs,), 10, dtype=torch.long, device=models.device)
    with torch.no_grad():
        with FlopCount() as counter:
            models.eps(x, t)
        flops = counter.total
        for _ in range(3):
            models.eps(x, t)
        synchronize(models.device)
        reps = 20
        start = time.perf_counter()
        for _ in range(reps):
            models.eps(x, t)
        synchronize(models.device)
    achieved = flops * reps / (time.perf_counter() - start) / 1e12
    return achieved, _peak(models)


def _peak(models: Models) -> float | None:
    """The peak an MFU is measured against: bf16 runs only (an fp32 run divided by it would mislead)."""
    if models.device.type != "cuda" or models.dtype != torch.bfloat16:
        return None
    return bf16_peak(torch.cuda.get_device_name(models.device))


def work_per_pair(models: Models, cfg: Config, classes, grid, samples: list[Inverted]) -> dict:
    """What the guide compute costs a pair, escalation included: network passes counted in samples
    (a batch of 8 through the UNet is 8 UNet evaluations) and model FLOPs (forward and backward).

    One untimed pass of the same guide_batch calls as `_compute_only`, under hooks and
    FlopCount, so pairs/s can be set against any device's peak and against
    the published costs of other methods in UNet evaluations per counterfactual.
    """
    counts = {"unet_evals": 0, "predictor_forwards": 0, "predictor_backwards": 0, "vae_encodes": 0,
              "vae_decodes": 0}

    def hook(*keys):
        def count(module, args, kwargs, output):
            n = int(args[0].shape[0]) if args else int(next(iter(kwargs.values())).shape[0])
            counts[keys[0]] += n
            if len(keys) > 1 and torch.is_grad_enabled():  # a predictor pass under grad is differentiated
                counts[keys[1]] += n
        return count

    watched = [(models.unet, ("unet_evals",))]
    if models.classifier is not None:
        watched.append((models.classifier, ("predictor_forwards", "predictor_backwards")))
    if models.vae is not None:
        watched += [(models.vae.vae.encoder, ("vae_encodes",)), (models.vae.vae.decoder, ("vae_decodes",))]
    handles = [m.register_forward_hook(hook(*keys), with_kwargs=True) for m, keys in watched]
    factual, noise, labels, seeds = _arrays(cfg, samples)
    bs = cfg.guide.batch_size
    pairs = kept = 0
    try:
        with FlopCount() as flops:
            for k in range(0, len(samples), bs):
                res = guide_batch(models, cfg, classes, grid, factual[k:k + bs], noise[k:k + bs], labels[k:k + bs],
                                  seeds[k:k + bs])
                pairs += len(res.source)
                kept += _kept(cfg, factual[k:k + bs], res)
    finally:
        for h in handles:
            h.remove()
    out = {key: value / pairs for key, value in counts.items()}
    out["gflop"] = flops.total / pairs / 1e9
    out["reverse_steps"] = len(grid) - 1
    out["kept_pairs"] = kept / pairs
    out["unet_evals_per_kept_pair"] = counts["unet_evals"] / kept if kept else float("nan")
    return out


def _kept(cfg: Config, factual: np.ndarray, res) -> int:
    """How many of a batch's pairs `cfgen pack` keeps: finite, and through the pack gates."""
    from cfgen.quality.distances import l1
    from cfgen.quality.measures import gate_failures

    p = cfg.pack
    return sum(bool(res.finite[j]) and not gate_failures(
        {"flipped": bool(res.flipped[j]), "p_cf": float(res.p_cf[j]), "l1": l1(factual[b], res.cf[j]),
         "recon_l1": l1(factual[b], res.recon[j])}, p.min_p_cf, p.max_l1, p.max_recon_l1, p.require_flip)
        for j, b in enumerate(res.source))


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
    work = work_per_pair(models, cfg, classes, grid, resident)
    if cfg.guide.mask != "off":  # what localized edits cost in evaluations: the same samples unmasked
        unmasked = dataclasses.replace(cfg, guide=dataclasses.replace(cfg.guide, mask="off"))
        plain = work_per_pair(models, unmasked, classes, grid, resident)
        work["unet_evals_unmasked"] = plain["unet_evals"]
        work["unet_evals_per_kept_pair_unmasked"] = plain["unet_evals_per_kept_pair"]
    factual, noise, labels, seeds = _arrays(cfg, resident[:cfg.guide.batch_size])
    profile = profile_guide(models, cfg, classes, grid, factual, noise, labels, seeds)
    # the whole guided step's achieved rate: counted FLOPs a pair at the compute-alone pairs/s
    step_tflops = work["gflop"] * compute_pairs_per_s / 1e3
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
        "per_pair": work,
        "guide_tflops": step_tflops,
        "guide_mfu": (step_tflops / peak) if peak else None,
        "profile": profile,
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
        f"guide compute (fwd + bwd)       {r['guide_tflops'] * 1e3:10.2f} GFLOP/s"
        + (f" = {r['guide_mfu']:.1%} of bf16 peak" if r["guide_mfu"] else ""),
        "per pair, escalation included ({reverse_steps} reverse steps a pass): {unet_evals:.1f} UNet evaluations, "
        "{predictor_forwards:.1f} predictor forwards ({predictor_backwards:.1f} differentiated), "
        "{vae_encodes:.1f} VAE encodes, {vae_decodes:.1f} VAE decodes, {gflop:.2f} GFLOP".format(**r["per_pair"]),
        _evals_line(r["per_pair"]),
        *format_profile(r["profile"]),
        json.dumps(r),
    ]
    return "\n".join(lines)


def _evals_line(w: dict) -> str:
    line = (f"UNet evaluations per kept pair           {w['unet_evals_per_kept_pair']:.1f} "
            f"({w['kept_pairs']:.1%} of the pairs pass the pack gates)")
    if "unet_evals_unmasked" in w:
        line += f"; with guide.mask = 'off' {w['unet_evals_per_kept_pair_unmasked']:.1f}"
    return line
