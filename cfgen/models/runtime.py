"""The loaded networks as the stages use them: `Models` hides pixel vs latent, conditional vs not,
noise-aware vs clean predictor, precision and memory layout.

    x = models.encode(images)          # pixel images in [-1, 1] -> model space (VAE latents or the images)
    e = models.eps(x_t, t)             # the noise estimate, fp32, whatever the UNet predicts
    y = models.text_states(captions)   # cfgen's text UNet (models/text.py): (N, L, D) states of N captions
    e = models.eps(x_t, t, y)          # ... and eps(x_t, t, y), y (1 or B, L, D); without y, model.prompt's
    logits = models.predict(images)    # the predictor on clean pixel images (closest, p_cf, flipped)
    classifier, gradient = models.guidance   # what diffusion.guided_reverse differentiates
    images = models.decode(x)

load_models (loading.py) builds it; the math it serves is in cfgen/diffusion.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from cfgen.diffusion import eps_from_output, x0_estimate
from cfgen.errors import ModelLoadError
from cfgen.models.latent import LatentCodec, PromptEncoder
from cfgen.models.text import CaptionEncoder, padding_mask


@dataclass
class Models:
    unet: torch.nn.Module
    alphas_cumprod: torch.Tensor  # float64 on the device: the a_t of DESIGN §2
    classifier: torch.nn.Module | None  # the predictor: noise-aware p(y | x_t, t), or clean on pixels when
                                        # `clean`; None when loaded without it (invert)
    device: torch.device
    dtype: torch.dtype = torch.float32  # autocast dtype of the networks
    channels_last: bool = False
    vae: LatentCodec | None = None       # latent models: images <-> model space; None = pixel model
    cond: torch.Tensor | None = None     # (1, L, D) text condition of a UNet2DConditionModel
    text: CaptionEncoder | PromptEncoder | None = None  # captions -> states of a UNet2DConditionModel:
                                         # cfgen's MiniLM (text_encoder.json) or a Stable Diffusion layout's
    prediction_type: str = "epsilon"     # what the UNet predicts (the scheduler's prediction_type)
    clean: bool = False                  # the predictor is a clean classifier, applied to D(x0-estimate)
    gradient: str = "unet"               # 'noisy' (noise-aware only), 'unet' or 'x0' (config.guidance_gradient)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _a(self, t: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[t].float().view(-1, 1, 1, 1)

    def text_states(self, captions: list[str]) -> torch.Tensor:
        """(N, L, D) encoder states of N captions on the device (cfgen's MiniLM: zero rows = padding)."""
        if self.text is None:
            raise ModelLoadError("captions need a text-conditioned UNet (a UNet2DConditionModel); model.unet is "
                                 "unconditional")
        return self.text.states(captions).to(self.device)

    def eps(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor | None = None) -> torch.Tensor:
        """eps(x_t, t) in fp32, whatever precision the UNet runs in (and whatever it was trained to predict).

        A UNet2DConditionModel reads `states` (1 or B, L, D), by default model.prompt's; zero rows in them
        are padding, masked out of its cross-attention.
        """
        cond = self.cond if states is None else states
        with self._autocast():
            if cond is None:
                out = self.unet(self._layout(x), t).sample.float()
            else:
                cond = cond.expand(x.shape[0], -1, -1)
                out = self.unet(self._layout(x), t, encoder_hidden_states=cond,
                                encoder_attention_mask=padding_mask(cond)).sample.float()
        if out.shape[1] == 2 * x.shape[1]:  # learned variance (improved DDPM): the first half is the noise
            out = out[:, : x.shape[1]]
        if self.prediction_type != "epsilon":
            out = eps_from_output(out, x, self._a(t), self.prediction_type)
        return out

    def logits(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """p(y | x_t, t) logits in fp32 (differentiable w.r.t. x).

        A clean predictor gives p(y | D(x0(x_t, eps(x_t, t)))): the same function that
        guidance with gradient='unet' differentiates (there without a second UNet pass).
        """
        if self.clean:
            return self.x0_logits(x0_estimate(x, self.eps(x, t), self._a(t)))
        with self._autocast():
            return self.classifier(self._layout(x), t).float()

    def x0_logits(self, x0: torch.Tensor) -> torch.Tensor:
        """A clean predictor's logits on a model-space x0-estimate, decoded to pixels first (latent models)."""
        with self._autocast():
            return self.classifier(self.decode(x0)).float()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel images (B, C, H, W) in [-1, 1] -> model space: the VAE latents, or the images themselves."""
        if self.vae is None:
            return images
        with self._autocast():
            return self.vae.encode(images).float()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> pixel images in (about) [-1, 1]; identity for pixel models."""
        if self.vae is None:
            return x
        with self._autocast():
            return self.vae.decode(x).float()

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predictor logits on clean pixel images in [-1, 1] (t = 0): what 'closest', p_cf and flipped read."""
        if self.clean:
            with self._autocast():
                return self.classifier(images).float()
        t = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
        return self.logits(self.encode(images), t)

    def x0_logits_at_t0(self, x0: torch.Tensor) -> torch.Tensor:
        """A noise-aware classifier read as a clean one: p(y | x0-estimate, t = 0), in model space."""
        return self.logits(x0, torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device))

    @property
    def guidance(self) -> tuple[Callable, str]:
        """(classifier, gradient) for diffusion.guided_reverse."""
        if self.clean:
            return self.x0_logits, self.gradient
        if self.gradient == "noisy":
            return self.logits, "noisy"
        return self.x0_logits_at_t0, self.gradient

    def sample_shape(self, channels: int, size: int) -> tuple[int, int, int]:
        """Shape (C, H, W) in model space of a (channels, size, size) image."""
        if self.vae is None:
            return channels, size, size
        return self.vae.latent_channels, size // self.vae.downscale, size // self.vae.downscale
