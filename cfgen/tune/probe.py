"""How much room a prompt has: linear probes on the frozen VLM's image features.

    python -m cfgen.tune.probe --config pipelines/shapes6.toml [--out RUN_DIR]

A learned prompt gives each class one text vector t_c and classifies by cos(f(x), t_c): a linear
classifier of the normalised image feature f(x). A linear probe fitted on the same features is
therefore what the best possible prompt could reach (on these features, with that data). Two
probes (multinomial logistic regression, scikit-learn), scored as `cfgen tune` scores a row --
base images among the base classes, novel among the novel, worst (group, class) cell:

- `train split`: fitted on every image of the split the shots come from (the train split, where the
  cue holds): the best a classifier taught by that split's images alone can do;
- `balanced half of eval`: fitted on half of the evaluation split (every (group, class) cell split
  in two), scored on the other half: whether the features hold the class apart from the cue at all.

Features come from `cfgen tune`'s cache (RUN_DIR/tune/cache/), computed there if missing. The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from cfgen.config import load_config
from cfgen.data.sources import load_class_names, open_source, split_ids
from cfgen.tune.backends import load_vlm
from cfgen.tune.protocol import split_classes, split_metrics
from cfgen.tune.train import load_eval_set


def _probe_correct(train_x, train_y, test_x, test_y, classes: list[int]) -> np.ndarray:
    """Fit a probe over `classes` only (one half) and say which test images of those classes it gets right."""
    from sklearn.linear_model import LogisticRegression

    fit = np.isin(train_y, classes)
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(train_x[fit], train_y[fit])
    return clf.predict(test_x) == test_y


def probe_scores(train_x, train_y, test_x, test_y, test_groups, base: list[int], novel: list[int],
                 names: dict[int, str]) -> dict:
    """base / novel / hm / worst_group of per-half probes fitted on (train_x, train_y), scored on test."""
    correct = np.zeros(len(test_y), dtype=bool)
    for half in (base, novel):
        keep = np.isin(test_y, half)
        if keep.any() and len(set(train_y[np.isin(train_y, half)])) == len(half):
            correct[keep] = _probe_correct(train_x, train_y, test_x[keep], test_y[keep], half)
    out = split_metrics(correct, test_y, test_groups, base, names)
    out.pop("cells")
    return out


def balanced_halves(labels: np.ndarray, groups: np.ndarray, seed: int = 0) -> np.ndarray:
    """A boolean mask picking half of every (group, class) cell (the fitting half)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for g, c in {(str(g), int(c)) for g, c in zip(groups, labels)}:
        idx = np.flatnonzero((groups.astype(str) == g) & (labels == c))
        mask[rng.permutation(idx)[: len(idx) // 2]] = True
    return mask


def run_probe(config: Path, run_dir: Path | None = None) -> dict:
    cfg = load_config(config)
    run_dir = run_dir or Path("runs") / cfg.pipeline.name
    names = load_class_names(cfg)
    base, novel = split_classes(list(range(len(names))))
    vlm = load_vlm(cfg, torch.device("cpu"))
    refs, splits = open_source(cfg).samples(names), split_ids(cfg)
    evaluation = load_eval_set(cfg, vlm, refs, splits, run_dir)
    shots_split = sorted({s for s in splits.values() if s != cfg.tune.eval_split})
    train_cfg = dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, eval_split=shots_split[0]))
    train = load_eval_set(train_cfg, vlm, refs, splits, run_dir)
    norm = lambda f: torch.nn.functional.normalize(f.float(), dim=-1).numpy()  # noqa: E731 (cos, as prompts)
    ex, tx = norm(evaluation.feat), norm(train.feat)
    named = dict(enumerate(names))
    half = balanced_halves(evaluation.label, evaluation.group)
    out = {
        "classes": names, "base": [names[c] for c in base], "novel": [names[c] for c in novel],
        "eval_split": cfg.tune.eval_split, "eval_images": len(evaluation.ids), "train_split": shots_split[0],
        "train_images": len(train.ids),
        "train split": probe_scores(tx, train.label, ex, evaluation.label, evaluation.group, base, novel, named),
        "balanced half of eval": probe_scores(ex[half], evaluation.label[half], ex[~half], evaluation.label[~half],
                                              evaluation.group[~half], base, novel, named),
    }
    return out


def format_probe(r: dict) -> str:
    lines = [f"linear probes on the frozen image features ({r['eval_images']} {r['eval_split']} images; "
             f"base {', '.join(r['base'])} | novel {', '.join(r['novel'])})",
             f"{'fitted on':34} {'base':>6} {'novel':>6} {'HM':>6} {'worst-group':>12}"]
    for key, label in (("train split", f"the {r['train_split']} split ({r['train_images']} images)"),
                       ("balanced half of eval", "a cell-balanced half of eval")):
        m = r[key]
        lines.append(f"{label:34} {m['base']:6.3f} {m['novel']:6.3f} {m['hm']:6.3f} {m['worst_group']:12.3f}")
    lines.append(json.dumps(r))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m cfgen.tune.probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None, help="run directory whose tune/cache to use (runs/<name>)")
    args = ap.parse_args(argv)
    r = run_probe(args.config, args.out)
    print(format_probe(r))
    return r


if __name__ == "__main__":
    main()
