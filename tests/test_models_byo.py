"""Bring your own models: every model kind end to end, on tiny random models saved to disk.

Each model is built here from a tiny config (nothing is downloaded),
`save_pretrained` to a temporary directory and loaded back by path through
`load_models`, exactly as a user's real checkpoint is: a pixel UNet in the
google/ddpm-* flat layout and in the unet/ + scheduler/ layout; a latent
Stable-Diffusion layout (UNet2DConditionModel, AutoencoderKL, CLIPTextModel +
tokenizer, a PNDM scheduler config); and the predictors: the noise-aware
classifier (also trained by `cfgen train classifier` on latents), a transformers
image classifier and CLIP zero-shot, with both clean-gradient variants.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import run_stages, tame, write_config
from cfgen.config import ConfigError, load_config
from cfgen.diffusion import (clean_log_prob_grad, eps_from_output, guided_reverse, invert, log_prob_grad,
                             timestep_grid, x0_estimate)
from cfgen.errors import ModelLoadError
from cfgen.models.loading import load_models, model_kind
from cfgen.models.predictors import ImagePreprocess, label_columns
from cfgen.shards import read_samples

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "triangle"]
WORDS = ["a", "photo", "of", *CLASSES]
SIZE = 16
N_IMAGES = 8

# The scheduler_config.json of google/ddpm-cifar10-32, verbatim: an old class name and key names.
GOOGLE_DDPM_SCHEDULER = {"_class_name": "GaussianDDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
                         "beta_start": 0.0001, "timesteps": 1000, "variance_type": "fixed_large"}
# The scheduler/ of a Stable Diffusion 1.x pipeline directory.
SD_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                "clip_sample": False}


# ----------------------------------------------------------------------------- tiny models on disk

def _tokenizer():
    """A CLIP BPE tokenizer whose merges spell each of WORDS as one token."""
    from cfgen.bench.random_models import bpe_tokenizer

    return bpe_tokenizer(WORDS, model_max_length=16)


def _pixel_unet():
    from diffusers import UNet2DModel

    return tame(UNet2DModel(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                             layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                             up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4))


def _save_sd(path: Path) -> None:
    """A Stable-Diffusion-layout pipeline directory: unet/ vae/ text_encoder/ tokenizer/ scheduler/."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tokenizer()
    tame(UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)).save_pretrained(path / "unet")
    # scaling_factor 4 gives this random VAE's latents unit std, as SD's 0.18215 does for SD's VAE
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=4, layers_per_block=1, sample_size=SIZE,
                  scaling_factor=4.0).save_pretrained(path / "vae")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                 bos_token_id=0, eos_token_id=1, pad_token_id=1)).save_pretrained(path / "text_encoder")
    tokenizer.save_pretrained(path / "tokenizer")
    (path / "scheduler").mkdir()
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER))


def _save_vit(path: Path) -> None:
    """A ViT image classifier at 32 px (the 16 px data is resized up), ImageNet-style stats."""
    from transformers import ViTConfig, ViTForImageClassification

    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=16,
                                        num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                        num_labels=3)).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))


