"""`cfgen train diffusion` and `cfgen train classifier` on the configured dataset.

    cfgen train diffusion  --config pipelines/digits.toml   # -> model.unet, model.scheduler
    cfgen train classifier --config pipelines/digits.toml   # -> model.classifier (+ metrics.json)

Both read the same samples the pipeline reads (`list_samples`), so a user's
image folder or manifest trains models for that data. The diffusion model is
a plain diffusers `UNet2DModel` trained with the epsilon objective on a DDIM
schedule; the classifier sees x_t = sqrt(a_t) x0 + sqrt(1-a_t) n at uniformly
drawn t, which is what makes it usable as p(y | x_t, t) during guidance.
For a latent model (model.kind, docs/models.md) the
classifier is trained on the VAE latents the guidance walks, and on the noise
levels of the pipeline's own scheduler (model.scheduler) whenever it exists.

With `train.diffusion.text_encoder = "minilm"` the diffusion model is a
`UNet2DConditionModel` on each sample's caption instead (cfgen/models/text.py),
the caption dropped to '' with probability `train.diffusion.caption_dropout`
for classifier-free guidance; it writes text_encoder.json beside unet/ and,
when the source knows each sample's concepts and can read them back from
pixels (shapes-text), metrics.json: whether samples obey their caption, and
the round trip (`text_metrics`).

    cfgen train diffusion --config pipelines/shapes-text.toml --out models/shapes-text
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from cfgen.config import Config
from cfgen.data.base import SampleRef
from cfgen.data.sources import list_samples, load_class_names, open_source
from cfgen.device import pick_device
from cfgen.diffusion import guided_reverse, invert, q_sample, timestep_grid
from cfgen.errors import ModelLoadError
from cfgen.quality.distances import l1
from cfgen.models.classifier import SCHEDULE_FILE, NoiseAwareClassifier, schedule_record
from cfgen.models.loading import load_codec, load_scheduler
from cfgen.models.runtime import Models
from cfgen.models.text import (CaptionEncoder, caption_table, drop_captions, pad_states, padding_mask,
                               sample_captions)
from cfgen.tensors import to_model_space, to_uint8
from cfgen.trainkit import cosine_lr, load_arrays, optimizer_step, split_train_test


def build_unet(cfg: Config) -> UNet2DModel:
    ch = tuple(cfg.train.diffusion.block_out_channels)
    n = len(ch)
    # One attention level, at the middle resolution, as in the probe of DESIGN §7.
    down = tuple("AttnDownBlock2D" if i == n - 2 else "DownBlock2D" for i in range(n))
    up = tuple("AttnUpBlock2D" if i == 1 else "UpBlock2D" for i in range(n))
    return UNet2DModel(sample_size=cfg.data.image_size, in_channels=cfg.data.channels,
                       out_channels=cfg.data.channels, block_out_channels=ch, layers_per_block=1,
                       down_block_types=down, up_block_types=up, norm_num_groups=8,
                       attention_head_dim=16)


def build_text_unet(cfg: Config, cross_attention_dim: int) -> UNet2DConditionModel:
    ch = tuple(cfg.train.diffusion.block_out_channels)
    # Cross-attention at every level but the full-resolution one, and in the middle block: on 2 CPU
    # cores a 16x16 attention level costs 2.5x the whole step, and caption words are global (what
    # colour, which background, which shape) rather than per pixel.
    down = tuple("DownBlock2D" if i == 0 else "CrossAttnDownBlock2D" for i in range(len(ch)))
    up = tuple(d.replace("Down", "Up") for d in reversed(down))
    return UNet2DConditionModel(sample_size=cfg.data.image_size, in_channels=cfg.data.channels,
                                out_channels=cfg.data.channels, block_out_channels=ch, layers_per_block=1,
                                down_block_types=down, up_block_types=up, norm_num_groups=8,
                                cross_attention_dim=cross_attention_dim, attention_head_dim=8)


def build_scheduler(cfg: Config) -> DDIMScheduler:
    t = cfg.train.diffusion
    return DDIMScheduler(num_train_timesteps=t.num_train_timesteps, beta_schedule=t.beta_schedule,
                         clip_sample=False, set_alpha_to_one=True)


def train_diffusion(cfg: Config, out: Path | None = None) -> Path:
    """Train the UNet; save unet/ and scheduler/ (diffusers layout), and for a text-conditioned one
    text_encoder.json and metrics.json. Returns the directory."""
    torch.manual_seed(cfg.pipeline.seed)
    device = pick_device(cfg.model.device)
    tc = cfg.train.diffusion
    refs: list[SampleRef] = []
    x, _, _ = load_arrays(cfg, split="", refs=refs)
    encoder = CaptionEncoder(tc.text_encoder) if tc.text_encoder else None
    if encoder is None:
        unet = build_unet(cfg).to(device)
    else:
        # The states of the few distinct captions once, not BERT at every step; a batch indexes them.
        table, caption_ids = caption_table(sample_captions(refs, load_class_names(cfg), cfg.pack.caption))
        states = encoder.states(table).to(device)
        mask = padding_mask(states)
        unet = build_text_unet(cfg, encoder.dim).to(device)
    scheduler = build_scheduler(cfg)
    ema = EMAModel(unet.parameters(), decay=0.999)
    a = scheduler.alphas_cumprod.to(device, torch.float32)
    opt = torch.optim.AdamW(unet.parameters(), lr=tc.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, tc.steps))
    gen = torch.Generator().manual_seed(cfg.pipeline.seed)
    start = time.monotonic()
    bar = tqdm(range(tc.steps), desc="train diffusion")
    for _ in bar:
        idx = torch.randint(0, x.shape[0], (tc.batch_size,), generator=gen)
        x0 = x[idx].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, tc.num_train_timesteps, (tc.batch_size,), generator=gen).to(device)
        xt = q_sample(x0, noise, a[t].view(-1, 1, 1, 1))
        if encoder is None:
            pred = unet(xt, t).sample
        else:
            c = drop_captions(caption_ids[idx], tc.caption_dropout, gen).to(device)
            pred = unet(xt, t, encoder_hidden_states=states[c],
                        encoder_attention_mask=None if mask is None else mask[c]).sample
        loss = F.mse_loss(pred, noise)
        optimizer_step(loss, opt, sched, clip=unet.parameters())
        ema.step(unet.parameters())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    seconds = time.monotonic() - start
    ema.copy_to(unet.parameters())
    out = out or cfg.path(cfg.model.unet).parent
    unet.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    if encoder is not None:
        encoder.save(out)
        report = {"steps": tc.steps, "batch_size": tc.batch_size, "caption_dropout": tc.caption_dropout,
                  "train_seconds": round(seconds), "final_loss": round(loss.item(), 4),
                  **text_metrics(cfg, unet.eval(), scheduler, encoder, device)}
        (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    return out


OBEY_IMAGES = 8
"""Images sampled from noise per distinct caption when measuring whether samples obey their caption."""
OBEY_STEPS = 50
"""DDIM steps of that sampling, from t = OBEY_FROM * T down to 0."""
OBEY_FROM = 0.98
"""Where sampling from pure noise starts, as diffusers' 50-step DDIM does (t = 980 of 1000): at t = T - 1 the
squaredcos schedule has a_t = 2.4e-9, and the x0-estimate's 1 / sqrt(a_t) = 2e4 blows any error in eps up
into noise that the remaining steps never remove (oracle accuracy at chance); at t = 980, a_t = 8.8e-4."""
OBEY_SCALES = (1.0, 3.0)
"""Classifier-free guidance scales w of that sampling: e = e(x, '') + w * (e(x, caption) - e(x, ''))."""
ROUND_TRIP_IMAGES = 50
"""Real images inverted under their caption and regenerated under it (w = 1, no edit)."""


def _guided(models: Models, cond: torch.Tensor, uncond: torch.Tensor | None, w: float):
    """eps(x, t) under classifier-free guidance of the states `cond` (B, L, D) against `uncond` (1, L, D);
    w = 1 is the caption's own estimate, one UNet pass."""
    def eps(x, t):
        if w == 1.0:
            return models.eps(x, t, cond)
        e_u, e_c = models.eps(torch.cat([x, x]), torch.cat([t, t]),
                              torch.cat([uncond.expand_as(cond), cond])).chunk(2)
        return e_u + w * (e_c - e_u)
    return eps


