"""Load the diffusion model, its scheduler and the predictor from local directories.

Everything loads by path with `local_files_only=True`, so a diffusers
checkpoint directory a user has on disk (the `google/ddpm-*` layout:
`unet/` + `scheduler/`, or a bare `UNet2DModel` directory) works exactly like
the small models shipped for the embedded default. A missing directory or
file is a one-line `ModelLoadError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DModel

from cfgen.config import Config
from cfgen.models.classifier import NoiseAwareClassifier


class ModelLoadError(RuntimeError):
    """Weights or configs missing/unreadable; printed as one line."""


def _resolve(path: Path, sub: str, marker: str) -> Path:
    """Accept either the component dir itself or a pipeline dir that contains `sub/`."""
    if (path / marker).is_file():
        return path
    if (path / sub / marker).is_file():
        return path / sub
    if not path.exists():
        raise ModelLoadError(f"model directory not found: {path}")
    raise ModelLoadError(f"no {marker} in {path} or {path / sub}")


def _check_weights(path: Path) -> None:
    names = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin")
    if not any((path / n).is_file() for n in names):
        raise ModelLoadError(f"no weights file ({' or '.join(names[:2])}) in {path}")


def load_unet(path: Path) -> UNet2DModel:
    path = _resolve(path, "unet", "config.json")
    _check_weights(path)
    return UNet2DModel.from_pretrained(path, local_files_only=True, use_safetensors=None)


def load_scheduler(path: Path) -> DDIMScheduler:
    path = _resolve(path, "scheduler", "scheduler_config.json")
    # Any DDPM/DDIM-family config works: only its betas/alphas are used.
    return DDIMScheduler.from_pretrained(path, local_files_only=True)


def load_classifier(path: Path) -> NoiseAwareClassifier:
    path = _resolve(path, "classifier", "config.json")
    _check_weights(path)
    return NoiseAwareClassifier.from_pretrained(path, local_files_only=True)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Models:
    unet: UNet2DModel
    alphas_cumprod: torch.Tensor  # float64 on the device: the a_t of DESIGN §2
    classifier: NoiseAwareClassifier
    device: torch.device

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])


def load_models(cfg: Config) -> Models:
    device = pick_device(cfg.model.device)
    unet = load_unet(cfg.path(cfg.model.unet)).to(device).eval().requires_grad_(False)
    scheduler = load_scheduler(cfg.path(cfg.model.scheduler))
    classifier = load_classifier(cfg.path(cfg.model.classifier)).to(device).eval().requires_grad_(False)
    if unet.config.in_channels != cfg.data.channels:
        raise ModelLoadError(f"UNet expects {unet.config.in_channels} channels, data.channels={cfg.data.channels}")
    return Models(unet=unet, alphas_cumprod=scheduler.alphas_cumprod.to(device, torch.float64),
                  classifier=classifier, device=device)
