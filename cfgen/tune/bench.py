"""Benchmark: a training epoch with the frozen-feature cache against re-encoding the images.

    cfgen tune --config pipelines/digits.toml --bench
    cfgen tune --config my.toml --bench --set tune.backend=transformers --set tune.vlm=/models/clip-vit-b-32

One run, same shots (seed tune.seeds[0]), same learner and objective (the first of
tune.learners and tune.objectives, with the generated counterfactuals), same steps. Without
the cache an epoch does what an input pipeline without it does every epoch:
stream the pair shards, decode the factual and counterfactual PNGs of the
shots (and only those) and run the frozen image encoder on them, then the
same optimizer steps. With the cache an epoch is the optimizer steps alone (the
text side: the prompts through the frozen text encoder, forward and backward).
Prints both epoch times, their ratio, and where the uncached time goes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cfgen.config import Config
from cfgen.data.sources import load_class_names
from cfgen.contract import image_keys
from cfgen.data.images import decode_png
from cfgen.device import pick_device
from cfgen.shards import read_samples
from cfgen.tune.backends import load_vlm
from cfgen.tune.features import encode_images
from cfgen.tune.losses import normalize
from cfgen.tune.protocol import sample_shots
from cfgen.tune.fit import RowRun, learner_loss, new_learner, optimizer_for
from cfgen.tune.train import (check_class_names, cpu_threads, load_features, make_task, pair_shards, tune_dir,
                              zero_shot_text)


def bench_cache(cfg: Config, run_dir: Path, pairs: str | None = None, epochs: int = 3,
                log: Callable[[str], None] = print) -> dict:
    device = pick_device(cfg.model.device)
    with cpu_threads(device):
        return _bench(cfg, run_dir, pairs, epochs, device)


def _bench(cfg: Config, run_dir: Path, pairs: str | None, epochs: int, device: torch.device) -> dict:
    t = cfg.tune
    shards = pair_shards(cfg, run_dir, pairs)
    vlm = load_vlm(cfg, device)
    data = load_features(cfg, run_dir, shards, vlm)  # fills the cache if it is cold
    names = load_class_names(cfg)
    check_class_names(data, names)
    task = make_task(names)
    labels = data.label.numpy()
    base_ids = task.base_ids
    learner_kind, objective = t.learners[0], t.objectives[0]
    seed = t.seeds[0]
    train_idx = sample_shots(labels, np.ones(len(labels), dtype=bool), base_ids, t.shots, seed, data.names)
    shot_ids = {data.ids[i] for i in train_idx}
    order_in_data = {k: i for i, k in enumerate(data.ids)}
    base_pos = {int(p): i for i, p in enumerate(task.base)}
    y_all = torch.tensor([base_pos[int(c)] for c in data.label[train_idx]], device=device)
    ycf_all = torch.tensor([base_pos.get(int(c), -1) for c in data.cf_label[train_idx]], device=device)
    classes = task.base.to(device)
    scale = 1.0 / t.temperature if t.temperature > 0 else vlm.logit_scale
    zs = zero_shot_text(vlm, task, t.ctx_init or "a photo of a").to(device)
    learner = new_learner(vlm, task, t, learner_kind, torch.Generator().manual_seed(seed), zs)
    row = RowRun(objective, t.lam, torch.empty(0), t.image_lr if learner_kind in ("linear", "adapter") else t.lr)
    opt = optimizer_for(learner, row.lr)
    gen = torch.Generator().manual_seed(seed)

    def steps(f: torch.Tensor, fcf: torch.Tensor) -> None:
        order = torch.randperm(len(f), generator=gen)
        for s in range(0, len(f), t.batch_size):
            b = order[s: s + t.batch_size].to(device)
            loss, _ = learner_loss(learner, row, t, scale, f[b], fcf[b], y_all[b], ycf_all[b], classes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    idx = torch.from_numpy(train_idx)
    cached, uncached, read_s, encode_s, step_s = [], [], [], [], []
    for _ in range(epochs):
        t0 = time.perf_counter()
        f, fcf = normalize(data.feat[idx]).to(device), normalize(data.cf_feat[idx]).to(device)
        steps(f, fcf)
        cached.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        images, cf_images, keys = [], [], []
        for shard in shards:  # stream every shard; decode only the shots' images
            for sample in read_samples(shard):
                if sample["__key__"] in shot_ids:
                    image, cf_image = image_keys(sample)
                    images.append(decode_png(sample[image]))
                    cf_images.append(decode_png(sample[cf_image]))
                    keys.append(sample["__key__"])
        t1 = time.perf_counter()
        perm = np.argsort([order_in_data[k] for k in keys])  # the same order as the cached features
        f = normalize(encode_images(vlm, np.stack(images)[perm], t.encode_batch_size)).to(device)
        fcf = normalize(encode_images(vlm, np.stack(cf_images)[perm], t.encode_batch_size)).to(device)
        t2 = time.perf_counter()
        steps(f, fcf)
        t3 = time.perf_counter()
        uncached.append(t3 - t0)
        read_s.append(t1 - t0)
        encode_s.append(t2 - t1)
        step_s.append(t3 - t2)
    result = {
        "backend": vlm.name, "model_id": vlm.model_id, "learner": learner_kind, "objective": objective,
        "pairs": len(data.ids), "shards": len(shards), "train_pairs": len(train_idx), "images_per_epoch": 2 * len(train_idx),
        "batch_size": t.batch_size, "epochs_timed": epochs,
        "epoch_cached_s": float(np.median(cached)), "epoch_reencode_s": float(np.median(uncached)),
        "reencode_read_decode_s": float(np.median(read_s)), "reencode_encode_s": float(np.median(encode_s)),
        "reencode_steps_s": float(np.median(step_s)),
        "cache_dir": str(tune_dir(run_dir) / "cache" / vlm.model_id),
    }
    result["ratio"] = result["epoch_reencode_s"] / result["epoch_cached_s"]
    return result


def format_bench(r: dict) -> str:
    return "\n".join([
        f"feature cache benchmark: {r['backend']} backend ({r['model_id']}), {r['learner']} + {r['objective']}",
        f"  {r['train_pairs']} training pairs ({r['images_per_epoch']} images) of {r['pairs']} in {r['shards']} shards, "
        f"batch {r['batch_size']}, median of {r['epochs_timed']} epochs",
        f"  epoch with the feature cache      {r['epoch_cached_s'] * 1000:9.1f} ms",
        f"  epoch re-encoding the images      {r['epoch_reencode_s'] * 1000:9.1f} ms"
        f"  (read+decode {r['reencode_read_decode_s'] * 1000:.1f}, encode {r['reencode_encode_s'] * 1000:.1f}, "
        f"steps {r['reencode_steps_s'] * 1000:.1f})",
        f"  ratio                             {r['ratio']:9.1f}x",
    ])
