"""The anti-causal predictor p(y | x_t, t): a small time-conditioned CNN.

It is a diffusers `ModelMixin`/`ConfigMixin`, so it saves and loads exactly
like the UNet (`save_pretrained(dir)` -> config.json + safetensors,
`NoiseAwareClassifier.from_pretrained(dir)`). Conditioning on t is what makes
its gradient meaningful on the noisy x_t of the guided reverse (Dhariwal &
Nichol; Diff-SCM). GroupNorm, never BatchNorm: a sample's output must not
depend on its batch-mates.

It only knows the noise levels it was trained on, so `cfgen train classifier` records them beside the
weights (SCHEDULE_FILE, `schedule_record`) and guidance refuses a scheduler with others
(`schedule_mismatch`); a classifier saved without the record (older ones) is taken on trust.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from torch import nn


class NoiseAwareClassifier(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_channels: int = 1, num_classes: int = 10, sample_size: int = 8,
                 channels: tuple[int, ...] = (32, 64, 64), groups: int = 8):
        super().__init__()
        temb_dim = channels[0] * 4
        self.time_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        blocks, downs = [], []
        prev = channels[0]
        for i, ch in enumerate(channels):
            blocks.append(ResnetBlock2D(in_channels=prev, out_channels=ch, temb_channels=temb_dim, groups=groups))
            last = i == len(channels) - 1
            downs.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            prev = ch
        self.blocks = nn.ModuleList(blocks)
        self.downs = nn.ModuleList(downs)
        self.norm_out = nn.GroupNorm(groups, prev)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for noisy images x (B, C, H, W) at integer timesteps t (B,)."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        temb = self.time_embedding(self.time_proj(t).to(x.dtype))
        h = self.conv_in(x)
        for block, down in zip(self.blocks, self.downs):
            h = down(block(h, temb))
        h = torch.nn.functional.silu(self.norm_out(h)).mean(dim=(2, 3))
        return self.head(h)


SCHEDULE_FILE = "noise_schedule.json"
"""Beside a trained classifier's weights: the noise schedule it was trained under (`schedule_record`)."""


def _probe_steps(num_train_timesteps: int) -> list[int]:
    return sorted({0, num_train_timesteps // 10, num_train_timesteps // 4, num_train_timesteps // 2,
                   3 * num_train_timesteps // 4, num_train_timesteps - 1})


def schedule_record(scheduler) -> dict:
    """The noise levels a classifier was trained on: the scheduler's kind and alpha-bar at a few timesteps."""
    steps = scheduler.config.num_train_timesteps
    a = scheduler.alphas_cumprod
    return {"num_train_timesteps": steps, "beta_schedule": scheduler.config.beta_schedule,
            "alphas_cumprod": {str(t): float(a[t]) for t in _probe_steps(steps)}}


def schedule_mismatch(classifier_dir: Path, scheduler) -> str | None:
    """How `scheduler` differs from the schedule the classifier in `classifier_dir` was trained under, or
    None: the same, or unknown (no record)."""
    try:
        recorded = json.loads((Path(classifier_dir) / SCHEDULE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("alphas_cumprod"), dict):
        return None  # not a record this function wrote: as good as none
    now = schedule_record(scheduler)
    same = recorded.get("num_train_timesteps") == now["num_train_timesteps"] and all(
        math.isclose(float(recorded["alphas_cumprod"].get(t, math.nan)), a, rel_tol=1e-3, abs_tol=1e-7)
        for t, a in now["alphas_cumprod"].items())
    if same:
        return None
    return (f"trained under {recorded.get('beta_schedule')!r} with {recorded.get('num_train_timesteps')} steps, "
            f"model.scheduler is {now['beta_schedule']!r} with {now['num_train_timesteps']} steps")
