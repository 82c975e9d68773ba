"""`make bench-gpu`: one guided DDIM step of real-sized recipes, random weights, no downloads.

    python -m cfgen.bench.gpu                  # on the GPU: both recipes, batch sizes 1..32 (about 5 min on an H100)
    python -m cfgen.bench.gpu --tiny           # the same code at toy sizes on the CPU (CI runs it)
    python -m cfgen.bench.gpu --compile        # torch.compile the UNet; counts recompiles

Recipes (shapes of the published models, weights random: compute depends on the shapes only):
- `adm256`: an ADM-256-class pixel UNet (diffusers UNet2DModel, channels 256/256/512/512/1024/1024,
  attention at 32, 16 and 8 px) and a noise-aware classifier read at x_t ('noisy' gradient, as DiME);
- `sd15`: the Stable Diffusion 1.5 UNet (UNet2DConditionModel's defaults, 860 M parameters, a 77-token
  text condition), its VAE, and a CLIP ViT-L/14 image tower as a clean zero-shot predictor read on the
  decoded x0-estimate (the FastDiME 'x0' gradient: UNet forward, VAE decoder and CLIP forward and backward).

Per recipe and batch size it prints: the guided step's time (channels-last, as the stages run, and
plain NCHW), pairs/s (a pair = S guided + S plain
steps, S = 25), achieved TFLOP/s of the guided step (FLOPs counted by torch, forward and backward)
and its share of the device's dense bf16 peak, peak GPU memory with and without gradient
checkpointing, the recompiles (with --compile), and how far the bf16 gradient is from the fp32 one
(cosine and relative L2, same inputs). The steps go through `cfgen.models.runtime.Models` and
`cfgen.diffusion`, the code the guide stage runs. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from cfgen.bench.guide import FlopCount, bf16_peak
from cfgen.device import synchronize, use_gpu_math
from cfgen.diffusion import clean_log_prob_grad, log_prob_grad
from cfgen.models.runtime import Models

STEPS = 25
"""Reverse steps a pass (invert.steps of the shipped pipelines); a pair is STEPS guided + STEPS plain."""


def _adm(tiny: bool):
    from diffusers import UNet2DModel

    from cfgen.models.classifier import NoiseAwareClassifier

    if tiny:
        size, chans, attn, head = 16, (32, 32, 64), (False, True, True), 8
        clf = NoiseAwareClassifier(in_channels=3, num_classes=10, sample_size=size, channels=(32, 64))
    else:  # ADM's 64-channel attention heads
        size, chans, attn, head = 256, (256, 256, 512, 512, 1024, 1024), (False, False, False, True, True, True), 64
        clf = NoiseAwareClassifier(in_channels=3, num_classes=1000, sample_size=size, channels=(128, 256, 512, 512, 1024))
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    unet = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=chans,
                       down_block_types=down, up_block_types=up, layers_per_block=2, attention_head_dim=head)
    return dict(unet=unet, classifier=clf, clean=False, gradient="noisy"), (3, size, size)


def _sd15(tiny: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from cfgen.models.latent import LatentCodec
    from cfgen.models.predictors import ImagePreprocess

    if tiny:
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=16)
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=8, projection_dim=16)
        cond_len, cond_dim, side = 77, 32, 8
    else:
        # SD 1.5's unet/config.json: the class defaults but a 768-wide text condition (CLIP ViT-L/14's)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                            sample_size=512)
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768)
        cond_len, cond_dim, side = 77, 768, 64
    clip = CLIPVisionModelWithProjection(vision)
    text = torch.nn.functional.normalize(torch.randn(1000, vision.projection_dim), dim=-1)
    pre = ImagePreprocess((vision.image_size,) * 2, (vision.image_size,) * 2, [0.48, 0.46, 0.41], [0.27, 0.26, 0.28])

    class ZeroShot(torch.nn.Module):  # ClipZeroShot's image side over 1,000 fixed random class embeddings
        def __init__(self):
            super().__init__()
            self.clip, self.pre = clip, pre
            self.register_buffer("text", text, persistent=False)

        def forward(self, images):
            f = torch.nn.functional.normalize(self.clip(pixel_values=self.pre(images)).image_embeds.float(), dim=-1)
            return 100.0 * f @ self.text.T

    cond = torch.randn(1, cond_len, cond_dim)
    return dict(unet=unet, classifier=ZeroShot(), vae=LatentCodec(vae), cond=cond, clean=True, gradient="x0"), \
        (4, side, side)


RECIPES = {"adm256": _adm, "sd15": _sd15}


def _models(recipe: str, tiny: bool, device: torch.device, dtype: torch.dtype, checkpointing: bool,
            compile_unet: bool, channels_last: bool | None = None) -> tuple[Models, tuple[int, int, int]]:
    from diffusers import DDIMScheduler

    from cfgen.models.loading import enable_checkpointing

    torch.manual_seed(0)
    parts, shape = RECIPES[recipe](tiny)
    channels_last = device.type == "cuda" if channels_last is None else channels_last  # as load_models
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for key in ("unet", "classifier", "vae"):
        if key in parts:
            parts[key] = parts[key].to(device, memory_format=fmt).eval().requires_grad_(False)
            if checkpointing:
                enable_checkpointing(parts[key])
    if "cond" in parts:
        parts["cond"] = parts["cond"].to(device)
    if compile_unet:
        parts["unet"] = torch.compile(parts["unet"])
    alphas = DDIMScheduler(beta_schedule="scaled_linear").alphas_cumprod.to(device, torch.float64)
    return Models(alphas_cumprod=alphas, device=device, dtype=dtype, channels_last=channels_last, **parts), shape


def guided_step(models: Models, x: torch.Tensor, t: int, target: torch.Tensor) -> torch.Tensor:
    """The guide stage's per-step work: eps and the guidance gradient (what guided_reverse computes)."""
    tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    classifier, gradient = models.guidance
    if gradient == "noisy":
        return models.eps(x, tt) - log_prob_grad(classifier, x, tt, target)
    eps, g = clean_log_prob_grad(models.eps, classifier, x, tt, float(models.alphas_cumprod[t]), target,
                                 through_unet=gradient == "unet")
    return eps - g


