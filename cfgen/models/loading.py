"""Load the diffusion model, its scheduler and the predictor from local directories.

Everything loads by path with `local_files_only=True`, so a diffusers
checkpoint directory a user has on disk (the `google/ddpm-*` layout:
`unet/` + `scheduler/`, or a bare `UNet2DModel` directory) works exactly like
the small models shipped for the embedded default. A missing directory or
file is a one-line `ModelLoadError`; pickle weights (.bin/.pt) are refused
unless `model.trust_checkpoint` (--trust-checkpoint) is set.

Bring your own models (README): a latent model (`model.kind`, a Stable
Diffusion layout with `vae/`, `text_encoder/`, `tokenizer/`; latent.py), a
`UNet2DConditionModel` with a fixed caption, and clean predictors on the
x0-estimate (`model.predictor`: a transformers image classifier or CLIP
zero-shot; predictors.py). `Models` hides the differences from the stages:
they call `encode` / `eps` / `logits` / `decode` / `predict` and pass
`guidance` to diffusion.guided_reverse.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNet2DModel

from cfgen.config import Config, guidance_gradient
from cfgen.diffusion import eps_from_output, x0_estimate
from cfgen.models.classifier import NoiseAwareClassifier
from cfgen.models.latent import LatentCodec, text_condition
from cfgen.models.predictors import CLIP_STATS, ClipZeroShot, HFImageClassifier, ImagePreprocess, label_columns


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


SAFE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_WEIGHTS = ("diffusion_pytorch_model.bin", "pytorch_model.bin", "diffusion_pytorch_model.pt",
                  "diffusion_pytorch_model.bin.index.json", "pytorch_model.bin.index.json")
SHARDED_SAFE_WEIGHTS = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


def _check_weights(path: Path, trust_checkpoint: bool = False) -> bool:
    """True for safetensors weights; pickle weights only with trust_checkpoint (they can run code)."""
    if any((path / n).is_file() for n in SAFE_WEIGHTS + SHARDED_SAFE_WEIGHTS):
        return True
    pickled = next((n for n in PICKLE_WEIGHTS if (path / n).is_file()), None)
    if pickled is None:
        raise ModelLoadError(f"no weights file ({' or '.join(SAFE_WEIGHTS)}) in {path}")
    if not trust_checkpoint:
        raise ModelLoadError(f"{path / pickled} is a pickle checkpoint, which can run code when loaded; "
                             "convert it to safetensors or pass --trust-checkpoint")
    return False


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"unreadable {path / 'config.json'}: {exc}") from None


def load_unet(path: Path, trust_checkpoint: bool = False) -> UNet2DModel | UNet2DConditionModel:
    """A UNet2DModel, or a UNet2DConditionModel (text-conditioned, e.g. Stable Diffusion) by its config's class."""
    path = _resolve(path, "unet", "config.json")
    safe = _check_weights(path, trust_checkpoint)
    conditional = _read_config(path).get("_class_name") == "UNet2DConditionModel"
    cls = UNet2DConditionModel if conditional else UNet2DModel
    return cls.from_pretrained(path, local_files_only=True, use_safetensors=safe)


def load_scheduler(path: Path) -> DDIMScheduler:
    path = _resolve(path, "scheduler", "scheduler_config.json")
    # Any DDPM/DDIM/PNDM-family config works: only its betas/alphas (and prediction_type) are used.
    config = dict(DDIMScheduler.load_config(path, local_files_only=True))
    if "timesteps" in config and "num_train_timesteps" not in config:  # the original google/ddpm-* configs
        config["num_train_timesteps"] = config.pop("timesteps")
    known = set(inspect.signature(DDIMScheduler.__init__).parameters)
    return DDIMScheduler.from_config({k: v for k, v in config.items() if k in known or k.startswith("_")})


def load_classifier(path: Path, trust_checkpoint: bool = False) -> NoiseAwareClassifier:
    path = _resolve(path, "classifier", "config.json")
    safe = _check_weights(path, trust_checkpoint)
    return NoiseAwareClassifier.from_pretrained(path, local_files_only=True, use_safetensors=safe)


def pipeline_root(unet: Path) -> Path:
    """The directory whose vae/, text_encoder/, tokenizer/ belong with this UNet: the pipeline directory
    holding unet/, or the parent of a directory named unet; a bare model directory is its own root."""
    if (unet / "unet").is_dir():
        return unet
    return unet.parent if unet.name == "unet" else unet


def _component(cfg: Config, value: str, sub: str) -> Path:
    """A configured component directory, or `sub/` of the UNet's pipeline directory when the key is empty."""
    return cfg.path(value) if value else pipeline_root(cfg.path(cfg.model.unet)) / sub


