"""Clean predictors p(y | x0): classifiers that know nothing of noise, used on the x0-estimate.

Two kinds, by `model.predictor` (the noise-aware p(y | x_t, t) of `cfgen
train classifier` lives in classifier.py):

- `hf_classifier`: any transformers image-classification model on disk
  (`AutoModelForImageClassification`: ViT, ConvNeXt, BEiT, Swin, ...). Its
  logits are restricted to the dataset's classes (`label_columns`).
- `clip_zero_shot`: a transformers `CLIPModel`; logit of class c =
  CLIP's logit scale * cos(image feature, text feature of c), the text
  feature being the mean of the normalized features of `model.clip_prompts`
  filled with the class name (CLIP's prompt ensembling).

Both take pixel images in [-1, 1] (B, C, H, W) and return (B, num_classes)
logits, differentiably: `ImagePreprocess` does what the model's transformers
image processor does (resize, centre crop, normalize, read from
`preprocessor_config.json`) with tensor ops, so a gradient reaches the pixels.
`Models.logits` / `Models.x0_logits` (loading.py) feed them the decoded
x0-estimate during guidance and the stored images for p_cf.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cfgen.errors import ConfigError

# PIL resampling codes (transformers processors store them) -> torch interpolation modes.
_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}
IMAGENET_STANDARD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
"""transformers' default mean/std (ViT), used when a checkpoint has no preprocessor_config.json."""
CLIP_STATS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
"""OpenAI CLIP's pixel mean and std, for checkpoints without a preprocessor_config.json."""


def _side(value) -> tuple[int, int]:
    """A processor size (int, or a dict: shortest_edge / longest_edge / height+width) as (h, w) for a square input."""
    if isinstance(value, int):
        return value, value
    if "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    side = int(value.get("shortest_edge") or value.get("longest_edge"))
    return side, side


def _per_channel(values, channels: int) -> list[float]:
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    return values if len(values) == channels else [sum(values) / len(values)] * channels


class ImagePreprocess(nn.Module):
    """A transformers image processor as differentiable tensor ops, for square inputs in [-1, 1].

    [-1, 1] -> [0, 1] -> the model's channels -> resize -> centre crop -> (x - mean) / std.
    """

    def __init__(self, resize: tuple[int, int] | None, crop: tuple[int, int] | None, mean, std,
                 mode: str = "bilinear", channels: int = 3):
        super().__init__()
        self.resize, self.crop, self.mode, self.channels = resize, crop, mode, channels
        # RGB statistics (the processor default) for a one-channel model: their average, or the
        # normalisation would broadcast a grey image to three channels
        mean, std = (_per_channel(v, channels) for v in (mean, std))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def from_processor(cls, p: dict, default_size: int, default_stats=IMAGENET_STANDARD, default_resample: int = 2,
                       channels: int = 3) -> "ImagePreprocess":
        """From a preprocessor_config.json dict ({} = the defaults: resize to default_size, no crop)."""
        resize = crop = None
        size = p.get("size", default_size)
        if p.get("do_resize", True):
            resize = _side(size)
            pct = p.get("crop_pct")
            if pct and (isinstance(size, int) or "shortest_edge" in size) and resize[0] < 384:
                crop, resize = resize, (int(resize[0] / pct),) * 2  # ConvNeXt: resize up by 1/crop_pct, crop back
        if crop is None and p.get("do_center_crop") and p.get("crop_size"):
            crop = _side(p["crop_size"])
        mode = _RESAMPLE.get(p.get("resample", default_resample), "bilinear")
        return cls(resize, crop, *cls._stats(p, default_stats), mode, channels)

    @staticmethod
    def _stats(p: dict, default_stats) -> tuple:
        if not p.get("do_normalize", True):
            return (0.0,) * 3, (1.0,) * 3
        return tuple(p.get("image_mean", default_stats[0])), tuple(p.get("image_std", default_stats[1]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images + 1.0) / 2.0
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and self.channels == 1:
            x = x.mean(dim=1, keepdim=True)
        if self.resize is not None and tuple(x.shape[-2:]) != self.resize:
            smooth = self.mode != "nearest"
            # PIL clips bicubic overshoot to [0, 255]; clip it to [0, 1] here too, or to the input's own
            # range where an x0-estimate already leaves [0, 1] (per sample, no gradient through the bounds)
            lo = x.detach().amin(dim=(1, 2, 3), keepdim=True).clamp(max=0.0)
            hi = x.detach().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1.0)
            x = F.interpolate(x, size=self.resize, mode=self.mode, antialias=smooth,
                              align_corners=False if smooth else None)
            x = torch.maximum(torch.minimum(x, hi), lo)
        if self.crop is not None:
            h, w = x.shape[-2:]
            top, left = (h - self.crop[0]) // 2, (w - self.crop[1]) // 2
            x = x[:, :, top: top + self.crop[0], left: left + self.crop[1]]
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def label_columns(id2label: dict, classes: list[str]) -> list[int] | None:
    """Which of the classifier's outputs is each dataset class; None = the same order (identity).

    A class matches a label, or one of its comma-separated synonyms ('tench, Tinca tinca'),
    ignoring case and '_' vs ' '. With as many classes as labels and no class matched to
    another position (generic LABEL_i names, the classifier's own list, or that list with
    duplicates renamed), the order is kept. Otherwise every class must match.
    """
    def norm(text: str) -> str:
        return " ".join(str(text).replace("_", " ").lower().split())

    index: dict[str, int] = {}
    for i, label in sorted((int(k), v) for k, v in id2label.items()):
        for name in (label, *str(label).split(",")):
            index.setdefault(norm(name), i)
    found = [index.get(norm(c)) for c in classes]
    if len(classes) == len(id2label) and all(f is None or f == i for i, f in enumerate(found)):
        return None
    missing = [c for c, f in zip(classes, found) if f is None]
    if missing:
        raise ValueError(f"class {missing[0]!r} is not among the classifier's {len(id2label)} labels "
                         f"({len(missing)} of {len(classes)} classes unmatched)")
    if len(set(found)) != len(found):
        raise ValueError("two dataset classes map to the same classifier label")
    return found


