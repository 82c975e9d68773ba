"""`cfgen tune`: zero-shot, the baseline (lambda = 0) and DiCap, base-to-novel, over seeds.

    cfgen tune --config pipelines/digits.toml                  # RUN/pairs/pairs-*.tar -> RUN/tune/
    cfgen tune --config pipelines/digits.toml --pairs 'runs/digits/pairs/pairs-{000000..000003}.tar'
    cfgen tune --config pipelines/digits.toml --set tune.learner=cocoop --set tune.objective=cfvlm

For each seed the same K shots, the same context initialisation and the same
batch order are used for the baseline and for DiCap; the only difference is
the objective (the baseline is `dicap_loss` with lambda = 0, i.e. CoOp /
CoCoOp's cross-entropy). Writes to RUN/tune/:

    metrics.json                    {"zero_shot"|"baseline"|<objective>: {"base"|"new"|"hm": {"mean", "std"}}}
    runs.json                       per-seed accuracies, shots, timings, cache use
    prompts/<method>-seed<s>.safetensors   the learned ctx (+ meta-net), metadata says how to use it
    cache/<model id>/...            frozen image features (features.py)
    config.toml                     the resolved config
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import save_file

from cfgen.config import Config, TuneConfig, write_resolved
from cfgen.data.sources import split_ids
from cfgen.device import pick_device
from cfgen.errors import ConfigError, InputError
from cfgen.shards import atomic_write_json
from cfgen.tune.backends import VLM, load_vlm
from cfgen.tune.features import PairFeatures, expand_urls, load_pair_features
from cfgen.tune.losses import cfvlm_loss, cosine_logits, dicap_loss, normalize
from cfgen.tune.prompts import PromptLearner
from cfgen.tune.protocol import accuracy, harmonic_mean, sample_shots, split_classes, summarize


def tune_dir(run_dir: Path) -> Path:
    return run_dir / "tune"


@contextmanager
def cpu_threads(device: torch.device, n: int = 1):
    """Run with n intra-op threads on CPU: prompt learning is many tiny ops (a few prompts of
    ~10 tokens), where thread synchronisation costs more than it saves (measured 4-20x slower
    with 2 threads on a busy 2-core machine). The previous setting is restored."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class Task:
    """Everything one training run needs, in the learner's class indexing (sorted class ids)."""

    class_ids: list[int]
    names: list[str]
    base: torch.Tensor  # class positions of the base classes
    novel: torch.Tensor
    position: dict[int, int]  # class id -> position


def make_task(pairs: PairFeatures) -> Task:
    ids = sorted(set(pairs.label.tolist()) | set(pairs.cf_label.tolist()))
    if len(ids) < 2:
        raise InputError(f"tune needs at least 2 classes in the pair shards, found {len(ids)}")
    base, novel = split_classes(ids)
    position = {c: i for i, c in enumerate(ids)}
    return Task(ids, [pairs.names[c] for c in ids], torch.tensor([position[c] for c in base]),
                torch.tensor([position[c] for c in novel]), position)


def _positions(task: Task, labels: torch.Tensor) -> torch.Tensor:
    return torch.tensor([task.position[int(c)] for c in labels], dtype=torch.long)


def _scale(t: TuneConfig, vlm: VLM) -> float:
    return 1.0 / t.temperature if t.temperature > 0 else vlm.logit_scale


