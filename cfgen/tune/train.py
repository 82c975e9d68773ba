"""`cfgen tune`: zero-shot, each learner's baseline and each (learner, objective, cf source), over seeds.

    cfgen tune --config pipelines/digits.toml                  # RUN/pairs/pairs-*.tar -> RUN/tune/
    cfgen tune --config pipelines/shapes.toml --out runs/shapes-benchmark      # make benchmark
    cfgen tune --config pipelines/digits.toml --set 'tune.learners=["coop", "cocoop"]' --set 'tune.objectives=["cfvlm"]'

Rows (protocol.py): zero-shot; for each learner in tune.learners (prompts: CoOp,
CoOp-CSC, CoCoOp; image side: a linear head and a residual adapter, heads.py) its
baseline (L1 alone, lambda = 0); for each objective in tune.objectives (losses.py)
and each cf source in tune.cf_sources (cfsources.py) a row. For each seed every row
of a learner trains on the same K shots (pairs outside tune.eval_split), from the
same initialisation and in the same batch order (fit.py); only the objective, the
image that plays x^cf and the selection grid's lr / lambda differ. lr, epochs and
lambda are chosen per seed and row on held-out pairs of the shot pool (select.py;
tune.select.mode = 'fixed' keeps the config's values): nothing is chosen on the
evaluation split. Evaluation is on the data source's images of tune.eval_split
(protocol.py: worst-group, base, novel, HM accuracy), summarised as mean ± std over
seeds and as the paired difference to the learner's baseline with a 95% t interval.
Writes to RUN/tune/:

    metrics.json     {"protocol": {...}, "order": [row keys, table order], "rows": {<row key>: {label, learner,
                      objective, cf_source, baseline,
                      base|novel|hm|worst_group: {mean, std}, delta: {<metric>: paired_difference} | null,
                      seconds: {mean, total}, chosen: [per seed {lr, epochs, lam, criterion}]}},
                      "captured": [per learner and objective: share of the true cfs' Δ worst-group]}
    runs.json        per seed: shots, each row's figures, cell accuracies, final losses, the selection
                     criterion at every grid point, seconds
    prompts/<row>-seed<s>.safetensors   the learned ctx (+ meta-net), metadata says how to use it
    heads/<row>-seed<s>.safetensors     an image-side learner's tensors (delta, or the adapter's weights)
    cache/<model id>/...                frozen image features (features.py)
    config.toml      the resolved config
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from cfgen.config import Config, TuneConfig, write_resolved
from cfgen.data.sources import load_class_names, open_source, split_ids
from cfgen.device import pick_device
from cfgen.errors import ConfigError, InputError
from cfgen.shards import atomic_write_json
from cfgen.tune.backends import VLM, load_vlm
from cfgen.tune.cfsources import CounterfactualFeatures, check_sources
from cfgen.tune.cueflips import CueFlips
from cfgen.tune.features import PairFeatures, expand_urls, load_image_set, load_pair_features, refs_fingerprint
from cfgen.tune.fit import RowRun, fit_rows, loss_scale, solve_heads
from cfgen.tune.heads import IMAGE_LEARNERS, ImageSideLearner
from cfgen.tune.losses import cosine_logits, normalize
from cfgen.tune.project import Projected, choose_k, cue_directions
from cfgen.tune.prompts import PromptLearner
from cfgen.tune.select import CRITERION, Picker, Validation, grid_for, validation_set
from cfgen.tune.protocol import METRICS, cell_name, paired_difference, sample_shots, split_classes, split_metrics, summarize

LEARNER_NAMES = {"coop": "CoOp", "coop_csc": "CoOp-CSC", "cocoop": "CoCoOp", "linear": "Linear", "adapter": "Adapter",
                 "project": "zero-shot+Project"}
OBJECTIVE_NAMES = {"dicap": "DiCap", "cfvlm": "CF-VLM", "augment": "CF-aug", "dicap_sym": "DiCap-sym"}
FIXED = ("fixed in advance in the config (lr, epochs, cocoop_epochs, image_lr, image_epochs, lam, alpha/beta/gamma, "
         "margins); none chosen on the evaluation split or any other")
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
    kind: str = "class"  # which pairs it learns from (tune.kinds): 'class', 'cue' or 'both'

    @property
    def baseline(self) -> str | None:
        if self.learner == "project":  # training-free: its baseline is zero-shot itself
            return "zero_shot"
        return self.learner if self.objective else None

    @property
    def stem(self) -> str:
        return self.key.replace("+", "-").replace("[", "-").replace("]", "").replace(":", "-")


def plan_methods(t: TuneConfig) -> list[Method]:
    """zero-shot; per learner its baseline, then pair kind x objective x cf source (only tune.rows, when
    given; cue and both kinds for 'augment' alone); then the projection rows (tune.project)."""
    rows = [Method("zero_shot", "zero-shot")]
    for learner in t.learners:
        rows.append(Method(learner, LEARNER_NAMES[learner], learner))
        for kind in t.kinds:
            for objective in t.objectives if kind == "class" else [o for o in t.objectives if o == "augment"]:
                for source in t.cf_sources:
                    tag = source if kind == "class" else f"{source}:{kind}"
                    key = f"{learner}+{objective}[{tag}]"
                    if t.rows and key not in t.rows and f"{learner}+*" not in t.rows:
                        continue
                    rows.append(Method(key, f"{LEARNER_NAMES[learner]}+{OBJECTIVE_NAMES[objective]}[{tag}]",
                                       learner, objective, source, kind))
    for source in t.project:
        rows.append(Method(f"zero_shot+project[{source}:cue]", f"zero-shot+Project[{source}:cue]", "project",
                           None, source, "cue"))
    return rows


def epochs_for(t: TuneConfig, learner: str) -> int:
    return t.cocoop_epochs if learner == "cocoop" and t.cocoop_epochs else t.epochs


@torch.no_grad()
def class_logits(learner: nn.Module, f: torch.Tensor, classes: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(N, C) cosines of normalised image features f with the learner's vectors of `classes`
    (image-side learners first map f; CoCoOp's per-image prompts are encoded `chunk` images at a time)."""
    classes = classes.to(f.device)
    if isinstance(learner, ImageSideLearner):  # class vectors already in cosine units (heads.py)
        logits = learner.image_features(f) @ learner.class_features(classes=classes).t()
        bias = learner.class_bias(classes)
        return logits if bias is None else logits + bias
    if not learner.conditional:
        return f @ normalize(learner.class_features(classes=classes)).t()
    return torch.cat([cosine_logits(f[i: i + chunk], normalize(learner.class_features(f[i: i + chunk], classes)))
                      for i in range(0, len(f), chunk)])