@torch.no_grad()
def text_metrics(cfg: Config, unet: UNet2DConditionModel, scheduler: DDIMScheduler, encoder: CaptionEncoder,
                 device: torch.device) -> dict:
    """How a text-conditioned UNet reconstructs and whether it obeys its caption.

    round_trip: the first ROUND_TRIP_IMAGES of the pipeline's samples inverted under their own caption and
    regenerated under it (w = 1, no edit), mean |x - x_rec| in [0, 1] pixel units, on the pipeline's grid
    (invert.steps to invert.t_inv) and all the way, OBEY_STEPS steps to OBEY_FROM.
    obey, when the source knows each sample's concepts and reads them back from pixels (its causal model's
    `read_concepts`, the renderer oracle of shapes-text): OBEY_IMAGES images from pure noise per distinct
    caption of the dataset (every concept combination it holds), DDIM with OBEY_STEPS steps from OBEY_FROM at
    each w in OBEY_SCALES, read back; per concept the share read as the caption says ('all': every concept right).
    """
    classes = load_class_names(cfg)
    models = Models(unet=unet, alphas_cumprod=scheduler.alphas_cumprod.to(device, torch.float64), classifier=None,
                    device=device, text=encoder)
    a, steps_total = models.alphas_cumprod, models.num_train_timesteps
    refs = [r for r in list_samples(cfg) if not r.error][:ROUND_TRIP_IMAGES]
    x0 = to_model_space(torch.from_numpy(np.stack([r.load() for r in refs]))).to(device)
    states = models.text_states(sample_captions(refs, classes, cfg.pack.caption))
    report: dict = {"round_trip": {}}
    for name, steps, t_inv in (("pipeline_grid", cfg.invert.steps, cfg.invert.t_inv), ("full", OBEY_STEPS, OBEY_FROM)):
        grid = timestep_grid(steps_total, steps, t_inv)
        eps = _guided(models, states, None, 1.0)
        rec = to_uint8(guided_reverse(eps, None, invert(eps, x0, a, grid), a, grid))
        report["round_trip"][name] = {"steps": steps, "t_inv": t_inv, "images": len(refs),
                                      "mean_l1": float(np.mean([l1(p, q) for p, q in zip(to_uint8(x0), rec)]))}
    causal = open_source(cfg).causal
    refs = [r for r in list_samples(cfg, split="") if not r.error]
    # read_concepts: the renderer oracle of a source whose samples carry concepts (shapes-text's causal model)
    if causal is None or not hasattr(causal, "read_concepts") or not all(r.concepts for r in refs):
        return report
    concepts = dict(zip(sample_captions(refs, classes, cfg.pack.caption), (r.concepts for r in refs)))
    captions = sorted(concepts)
    states = models.text_states(captions)
    cond, uncond = states.repeat_interleave(OBEY_IMAGES, 0), pad_states(models.text_states([""]), states.shape[1])
    noise = torch.randn((cond.shape[0], cfg.data.channels, cfg.data.image_size, cfg.data.image_size),
                        generator=torch.Generator().manual_seed(cfg.pipeline.seed)).to(device)
    grid = timestep_grid(steps_total, OBEY_STEPS, OBEY_FROM)
    wanted = [concepts[c] for c in captions for _ in range(OBEY_IMAGES)]
    accuracy = {}
    for w in OBEY_SCALES:  # the same noise at every w
        read = [causal.read_concepts(image) for image in
                to_uint8(guided_reverse(_guided(models, cond, uncond, w), None, noise, a, grid))]
        right = {k: [r[k] == want[k] for r, want in zip(read, wanted)] for k in wanted[0]}
        right["all"] = [all(r[k] == want[k] for k in want) for r, want in zip(read, wanted)]
        accuracy[f"w={w:g}"] = {k: float(np.mean(v)) for k, v in right.items()}
    report["obey"] = {"captions": len(captions), "images_per_caption": OBEY_IMAGES, "ddim_steps": OBEY_STEPS,
                      "from_t": grid[-1], "accuracy": accuracy}
    return report