def _save_clip(path: Path) -> None:
    """A CLIPModel with CLIP's processor layout: shortest edge 28, centre crop 24, bicubic."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = _tokenizer()
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer.get_vocab()), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=24, patch_size=8),
        projection_dim=16)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 28},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 24, "width": 24}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """Every tiny model, saved once: ddpm_flat/ ddpm_pipe/ sd/ clf_pixel/ vit/ clip/, plus data/."""
    from diffusers import DDIMScheduler

    from cfgen.data import shapes
    from cfgen.models.classifier import NoiseAwareClassifier

    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    unet = _pixel_unet()
    unet.save_pretrained(root / "ddpm_flat")  # google/ddpm-cifar10-32: config + weights + scheduler at the top
    (root / "ddpm_flat" / "scheduler_config.json").write_text(json.dumps(GOOGLE_DDPM_SCHEDULER))
    unet.save_pretrained(root / "ddpm_pipe" / "unet")
    DDIMScheduler(beta_schedule="linear", clip_sample=False).save_pretrained(root / "ddpm_pipe" / "scheduler")
    _save_sd(root / "sd")
    NoiseAwareClassifier(in_channels=3, num_classes=3, sample_size=SIZE, channels=(8, 8),
                         groups=4).save_pretrained(root / "clf_pixel")
    _save_vit(root / "vit")
    _save_clip(root / "clip")
    for i in range(N_IMAGES):  # a folder dataset: root/<class>/<name>.png
        f = shapes.factors(i, 0.9)
        (root / "data" / CLASSES[f.label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(shapes.render(f, f.label, SIZE, 3)).save(root / "data" / CLASSES[f.label] / f"s{i}.png")
    return root


def _config(zoo: Path, tmp: Path, model: dict, **sections):
    """A pipeline TOML on the zoo's folder dataset, written to disk and loaded as a user's would be."""
    table = {
        "pipeline": {"name": "byo"},
        "data": {"source": "folder", "root": str(zoo / "data"), "image_size": SIZE, "channels": 3, "shard_size": 4},
        "model": {"device": "cpu", "classifier": str(zoo / "clf_pixel"),
                  **{k: str(v) if isinstance(v, Path) else v for k, v in model.items()}},
        "invert": {"steps": 5, "t_inv": 0.5, "batch_size": 3},
        "guide": {"scale": 4.0, "escalation": [16.0], "batch_size": 3},
        "pack": {"caption": "a photo of a {label_name}."},
    }
    return write_config(tmp / "pipeline.toml", table, sections)


_run = run_stages


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _check_run(cfg, run_dir: Path, stats: dict, noise_shape: tuple, pixel_gain: bool = True) -> list[dict]:
    """The output contract holds and guidance moved the images; returns the guide samples' metadata."""
    assert stats["count"] == N_IMAGES and stats["pairs"] == N_IMAGES and stats["failed"] == 0
    noises = [s["noise.npy"] for s in read_samples(run_dir / "invert" / "invert-000000.tar")]
    assert np.load(io.BytesIO(noises[0])).shape == noise_shape
    guided = [s for i in (0, 1) for s in read_samples(run_dir / "guide" / f"guide-{i:06d}.tar")]
    assert len(guided) == N_IMAGES
    models = load_models(cfg)
    changed, gain = [], []
    for s in guided:
        f, cf, recon = _png(s["png"]), _png(s["cf.png"]), _png(s["recon.png"])
        assert f.shape == cf.shape == recon.shape == (SIZE, SIZE, 3)
        meta = json.loads(s["json"])
        changed.append(np.abs(cf.astype(int) - recon.astype(int)).mean())
        x = torch.from_numpy(np.stack([cf, recon])).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            p = torch.softmax(models.predict(x), -1)[:, meta["cf_label"]]
        assert float(p[0]) == pytest.approx(meta["p_cf"], abs=1e-6)  # p_cf is the stored image's
        gain.append(float(p[0] - p[1]))
    pairs = [s for s in read_samples(run_dir / "pairs" / "pairs-000000.tar")]
    assert {k for k in pairs[0] if not k.startswith("__")} == {"png", "txt", "cls", "cf.png", "cf.txt", "cf.cls",
                                                                 "json"}
    assert min(changed) > 0, "guidance must change every counterfactual relative to its s = 0 reconstruction"
    assert not pixel_gain or np.mean(gain) > 0, "guidance must raise the predictor's p(y*) over the s = 0 reconstruction"
    return [json.loads(s["json"]) for s in guided]


# ----------------------------------------------------------------------------- end to end, per model kind

@pytest.mark.parametrize("layout,predictor,gradient", [
    ("ddpm_flat", "noise_aware", "unet"),
    ("ddpm_pipe", "hf_classifier", "unet"),
    ("ddpm_pipe", "hf_classifier", "x0"),
])
def test_pixel_models_end_to_end(zoo, tmp_path, layout, predictor, gradient):
    model = {"unet": zoo / layout, "scheduler": zoo / layout, "classifier": zoo / "clf_pixel",
             "predictor": predictor, "gradient": gradient}
    if predictor != "noise_aware":
        model["predictor_path"] = zoo / "vit"
    cfg = _config(zoo, tmp_path, model)
    assert model_kind(cfg) == "pixel"
    metas = _check_run(cfg, tmp_path / "run", _run(cfg, tmp_path / "run"), noise_shape=(3, SIZE, SIZE))
    # the s = 0 round trip of a pixel model: back to the factual image within a few grey levels
    assert max(m["recon_l1"] for m in metas) < 0.01