@torch.no_grad()
def predict_correct(learner: nn.Module, task: Task, feat: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """(N,) bool: each image classified right within its own half (base among base, novel among novel).
    Zero-shot is `ImageSideLearner(zero_shot_text)`: the prompt '<ctx_init> <class name>.'."""
    device = learner_device(learner)
    labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    correct = np.zeros(len(labels_t), dtype=bool)
    for classes in (task.base, task.novel):
        keep = torch.isin(labels_t, classes)
        if keep.any():
            logits = class_logits(learner, normalize(feat[keep].float()).to(device), classes)
            correct[keep.numpy()] = (logits.argmax(1).cpu() == torch.searchsorted(classes, labels_t[keep])).numpy()
    return correct


def learner_device(learner: nn.Module) -> torch.device:
    return next(iter(learner.buffers())).device


def zero_shot_prompts(task: Task, prompt: str) -> list[str]:
    """'<prompt> <class name>.' for every class."""
    return [f"{prompt} {name}." for name in task.names]


def zero_shot_text(vlm: VLM, task: Task, prompt: str) -> torch.Tensor:
    """(C, D) text features of the zero-shot prompts, through the library's own text path."""
    with torch.no_grad():
        return vlm.encode_text(zero_shot_prompts(task, prompt)).float()


def learned_path(out: Path, method: Method, seed: int) -> Path:
    """prompts/<row>-seed<s>.safetensors for a prompt learner, heads/... for an image-side one."""
    folder = "heads" if method.learner in IMAGE_LEARNERS or method.learner == "project" else "prompts"
    return out / folder / f"{method.stem}-seed{seed}.safetensors"


def save_learned(path: Path, learner: nn.Module, vlm: VLM, task: Task, t: TuneConfig, method: Method, seed: int,
                 chosen: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"backend": vlm.name, "model_id": vlm.model_id, "learner": method.learner or "",
            "objective": method.objective or "", "cf_source": method.cf_source or "",
            "ctx_init": t.ctx_init, "method": method.key, "seed": str(seed), "chosen": json.dumps(chosen),
            "class_names": json.dumps(task.names), "class_ids": json.dumps(list(range(len(task.names)))),
            "base_classes": json.dumps(task.base_ids)}
    if isinstance(learner, PromptLearner):
        meta.update(n_ctx=str(learner.n_ctx), layout="[BOS] ctx_1..ctx_n <class name> . [EOS]")
        state = learner.prompt_state()
    else:
        meta.update(use=("linear: class vector c = zero-shot text feature of '<ctx_init> <name>.' + delta[c]"
                         if method.learner == "linear" else
                         "project: f' = normalise(f - (f U^T) U), U = directions (k, D); classes by the zero-shot "
                         "text features" if method.learner == "project" else
                         "adapter: f' = normalise(f + up(relu(down(f)))), classes by the zero-shot text features"))
        state = learner.learned_state()
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
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
        start = time.perf_counter()
        setup = prepare(cfg, run_dir, pairs, log, device)
        seeds = run_seeds(setup, log, seed_workers(cfg.tune, device))
        return write_summary(setup, seeds, time.perf_counter() - start)


def seed_workers(t: TuneConfig, device: torch.device) -> int:
    """Processes the (seed, learner) jobs run in: tune.workers, or (0) one per core this process may
    use. Each is one thread (cpu_threads): the steps are many small ops, which a second thread slows
    down, while a second process doubles the work done. One on a GPU."""
    if device.type != "cpu" or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))
    return max(1, min(t.workers or cores, len(t.seeds) * len(t.learners)))