def _time(fn, device, reps: int) -> float:
    for _ in range(2):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / reps


def measure(recipe: str, batch: int, tiny: bool, device: torch.device, compile_unet: bool = False,
            reps: int = 5) -> dict:
    dtype = torch.bfloat16
    models, shape = _models(recipe, tiny, device, dtype, False, compile_unet)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=gen).to(device)
    target = torch.randint(0, 10, (batch,), generator=gen).to(device)
    t = 500
    tt = torch.full((batch,), t, dtype=torch.long, device=device)
    from torch._dynamo.utils import counters

    if compile_unet:
        counters.clear()
    guided = _time(lambda: guided_step(models, x, t, target), device, reps)
    with torch.no_grad():
        plain = _time(lambda: models.eps(x, tt), device, reps)
    with FlopCount() as counter:
        guided_step(models, x, t, target)
    tflops = counter.total / guided / 1e12
    peak = bf16_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    out = {"recipe": recipe, "batch": batch, "guided_step_s": guided, "plain_step_s": plain,
           "pairs_per_s": batch / (STEPS * (guided + plain)), "guided_tflops": tflops,
           "bf16_mfu": tflops / peak if peak else None}
    if compile_unet:
        out["recompiles"] = int(counters["stats"]["unique_graphs"])
    # gradient agreement: the same step in fp32 (weights are shared, only autocast changes)
    fp32 = replace(models, dtype=torch.float32)
    a, b = guided_step(models, x, t, target).float().flatten(), guided_step(fp32, x, t, target).float().flatten()
    out["bf16_vs_fp32_cosine"] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    out["bf16_vs_fp32_rel_l2"] = float((a - b).norm() / b.norm())
    if device.type == "cuda":  # the stages' channels-last layout against plain NCHW (GroupNorm-heavy UNets
        # may convert layouts in every block, which would make channels-last a loss)
        nchw, _ = _models(recipe, tiny, device, dtype, False, False, channels_last=False)
        out["guided_step_s_nchw"] = _time(lambda: guided_step(nchw, x, t, target), device, reps)
        del nchw
    if device.type == "cuda":  # peak memory of one guided step, without and with checkpointing
        del models, fp32
        for ckpt in (False, True):
            m, _ = _models(recipe, tiny, device, dtype, ckpt, False)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            guided_step(m, x, t, target)
            synchronize(device)
            out["peak_gib_checkpointing" if ckpt else "peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            del m
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m cfgen.bench.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (what CI runs)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet and count recompiles")
    ap.add_argument("--recipes", default="adm256,sd15")
    ap.add_argument("--batches", default="", help="comma-separated batch sizes (default 1,4,16,32; tiny: 2)")
    args = ap.parse_args(argv)
    device = torch.device("cpu") if args.tiny or not torch.cuda.is_available() else torch.device("cuda")
    use_gpu_math(device)
    batches = [int(b) for b in (args.batches or ("2" if args.tiny else "1,4,16,32")).split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, bf16 autocast, {STEPS} steps a pass, random weights"
          + (" (tiny shapes)" if args.tiny else ""), flush=True)
    print(f"{'recipe':8} {'batch':>5} {'guided s':>9} {'NCHW s':>8} {'pairs/s':>8} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'peak GiB':>9} {'ckpt GiB':>9} {'cos bf16':>9}", flush=True)
    rows = []
    for recipe in args.recipes.split(","):
        for batch in batches:
            try:
                r = measure(recipe, batch, args.tiny, device, args.compile)
            except torch.OutOfMemoryError:
                print(f"{recipe:8} {batch:5d} out of memory", flush=True)
                torch.cuda.empty_cache()
                break
            rows.append(r)

            def fmt(v, spec):
                return format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0]))
            print(f"{recipe:8} {batch:5d} {r['guided_step_s']:9.4f} {fmt(r.get('guided_step_s_nchw'), '8.4f')} "
                  f"{r['pairs_per_s']:8.2f} {r['guided_tflops']:8.2f} "
                  f"{fmt(r['bf16_mfu'], '6.1%')} {fmt(r.get('peak_gib'), '9.2f')} "
                  f"{fmt(r.get('peak_gib_checkpointing'), '9.2f')} {r['bf16_vs_fp32_cosine']:9.5f}", flush=True)
    print(json.dumps({"device": name, "tiny": args.tiny, "compile": args.compile, "rows": rows}))
    return rows


if __name__ == "__main__":
    main()
