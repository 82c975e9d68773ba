"""Load the diffusion model, its scheduler, the VAE, the text condition and the predictor by path.

A diffusers checkpoint directory a user has on disk (the `google/ddpm-*`
layout: `unet/` + `scheduler/`, or a bare `UNet2DModel` directory; a Stable
Diffusion layout with `vae/`, `text_encoder/`, `tokenizer/`) works exactly like
the small models shipped for the embedded default; a UNet2DConditionModel that
`cfgen train diffusion` trained on the frozen MiniLM has text_encoder.json
instead of text_encoder/ (models/text.py), and `Models.text_states(captions)`
gives what its `Models.eps(x_t, t, states)` reads. Which files are accepted is
weights.py's policy; the loaded networks are handed to runtime.Models, which
hides their differences from the stages. Bring your own models: docs/models.md.

    models = load_models(cfg)                      # UNet, scheduler, VAE, condition, predictor
    models = load_models(cfg, predictor=False)     # what invert needs: no predictor
"""

from __future__ import annotations

import inspect
import os
from functools import partial
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.utils import logging as diffusers_logging

from cfgen.config import Config, guidance_gradient
from cfgen.device import pick_device, pick_dtype, use_gpu_math
from cfgen.errors import ConfigError, ModelLoadError
from cfgen.models.classifier import NoiseAwareClassifier, schedule_mismatch
from cfgen.models.latent import LatentCodec, PromptEncoder
from cfgen.models.predictors import (CLIP_STATS, ClipZeroShot, HFImageClassifier, ImagePreprocess, check_text_fits,
                                     label_columns)
from cfgen.models.runtime import Models
from cfgen.models.text import TEXT_ENCODER_FILE, CaptionEncoder
from cfgen.models.weights import check_weights, component_dir, pipeline_root, read_json, resolve_dir

if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":  # the CLI without --verbose (cli.QUIET_ENV); transformers
    diffusers_logging.disable_progress_bar()                # reads the variable itself, diffusers does not


