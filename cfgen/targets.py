"""Choosing the counterfactual label y* (DESIGN.md §2, DiCap §3.5), and per-sample seeds.

    closest  the predictor's top class that is not the factual one (hardest negative)
    random   uniform over the other classes, from the sample's own seed
    <class>  a fixed class index or name for every sample
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def sample_seed(global_seed: int, sample_id: str) -> int:
    """A 31-bit seed from the run seed and the sample id alone.

    Never from the batch or the rank: a sample's result must not depend on
    its batch-mates or on how many processes run.
    """
    digest = hashlib.sha256(f"{global_seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def resolve_fixed_target(strategy: str, class_names: list[str]) -> int | None:
    """The class index of a fixed target, or None for 'closest'/'random'."""
    if strategy in ("closest", "random"):
        return None
    if strategy in class_names:
        return class_names.index(strategy)
    if strategy.isdigit() and int(strategy) < len(class_names):
        return int(strategy)
    raise ValueError(f"guide.target: expected 'closest', 'random', a class index or name; got {strategy!r}")


def choose_targets(strategy: str, logits: torch.Tensor, labels: torch.Tensor, seeds: list[int],
                   class_names: list[str]) -> torch.Tensor:
    """y* per sample. `logits` are the predictor's on the clean factual images (t = 0)."""
    n, k = logits.shape
    if strategy == "closest":
        masked = logits.detach().clone().float()
        masked[torch.arange(n), labels] = float("-inf")
        return masked.argmax(dim=1)
    if strategy == "random":
        out = []
        for seed, label in zip(seeds, labels.tolist()):
            r = int(np.random.default_rng(seed).integers(k - 1))
            out.append(r if r < label else r + 1)  # skip the factual class
        return torch.tensor(out, dtype=torch.long, device=labels.device)
    fixed = resolve_fixed_target(strategy, class_names)
    return torch.full_like(labels, fixed)
