"""What every `cfgen train` command shares: the dataset as tensors, its train/test split, the
learning-rate schedule and the optimizer step.

    x, y, ids = load_arrays(cfg, split="")          # model-space tensors of every usable sample
    train, test = split_train_test(cfg, y, ids)     # data.split's 'test' ids, else a stratified split
    sched = LambdaLR(opt, lambda s: cosine_lr(s, steps))
    optimizer_step(loss, opt, sched, clip=model.parameters())

Used by models/training.py (diffusion, classifier) and tune/vlm.py (the VLM's image tower).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
from tqdm import tqdm

from cfgen.config import Config
from cfgen.data.base import SampleRef
from cfgen.data.sources import list_samples, split_ids
from cfgen.errors import InputError
from cfgen.tensors import to_model_space


def load_arrays(cfg: Config, split: str | None = None,
                refs: list[SampleRef] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All decodable samples as model-space tensors; undecodable ones are skipped and counted.

    `refs`, when given, is filled with each kept sample's SampleRef (its group, concepts, caption).
    """
    images, labels, ids, skipped = [], [], [], 0
    for ref in tqdm(list_samples(cfg, split=split), desc="load", leave=False):
        if ref.error:
            skipped += 1
            continue
        try:
            images.append(ref.load())
        except ValueError:
            skipped += 1
            continue
        labels.append(ref.label)
        ids.append(ref.id)
        if refs is not None:
            refs.append(ref)
    if not images:
        raise InputError("no usable training images in the configured dataset")
    if skipped:
        print(f"skipped {skipped} unusable samples")
    x = to_model_space(torch.from_numpy(np.stack(images)))
    return x, torch.tensor(labels, dtype=torch.long), ids


def split_train_test(cfg: Config, y: torch.Tensor, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks: the manifest split if there is one, else a seeded stratified split."""
    if cfg.data.split:
        splits = split_ids(cfg)
        test = torch.tensor([splits.get(i) == "test" for i in ids])
    else:
        from sklearn.model_selection import train_test_split

        _, te = train_test_split(np.arange(len(ids)), test_size=cfg.train.classifier.test_fraction,
                                 stratify=y.numpy(), random_state=cfg.pipeline.seed)
        test = torch.zeros(len(ids), dtype=torch.bool)
        test[te] = True
    return ~test, test


def cosine_lr(step: int, total: int, warmup: int = 100) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (a LambdaLR factor)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched, clip: Iterable | None = None,
                   max_norm: float = 1.0) -> None:
    """Backward, optional gradient-norm clipping of `clip`, optimizer and schedule step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, max_norm)
    opt.step()
    sched.step()
