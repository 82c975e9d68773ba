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
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from cfgen.config import Config
from cfgen.data.sources import load_class_names
from cfgen.device import pick_device
from cfgen.diffusion import q_sample
from cfgen.errors import ModelLoadError
from cfgen.models.classifier import NoiseAwareClassifier
from cfgen.models.loading import load_codec, load_scheduler
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


def build_scheduler(cfg: Config) -> DDIMScheduler:
    t = cfg.train.diffusion
    return DDIMScheduler(num_train_timesteps=t.num_train_timesteps, beta_schedule=t.beta_schedule,
                         clip_sample=False, set_alpha_to_one=True)


def train_diffusion(cfg: Config, out: Path | None = None) -> Path:
    """Train the UNet; save unet/ and scheduler/ (diffusers layout). Returns the directory."""
    torch.manual_seed(cfg.pipeline.seed)
    device = pick_device(cfg.model.device)
    x, _, _ = load_arrays(cfg, split="")
    unet = build_unet(cfg).to(device)
    scheduler = build_scheduler(cfg)
    ema = EMAModel(unet.parameters(), decay=0.999)
    a = scheduler.alphas_cumprod.to(device, torch.float32)
    tc = cfg.train.diffusion
    opt = torch.optim.AdamW(unet.parameters(), lr=tc.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, tc.steps))
    gen = torch.Generator().manual_seed(cfg.pipeline.seed)
    bar = tqdm(range(tc.steps), desc="train diffusion")
    for _ in bar:
        idx = torch.randint(0, x.shape[0], (tc.batch_size,), generator=gen)
        x0 = x[idx].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, tc.num_train_timesteps, (tc.batch_size,), generator=gen).to(device)
        loss = F.mse_loss(unet(q_sample(x0, noise, a[t].view(-1, 1, 1, 1)), t).sample, noise)
        optimizer_step(loss, opt, sched, clip=unet.parameters())
        ema.step(unet.parameters())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(unet.parameters())
    out = out or cfg.path(cfg.model.unet).parent
    unet.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    return out


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
    groups: list[str] = []
    x, y, ids = load_arrays(cfg, split="", groups=groups)
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
    return report
