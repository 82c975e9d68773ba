"""`cfgen tune`: zero-shot, each learner's baseline and each (learner, objective, cf source), over seeds.

    cfgen tune --config pipelines/digits.toml                  # RUN/pairs/pairs-*.tar -> RUN/tune/
    cfgen tune --config pipelines/shapes.toml --out runs/shapes-benchmark      # make benchmark
    cfgen tune --config pipelines/digits.toml --set 'tune.learners=["coop", "cocoop"]' --set 'tune.objectives=["cfvlm"]'

Rows (protocol.py): zero-shot; for each learner in tune.learners its baseline
(L1 alone, lambda = 0: CoOp / CoCoOp); for each objective in tune.objectives and
each cf source in tune.cf_sources (cfsources.py) a row. For each seed every row
of a learner trains on the same K shots (pairs outside tune.eval_split), from the
same initialisation and in the same batch order; only the objective and the image
that plays x^cf differ. Evaluation is on the data source's images of
tune.eval_split (protocol.py: base, novel, HM, worst-group accuracy), summarised
as mean ± std over seeds and as the paired difference to the learner's baseline
with a 95% t interval. Hyper-parameters (lam, epochs, cocoop_epochs, lr, the
CF-VLM weights) are fixed in advance in the config: nothing is chosen on the
evaluation split. Writes to RUN/tune/:

    metrics.json     {"protocol": {...}, "order": [row keys, table order], "rows": {<row key>: {label, learner,
                      objective, cf_source, baseline,
                      base|novel|hm|worst_group: {mean, std}, delta: {<metric>: paired_difference} | null,
                      seconds: {mean, total}}}}
    runs.json        per seed: shots, each row's figures, cell accuracies, final losses, seconds
    prompts/<row>-seed<s>.safetensors   the learned ctx (+ meta-net), metadata says how to use it
    cache/<model id>/...                frozen image features (features.py)
    config.toml      the resolved config
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
from cfgen.data.sources import load_class_names, open_source, split_ids
from cfgen.device import pick_device
from cfgen.errors import ConfigError, InputError
from cfgen.shards import atomic_write_json
from cfgen.tune.backends import VLM, load_vlm
from cfgen.tune.cfsources import CounterfactualFeatures, check_sources
from cfgen.tune.features import PairFeatures, expand_urls, load_image_set, load_pair_features, refs_fingerprint
from cfgen.tune.losses import cfvlm_loss, cosine_logits, dicap_loss, normalize
from cfgen.tune.prompts import PromptLearner, encode_prompts
from cfgen.tune.protocol import METRICS, cell_name, paired_difference, sample_shots, split_classes, split_metrics, summarize

LEARNER_NAMES = {"coop": "CoOp", "coop_csc": "CoOp-CSC", "cocoop": "CoCoOp"}
OBJECTIVE_NAMES = {"dicap": "DiCap", "cfvlm": "CF-VLM"}
SELECTION = ("fixed in advance in the config (lam, epochs, cocoop_epochs, lr, alpha/beta/gamma, margins); "
             "none chosen on the evaluation split or any other")
INTERVAL = ("paired difference d_s = metric(row, seed s) - metric(its learner's baseline, seed s); "
            "mean(d) ± t_{0.975, n-1} * sd(d) / sqrt(n), sd with ddof=1 (Student t, n = number of seeds)")


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
    """The classes: ids are the source's class indices (also the learner's class positions)."""

    names: list[str]
    base: torch.Tensor  # class ids of the base classes (sorted)
    novel: torch.Tensor

    @property
    def base_ids(self) -> list[int]:
        return self.base.tolist()

    @property
    def novel_ids(self) -> list[int]:
        return self.novel.tolist()


def make_task(names: list[str]) -> Task:
    if len(names) < 2:
        raise InputError(f"tune needs at least 2 classes, the class list has {len(names)}")
    base, novel = split_classes(list(range(len(names))))
    return Task(list(names), torch.tensor(base, dtype=torch.long), torch.tensor(novel, dtype=torch.long))


@dataclass(frozen=True)
class Method:
    """One row of the table."""

    key: str
    label: str
    learner: str | None = None  # None: zero-shot
    objective: str | None = None  # None: the learner's baseline (L1 alone, lambda = 0)
    cf_source: str | None = None

    @property
    def baseline(self) -> str | None:
        return self.learner if self.objective else None

    @property
    def stem(self) -> str:
        return self.key.replace("+", "-").replace("[", "-").replace("]", "")


def plan_methods(t: TuneConfig) -> list[Method]:
    """zero-shot; per learner its baseline, then objective x cf source (only tune.rows, when given)."""
    rows = [Method("zero_shot", "zero-shot")]
    for learner in t.learners:
        rows.append(Method(learner, LEARNER_NAMES[learner], learner))
        for objective in t.objectives:
            for source in t.cf_sources:
                key = f"{learner}+{objective}[{source}]"
                if t.rows and key not in t.rows:
                    continue
                rows.append(Method(key,
                                   f"{LEARNER_NAMES[learner]}+{OBJECTIVE_NAMES[objective]}[{source}]",
                                   learner, objective, source))
    return rows


def _scale(t: TuneConfig, vlm: VLM) -> float:
    return 1.0 / t.temperature if t.temperature > 0 else vlm.logit_scale


def needs_cf(objective: str, lam: float) -> bool:
    return objective == "cfvlm" or lam != 0


def batch_requests(learner: PromptLearner, objective: str, lam: float, f: torch.Tensor, fcf: torch.Tensor,
                   y: torch.Tensor, ycf: torch.Tensor, classes: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The prompts one batch's loss needs (for prompts.encode_prompts): the class prompts, and for
    CoCoOp the prompts as the counterfactual images see them (true class; CF-VLM: also y^cf)."""
    reqs = [learner.class_prompts(f if learner.conditional else None, classes)]
    if learner.conditional and needs_cf(objective, lam):
        reqs.append(learner.paired_prompts(fcf, classes[y]))
        if objective == "cfvlm":
            reqs.append(learner.paired_prompts(fcf, classes[ycf.clamp(min=0)]))
    return reqs


