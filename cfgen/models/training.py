"""`cfgen train diffusion` and `cfgen train classifier` on the configured dataset.

    cfgen train diffusion  --config pipelines/digits.toml   # -> model.unet, model.scheduler
    cfgen train classifier --config pipelines/digits.toml   # -> model.classifier (+ metrics.json)

Both read the same samples the pipeline reads (`list_samples`), so a user's
image folder or manifest trains models for that data. The diffusion model is
a plain diffusers `UNet2DModel` trained with the epsilon objective on a DDIM
schedule; the classifier sees x_t = sqrt(a_t) x0 + sqrt(1-a_t) n at uniformly
drawn t, which is what makes it usable as p(y | x_t, t) during guidance.
For a latent model (model.kind, README "Bring your own models") the
classifier is trained on the VAE latents the guidance walks, and on the noise
levels of the pipeline's own scheduler (model.scheduler) whenever it exists.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from cfgen.config import Config, ConfigError
from cfgen.data.sources import list_samples, load_class_names
from cfgen.models.classifier import NoiseAwareClassifier
from cfgen.models.loading import ModelLoadError, load_codec, load_scheduler, pick_device
from cfgen.tensors import to_model_space


def _load_arrays(cfg: Config, split: str | None = None,
                 groups: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All decodable samples as model-space tensors; undecodable ones are skipped and counted.

    `groups`, when given, is filled with each kept sample's `SampleRef.group`.
    """
    images, labels, ids, skipped = [], [], [], 0
    for ref in tqdm(list_samples(cfg, split=split), desc="load", leave=False):
        if ref.error:
            skipped += 1
            continue
        try:
            images.append(ref.load())
        except ValueError:
            skipped += 1
            continue
        labels.append(ref.label)
        ids.append(ref.id)
        if groups is not None:
            groups.append(ref.group)
    if not images:
        raise ConfigError("no usable training images in the configured dataset")
    if skipped:
        print(f"skipped {skipped} unusable samples")
    x = to_model_space(torch.from_numpy(np.stack(images)))
    return x, torch.tensor(labels, dtype=torch.long), ids


def _cosine_lr(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


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
    x, _, _ = _load_arrays(cfg, split="")
    unet = build_unet(cfg).to(device)
    scheduler = build_scheduler(cfg)
    ema = EMAModel(unet.parameters(), decay=0.999)
    a = scheduler.alphas_cumprod.to(device, torch.float32)
    tc = cfg.train.diffusion
    opt = torch.optim.AdamW(unet.parameters(), lr=tc.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, tc.steps))
    gen = torch.Generator().manual_seed(cfg.pipeline.seed)
    bar = tqdm(range(tc.steps), desc="train diffusion")
    for _ in bar:
        idx = torch.randint(0, x.shape[0], (tc.batch_size,), generator=gen)
        x0 = x[idx].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, tc.num_train_timesteps, (tc.batch_size,), generator=gen).to(device)
        at = a[t].view(-1, 1, 1, 1)
        xt = at.sqrt() * x0 + (1 - at).sqrt() * noise
        loss = F.mse_loss(unet(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
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


def _split_train_test(cfg: Config, y: torch.Tensor, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks: the manifest split if there is one, else a seeded stratified split."""
    if cfg.data.split:
        from cfgen.data.sources import split_ids

        splits = split_ids(cfg)
        test = torch.tensor([splits.get(i) == "test" for i in ids])
    else:
        from sklearn.model_selection import train_test_split

        _, te = train_test_split(np.arange(len(ids)), test_size=cfg.train.classifier.test_fraction,
                                 stratify=y.numpy(), random_state=cfg.pipeline.seed)
        test = torch.zeros(len(ids), dtype=torch.bool)
        test[te] = True
    return ~test, test


@torch.no_grad()
def classifier_accuracy(model: NoiseAwareClassifier, x: torch.Tensor, y: torch.Tensor,
                        alphas_cumprod: torch.Tensor, t: int, seed: int = 0) -> float:
    """Accuracy on x_t at one timestep, with fixed noise so the figure is reproducible."""
    gen = torch.Generator().manual_seed(seed + t)
    a = alphas_cumprod[t].float()
    xt = a.sqrt() * x + (1 - a).sqrt() * torch.randn(x.shape, generator=gen)
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
    x, y, ids = _load_arrays(cfg, split="", groups=groups)
    codec = load_codec(cfg, device)  # latent models: learn p(y | z_t, t) on the VAE latents
    if codec is not None:
        x = _encode_latents(codec, x, device)
    train, test = _split_train_test(cfg, y, ids)
    classes = load_class_names(cfg)
    tc = cfg.train.classifier
    scheduler = _classifier_scheduler(cfg)
    a = scheduler.alphas_cumprod.to(torch.float32)
    model = NoiseAwareClassifier(in_channels=x.shape[1], num_classes=len(classes),
                                 sample_size=x.shape[-1], channels=tuple(tc.channels)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, tc.steps))
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
        at = a[t].view(-1, 1, 1, 1)
        xt = at.sqrt() * x0 + (1 - at).sqrt() * torch.randn(x0.shape, generator=gen)
        loss = F.cross_entropy(model(xt.to(device), t.to(device)), target.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
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