def objective_loss(learner: PromptLearner, t: TuneConfig, objective: str, lam: float, scale: float,
                   f: torch.Tensor, fcf: torch.Tensor, y: torch.Tensor, ycf: torch.Tensor,
                   classes: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The loss of one batch. f, fcf normalized features; y, ycf positions in `classes` (ycf = -1: not a training class)."""
    if learner.conditional:
        text = normalize(learner.class_features(f, classes))  # (B, C, D)
        text_true = text[torch.arange(len(y)), y]
    else:
        text = normalize(learner.class_features(classes=classes))  # (C, D)
        text_true = text[y]
    cos = cosine_logits(f, text)
    s_pos = (f * text_true).sum(-1)
    need_cf = objective == "cfvlm" or lam != 0

    def cf_cos(cls: torch.Tensor) -> torch.Tensor:
        """cos(x^cf, p_cls), the prompt as the counterfactual image sees it (CoCoOp)."""
        if not learner.conditional:
            return (fcf * text[cls]).sum(-1)
        return (fcf * normalize(learner.paired_features(fcf, classes[cls]))).sum(-1)

    if objective == "dicap":
        return dicap_loss(cos, y, s_pos, cf_cos(y) if need_cf else None, scale, lam)
    if objective != "cfvlm":
        raise ConfigError(f"tune.objective: unknown objective {objective!r}")
    valid = ycf >= 0
    s_cf_cf = cf_cos(ycf.clamp(min=0))
    return cfvlm_loss(cos, y, f, text_true, s_cf_cf, cf_cos(y), valid, scale, t.alpha, t.beta, t.gamma,
                      t.margin_csd, t.margin_fcd)


def train_prompt(vlm: VLM, task: Task, pairs: PairFeatures, train_idx: np.ndarray, t: TuneConfig,
                 seed: int, objective: str, lam: float) -> tuple[PromptLearner, dict]:
    """One run: learn the context on the K-shot pairs of the base classes."""
    gen = torch.Generator().manual_seed(seed)
    learner = PromptLearner(vlm, task.names, t.n_ctx, t.ctx_init, conditional=t.learner == "cocoop", generator=gen)
    device = vlm.device
    idx = torch.from_numpy(train_idx)
    f = normalize(pairs.feat[idx]).to(device)
    fcf = normalize(pairs.cf_feat[idx]).to(device)
    base_pos = {int(p): i for i, p in enumerate(task.base)}
    y = torch.tensor([base_pos[task.position[int(c)]] for c in pairs.label[idx]], device=device)
    ycf = torch.tensor([base_pos.get(task.position[int(c)], -1) for c in pairs.cf_label[idx]], device=device)
    classes = task.base.to(device)
    params = [p for p in learner.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=t.lr, momentum=0.9)
    steps_per_epoch = math.ceil(len(idx) / t.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs * steps_per_epoch)
    scale = _scale(t, vlm)
    start, last = time.perf_counter(), {}
    for _ in range(t.epochs):
        order = torch.randperm(len(idx), generator=gen)
        for s in range(0, len(idx), t.batch_size):  # the last, smaller batch is kept
            b = order[s: s + t.batch_size].to(device)
            loss, last = objective_loss(learner, t, objective, lam, scale, f[b], fcf[b], y[b], ycf[b], classes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    last["seconds"] = time.perf_counter() - start
    return learner, last


@torch.no_grad()
def evaluate(learner: PromptLearner | None, vlm: VLM, task: Task, pairs: PairFeatures, eval_idx: np.ndarray,
             classes: torch.Tensor, zero_shot_prompt: str, chunk: int = 128) -> float:
    """Accuracy on the eval pairs whose class is in `classes`, classifying among `classes`."""
    labels = _positions(task, pairs.label[torch.from_numpy(eval_idx)])
    keep = torch.isin(labels, classes)
    idx = torch.from_numpy(eval_idx)[keep]
    target = torch.searchsorted(classes, labels[keep]) if len(classes) else labels[keep]
    device = vlm.device
    f = normalize(pairs.feat[idx]).to(device)
    if learner is None:
        prompts = [f"{zero_shot_prompt} {task.names[int(c)]}." for c in classes]
        text = normalize(vlm.encode_text(prompts))
        return accuracy((f @ text.t()).cpu(), target)
    if not learner.conditional:
        text = normalize(learner.class_features(classes=classes.to(device)))
        return accuracy((f @ text.t()).cpu(), target)
    logits = [cosine_logits(f[i: i + chunk], normalize(learner.class_features(f[i: i + chunk], classes.to(device))))
              for i in range(0, len(f), chunk)]
    return accuracy(torch.cat(logits).cpu(), target)


def eval_pool(cfg: Config, pairs: PairFeatures) -> np.ndarray | None:
    """Boolean mask of the held-out pairs fixed by tune.eval_split, or None (held out = not a shot)."""
    if not cfg.tune.eval_split:
        return None
    splits = split_ids(cfg)
    mask = np.array([splits.get(i) == cfg.tune.eval_split for i in pairs.ids])
    if not mask.any():
        raise ConfigError(f"tune.eval_split={cfg.tune.eval_split!r}: no pair in the shards has that split in {cfg.data.split}")
    return mask


def save_prompt(path: Path, learner: PromptLearner, vlm: VLM, task: Task, t: TuneConfig, method: str, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"backend": vlm.name, "model_id": vlm.model_id, "learner": t.learner, "n_ctx": str(learner.n_ctx),
            "ctx_init": t.ctx_init, "method": method, "seed": str(seed),
            "class_names": json.dumps(task.names), "class_ids": json.dumps(task.class_ids),
            "base_classes": json.dumps([task.class_ids[int(p)] for p in task.base]),
            "layout": "[BOS] ctx_1..ctx_n <class name> . [EOS]"}
    tmp = path.with_name(path.name + ".tmp")
    save_file(learner.prompt_state(), str(tmp), metadata=meta)
    tmp.replace(path)


def default_pairs(run_dir: Path) -> str:
    return str(run_dir / "pairs" / "pairs-*.tar")


def pair_shards(cfg: Config, run_dir: Path, pairs: str | None) -> list[Path]:
    """The shards named by --pairs, else tune.pairs, else RUN_DIR/pairs/pairs-*.tar."""
    return expand_urls(pairs or (str(cfg.path(cfg.tune.pairs)) if cfg.tune.pairs else default_pairs(run_dir)))


def load_features(cfg: Config, run_dir: Path, shards: list[Path], vlm: VLM) -> PairFeatures:
    cache = tune_dir(run_dir) / "cache" if cfg.tune.cache else None
    return load_pair_features(shards, vlm, cache, cfg.tune.encode_batch_size)


def run_tune(cfg: Config, run_dir: Path, pairs: str | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Zero-shot, baseline and the configured objective over tune.seeds; writes RUN/tune/. Returns metrics."""
    device = pick_device(cfg.model.device)
    with cpu_threads(device):
        return _run_tune(cfg, run_dir, pairs, log, device)


def _run_tune(cfg: Config, run_dir: Path, pairs: str | None, log: Callable[[str], None], device: torch.device) -> dict:
    t = cfg.tune
    start = time.perf_counter()
    shards = pair_shards(cfg, run_dir, pairs)
    vlm = load_vlm(cfg, device)
    data = load_features(cfg, run_dir, shards, vlm)
    task = make_task(data)
    labels = data.label.numpy()
    held_out = eval_pool(cfg, data)
    pool = ~held_out if held_out is not None else np.ones(len(labels), dtype=bool)
    base_ids = [task.class_ids[int(p)] for p in task.base]
    shots = {seed: sample_shots(labels, pool, base_ids, t.shots, seed, data.names) for seed in t.seeds}
    log(f"features: {len(data.ids)} pairs from {data.stats['shards']} shards "
        f"({data.stats['cache_hits']} cached, {data.stats['cache_misses']} encoded) in {data.stats['seconds']:.1f}s; "
        f"base classes {base_ids}, novel {[task.class_ids[int(p)] for p in task.novel]}")
    methods = {"baseline": 0.0, t.objective: t.lam}
    per_seed: dict[str, list[dict]] = {"zero_shot": [], **{m: [] for m in methods}}
    out = tune_dir(run_dir)
    runs = []
    for seed in t.seeds:
        train_idx = shots[seed]
        if held_out is not None:
            eval_idx = np.flatnonzero(held_out)
        else:
            mask = np.ones(len(labels), dtype=bool)
            mask[train_idx] = False
            eval_idx = np.flatnonzero(mask)
        row = {"seed": seed, "shots": len(train_idx), "eval_pairs": len(eval_idx)}
        zs = {k: evaluate(None, vlm, task, data, eval_idx, c, t.ctx_init or "a photo of a")
              for k, c in (("base", task.base), ("new", task.novel))}
        per_seed["zero_shot"].append(zs)
        row["zero_shot"] = zs
        for method, lam in methods.items():
            objective = "dicap" if method == "baseline" else t.objective
            learner, info = train_prompt(vlm, task, data, train_idx, t, seed, objective, lam)
            acc = {k: evaluate(learner, vlm, task, data, eval_idx, c, "") for k, c in (("base", task.base), ("new", task.novel))}
            per_seed[method].append(acc)
            row[method] = {**acc, "hm": harmonic_mean(acc["base"], acc["new"]), **info}
            save_prompt(out / "prompts" / f"{method}-seed{seed}.safetensors", learner, vlm, task, t, method, seed)
            log(f"seed {seed} {method:<9} base {acc['base']:.3f} new {acc['new']:.3f} "
                f"HM {harmonic_mean(acc['base'], acc['new']):.3f} ({info['seconds']:.1f}s)")
        runs.append(row)
    metrics = {m: summarize(v) for m, v in per_seed.items()}
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "runs.json", {
        "classes": dict(zip(map(str, task.class_ids), task.names)), "base": base_ids,
        "novel": [task.class_ids[int(p)] for p in task.novel], "backend": vlm.name, "model_id": vlm.model_id,
        "learner": t.learner, "objective": t.objective, "features": data.stats, "runs": runs,
        "seconds": time.perf_counter() - start})
    write_resolved(cfg, out)
    return metrics