@pytest.mark.parametrize("predictor,gradient", [("clip_zero_shot", "x0"), ("clip_zero_shot", "unet"),
                                                ("hf_classifier", "x0")])
def test_latent_model_end_to_end(zoo, tmp_path, predictor, gradient):
    path = zoo / ("clip" if predictor == "clip_zero_shot" else "vit")
    cfg = _config(zoo, tmp_path, {"unet": zoo / "sd", "scheduler": zoo / "sd", "prompt": "a photo",
                                  "predictor": predictor, "predictor_path": path, "gradient": gradient})
    assert model_kind(cfg) == "latent"  # inferred from sd/vae/
    _check_run(cfg, tmp_path / "run", _run(cfg, tmp_path / "run"), noise_shape=(4, SIZE // 2, SIZE // 2))


def test_latent_model_with_localized_edits(zoo, tmp_path):
    """guide.mask on a latent model: the mask lives in latent space (the factual latent's trajectory outside
    it); the run keeps the contract and records the share of the latent each edit could touch."""
    cfg = _config(zoo, tmp_path, {"unet": zoo / "sd", "scheduler": zoo / "sd", "prompt": "a photo",
                                  "predictor": "clip_zero_shot", "predictor_path": zoo / "clip", "gradient": "x0"},
                  guide={"scale": 4.0, "escalation": [16.0], "batch_size": 3, "mask": "x0", "mask_threshold": 0.3,
                         "mask_dilation": 1, "mask_blur": 1, "mask_start": 0.0})
    stats = _run(cfg, tmp_path / "run")
    _check_run(cfg, tmp_path / "run", stats, noise_shape=(4, SIZE // 2, SIZE // 2), pixel_gain=False)
    rows = pq.read_table(tmp_path / "run" / "pairs" / "manifest.parquet").to_pylist()
    shares = [r["mask_fraction"] for r in rows]
    latent_cells = (SIZE // 2) ** 2
    assert all(0 < f <= 1 and (f * latent_cells) == pytest.approx(round(f * latent_cells)) for f in shares)
    assert stats["mean_mask_fraction"] < 1.0


def test_latent_model_under_bf16_autocast(zoo, tmp_path):
    """model.dtype = bf16 on the CPU: UNet, VAE and CLIP under bf16 autocast, the DDIM update in fp32;
    finite outputs, the contract, and guidance still raising p(y*) over the s = 0 reconstruction."""
    cfg = _config(zoo, tmp_path, {"unet": zoo / "sd", "scheduler": zoo / "sd", "prompt": "a photo", "dtype": "bf16",
                                  "predictor": "clip_zero_shot", "predictor_path": zoo / "clip", "gradient": "x0"})
    assert load_models(cfg).dtype == torch.bfloat16
    metas = _check_run(cfg, tmp_path / "run", _run(cfg, tmp_path / "run"), noise_shape=(4, SIZE // 2, SIZE // 2))
    assert all(np.isfinite([m["p_cf"], m["l1"], m["recon_l1"]]).all() for m in metas)


def test_latent_noise_aware_classifier_trained_by_cfgen(zoo, tmp_path):
    """`cfgen train classifier` on a latent model learns p(y | z_t, t) on the VAE latents, then guides."""
    from cfgen.models.training import train_classifier

    cfg = _config(zoo, tmp_path, {"unet": zoo / "sd" / "unet", "scheduler": zoo / "sd" / "scheduler",
                                  "classifier": tmp_path / "latent_clf"},
                  train={"classifier": {"steps": 4, "batch_size": 4, "channels": [8, 8], "test_fraction": 0.5}})
    report = train_classifier(cfg)
    assert report["train_samples"] + report["test_samples"] == N_IMAGES
    saved = json.loads((tmp_path / "latent_clf" / "config.json").read_text())
    assert (saved["in_channels"], saved["sample_size"]) == (4, SIZE // 2)  # latents, not pixels
    # Through PNG quantisation and a re-encode by the zoo's random VAE (which does not give its latents
    # back) the guidance of a classifier trained 4 steps is below noise; check it where it acts, on latents.
    _check_run(cfg, tmp_path / "run", _run(cfg, tmp_path / "run"), noise_shape=(4, SIZE // 2, SIZE // 2),
               pixel_gain=False)
    models = load_models(cfg)
    guided = list(read_samples(tmp_path / "run" / "guide" / "guide-000000.tar"))
    inverted = {s["__key__"]: s for s in read_samples(tmp_path / "run" / "invert" / "invert-000000.tar")}
    u = torch.from_numpy(np.stack([np.load(io.BytesIO(inverted[s["__key__"]]["noise.npy"])) for s in guided]))
    target = torch.tensor([json.loads(s["json"])["cf_label"] for s in guided])
    grid = timestep_grid(models.num_train_timesteps, cfg.invert.steps, cfg.invert.t_inv)
    t0 = torch.zeros(len(guided), dtype=torch.long)
    logp = []
    for scale in (0.0, cfg.guide.scale):
        z = guided_reverse(models.eps, models.logits, u, models.alphas_cumprod, grid, target=target, scale=scale)
        with torch.no_grad():
            logp.append(torch.log_softmax(models.logits(z, t0), -1)[torch.arange(len(guided)), target])
    assert float((logp[1] - logp[0]).mean()) > 0, "guidance must raise log p(y*) of the latents it ends at"


def test_latent_round_trip_at_s0(zoo, tmp_path):
    """Invert then reconstruct with s = 0 in latent space: the DDIM path adds (almost) nothing to the
    VAE's own encode-decode error, which is what bounds a latent model's reconstruction."""
    cfg = _config(zoo, tmp_path, {"unet": zoo / "sd", "scheduler": zoo / "sd"}, invert={"steps": 25, "t_inv": 0.6})
    models = load_models(cfg)
    from cfgen.data.sources import list_samples

    images = torch.from_numpy(np.stack([r.load() for r in list_samples(cfg)])).permute(0, 3, 1, 2).float() / 127.5 - 1
    grid = timestep_grid(models.num_train_timesteps, 25, 0.6)
    with torch.no_grad():
        z = models.encode(images)
        z_rec = guided_reverse(models.eps, None, invert(models.eps, z, models.alphas_cumprod, grid),
                               models.alphas_cumprod, grid)
        latent_err = float((z_rec - z).abs().mean() / z.abs().mean())
        vae_l1 = float((models.decode(z).clamp(-1, 1) - images).abs().mean() / 2)
        recon_l1 = float((models.decode(z_rec).clamp(-1, 1) - images).abs().mean() / 2)
    print(f"latent round trip: relative latent L1 {latent_err:.2e}, pixel recon L1 {recon_l1:.5f}, "
          f"VAE encode-decode L1 {vae_l1:.5f}")
    assert latent_err < 1e-3
    assert abs(recon_l1 - vae_l1) < 1e-3 * vae_l1


# ----------------------------------------------------------------------------- the gradient variants

def test_clean_gradients_by_hand():
    """eps(x) = c x and a linear predictor: both variants against their closed forms (float64).

    x0 = x (1 - sqrt(1-a) c) / sqrt(a) = k x;  grad_x0 log p(y|x0) = W^T (onehot(y) - softmax(W x0 + b))
    'x0':   g = grad_x0 log p / sqrt(a)      'unet':  g = k grad_x0 log p   (the chain rule through eps)
    """
    gen = torch.Generator().manual_seed(0)
    a, c = 0.7, 0.3
    x = torch.randn(2, 1, 2, 2, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(3, generator=gen, dtype=torch.float64)
    y = torch.tensor([2, 0])
    eps_fn = lambda x, t: c * x  # noqa: E731
    predictor = lambda x0: x0.flatten(1) @ w.T + b  # noqa: E731
    t = torch.zeros(2, dtype=torch.long)
    k = (1 - (1 - a) ** 0.5 * c) / a ** 0.5
    x0 = (k * x).flatten(1).numpy()
    logits = x0 @ w.numpy().T + b.numpy()
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad_x0 = (np.eye(3)[y.numpy()] - p) @ w.numpy()
    e, g_x0 = clean_log_prob_grad(eps_fn, predictor, x, t, a, y, through_unet=False)
    _, g_unet = clean_log_prob_grad(eps_fn, predictor, x, t, a, y, through_unet=True)
    np.testing.assert_allclose(e.numpy(), c * x.numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(g_x0.flatten(1).numpy(), grad_x0 / a ** 0.5, rtol=1e-12)
    np.testing.assert_allclose(g_unet.flatten(1).numpy(), k * grad_x0, rtol=1e-12)


@pytest.fixture(scope="module")
def latent_vit(zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("latent_vit")
    return load_models(_config(zoo, tmp, {"unet": zoo / "sd", "scheduler": zoo / "sd", "predictor": "hf_classifier",
                                          "predictor_path": zoo / "vit"}))


def test_clean_gradients_through_real_models(latent_vit):
    """On the tiny SD + ViT: 'x0' = grad_z0 log p(y | vae.decode(z0)) / sqrt(a_t), computed independently;
    'unet' = the gradient of the derived noise-aware predictor p(y | x_t, t) = Models.logits."""
    m = latent_vit
    gen = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=gen)
    t = torch.full((2,), 500, dtype=torch.long)
    a = float(m.alphas_cumprod[500])
    y = torch.tensor([1, 2])
    e, g_x0 = clean_log_prob_grad(m.eps, m.x0_logits, x_t, t, a, y, through_unet=False)
    _, g_unet = clean_log_prob_grad(m.eps, m.x0_logits, x_t, t, a, y, through_unet=True)

    with torch.no_grad():
        e_ref = m.unet(x_t, t, encoder_hidden_states=m.cond.expand(2, -1, -1)).sample
    z0 = ((x_t - (1 - a) ** 0.5 * e_ref) / a ** 0.5).requires_grad_(True)
    pixels = m.vae.vae.decode(z0 / m.vae.vae.config.scaling_factor).sample
    logp = torch.log_softmax(m.classifier(pixels), -1)[torch.arange(2), y].sum()
    (ref,) = torch.autograd.grad(logp, z0)
    torch.testing.assert_close(e, e_ref, rtol=0, atol=0)
    scale = float(ref.abs().max())
    torch.testing.assert_close(g_x0, ref / a ** 0.5, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(g_unet, log_prob_grad(m.logits, x_t, t, y), rtol=1e-5, atol=1e-5 * scale)
    # the two variants are different gradients: dropping d eps / d x_t matters
    assert float((g_unet - g_x0).norm() / g_x0.norm()) > 1e-3


def test_noise_aware_classifier_read_at_t0_on_the_x0_estimate():
    """model.gradient='x0' with the shipped noise-aware classifier: g = grad_x0 log p(y | x0, t=0) / sqrt(a_t),
    computed independently; 'auto' keeps the noisy gradient at x_t for a noise-aware classifier."""
    digits = ROOT / "pipelines" / "digits.toml"
    assert load_models(load_config(digits)).guidance[1] == "noisy"
    m = load_models(load_config(digits, ["model.gradient=x0"]))
    classifier, gradient = m.guidance
    assert gradient == "x0"
    gen = torch.Generator().manual_seed(2)
    x_t = torch.randn(3, 1, 8, 8, generator=gen)
    t = torch.full((3,), 400, dtype=torch.long)
    a = float(m.alphas_cumprod[400])
    y = torch.tensor([3, 1, 7])
    e, g = clean_log_prob_grad(m.eps, classifier, x_t, t, a, y, through_unet=False)
    with torch.no_grad():
        e_ref = m.unet(x_t, t).sample
    x0 = ((x_t - (1 - a) ** 0.5 * e_ref) / a ** 0.5).requires_grad_(True)
    logp = torch.log_softmax(m.classifier(x0, torch.zeros(3, dtype=torch.long)), -1)[torch.arange(3), y].sum()
    (ref,) = torch.autograd.grad(logp, x0)
    torch.testing.assert_close(e, e_ref, rtol=0, atol=0)
    torch.testing.assert_close(g, ref / a ** 0.5, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradient(zoo, tmp_path):
    """With model.gradient_checkpointing, UNet, VAE decoder and CLIP layers run twice (forward, recompute)
    during a guidance step; the gradient is unchanged."""
    model = {"unet": zoo / "sd", "scheduler": zoo / "sd", "predictor": "clip_zero_shot", "predictor_path": zoo / "clip"}
    grads, calls = [], []
    for ckpt in (False, True):
        m = load_models(_config(zoo, tmp_path, {**model, "gradient_checkpointing": ckpt}))
        count = {"unet": 0, "decoder": 0, "clip": 0}
        hooked = {"unet": m.unet.down_blocks[0].resnets[0], "decoder": m.vae.vae.decoder.up_blocks[0].resnets[0],
                  "clip": m.classifier.vision_model.encoder.layers[0].layer_norm1}
        for name, module in hooked.items():  # count forward calls (a checkpoint's recompute skips module hooks)
            def counted(*args, name=name, forward=module.forward, **kwargs):
                count[name] += 1
                return forward(*args, **kwargs)
            module.forward = counted
        x_t = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(2))
        t = torch.full((2,), 300, dtype=torch.long)
        _, g = clean_log_prob_grad(m.eps, m.x0_logits, x_t, t, float(m.alphas_cumprod[300]), torch.tensor([0, 1]))
        grads.append(g)
        calls.append(dict(count))
    assert calls == [{"unet": 1, "decoder": 1, "clip": 1}, {"unet": 2, "decoder": 2, "clip": 2}]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8)


def test_scheduler_configs_of_other_families(zoo, tmp_path):
    """google/ddpm-*'s original config (legacy 'timesteps' key) and SD's PNDM config give their own alphas."""
    from diffusers import DDPMScheduler, PNDMScheduler

    from cfgen.models.loading import load_scheduler

    google = load_scheduler(zoo / "ddpm_flat")
    torch.testing.assert_close(google.alphas_cumprod, DDPMScheduler(beta_schedule="linear").alphas_cumprod,
                               rtol=0, atol=0)
    legacy = dict(GOOGLE_DDPM_SCHEDULER, timesteps=4000)
    (tmp_path / "scheduler_config.json").write_text(json.dumps(legacy))
    assert load_scheduler(tmp_path).alphas_cumprod.shape == (4000,)
    sd = load_scheduler(zoo / "sd")
    torch.testing.assert_close(sd.alphas_cumprod, PNDMScheduler.from_config(SD_SCHEDULER).alphas_cumprod,
                               rtol=0, atol=0)
    assert sd.config.prediction_type == "epsilon"


def test_eps_from_v_and_x0_predictions():
    gen = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=gen,
                                                                                        dtype=torch.float64)
    a = 0.37
    x_t = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps
    v = a ** 0.5 * eps - (1 - a) ** 0.5 * x0
    torch.testing.assert_close(eps_from_output(v, x_t, a, "v_prediction"), eps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eps_from_output(x0, x_t, a, "sample"), eps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x0_estimate(x_t, eps_from_output(v, x_t, a, "v_prediction"), a), x0,
                               rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- predictors

def test_preprocessing_matches_the_transformers_processors(zoo):
    """The differentiable preprocessing gives what the library's (PIL) processors give on the stored images."""
    from transformers import CLIPImageProcessorPil, ConvNextImageProcessorPil, ViTImageProcessorPil

    from cfgen.data.sources import list_samples

    cfg = load_config(None, ["data.source=folder", f"data.root={zoo / 'data'}", f"data.image_size={SIZE}",
                             "data.channels=3"])
    pixels = np.stack([r.load() for r in list_samples(cfg)])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    # PIL resizes uint8 images (rounding to grey levels). Its bilinear kernel is torch's; its bicubic
    # upsampling differs from torch's (and torchvision's, transformers' default backend) by up to ~10
    # grey levels at the shapes' sharp edges, 0.3 on average. A crop off by one pixel is 13 grey levels
    # off on average, a missing crop 11.
    convnext = {"size": 24, "crop_pct": 0.875, "resample": 3, "do_resize": True, "do_normalize": True,
                "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}  # resize 27, crop 24
    for name, proc_cls, size, max_grey in (("vit", ViTImageProcessorPil, 32, 1.5),
                                           ("clip", CLIPImageProcessorPil, 24, 12.0),
                                           ("convnext", ConvNextImageProcessorPil, 24, 12.0)):
        p = convnext if name == "convnext" else json.loads((zoo / name / "preprocessor_config.json").read_text())
        ours = ImagePreprocess.from_processor(p, size)(x)
        ref = proc_cls(**{k: v for k, v in p.items() if k != "image_processor_type"})(
            images=[Image.fromarray(a) for a in pixels], return_tensors="pt").pixel_values
        assert ours.shape == ref.shape
        grey = 1 / 255 / min(p["image_std"])
        assert float((ours - ref).abs().max()) < max_grey * grey
        assert float((ours - ref).abs().mean()) < 0.5 * grey


def test_clip_zero_shot_logits_are_clips_own(zoo, tmp_path):
    from transformers import CLIPModel

    from cfgen.models.predictors import CLIP_STATS

    m = load_models(_config(zoo, tmp_path, {"unet": zoo / "ddpm_pipe", "scheduler": zoo / "ddpm_pipe",
                                            "predictor": "clip_zero_shot", "predictor_path": zoo / "clip",
                                            "clip_prompts": ["a photo of a {label_name}."]}))
    clip = CLIPModel.from_pretrained(zoo / "clip", local_files_only=True).eval()
    tok = _tokenizer()
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4)) * 2 - 1
    pre = ImagePreprocess.from_processor(json.loads((zoo / "clip" / "preprocessor_config.json").read_text()), 24,
                                         CLIP_STATS, 3)
    with torch.no_grad():
        ref = clip(**tok([f"a photo of a {c}." for c in CLASSES], padding=True, return_tensors="pt"),
                   pixel_values=pre(x)).logits_per_image
        ours = m.predict(x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_label_columns():
    imagenet_like = {0: "tench, Tinca tinca", 1: "great white shark", 2: "Square", 3: "triangle, trigon", 4: "circle"}
    assert label_columns(imagenet_like, ["circle", "square", "triangle"]) == [4, 2, 3]
    assert label_columns(imagenet_like, ["tench", "great_white_shark"]) == [0, 1]
    assert label_columns({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, CLASSES) is None  # generic names: as is
    assert label_columns({0: "circle", 1: "square", 2: "triangle"}, CLASSES) is None  # same order
    # ImageNet's list has duplicate names (two 'crane's): renamed in place, the order is kept
    assert label_columns({0: "crane", 1: "tench", 2: "crane"}, ["crane", "tench", "crane (2)"]) is None
    assert label_columns({0: "square", 1: "circle", 2: "triangle"}, CLASSES) == [1, 0, 2]
    with pytest.raises(ValueError, match="class 'hexagon' is not among the classifier's 5 labels"):
        label_columns(imagenet_like, ["circle", "hexagon"])


# ----------------------------------------------------------------------------- checkpoints and errors

def _to_pickle(src: Path, dst: Path) -> Path:
    """A copy of a model directory whose safetensors weights are replaced by a pickle file."""
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    for name, pickled in (("model.safetensors", "pytorch_model.bin"),
                          ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")):
        if (dst / name).is_file():
            torch.save(load_file(dst / name), dst / pickled)
            (dst / name).unlink()
            return dst / pickled
    raise AssertionError(f"no safetensors in {src}")


@pytest.mark.parametrize("component", ["vae", "text_encoder", "hf_classifier", "clip_zero_shot"])
def test_pickle_checkpoints_of_new_kinds_need_trust(zoo, tmp_path, component):
    model = {"unet": zoo / "sd", "scheduler": zoo / "sd"}
    if component in ("vae", "text_encoder"):
        model[component] = tmp_path / component
        pickled = _to_pickle(zoo / "sd" / component, tmp_path / component)
    else:
        pickled = _to_pickle(zoo / ("vit" if component == "hf_classifier" else "clip"), tmp_path / component)
        model.update(predictor=component, predictor_path=tmp_path / component)
    with pytest.raises(ModelLoadError) as err:
        load_models(_config(zoo, tmp_path, model))
    assert str(err.value) == (f"{pickled} is a pickle checkpoint, which can run code when loaded; "
                              "convert it to safetensors or pass --trust-checkpoint")
    models = load_models(_config(zoo, tmp_path, {**model, "trust_checkpoint": True}))
    assert models.vae is not None and models.cond.shape == (1, 16, 16)


def test_missing_components_are_one_line_errors(zoo, tmp_path):
    sd = tmp_path / "sd"
    shutil.copytree(zoo / "sd", sd)
    shutil.rmtree(sd / "tokenizer")
    (sd / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    cfg = _config(zoo, tmp_path, {"unet": sd, "scheduler": sd})
    with pytest.raises(ModelLoadError, match=r"^no weights file \(diffusion_pytorch_model.safetensors or "
                                             r"model.safetensors\) in .*/sd/vae$"):
        load_models(cfg)
    shutil.copy(zoo / "sd" / "vae" / "diffusion_pytorch_model.safetensors", sd / "vae")
    with pytest.raises(ModelLoadError) as err:
        load_models(cfg)
    assert str(err.value) == f"tokenizer directory not found: {sd / 'tokenizer'}"
    cfg = _config(zoo, tmp_path, {"unet": zoo / "sd", "scheduler": zoo / "sd", "predictor": "clip_zero_shot",
                                  "predictor_path": tmp_path / "nowhere"})
    with pytest.raises(ModelLoadError) as err:
        load_models(cfg)
    assert str(err.value) == f"model directory not found: {tmp_path / 'nowhere'}"


def test_model_config_validation(tmp_path):
    for sets, message in (
        (["model.kind=vector"], "model.kind: expected 'auto', 'pixel' or 'latent', got 'vector'"),
        (["model.predictor=clip_zero_shot"], "model.predictor='clip_zero_shot' needs model.predictor_path"),
        (["model.predictor=clip_zero_shot", "model.predictor_path=/x", "model.gradient=noisy"],
         "model.gradient='noisy' needs a noise-aware classifier"),
        (["model.gradient=both"], "model.gradient: expected 'auto', 'noisy', 'unet' or 'x0', got 'both'"),
        (["model.clip_prompts=['a photo']"], "model.clip_prompts: give one or more templates, each containing"),
        (["model.kind=pixel", "model.vae=/x"], "model.vae is set but model.kind='pixel'"),
    ):
        with pytest.raises(ConfigError) as err:
            load_config(ROOT / "pipelines" / "digits.toml", sets)
        assert str(err.value).startswith(message)


# ----------------------------------------------------------------------------- the recipes in pipelines/

RECIPES = {"cifar10.toml": ("pixel", "noise_aware", "weights/ddpm-cifar10-32"),
           "sd-clip.toml": ("latent", "clip_zero_shot", "weights/stable-diffusion-v1-5"),
           "imagenet.toml": ("latent", "hf_classifier", "weights/stable-diffusion-v1-5")}


def _recipe_copy(name: str, tmp: Path) -> Path:
    """The recipe in a fresh tree, so its ../weights/ is missing even where a user has downloaded them."""
    (tmp / "pipelines").mkdir()
    return Path(shutil.copy(ROOT / "pipelines" / name, tmp / "pipelines" / name))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_validate_and_name_their_missing_weights(name, tmp_path):
    kind, predictor, weights = RECIPES[name]
    text = (ROOT / "pipelines" / name).read_text()
    assert "download" in text and "Memory (an estimate" in text  # each documents its weights and memory
    cfg = load_config(_recipe_copy(name, tmp_path))
    assert (cfg.model.kind, cfg.model.predictor) == (kind, predictor)
    assert cfg.path(cfg.model.unet) == tmp_path / weights
    with pytest.raises(ModelLoadError) as err:
        load_models(cfg)
    assert str(err.value) == f"model directory not found: {tmp_path / weights}"


def test_recipe_without_weights_exits_2_with_one_line(tmp_path):
    recipe = _recipe_copy("cifar10.toml", tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "cfgen", "invert", "--config", str(recipe), "--out", str(tmp_path / "run"),
         "--set", "data.source=shapes", "--set", "data.classes=", "--set", "data.limit=2"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == f"cfgen: error: model directory not found: {tmp_path / 'weights' / 'ddpm-cifar10-32'}"


def test_clip_prompt_longer_than_the_text_encoder_is_one_line(zoo, tmp_path):
    """The tiny CLIP holds 16 positions; a prompt template past that is a config error before any work."""
    from cfgen.errors import ConfigError

    long = "a photo of a " * 8 + "{label_name}."
    cfg = _config(zoo, tmp_path, {"unet": zoo / "sd", "scheduler": zoo / "sd", "predictor": "clip_zero_shot",
                                  "predictor_path": zoo / "clip", "clip_prompts": [long]})
    with pytest.raises(ConfigError) as err:
        load_models(cfg)
    assert str(err.value).startswith("model.clip_prompts: 'a photo of a a photo of a ")
    assert str(err.value).endswith(f"tokens; the text encoder in {zoo / 'clip'} holds 16")