def batch_loss(learner: PromptLearner, t: TuneConfig, objective: str, lam: float, scale: float,
               feats: list[torch.Tensor], f: torch.Tensor, fcf: torch.Tensor, y: torch.Tensor, ycf: torch.Tensor,
               classes: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The loss of one batch from the encoded `batch_requests`. f, fcf normalized features; y, ycf
    positions in `classes` (ycf = -1: not a training class)."""
    text = normalize(feats[0])
    if learner.conditional:
        text = text.view(len(y), len(classes), -1)  # (B, C, D)
        text_true = text[torch.arange(len(y)), y]
    else:
        text_true = text[y]  # (C, D) -> (B, D)
    cos = cosine_logits(f, text)
    s_pos = (f * text_true).sum(-1)

    def cf_cos(k: int, cls: torch.Tensor) -> torch.Tensor:
        """cos(x^cf, p_cls): the prompt as the counterfactual image sees it (CoCoOp: request k)."""
        if not learner.conditional:
            return (fcf * text[cls]).sum(-1)
        return (fcf * normalize(feats[k])).sum(-1)

    if objective == "dicap":
        return dicap_loss(cos, y, s_pos, cf_cos(1, y) if needs_cf(objective, lam) else None, scale, lam)
    if objective != "cfvlm":
        raise ConfigError(f"tune.objectives: unknown objective {objective!r}")
    valid = ycf >= 0
    return cfvlm_loss(cos, y, f, text_true, cf_cos(2, ycf.clamp(min=0)), cf_cos(1, y), valid, scale, t.alpha, t.beta,
                      t.gamma, t.margin_csd, t.margin_fcd)


def objective_loss(learner: PromptLearner, t: TuneConfig, objective: str, lam: float, scale: float,
                   f: torch.Tensor, fcf: torch.Tensor, y: torch.Tensor, ycf: torch.Tensor,
                   classes: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The loss of one batch of one learner (batch_requests, encoded, then batch_loss)."""
    reqs = batch_requests(learner, objective, lam, f, fcf, y, ycf, classes)
    return batch_loss(learner, t, objective, lam, scale, encode_prompts([learner], reqs), f, fcf, y, ycf, classes)


def epochs_for(t: TuneConfig, learner: str) -> int:
    return t.cocoop_epochs if learner == "cocoop" and t.cocoop_epochs else t.epochs


def new_learner(vlm: VLM, task: Task, t: TuneConfig, learner: str, gen: torch.Generator) -> PromptLearner:
    return PromptLearner(vlm, task.names, t.n_ctx, t.ctx_init, conditional=learner == "cocoop", generator=gen,
                         class_specific=learner == "coop_csc")


@dataclass
class RowRun:
    """One row of a lockstep group: its objective, lambda and what plays x^cf for the shots."""

    objective: str
    lam: float
    cf_feat: torch.Tensor  # (N, D) for the shots, in the shots' order


def train_prompts(vlm: VLM, task: Task, feat: torch.Tensor, label: torch.Tensor, cf_label: torch.Tensor,
                  rows: list[RowRun], t: TuneConfig, seed: int, learner_kind: str) -> tuple[list[PromptLearner], list[dict], float]:
    """Learn one context per row on the K-shot pairs of the base classes, all rows in lockstep.

    Every row starts from the same initialisation (a generator seeded with `seed`) and takes the
    same batches in the same order (one permutation per epoch, from the same generator); per
    step the prompts of all rows go through the frozen text encoder in one call and the loss
    is the sum of the rows' losses, so each row's parameters get exactly its own gradient (the
    rows share nothing): the same training as one run per row, at a fraction of the calls.
    feat (N, D) the shots' factual features; label / cf_label (N,) class ids. Returns the
    learners, each row's last-batch losses, and the seconds the group took.
    """
    gen = torch.Generator().manual_seed(seed)
    learners = [new_learner(vlm, task, t, learner_kind, gen if i == 0 else torch.Generator().manual_seed(seed))
                for i in range(len(rows))]
    device = vlm.device
    f = normalize(feat.float()).to(device)
    fcfs = [normalize(r.cf_feat.float()).to(device) for r in rows]
    base_pos = {int(c): i for i, c in enumerate(task.base)}
    y = torch.tensor([base_pos[int(c)] for c in label], device=device)
    ycf = torch.tensor([base_pos.get(int(c), -1) for c in cf_label], device=device)
    classes = task.base.to(device)
    params = [p for learner in learners for p in learner.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=t.lr, momentum=0.9)
    epochs = epochs_for(t, learner_kind)
    n = len(f)
    steps_per_epoch = math.ceil(n / t.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    scale = _scale(t, vlm)
    start = time.perf_counter()
    last: list[dict] = [{} for _ in rows]
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, t.batch_size):  # the last, smaller batch is kept
            b = order[s: s + t.batch_size].to(device)
            reqs = [batch_requests(learner, r.objective, r.lam, f[b], fcf[b], y[b], ycf[b], classes)
                    for learner, r, fcf in zip(learners, rows, fcfs)]
            feats = encode_prompts(learners, [q for rq in reqs for q in rq])
            total, k = 0.0, 0
            for i, (learner, r, fcf) in enumerate(zip(learners, rows, fcfs)):
                loss, last[i] = batch_loss(learner, t, r.objective, r.lam, scale, feats[k: k + len(reqs[i])],
                                           f[b], fcf[b], y[b], ycf[b], classes)
                k += len(reqs[i])
                total = total + loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
    for info in last:
        info["epochs"] = epochs
    return learners, last, time.perf_counter() - start


def train_prompt(vlm: VLM, task: Task, feat: torch.Tensor, cf_feat: torch.Tensor, label: torch.Tensor,
                 cf_label: torch.Tensor, t: TuneConfig, seed: int, learner_kind: str, objective: str,
                 lam: float) -> tuple[PromptLearner, dict]:
    """One row alone (train_prompts with one row)."""
    learners, infos, seconds = train_prompts(vlm, task, feat, label, cf_label, [RowRun(objective, lam, cf_feat)], t,
                                             seed, learner_kind)
    return learners[0], {**infos[0], "train_seconds": seconds}


@torch.no_grad()
def predict_correct(learner: PromptLearner | None, vlm: VLM, task: Task, feat: torch.Tensor, labels: np.ndarray,
                    zero_shot_prompt: str, chunk: int = 256) -> np.ndarray:
    """(N,) bool: each image classified right within its own half (base among base, novel among novel).

    zero-shot (learner None): the prompt '<zero_shot_prompt> <class name>.' through the library's
    own text path. CoCoOp's per-image prompts are encoded in chunks of `chunk` images.
    """
    device = vlm.device
    labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    correct = np.zeros(len(labels_t), dtype=bool)
    for classes in (task.base, task.novel):
        keep = torch.isin(labels_t, classes)
        if not keep.any():
            continue
        f = normalize(feat[keep].float()).to(device)
        target = torch.searchsorted(classes, labels_t[keep])
        if learner is None:
            text = normalize(vlm.encode_text([f"{zero_shot_prompt} {task.names[int(c)]}." for c in classes]))
            logits = f @ text.t()
        elif not learner.conditional:
            logits = f @ normalize(learner.class_features(classes=classes.to(device))).t()
        else:
            logits = torch.cat([cosine_logits(f[i: i + chunk],
                                              normalize(learner.class_features(f[i: i + chunk], classes.to(device))))
                                for i in range(0, len(f), chunk)])
        correct[keep.numpy()] = (logits.argmax(1).cpu() == target).numpy()
    return correct


def save_prompt(path: Path, learner: PromptLearner, vlm: VLM, task: Task, t: TuneConfig, method: Method,
                seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"backend": vlm.name, "model_id": vlm.model_id, "learner": method.learner or "",
            "objective": method.objective or "", "cf_source": method.cf_source or "", "n_ctx": str(learner.n_ctx),
            "ctx_init": t.ctx_init, "method": method.key, "seed": str(seed),
            "class_names": json.dumps(task.names), "class_ids": json.dumps(list(range(len(task.names)))),
            "base_classes": json.dumps(task.base_ids),
            "layout": "[BOS] ctx_1..ctx_n <class name> . [EOS]"}
    tmp = path.with_name(path.name + ".tmp")
    save_file(learner.prompt_state(), str(tmp), metadata=meta)
    tmp.replace(path)


def default_pairs(run_dir: Path) -> str:
    return str(run_dir / "pairs" / "pairs-*.tar")


def pair_shards(cfg: Config, run_dir: Path, pairs: str | None) -> list[Path]:
    """The shards named by --pairs, else tune.pairs, else RUN_DIR/pairs/pairs-*.tar."""
    return expand_urls(pairs or (str(cfg.path(cfg.tune.pairs)) if cfg.tune.pairs else default_pairs(run_dir)))


def cache_dir(cfg: Config, run_dir: Path) -> Path | None:
    return tune_dir(run_dir) / "cache" if cfg.tune.cache else None


def load_features(cfg: Config, run_dir: Path, shards: list[Path], vlm: VLM) -> PairFeatures:
    return load_pair_features(shards, vlm, cache_dir(cfg, run_dir), cfg.tune.encode_batch_size)


def check_class_names(pairs: PairFeatures, names: list[str]) -> None:
    """The pair shards' class ids and names must be the config's class list."""
    for c, n in sorted(pairs.names.items()):
        if not 0 <= c < len(names) or names[c] != n:
            have = repr(names[c]) if 0 <= c < len(names) else "no such class"
            raise InputError(f"the pair shards call class {c} {n!r}, the config's class list {have}; "
                             "tune with the config the pairs were made with")


@dataclass
class EvalSet:
    ids: list[str]
    feat: torch.Tensor
    label: np.ndarray
    group: np.ndarray
    stats: dict


def load_eval_set(cfg: Config, vlm: VLM, refs, splits: dict[str, str], run_dir: Path) -> EvalSet:
    """The source's images of tune.eval_split (every sample when it is ''), encoded once and cached."""
    t = cfg.tune
    chosen = [r for r in refs if not r.error and (not t.eval_split or splits.get(r.id) == t.eval_split)]
    if not chosen:
        raise InputError(f"tune.eval_split={t.eval_split!r}: the data source has no usable sample in that split "
                         f"of {cfg.data.split}")
    images = load_image_set(f"eval-{t.eval_split or 'all'}", refs_fingerprint(cfg, chosen), [r.id for r in chosen],
                            [r.load for r in chosen], vlm, cache_dir(cfg, run_dir), t.encode_batch_size)
    by_id = {r.id: r for r in chosen}
    return EvalSet(images.ids, images.feat, np.array([by_id[i].label for i in images.ids], dtype=np.int64),
                   np.array([by_id[i].group for i in images.ids], dtype=object),
                   {**images.stats, "skipped": len(images.skipped)})


def run_tune(cfg: Config, run_dir: Path, pairs: str | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Every row of plan_methods over tune.seeds; writes RUN/tune/. Returns metrics.json's content."""
    device = pick_device(cfg.model.device)
    with cpu_threads(device):
        return _run_tune(cfg, run_dir, pairs, log, device)


def _run_tune(cfg: Config, run_dir: Path, pairs: str | None, log: Callable[[str], None], device: torch.device) -> dict:
    t = cfg.tune
    start = time.perf_counter()
    names = load_class_names(cfg)
    task = make_task(names)
    source = open_source(cfg)
    methods = plan_methods(t)
    cf_sources = sorted({m.cf_source for m in methods if m.cf_source})
    check_sources(cfg, source, cf_sources)
    shards = pair_shards(cfg, run_dir, pairs)
    vlm = load_vlm(cfg, device)
    data = load_features(cfg, run_dir, shards, vlm)
    check_class_names(data, names)
    refs = source.samples(names)
    splits = split_ids(cfg) if cfg.data.split else {}
    cfs = CounterfactualFeatures(cfg, data, vlm, source, refs, splits, shards, cache_dir(cfg, run_dir))
    ev = load_eval_set(cfg, vlm, refs, splits, run_dir)
    name_of = dict(enumerate(names))

    labels = data.label.numpy()
    if t.eval_split:
        pool = np.array([splits.get(i) != t.eval_split for i in data.factual_ids])
        where = f" outside tune.eval_split={t.eval_split!r}"
    else:
        pool, where = np.ones(len(labels), dtype=bool), ""
    shots = {seed: sample_shots(labels, pool, task.base_ids, t.shots, seed, name_of, where) for seed in t.seeds}
    cfs.prepare(cf_sources, np.concatenate(list(shots.values())))
    log("; ".join([(f"features: {len(data.ids)} pairs from {data.stats['shards']} shards "
                    f"({data.stats['cache_hits']} cached, {data.stats['cache_misses']} encoded), {int(pool.sum())} "
                    "outside the evaluation split"),
                   f"{len(ev.ids)} evaluation images ({'cached' if ev.stats['cached'] else 'encoded'})",
                   f"base classes {task.base_ids}, novel {task.novel_ids}"]
                  + [f"{k}: {v['images']} images ({'cached' if v['cached'] else 'encoded'})" for k, v in cfs.stats.items()]))

    zs_prompt = t.ctx_init or "a photo of a"
    t0 = time.perf_counter()
    zs_correct = predict_correct(None, vlm, task, ev.feat, ev.label, zs_prompt)
    zs_seconds = time.perf_counter() - t0
    out = tune_dir(run_dir)
    per_seed: dict[str, list[dict]] = {m.key: [] for m in methods}
    seconds: dict[str, list[float]] = {m.key: [] for m in methods}
    runs = []
    for seed in t.seeds:
        idx = shots[seed]
        shot_ids = {data.factual_ids[i] for i in idx}
        mask = np.ones(len(ev.ids), dtype=bool) if t.eval_split else np.array([i not in shot_ids for i in ev.ids])
        row: dict = {"seed": seed, "shots": len(idx), "shot_ids": [data.ids[i] for i in idx],
                     "eval_images": int(mask.sum()), "methods": {}}
        ti = torch.from_numpy(idx)
        f, y, ycf = data.feat[ti], data.label[ti], data.cf_label[ti]
        results: dict[str, tuple[np.ndarray, dict]] = {"zero_shot": (zs_correct, {"eval_seconds": zs_seconds})}
        for kind in t.learners:
            group = [m for m in methods if m.learner == kind]
            specs = [RowRun(m.objective or "dicap", 0.0 if m.objective is None else t.lam,
                            cfs.get(m.cf_source or "generated", idx)) for m in group]
            learners, infos, group_seconds = train_prompts(vlm, task, f, y, ycf, specs, t, seed, kind)
            for m, learner, info in zip(group, learners, infos):
                t0 = time.perf_counter()
                correct = predict_correct(learner, vlm, task, ev.feat, ev.label, "")
                info.update(train_seconds=group_seconds / len(group), group_train_seconds=group_seconds,
                            eval_seconds=time.perf_counter() - t0)
                save_prompt(out / "prompts" / f"{m.stem}-seed{seed}.safetensors", learner, vlm, task, t, m, seed)
                results[m.key] = (correct, info)
        for m in methods:
            correct, info = results[m.key]
            fig = split_metrics(correct[mask], ev.label[mask], ev.group[mask], task.base_ids, name_of)
            info["seconds"] = info.get("train_seconds", 0.0) + info["eval_seconds"]
            per_seed[m.key].append(fig)
            seconds[m.key].append(info["seconds"])
            row["methods"][m.key] = {**fig, **info}
            log(f"seed {seed} {m.label:<26} base {fig['base']:.3f} novel {fig['novel']:.3f} HM {fig['hm']:.3f} "
                f"worst-group {fig['worst_group']:.3f} ({info['seconds']:.1f}s)")
        runs.append(row)

    rows = {}
    for m in methods:
        summary = summarize(per_seed[m.key])
        delta = None
        if m.baseline:
            delta = {k: paired_difference([r[k] for r in per_seed[m.key]], [r[k] for r in per_seed[m.baseline]])
                     for k in METRICS}
        rows[m.key] = {"label": m.label, "learner": m.learner, "objective": m.objective, "cf_source": m.cf_source,
                       "baseline": m.baseline, **summary, "delta": delta,
                       "seconds": {"mean": float(np.mean(seconds[m.key])), "total": float(np.sum(seconds[m.key]))}}
    cells: dict[str, int] = {}
    for g, c in zip(ev.group, ev.label):
        key = cell_name(g, names[c])
        cells[key] = cells.get(key, 0) + 1
    metrics = {
        "protocol": {
            "eval_split": t.eval_split, "eval_images": len(ev.ids), "cells": dict(sorted(cells.items())),
            "classes": names, "base": task.base_ids, "novel": task.novel_ids,
            "pairs": len(data.ids), "shot_pool": int(pool.sum()), "shots": t.shots, "seeds": list(t.seeds),
            "backend": vlm.name, "model_id": vlm.model_id,
            "hyperparameters": {"selection": SELECTION, "lam": t.lam, "epochs": t.epochs,
                                "cocoop_epochs": epochs_for(t, "cocoop"), "lr": t.lr, "batch_size": t.batch_size,
                                "n_ctx": t.n_ctx, "ctx_init": t.ctx_init, "temperature": t.temperature,
                                "alpha": t.alpha, "beta": t.beta, "gamma": t.gamma,
                                "margin_csd": t.margin_csd, "margin_fcd": t.margin_fcd},
            "interval": INTERVAL,
        },
        "order": [m.key for m in methods],
        "rows": rows,
    }
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "runs.json", {
        "features": data.stats, "eval": ev.stats, "cf_sources": cfs.stats,
        "nearest_counterfactuals": {data.ids[i]: v for i, v in sorted(cfs.nearest_ids.items())},
        "runs": runs, "seconds": time.perf_counter() - start})
    write_resolved(cfg, out)
    return metrics