class HFImageClassifier(nn.Module):
    """A transformers image-classification model as a clean predictor over the dataset's classes."""

    def __init__(self, model: nn.Module, preprocess: ImagePreprocess, columns: list[int] | None = None):
        super().__init__()
        self.model, self.preprocess = model, preprocess
        self.register_buffer("columns", None if columns is None else torch.tensor(columns), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(pixel_values=self.preprocess(images)).logits
        return logits if self.columns is None else logits.index_select(1, self.columns)


def check_text_fits(tokenizer, texts: list[str], limit: int, key: str, where) -> None:
    """A ConfigError naming the longest of `texts` when it has more tokens than the text encoder in `where`
    holds (`limit`, its position embeddings): the library would raise from inside its forward instead."""
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    longest = max(range(len(texts)), key=lengths.__getitem__)
    if lengths[longest] > limit:
        raise ConfigError(f"{key}: {texts[longest]!r} is {lengths[longest]} tokens; the text encoder in {where} "
                          f"holds {limit}")


def pooled(out) -> torch.Tensor:
    """get_*_features returns a tensor (transformers < 5) or an output with pooler_output (>= 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipZeroShot(nn.Module):
    """CLIP zero-shot over class names: logits = scale * cos(f(image), mean_template g(prompt(c)))."""

    def __init__(self, clip: nn.Module, tokenizer, preprocess: ImagePreprocess, class_names: list[str],
                 templates: list[str], text_batch: int = 256):
        super().__init__()
        texts = [t.format(label_name=name) for name in class_names for t in templates]
        with torch.no_grad():
            parts = []
            for k in range(0, len(texts), text_batch):
                batch = tokenizer(texts[k:k + text_batch], padding=True, truncation=True, return_tensors="pt")
                parts.append(F.normalize(pooled(clip.get_text_features(**batch)).float(), dim=-1))
            per_class = torch.cat(parts).view(len(class_names), len(templates), -1).mean(1)
        self.register_buffer("text_features", F.normalize(per_class, dim=-1), persistent=False)
        # only the image side is kept: the text tower's work is done
        self.vision_model, self.visual_projection = clip.vision_model, clip.visual_projection
        self.logit_scale = float(clip.logit_scale.detach().exp().clamp(max=100.0))
        self.preprocess = preprocess

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=self.preprocess(images)).pooler_output
        f = F.normalize(self.visual_projection(pooled).float(), dim=-1)
        return self.logit_scale * f @ self.text_features.T
