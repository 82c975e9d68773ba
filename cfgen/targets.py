"""Choosing the counterfactual label y* (DESIGN.md §2, DiCap §3.5), and per-sample seeds.

    closest  the predictor's top class that is not the factual one (hardest negative);
             with guide.top_k = K, the K classes it ranks highest after the factual one
    random   uniform over the other classes, from the sample's own seed
    all      every other class: one counterfactual per class (CF-VLM trains on several per anchor)
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
    if strategy in ("closest", "random", "all"):
        return None
    if strategy in class_names:
        return class_names.index(strategy)
    if strategy.isdigit() and int(strategy) < len(class_names):
        return int(strategy)
    raise ValueError(f"guide.target: expected 'closest', 'random', 'all', a class index or name; got {strategy!r}")


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


def targets_per_image(strategy: str, top_k: int, num_classes: int) -> int:
    """How many counterfactuals each factual image gets: C - 1 for 'all', top_k for 'closest', else 1."""
    if strategy == "all":
        return num_classes - 1
    return min(top_k, num_classes - 1) if strategy == "closest" else 1


def choose_target_sets(strategy: str, top_k: int, logits: torch.Tensor, labels: torch.Tensor, seeds: list[int],
                       class_names: list[str]) -> torch.Tensor:
    """(B, T) targets, T = targets_per_image: row i lists sample i's y*, in the order its pairs are written
    ('closest': by the predictor's rank; 'all': by class index)."""
    n, k = logits.shape
    if strategy == "all":
        others = [[c for c in range(k) if c != y] for y in labels.tolist()]
        return torch.tensor(others, dtype=torch.long, device=labels.device).reshape(n, k - 1)
    if strategy == "closest" and top_k > 1:
        masked = logits.detach().clone().float()
        masked[torch.arange(n), labels] = float("-inf")
        # a stable sort keeps ties in class order, as argmax does for top_k = 1
        return torch.sort(masked, dim=1, descending=True, stable=True).indices[:, : targets_per_image(strategy, top_k, k)]
    return choose_targets(strategy, logits, labels, seeds, class_names)[:, None]
