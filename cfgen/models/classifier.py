"""The anti-causal predictor p(y | x_t, t): a small time-conditioned CNN.

It is a diffusers `ModelMixin`/`ConfigMixin`, so it saves and loads exactly
like the UNet (`save_pretrained(dir)` -> config.json + safetensors,
`NoiseAwareClassifier.from_pretrained(dir)`). Conditioning on t is what makes
its gradient meaningful on the noisy x_t of the guided reverse (Dhariwal &
Nichol; Diff-SCM). GroupNorm, never BatchNorm: a sample's output must not
depend on its batch-mates.
"""

from __future__ import annotations

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