def _classifier_scheduler(cfg: Config) -> DDIMScheduler:
    """The pipeline's scheduler (a user's DDPM or Stable Diffusion schedule: the classifier must see the
    noise levels guidance walks), else, before `train diffusion` wrote one, the one it will write."""
    try:
        return load_scheduler(cfg.path(cfg.model.scheduler))
    except ModelLoadError:
        return build_scheduler(cfg)


@torch.no_grad()
def _encode_latents(codec, x: torch.Tensor, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([codec.encode(x[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def classifier_accuracy(model: NoiseAwareClassifier, x: torch.Tensor, y: torch.Tensor,
                        alphas_cumprod: torch.Tensor, t: int, seed: int = 0) -> float:
    """Accuracy on x_t at one timestep, with fixed noise so the figure is reproducible."""
    gen = torch.Generator().manual_seed(seed + t)
    xt = q_sample(x, torch.randn(x.shape, generator=gen), alphas_cumprod[t].float())
    logits = model(xt, torch.full((x.shape[0],), t, dtype=torch.long))
    return float((logits.argmax(1) == y).float().mean())


def group_balanced_weights(groups: list[str], labels: list[int]) -> torch.Tensor:
    """Sampling weight 1 / (size of the sample's (group, class) cell): every cell present is drawn
    equally often, so a group that predicts the class in the train split stops predicting it."""
    cells = list(zip(groups, labels))
    counts = Counter(cells)
    return torch.tensor([1.0 / counts[cell] for cell in cells], dtype=torch.float64)


def train_classifier(cfg: Config, out: Path | None = None) -> dict:
    """Train p(y|x_t,t) on the train split; report held-out accuracy at several t."""
    torch.manual_seed(cfg.pipeline.seed)
    device = pick_device(cfg.model.device)
    refs: list[SampleRef] = []
    x, y, ids = load_arrays(cfg, split="", refs=refs)
    groups = [r.group for r in refs]
    codec = load_codec(cfg, device)  # latent models: learn p(y | z_t, t) on the VAE latents
    if codec is not None:
        x = _encode_latents(codec, x, device)
    train, test = split_train_test(cfg, y, ids)
    classes = load_class_names(cfg)
    tc = cfg.train.classifier
    scheduler = _classifier_scheduler(cfg)
    a = scheduler.alphas_cumprod.to(torch.float32)
    model = NoiseAwareClassifier(in_channels=x.shape[1], num_classes=len(classes),
                                 sample_size=x.shape[-1], channels=tuple(tc.channels)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, tc.steps))
    xtr, ytr = x[train], y[train]
    weights = (group_balanced_weights([g for g, keep in zip(groups, train.tolist()) if keep], ytr.tolist())
               if tc.balance_groups else None)
    gen = torch.Generator().manual_seed(cfg.pipeline.seed)
    bar = tqdm(range(tc.steps), desc="train classifier")
    for _ in bar:
        idx = (torch.randint(0, xtr.shape[0], (tc.batch_size,), generator=gen) if weights is None
               else torch.multinomial(weights, tc.batch_size, replacement=True, generator=gen))
        x0, target = xtr[idx], ytr[idx]
        # Half the batch near-clean (t < T/10): the guided reverse ends there and
        # p_cf / 'closest' are read at t = 0, so clean accuracy matters most.
        t = torch.randint(0, scheduler.config.num_train_timesteps, (tc.batch_size,), generator=gen)
        t[: tc.batch_size // 2] = t[: tc.batch_size // 2] // 10
        xt = q_sample(x0, torch.randn(x0.shape, generator=gen), a[t].view(-1, 1, 1, 1))
        loss = F.cross_entropy(model(xt.to(device), t.to(device)), target.to(device))
        optimizer_step(loss, opt, sched)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval().cpu()
    steps = scheduler.config.num_train_timesteps
    report = {"train_samples": int(train.sum()), "test_samples": int(test.sum()),
              "balance_groups": tc.balance_groups,
              "test_accuracy_by_t": {str(t): classifier_accuracy(model, x[test], y[test], a, t, cfg.pipeline.seed)
                                     for t in (0, steps // 10, steps // 4, steps // 2, 3 * steps // 4)}}
    out = out or cfg.path(cfg.model.classifier)
    model.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / SCHEDULE_FILE).write_text(json.dumps(schedule_record(scheduler), indent=2) + "\n")
    return report