def model_kind(cfg: Config) -> str:
    """'pixel' or 'latent': model.kind, or for 'auto' latent iff model.vae is set or the pipeline has vae/."""
    if cfg.model.kind != "auto":
        return cfg.model.kind
    return "latent" if cfg.model.vae or (pipeline_root(cfg.path(cfg.model.unet)) / "vae").is_dir() else "pixel"


def load_vae(path: Path, trust_checkpoint: bool = False) -> AutoencoderKL:
    path = _resolve(path, "vae", "config.json")
    safe = _check_weights(path, trust_checkpoint)
    cls = _read_config(path).get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ModelLoadError(f"{path}: the VAE must be a diffusers AutoencoderKL, found {cls}")
    return AutoencoderKL.from_pretrained(path, local_files_only=True, use_safetensors=safe)


def load_codec(cfg: Config, device: torch.device) -> LatentCodec | None:
    """The frozen VAE of a latent model on `device`; None for a pixel model."""
    if model_kind(cfg) != "latent":
        return None
    vae = load_vae(_component(cfg, cfg.model.vae, "vae"), cfg.model.trust_checkpoint)
    return LatentCodec(vae.to(device).eval().requires_grad_(False))


def _transformers_model(path: Path, trust_checkpoint: bool, class_name: str, by_architecture: bool = False):
    """A transformers model of class `class_name` (e.g. AutoModelForImageClassification, CLIPModel); with
    by_architecture, the class its config names (CLIPTextModel, T5EncoderModel, ...) if transformers has it."""
    import transformers

    safe = _check_weights(path, trust_checkpoint)
    cls = getattr(transformers, class_name)
    if by_architecture:
        arch = getattr(transformers, (_read_config(path).get("architectures") or [""])[0], None)
        cls = arch if isinstance(arch, type) and hasattr(arch, "from_pretrained") else cls
    try:
        return cls.from_pretrained(path, local_files_only=True, use_safetensors=safe)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load a {cls.__name__} from {path}: {str(exc).splitlines()[0]}") from None


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise ModelLoadError(f"tokenizer directory not found: {path}")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None


def load_condition(cfg: Config, unet: torch.nn.Module, device: torch.device) -> torch.Tensor | None:
    """Encoder states (1, L, D) of model.prompt for a UNet2DConditionModel; None for an unconditional UNet."""
    if not isinstance(unet, UNet2DConditionModel):
        return None
    if unet.config.addition_embed_type is not None or unet.config.class_embed_type is not None:
        raise ModelLoadError("UNet2DConditionModel with added (SDXL-style) or class conditioning is not supported")
    path = _resolve(_component(cfg, cfg.model.text_encoder, "text_encoder"), "text_encoder", "config.json")
    encoder = _transformers_model(path, cfg.model.trust_checkpoint, "AutoModel", by_architecture=True).eval()
    tokenizer = load_tokenizer(_component(cfg, cfg.model.tokenizer, "tokenizer"))
    cond = text_condition(encoder, tokenizer, cfg.model.prompt, torch.device("cpu")).to(device)
    if cond.shape[-1] != unet.config.cross_attention_dim:
        raise ModelLoadError(f"text encoder width {cond.shape[-1]} != the UNet's cross_attention_dim "
                             f"{unet.config.cross_attention_dim}")
    return cond


def _read_processor(path: Path) -> dict:
    pre = path / "preprocessor_config.json"
    try:
        return json.loads(pre.read_text(encoding="utf-8")) if pre.is_file() else {}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"unreadable {pre}: {exc}") from None


def load_predictor(cfg: Config, classes: list[str]) -> tuple[torch.nn.Module, bool]:
    """(predictor, clean): the noise-aware classifier (clean = False) or a clean one on pixel images."""
    m = cfg.model
    if m.predictor == "noise_aware":
        return load_classifier(cfg.path(m.classifier), m.trust_checkpoint), False
    path = cfg.path(m.predictor_path)
    if not path.exists():
        raise ModelLoadError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"no config.json in {path}")
    processor = _read_processor(path)
    if m.predictor == "hf_classifier":
        model = _transformers_model(path, m.trust_checkpoint, "AutoModelForImageClassification").eval()
        try:
            columns = label_columns(model.config.id2label, classes)
        except ValueError as exc:
            raise ModelLoadError(f"model.predictor_path {path}: {exc}") from None
        size = getattr(model.config, "image_size", None) or cfg.data.image_size
        pre = ImagePreprocess.from_processor(processor, size, channels=getattr(model.config, "num_channels", 3))
        predictor = HFImageClassifier(model, pre, columns)
    else:
        model = _transformers_model(path, m.trust_checkpoint, "CLIPModel").eval()
        if not hasattr(model, "get_text_features"):
            raise ModelLoadError(f"model.predictor_path {path}: clip_zero_shot needs a CLIPModel, found "
                                 f"{type(model).__name__}")
        pre = ImagePreprocess.from_processor(processor, model.config.vision_config.image_size, CLIP_STATS, 3)
        predictor = ClipZeroShot(model, load_tokenizer(path), pre, classes, m.clip_prompts)
    return predictor, True