def _from_pretrained(cls, path: Path, **kwargs):
    """cls.from_pretrained by local path; whatever goes wrong (garbage or wrong-shape weights, a config
    this class cannot take) is one line naming the directory, not a traceback. Never runs a model's own code."""
    try:
        return cls.from_pretrained(path, local_files_only=True, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - third-party loaders raise anything; the user's fix is the file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"cannot load a {cls.__name__} from {path}: {first}") from None


def load_unet(path: Path, trust_checkpoint: bool = False) -> UNet2DModel | UNet2DConditionModel:
    """A UNet2DModel, or a UNet2DConditionModel (text-conditioned, e.g. Stable Diffusion) by its config's class."""
    path = resolve_dir(path, "unet", "config.json")
    safe = check_weights(path, trust_checkpoint)
    conditional = read_json(path).get("_class_name") == "UNet2DConditionModel"
    cls = UNet2DConditionModel if conditional else UNet2DModel
    return _from_pretrained(cls, path, use_safetensors=safe)


def load_scheduler(path: Path) -> DDIMScheduler:
    path = resolve_dir(path, "scheduler", "scheduler_config.json")
    # Any DDPM/DDIM/PNDM-family config works: only its betas/alphas (and prediction_type) are used.
    try:
        config = dict(DDIMScheduler.load_config(path, local_files_only=True))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot read the scheduler config in {path}: {str(exc).splitlines()[0]}") from None
    if "timesteps" in config and "num_train_timesteps" not in config:  # the original google/ddpm-* configs
        config["num_train_timesteps"] = config.pop("timesteps")
    known = set(inspect.signature(DDIMScheduler.__init__).parameters)
    return DDIMScheduler.from_config({k: v for k, v in config.items() if k in known or k.startswith("_")})


def load_classifier(path: Path, trust_checkpoint: bool = False,
                    scheduler: DDIMScheduler | None = None) -> NoiseAwareClassifier:
    """The noise-aware classifier; with `scheduler` (guidance reads it at x_t), refused when it was trained
    under another noise schedule: its gradient at a level it never saw is silently wrong, not weaker."""
    path = resolve_dir(path, "classifier", "config.json")
    safe = check_weights(path, trust_checkpoint)
    if scheduler is not None and (why := schedule_mismatch(path, scheduler)):
        raise ModelLoadError(f"model.classifier {path} was trained under another noise schedule than "
                             f"model.scheduler ({why}); train one under this scheduler (`cfgen train classifier`)")
    return _from_pretrained(NoiseAwareClassifier, path, use_safetensors=safe)


def model_kind(cfg: Config) -> str:
    """'pixel' or 'latent': model.kind, or for 'auto' latent iff model.vae is set or the pipeline has vae/."""
    if cfg.model.kind != "auto":
        return cfg.model.kind
    return "latent" if cfg.model.vae or (pipeline_root(cfg.path(cfg.model.unet)) / "vae").is_dir() else "pixel"


def load_vae(path: Path, trust_checkpoint: bool = False) -> AutoencoderKL:
    path = resolve_dir(path, "vae", "config.json")
    safe = check_weights(path, trust_checkpoint)
    cls = read_json(path).get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ModelLoadError(f"{path}: the VAE must be a diffusers AutoencoderKL, found {cls}")
    return _from_pretrained(AutoencoderKL, path, use_safetensors=safe)


def load_codec(cfg: Config, device: torch.device) -> LatentCodec | None:
    """The frozen VAE of a latent model on `device`; None for a pixel model."""
    if model_kind(cfg) != "latent":
        return None
    vae = load_vae(component_dir(cfg, cfg.model.vae, "vae"), cfg.model.trust_checkpoint)
    return LatentCodec(vae.to(device).eval().requires_grad_(False))


def _transformers_model(path: Path, trust_checkpoint: bool, class_name: str, by_architecture: bool = False):
    """A transformers model of class `class_name` (e.g. AutoModelForImageClassification, CLIPModel); with
    by_architecture, the class its config names (CLIPTextModel, T5EncoderModel, ...) if transformers has it."""
    import transformers

    safe = check_weights(path, trust_checkpoint)
    cls = getattr(transformers, class_name)
    if by_architecture:
        arch = getattr(transformers, (read_json(path).get("architectures") or [""])[0], None)
        cls = arch if isinstance(arch, type) and hasattr(arch, "from_pretrained") else cls
    return _from_pretrained(cls, path, use_safetensors=safe, trust_remote_code=False)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise ModelLoadError(f"tokenizer directory not found: {path}")
    return _from_pretrained(AutoTokenizer, path, trust_remote_code=False)


def load_condition(cfg: Config, unet: torch.nn.Module,
                   device: torch.device) -> tuple[torch.Tensor | None, CaptionEncoder | PromptEncoder | None]:
    """(encoder states (1, L, D) of model.prompt, the caption encoder) for a UNet2DConditionModel; (None,
    None) for an unconditional UNet. A text_encoder.json beside unet/ names cfgen's frozen encoder
    (models/text.py); otherwise the transformers text_encoder/ and tokenizer/ (a Stable Diffusion layout)."""
    if not isinstance(unet, UNet2DConditionModel):
        return None, None
    if unet.config.addition_embed_type is not None or unet.config.class_embed_type is not None:
        raise ModelLoadError("UNet2DConditionModel with added (SDXL-style) or class conditioning is not supported")
    marker = pipeline_root(cfg.path(cfg.model.unet)) / TEXT_ENCODER_FILE
    if not cfg.model.text_encoder and marker.is_file():
        text = CaptionEncoder.from_file(marker)
    else:
        path = resolve_dir(component_dir(cfg, cfg.model.text_encoder, "text_encoder"), "text_encoder", "config.json")
        encoder = _transformers_model(path, cfg.model.trust_checkpoint, "AutoModel", by_architecture=True).eval()
        text = PromptEncoder(encoder, load_tokenizer(component_dir(cfg, cfg.model.tokenizer, "tokenizer")))
    cond = text.states([cfg.model.prompt])
    if cond.shape[-1] != unet.config.cross_attention_dim:
        raise ModelLoadError(f"text encoder width {cond.shape[-1]} != the UNet's cross_attention_dim "
                             f"{unet.config.cross_attention_dim}")
    return cond.to(device), text


def load_predictor(cfg: Config, classes: list[str],
                   scheduler: DDIMScheduler | None = None) -> tuple[torch.nn.Module, bool]:
    """(predictor, clean): the noise-aware classifier (clean = False) or a clean one on pixel images. Where
    guidance reads the classifier at x_t (gradient 'noisy', classifier mode), it must know `scheduler`'s noise
    levels; at t = 0 alone (gradient 'unet' / 'x0', or text mode's p(y*)) any schedule will do."""
    m = cfg.model
    if m.predictor == "noise_aware":
        noisy = cfg.guide.mode == "classifier" and guidance_gradient(m) == "noisy"
        classifier = load_classifier(cfg.path(m.classifier), m.trust_checkpoint, scheduler if noisy else None)
        if classifier.config.num_classes != len(classes):
            raise ModelLoadError(f"model.classifier {cfg.path(m.classifier)} has {classifier.config.num_classes} "
                                 f"outputs but the class list has {len(classes)} classes")
        return classifier, False
    path = cfg.path(m.predictor_path)
    if not path.exists():
        raise ModelLoadError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"no config.json in {path}")
    processor = read_json(path, "preprocessor_config.json", missing_ok=True)
    if m.predictor == "hf_classifier":
        model = _transformers_model(path, m.trust_checkpoint, "AutoModelForImageClassification").eval()
        try:
            columns = label_columns(model.config.id2label, classes)
        except ValueError as exc:
            raise ModelLoadError(f"model.predictor_path {path}: {exc}") from None
        size = getattr(model.config, "image_size", None) or cfg.data.image_size
        pre = ImagePreprocess.from_processor(processor, size, channels=getattr(model.config, "num_channels", 3))
        return HFImageClassifier(model, pre, columns), True
    if m.predictor == "clip_zero_shot":
        model = _transformers_model(path, m.trust_checkpoint, "CLIPModel").eval()
        if not hasattr(model, "get_text_features"):
            raise ModelLoadError(f"model.predictor_path {path}: clip_zero_shot needs a CLIPModel, found "
                                 f"{type(model).__name__}")
        pre = ImagePreprocess.from_processor(processor, model.config.vision_config.image_size, CLIP_STATS, 3)
        tokenizer = load_tokenizer(path)
        check_text_fits(tokenizer, [t.format(label_name=c) for t in m.clip_prompts for c in classes],
                        model.config.text_config.max_position_embeddings, "model.clip_prompts", path)
        return ClipZeroShot(model, tokenizer, pre, classes, m.clip_prompts), True
    raise ConfigError(f"model.predictor: unknown predictor {m.predictor!r}")


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