_FORKED: tuple = ()  # (setup, log): what a forked worker inherits (run_seeds)


def _worker_signals() -> None:
    """A forked worker's signals: SIGTERM kills it (Pool.terminate's way of ending it) and Ctrl-C is the
    parent's to handle. Why: a fork inherits `cfgen`'s handlers, which turn SIGTERM into an exception; a
    worker that took one while holding the pool's task-queue lock died holding it, and the other worker
    and the parent's join then waited forever (a test run hung so)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _learner_job(job: tuple[int, str]) -> dict:
    setup, log = _FORKED
    return train_learner(setup, job[0], job[1], log)


def run_seeds(setup: "TuneSetup", log: Callable[[str], None], workers: int) -> list[dict]:
    """Every (seed, learner) job, in `workers` forked processes; then each seed's figures. The jobs
    share nothing and are deterministic, so the figures are those of one process running them in
    turn (a test checks it)."""
    t = setup.cfg.tune
    learners = list(t.learners) + (["project"] if t.project else [])
    jobs = [(seed, kind) for seed in t.seeds for kind in learners]
    if workers <= 1:
        done = [train_learner(setup, seed, kind, log) for seed, kind in jobs]
    else:
        global _FORKED
        _FORKED = (setup, log)
        log(f"{len(jobs)} (seed, learner) jobs in {workers} processes of one thread each (tune.workers)")
        try:  # the longest learners first, so that no process is left with one long job at the end
            order = sorted(range(len(jobs)), key=lambda i: LEARNER_COST.get(jobs[i][1], 1), reverse=True)
            with multiprocessing.get_context("fork").Pool(workers, initializer=_worker_signals) as pool:
                out = pool.map(_learner_job, [jobs[i] for i in order], chunksize=1)
                pool.close()  # the workers end on the queue's sentinel, not on a signal (the exit's terminate)
                pool.join()
            done = [None] * len(jobs)
            for i, r in zip(order, out):
                done[i] = r
        finally:
            _FORKED = ()
    results = {(seed, kind): r for (seed, kind), r in zip(jobs, done)}
    return [seed_figures(setup, seed, {k: v for kind in learners for k, v in results[(seed, kind)].items()}, log)
            for seed in t.seeds]


LEARNER_COST = {"cocoop": 100, "coop": 10, "coop_csc": 10, "adapter": 5, "linear": 1, "project": 1}
"""Rough relative cost of a learner's job (the pool's scheduling order only)."""


@dataclass
class TuneSetup:
    """Everything a seed needs, loaded once: classes, rows, the frozen features, the evaluation set."""

    cfg: Config
    task: Task
    methods: list[Method]
    vlm: VLM
    data: PairFeatures
    cfs: CounterfactualFeatures
    cue: CueFlips | None  # the shots' cue flips (tune.cue_pairs), None without them
    ev: EvalSet
    pool: np.ndarray  # (pairs,) bool: the pair's factual image is outside the evaluation split
    shots: dict[int, np.ndarray]
    zero_shot: ImageSideLearner
    zero_shot_correct: np.ndarray
    zero_shot_seconds: float
    out: Path

    @property
    def names(self) -> dict[int, str]:
        return dict(enumerate(self.task.names))


def prepare(cfg: Config, run_dir: Path, pairs: str | None, log: Callable[[str], None],
            device: torch.device) -> TuneSetup:
    """Checks, the frozen features of the pairs, the cf sources and the evaluation images; the shots."""
    t = cfg.tune
    names = load_class_names(cfg)
    task = make_task(names)
    source = open_source(cfg)
    methods = plan_methods(t)
    cf_sources = sorted({m.cf_source for m in methods if m.cf_source})
    check_sources(cfg, source, cf_sources)
    shards = pair_shards(cfg, run_dir, pairs)
    vlm = load_vlm(cfg, device)
    # text the VLM cannot take is one line before any work, not a traceback from inside it after the features
    vlm.check_texts(zero_shot_prompts(task, t.ctx_init or "a photo of a"))
    if any(learner not in IMAGE_LEARNERS for learner in t.learners):
        vlm.prompt_tokens(names, t.n_ctx)
    data = load_features(cfg, run_dir, shards, vlm)
    check_class_names(data, names)
    refs = source.samples(names)
    splits = split_ids(cfg) if cfg.data.split else {}
    cfs = CounterfactualFeatures(cfg, data, vlm, source, refs, splits, shards, cache_dir(cfg, run_dir))
    ev = load_eval_set(cfg, vlm, refs, splits, run_dir)
    labels = data.label.numpy()
    if t.eval_split:
        pool = np.array([splits.get(i) != t.eval_split for i in data.factual_ids])
        where = f" outside tune.eval_split={t.eval_split!r}"
    else:
        pool, where = np.ones(len(labels), dtype=bool), ""
    shots = {seed: sample_shots(labels, pool, task.base_ids, t.shots, seed, dict(enumerate(names)), where)
             for seed in t.seeds}
    cfs.prepare(cf_sources, np.concatenate(list(shots.values())))
    cue = None
    if t.cue_pairs:
        cue_shards = expand_urls(str(cfg.path(t.cue_pairs)))
        cue = CueFlips(cfg, data, load_features(cfg, run_dir, cue_shards, vlm), vlm, source, refs, splits, cue_shards,
                       cache_dir(cfg, run_dir))
        cue_sources = sorted({m.cf_source for m in methods if m.cf_source and m.kind != "class"})
        cue.prepare(cue_sources, np.concatenate(list(shots.values())))
        cfs.stats.update({f"{k} (cue flips)": v for k, v in cue.stats.items()})
        shot_rows = cue.expand(np.unique(np.concatenate(list(shots.values()))))[1]
        log(f"cue flips: {sum(map(len, cue.of_image.values()))} pairs of {len(cue.of_image)} images; the shots' images "
            f"have {int((shot_rows >= 0).sum())}")
    log("; ".join([(f"features: {len(data.ids)} pairs from {data.stats['shards']} shards "
                    f"({data.stats['cache_hits']} cached, {data.stats['cache_misses']} encoded), {int(pool.sum())} "
                    "outside the evaluation split"),
                   f"{len(ev.ids)} evaluation images ({'cached' if ev.stats['cached'] else 'encoded'})",
                   f"base classes {task.base_ids}, novel {task.novel_ids}"]
                  + [f"{k}: {v['images']} images ({'cached' if v['cached'] else 'encoded'})" for k, v in cfs.stats.items()]))
    zero_shot = ImageSideLearner(zero_shot_text(vlm, task, t.ctx_init or "a photo of a").to(device))
    t0 = time.perf_counter()
    zs_correct = predict_correct(zero_shot, task, ev.feat, ev.label)
    return TuneSetup(cfg, task, methods, vlm, data, cfs, cue, ev, pool, shots, zero_shot, zs_correct,
                     time.perf_counter() - t0, tune_dir(run_dir))


def _validation(s: TuneSetup, idx: np.ndarray) -> Validation | None:
    if s.cfg.tune.select.mode != "validation":
        return None
    d = s.data
    return validation_set(d.factual_ids, normalize(d.feat.float()), normalize(d.cf_feat.float()), d.label.numpy(),
                          d.cf_label.numpy(), s.pool, idx, s.task.base_ids)


def train_group(s: TuneSetup, kind: str, group: list[Method], idx: np.ndarray, val: Validation | None,
                seed: int) -> tuple[list[nn.Module], list[dict], list[dict], float]:
    """Train every row of one learner over its selection grid, in lockstep within each pair kind (the
    kinds' training sets differ: train_kind); per row the chosen learner, its last losses, the choice
    record and the seconds."""
    out: list = [None] * len(group)
    seconds = 0.0
    for pair_kind in dict.fromkeys(m.kind for m in group):
        members = [i for i, m in enumerate(group) if m.kind == pair_kind]
        learners, infos, choices, secs = train_kind(s, kind, [group[i] for i in members], pair_kind, idx, val, seed)
        seconds += secs
        for i, lr, info, ch in zip(members, learners, infos, choices):
            out[i] = (lr, info, ch)
    return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out], seconds


def training_set(s: TuneSetup, pair_kind: str, source: str, idx: np.ndarray
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(feat, label, cf_label, cf_feat) of the shots `idx` for one pair kind and cf source: 'class' the
    class flips (y*); 'cue' the cue flips, a row each (the shot's image beside each of its cue flips;
    label y, -1 for a shot without one, which every term skips); 'both' the class-flip rows, then the
    cue-flip rows."""
    ti = torch.from_numpy(idx)
    f, y = s.data.feat[ti], s.data.label[ti]
    if pair_kind == "class":
        return f, y, s.data.cf_label[ti], s.cfs.get(source, idx)
    pos, cue_feat, ok = s.cue.get(source, idx)
    f_cue, y_rep = f[torch.from_numpy(pos)], y[torch.from_numpy(pos)]
    y_cue = torch.where(ok, y_rep, torch.full_like(y_rep, -1))
    if pair_kind == "cue":
        return f_cue, y_rep, y_cue, cue_feat
    return (torch.cat([f, f_cue]), torch.cat([y, y_rep]), torch.cat([s.data.cf_label[ti], y_cue]),
            torch.cat([s.cfs.get(source, idx), cue_feat]))


def train_kind(s: TuneSetup, kind: str, group: list[Method], pair_kind: str, idx: np.ndarray,
               val: Validation | None, seed: int) -> tuple[list[nn.Module], list[dict], list[dict], float]:
    """train_group's work for the rows of one pair kind, which share their shots, labels and batches."""
    t = s.cfg.tune
    configs, runs, grids = [], [], []
    feat = label = cf_label = None
    for gi, m in enumerate(group):
        grid = grid_for(t, kind, m.objective)
        grids.append(grid)
        feat, label, cf_label, cf = training_set(s, pair_kind, m.cf_source or "generated", idx)
        for lr in grid.lrs:
            for lam in grid.lams:
                configs.append((gi, lr, lam))
                runs.append(RowRun(m.objective or "dicap", lam, cf, lr))
    epochs = max(g.longest for g in grids)
    checkpoints = sorted({e for g in grids for e in g.epochs})
    device = s.vlm.device
    base = s.task.base.to(device)
    picker = Picker(configs, val and Validation(val.feat.to(device), val.label, val.cf_feat.to(device), val.cf_label,
                                                val.factual_ids),
                    lambda learner, f: class_logits(learner, f, base), len(group))
    if kind == "linear":
        t0 = time.perf_counter()
        learners, infos = solve_heads(s.task, runs, feat, label, cf_label, t, s.zero_shot.zero_shot,
                                      loss_scale(t, s.vlm), n_images=len(idx))
        with torch.no_grad():
            picker(0, learners)
        seconds = time.perf_counter() - t0
    else:
        learners, infos, seconds = fit_rows(s.vlm, s.task, kind, runs, feat, label, cf_label, t, seed, epochs,
                                            s.zero_shot.zero_shot, checkpoints, picker)
    chosen, last = [], []
    for gi in range(len(group)):
        choice = picker.choices[gi]
        i = configs.index((gi, choice.key[0], choice.key[2]))
        learners[i].load_state_dict(choice.state)
        chosen.append((learners[i], infos[i], choice.record()))
    return [c[0] for c in chosen], [c[1] for c in chosen], [c[2] for c in chosen], seconds


def held_out(s: TuneSetup, seed: int) -> tuple[np.ndarray, Validation | None]:
    """The seed's shot indices and its validation pairs (None: select.mode = 'fixed')."""
    idx = s.shots[seed]
    return idx, _validation(s, idx)


def train_learner(s: TuneSetup, seed: int, kind: str, log: Callable[[str], None]) -> dict:
    """Train one learner's rows for one seed, choose, evaluate and save each: {row key: (correct, info)}."""
    t = s.cfg.tune
    idx, val = held_out(s, seed)
    group = [m for m in s.methods if m.learner == kind]
    if kind == "project":
        learners, infos, choices, seconds = project_rows(s, group, idx, val)
    else:
        learners, infos, choices, seconds = train_group(s, kind, group, idx, val, seed)
    out = {}
    for m, learner, info, choice in zip(group, learners, infos, choices):
        t0 = time.perf_counter()
        correct = predict_correct(learner, s.task, s.ev.feat, s.ev.label)
        info.update(train_seconds=seconds / len(group), group_train_seconds=seconds,
                    eval_seconds=time.perf_counter() - t0, chosen=choice)
        save_learned(learned_path(s.out, m, seed), learner, s.vlm, s.task, t, m, seed,
                     {k: v for k, v in choice.items() if k != "scores"})
        out[m.key] = (correct, info)
    log(f"seed {seed}: {LEARNER_NAMES[kind]} trained, {len(group)} rows ({seconds:.1f}s)")
    return out


def project_rows(s: TuneSetup, group: list[Method], idx: np.ndarray, val: Validation | None
                 ) -> tuple[list[nn.Module], list[dict], list[dict], float]:
    """The training-free rows (project.py): per cf source, the cue subspace from the shots' cue-flip
    pairs, k chosen on the held-out pool pairs, zero-shot prompts on the projected features."""
    t0 = time.perf_counter()
    device = s.vlm.device
    base = s.task.base.to(device)
    vd = val and Validation(val.feat.to(device), val.label, val.cf_feat.to(device), val.cf_label, val.factual_ids)
    zs = s.zero_shot.zero_shot
    learners, infos, choices = [], [], []
    for m in group:
        pos, cf, ok = s.cue.get(m.cf_source, idx)
        f = normalize(s.data.feat[torch.from_numpy(idx[pos])].float())
        diffs = (normalize(cf.float()) - f)[ok].to(device)
        k, scores = choose_k(diffs, s.cfg.tune.select.project_k, zs, vd, lambda lr, x: class_logits(lr, x, base))
        learners.append(Projected(zs, cue_directions(diffs, k)))
        infos.append({"pairs": int(ok.sum())})
        choices.append({"lr": 0.0, "epochs": 0, "lam": 0.0, "k": k, "criterion": scores.get(f"k={k}"),
                        "scores": scores})
    return learners, infos, choices, time.perf_counter() - t0


def seed_figures(s: TuneSetup, seed: int, results: dict[str, tuple[np.ndarray, dict]],
                 log: Callable[[str], None]) -> dict:
    """One seed's figures of every row: {"seed", "shots", ..., "methods": {key: figures}}."""
    t = s.cfg.tune
    idx, val = held_out(s, seed)
    excluded = {s.data.factual_ids[i] for i in idx} | set(val.factual_ids if val else [])
    mask = np.ones(len(s.ev.ids), dtype=bool) if t.eval_split else np.array([i not in excluded for i in s.ev.ids])
    row: dict = {"seed": seed, "shots": len(idx), "shot_ids": [s.data.ids[i] for i in idx],
                 "validation_images": len(val.factual_ids) if val else 0,
                 "validation_counterfactuals": len(val.cf_label) if val else 0,
                 "eval_images": int(mask.sum()), "methods": {}}
    results = {"zero_shot": (s.zero_shot_correct, {"eval_seconds": s.zero_shot_seconds}), **results}
    for m in s.methods:
        correct, info = results[m.key]
        fig = split_metrics(correct[mask], s.ev.label[mask], s.ev.group[mask], s.task.base_ids, s.names)
        info["seconds"] = info.get("train_seconds", 0.0) + info["eval_seconds"]
        row["methods"][m.key] = {**fig, **info}
        chosen = info.get("chosen")
        picked = ""
        if chosen:
            how = ("solved" if m.learner == "linear" else f"k {chosen['k']}" if m.learner == "project" else
                   f"lr {chosen['lr']:g}, {chosen['epochs']} ep")
            picked = f" [{how}, λ {chosen['lam']:g}]"
        log(f"seed {seed} {m.label:<28} worst base {fig['worst_base']:.3f} base {fig['base']:.3f} "
            f"novel {fig['novel']:.3f} worst novel {fig['worst_novel']:.3f} ({info['seconds']:.1f}s){picked}")
    return row


def selection_protocol(t: TuneConfig) -> dict:
    if t.select.mode == "fixed":
        return {"mode": "fixed", "rule": FIXED}
    return {"mode": "validation", "criterion": CRITERION, "grid": dataclasses.asdict(t.select),
            "schedule": "each epoch budget is a checkpoint of one run, cosine over the grid's largest budget"}


def write_summary(s: TuneSetup, runs: list[dict], seconds_total: float) -> dict:
    """metrics.json (rows over seeds, paired differences), runs.json (per seed), config.toml."""
    t, names = s.cfg.tune, s.task.names
    per_seed = {m.key: [r["methods"][m.key] for r in runs] for m in s.methods}
    rows = {}
    for m in s.methods:
        figs = per_seed[m.key]
        delta = None
        if m.baseline:
            delta = {k: paired_difference([r[k] for r in figs], [r[k] for r in per_seed[m.baseline]])
                     for k in METRICS}
        secs = [r["seconds"] for r in figs]
        rows[m.key] = {"label": m.label, "learner": m.learner, "objective": m.objective, "cf_source": m.cf_source,
                       "kind": m.kind,
                       "baseline": m.baseline, **summarize(figs), "delta": delta,
                       "seconds": {"mean": float(np.mean(secs)), "total": float(np.sum(secs))},
                       "chosen": [{k: v for k, v in r["chosen"].items() if k != "scores"} for r in figs
                                  if "chosen" in r]}
    cells: dict[str, int] = {}
    for g, c in zip(s.ev.group, s.ev.label):
        key = cell_name(g, names[c])
        cells[key] = cells.get(key, 0) + 1
    metrics = {
        "protocol": {
            "eval_split": t.eval_split, "eval_images": len(s.ev.ids), "cells": dict(sorted(cells.items())),
            "classes": names, "base": s.task.base_ids, "novel": s.task.novel_ids,
            "pairs": len(s.data.ids), "shot_pool": int(s.pool.sum()), "shots": t.shots, "seeds": list(t.seeds),
            "backend": s.vlm.name, "model_id": s.vlm.model_id,
            "selection": selection_protocol(t),
            "hyperparameters": {"lam": t.lam, "epochs": t.epochs, "cocoop_epochs": epochs_for(t, "cocoop"),
                                "lr": t.lr, "image_lr": t.image_lr, "image_epochs": t.image_epochs,
                                "batch_size": t.batch_size, "n_ctx": t.n_ctx, "ctx_init": t.ctx_init,
                                "temperature": t.temperature, "alpha": t.alpha, "beta": t.beta, "gamma": t.gamma,
                                "margin_csd": t.margin_csd, "margin_fcd": t.margin_fcd},
            "interval": INTERVAL,
        },
        "order": [m.key for m in s.methods],
        "rows": rows,
        "captured": gain_captured(rows, per_seed, s.methods),
    }
    atomic_write_json(s.out / "metrics.json", metrics)
    atomic_write_json(s.out / "runs.json", {
        "features": s.data.stats, "eval": s.ev.stats, "cf_sources": s.cfs.stats,
        "nearest_counterfactuals": {s.data.ids[i]: v for i, v in sorted(s.cfs.nearest_ids.items())},
        "runs": runs, "seconds": seconds_total})
    write_resolved(s.cfg, s.out)
    return metrics


def gain_captured(rows: dict, per_seed: dict, methods: list[Method]) -> list[dict]:
    """Per (learner, objective) with generated and true rows: the share of the true counterfactuals'
    Δ worst-group (base cells) that cfgen's pairs capture (ratio of the mean Δs), and generated - nearest as a
    paired difference over seeds (when the nearest row exists)."""
    out = []
    keys = {m.key for m in methods}
    for m in methods:
        if m.cf_source != "generated":
            continue
        true_key, near_key = (m.key.replace("[generated", f"[{src}") for src in ("true", "nearest"))
        if true_key not in keys:
            continue
        d_gen = rows[m.key]["delta"]["worst_base"]["mean"]
        d_true = rows[true_key]["delta"]["worst_base"]["mean"]
        item = {"learner": m.learner, "objective": m.objective, "kind": m.kind, "metric": "worst_base",
                "label": m.label.replace("[generated", "[").replace("[]", "").replace("[:", "["),
                "delta_generated": d_gen, "delta_true": d_true,
                "share": d_gen / d_true if abs(d_true) > 1e-12 else None}
        if near_key in keys:
            item["generated_minus_nearest"] = paired_difference(
                [r["worst_base"] for r in per_seed[m.key]], [r["worst_base"] for r in per_seed[near_key]])
        out.append(item)
    return out