def enable_checkpointing(module: torch.nn.Module) -> int:
    """Activation checkpointing in every diffusers model and transformers layer inside `module`; returns how many.

    diffusers checkpoints whenever grad is enabled. transformers checkpoints a
    `GradientCheckpointingLayer` only in training mode, so those layer modules
    themselves (not their dropout or norm children, which stay in eval mode)
    are flagged as training: frozen eval-mode predictors checkpoint too.
    """
    from diffusers.models.modeling_utils import ModelMixin
    from transformers.modeling_layers import GradientCheckpointingLayer

    count = 0
    for sub in module.modules():
        if isinstance(sub, ModelMixin) and sub._supports_gradient_checkpointing:
            sub.enable_gradient_checkpointing()
            count += 1
        elif isinstance(sub, GradientCheckpointingLayer):
            sub.gradient_checkpointing = True
            sub._gradient_checkpointing_func = partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
            sub.training = True
            count += 1
    return count


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():  # one GPU per process under accelerate launch / torchrun
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


@dataclass
class Models:
    unet: torch.nn.Module
    alphas_cumprod: torch.Tensor  # float64 on the device: the a_t of DESIGN §2
    classifier: torch.nn.Module   # the predictor: noise-aware p(y | x_t, t), or clean on pixels when `clean`
    device: torch.device
    dtype: torch.dtype = torch.float32  # autocast dtype of the networks
    channels_last: bool = False
    vae: LatentCodec | None = None       # latent models: images <-> model space; None = pixel model
    cond: torch.Tensor | None = None     # (1, L, D) text condition of a UNet2DConditionModel
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

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps(x_t, t) in fp32, whatever precision the UNet runs in (and whatever it was trained to predict)."""
        with self._autocast():
            if self.cond is None:
                out = self.unet(self._layout(x), t).sample.float()
            else:
                cond = self.cond.expand(x.shape[0], -1, -1)
                out = self.unet(self._layout(x), t, encoder_hidden_states=cond).sample.float()
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


def load_models(cfg: Config) -> Models:
    from cfgen.data.sources import load_class_names

    device = pick_device(cfg.model.device)
    dtype = pick_dtype(cfg.model.dtype, device)
    channels_last = device.type == "cuda"  # faster convolutions on tensor cores; no gain on CPU
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    trust = cfg.model.trust_checkpoint
    unet = load_unet(cfg.path(cfg.model.unet), trust).to(device, memory_format=fmt).eval().requires_grad_(False)
    scheduler = load_scheduler(cfg.path(cfg.model.scheduler))
    vae = load_codec(cfg, device)
    cond = load_condition(cfg, unet, device)
    classes = load_class_names(cfg) if cfg.model.predictor != "noise_aware" else []
    classifier, clean = load_predictor(cfg, classes)
    classifier = classifier.to(device, memory_format=fmt).eval().requires_grad_(False)
    image_channels = unet.config.in_channels if vae is None else vae.image_channels
    if vae is not None and unet.config.in_channels != vae.latent_channels:
        raise ModelLoadError(f"UNet expects {unet.config.in_channels} channels, the VAE makes {vae.latent_channels}")
    if image_channels != cfg.data.channels:
        what = "UNet" if vae is None else "VAE"
        raise ModelLoadError(f"{what} expects {image_channels} channels, data.channels={cfg.data.channels}")
    if vae is not None and cfg.data.image_size % vae.downscale:
        raise ModelLoadError(f"data.image_size={cfg.data.image_size} is not a multiple of the VAE's "
                             f"downscale factor {vae.downscale}")
    if cfg.model.gradient_checkpointing:  # after .eval(): transformers layers are flagged as training
        for net in (unet, vae, classifier):
            if net is not None:
                enable_checkpointing(net)
    if cfg.model.compile:
        unet, classifier = torch.compile(unet), torch.compile(classifier)
    return Models(unet=unet, alphas_cumprod=scheduler.alphas_cumprod.to(device, torch.float64),
                  classifier=classifier, device=device, dtype=dtype, channels_last=channels_last, vae=vae,
                  cond=cond, prediction_type=scheduler.config.prediction_type, clean=clean,
                  gradient=guidance_gradient(cfg.model))