def load_models(cfg: Config, predictor: bool = True) -> Models:
    """Everything the stages need, on the configured device; `predictor=False` skips the predictor
    (invert never reads it), so `Models.classifier` is None."""
    from cfgen.data.sources import load_class_names

    device = pick_device(cfg.model.device)
    dtype = pick_dtype(cfg.model.dtype, device)
    channels_last = device.type == "cuda"  # faster convolutions on tensor cores; no gain on CPU
    use_gpu_math(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    trust = cfg.model.trust_checkpoint
    unet = load_unet(cfg.path(cfg.model.unet), trust).to(device, memory_format=fmt).eval().requires_grad_(False)
    scheduler = load_scheduler(cfg.path(cfg.model.scheduler))
    vae = load_codec(cfg, device)
    cond, text = load_condition(cfg, unet, device)
    classifier, clean = None, cfg.model.predictor != "noise_aware"
    if predictor:
        classifier, clean = load_predictor(cfg, load_class_names(cfg), scheduler)
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
    side = cfg.data.image_size // (1 if vae is None else vae.downscale)
    factor = 2 ** (len(unet.config.block_out_channels) - 1)  # every down block but the last halves the side
    if side % factor:
        raise ModelLoadError(f"data.image_size={cfg.data.image_size} does not fit the UNet: the side it denoises "
                             f"({side}) must be a multiple of {factor} (it was trained at {unet.config.sample_size})")
    if dtype == torch.bfloat16:
        # Stored in bf16, not only run under bf16 autocast: autocast caches its weight casts only for
        # leaves that require grad, and frozen weights do not, so every forward would re-cast every
        # weight. The diffusers networks only: a transformers predictor keeps fp32 buffers (pixel
        # statistics, text features) that its fp32 preprocessing reads.
        for net in (unet, vae, classifier if not clean else None):
            if net is not None:
                net.to(torch.bfloat16)
    if cfg.model.gradient_checkpointing:  # after .eval(): transformers layers are flagged as training
        for net in (unet, vae, classifier):
            if net is not None:
                enable_checkpointing(net)
    if cfg.model.compile:
        unet = torch.compile(unet)
        classifier = classifier if classifier is None else torch.compile(classifier)
        if vae is not None:  # the decoder runs in every guided step of a clean predictor ('x0' / 'unet')
            vae.vae.decoder = torch.compile(vae.vae.decoder)
    return Models(unet=unet, alphas_cumprod=scheduler.alphas_cumprod.to(device, torch.float64),
                  classifier=classifier, device=device, dtype=dtype, channels_last=channels_last, vae=vae,
                  cond=cond, text=text, prediction_type=scheduler.config.prediction_type, clean=clean,
                  gradient=guidance_gradient(cfg.model))
