"""Latent diffusion: the VAE that maps images to model space and back, and the fixed text condition.

For a latent model (`model.kind = "latent"`, e.g. a Stable Diffusion layout
`unet/ vae/ text_encoder/ tokenizer/ scheduler/`) inversion and guidance run on

    x = (vae.encode(image).latent_dist.mean - shift_factor) * scaling_factor

and the counterfactual and the s = 0 reconstruction are `vae.decode(x /
scaling_factor + shift_factor)`. The mean of the posterior, never a sample:
the latent of an image must not depend on a seed or on its batch-mates.

A `UNet2DConditionModel` is conditioned on one caption for every sample
(`model.prompt`, '' = the empty prompt, as classifier-free guidance's
unconditional branch): its encoder states are computed once at load time.

    codec = LatentCodec(AutoencoderKL.from_pretrained("weights/sd15/vae", local_files_only=True))
    z = codec.encode(images)              # images (B, 3, H, W) in [-1, 1]
    images = codec.decode(z)              # (B, 3, H, W), roughly [-1, 1]
"""

from __future__ import annotations

import torch
from torch import nn


class LatentCodec(nn.Module):
    """A diffusers AutoencoderKL as the map between pixel space ([-1, 1]) and the UNet's latent space."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @property
    def downscale(self) -> int:
        """Pixels per latent pixel along a side (8 for Stable Diffusion)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel images (B, C, H, W) in [-1, 1] -> latents (B, c, H/f, W/f), the posterior mean, scaled."""
        return (self.vae.encode(images).latent_dist.mean - self.shift_factor) * self.scaling_factor

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> pixel images in (about) [-1, 1]; differentiable, for guidance through the decoder."""
        return self.vae.decode(x / self.scaling_factor + self.shift_factor).sample


class PromptEncoder:
    """A Stable Diffusion layout's text encoder and tokenizer (transformers) as captions -> the encoder
    states (N, L, D) a UNet2DConditionModel attends to (model.prompt's, and text mode's captions).

    Tokenized as diffusers' Stable Diffusion pipeline does: padded to the tokenizer's maximum length
    (capped at the encoder's position table), last hidden state of the text encoder. The UNet was
    trained attending to the padding too, so no row is masked (models/text.py's padding_mask: None).
    """

    def __init__(self, text_encoder: nn.Module, tokenizer):
        self.encoder, self.tokenizer = text_encoder, tokenizer
        self.length = min(int(tokenizer.model_max_length), int(text_encoder.config.max_position_embeddings))

    @torch.no_grad()
    def states(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.length, truncation=True,
                             return_tensors="pt").input_ids
        return self.encoder(ids.to(self.encoder.device))[0].float()
