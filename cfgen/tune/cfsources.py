"""Which image plays the counterfactual x^cf of a shot (tune.cf_sources), as frozen features.

A shot is a pair (x, y*): a factual image x of class y and its target class y* (the
pair's `cf_label` in K.json). The counterfactual objectives contrast x with an image
of y*; the ablation asks which image that should be:

    generated  the pair's own counterfactual (cfgen's invert -> guide -> pack)
    true       the data source's causal model renders x's exogenous factors under y*
               (`Source.causal.true_counterfactual(origin, y*)`): the upper bound
    nearest    the real image of class y* nearest to x by cosine in the frozen VLM's
               feature space, from the samples outside tune.eval_split, x itself
               excluded: a non-minimal negative (CPL's feature-space counterfactual)
    none       no counterfactual: the baseline (lambda = 0), which every learner gets

All three give a (len(idx), D) tensor for the same shot indices, so every source
trains on identical shots, initialisation and batch order.

    check_sources(cfg, source, ["generated", "true"])      # before any work: 'true' needs a causal model
    feats = CounterfactualFeatures(cfg, pairs, vlm, source, refs, splits, shards, cache_dir)
    feats.prepare(["true"], shot_indices)
    fcf = feats.get("true", shot_indices)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from cfgen.config import Config
from cfgen.data.base import SampleRef, Source
from cfgen.errors import ConfigError, InputError
from cfgen.tune.backends import VLM
from cfgen.tune.features import ImageSet, PairFeatures, load_image_set, refs_fingerprint
from cfgen.tune.losses import normalize


def pair_origins(ids: list[str], refs: list[SampleRef], shards: list[Path]) -> dict[str, str]:
    """The source `origin` of each pair id: from the source's samples, else from manifest.parquet
    beside the shards (ids the source does not list, e.g. with data.repeat's '-r<k>')."""
    by_id = {r.id: r.origin for r in refs}
    out = {i: by_id[i] for i in ids if i in by_id}
    missing = [i for i in ids if i not in out]
    if missing:
        for folder in dict.fromkeys(s.parent for s in shards):
            manifest = folder / "manifest.parquet"
            if manifest.is_file():
                table = pq.read_table(manifest).to_pydict()
                found = dict(zip(table["id"], table["origin"]))
                found.update(zip(table.get("factual_id", []), table["origin"]))  # ids of the factual images
                out.update({i: found[i] for i in missing if found.get(i)})
        missing = [i for i in ids if i not in out]
    if missing:
        raise InputError(f"tune.cf_sources 'true': pair {missing[0]} is not a sample of the source and no "
                         "manifest.parquet beside the shards names its origin")
    return out


def nearest_indices(x: torch.Tensor, x_ids: list[str], targets: np.ndarray, cand: torch.Tensor,
                    cand_ids: list[str], cand_labels: np.ndarray) -> np.ndarray:
    """For each row i of x: the index of the candidate of class targets[i] with the highest cosine to
    x[i], x_ids[i] itself excluded. x (P, D), cand (M, D) features (normalized here)."""
    sims = normalize(x.float()) @ normalize(cand.float()).t()  # (P, M)
    cand_ids_arr = np.asarray(cand_ids, dtype=object)
    out = np.empty(len(x), dtype=np.int64)
    for i in range(len(x)):
        ok = (cand_labels == targets[i]) & (cand_ids_arr != x_ids[i])
        if not ok.any():
            raise InputError(f"tune.cf_sources 'nearest': no real image of class {int(targets[i])} outside the "
                             f"evaluation split to pair with {x_ids[i]}")
        row = sims[i].clone()
        row[torch.from_numpy(~ok)] = -float("inf")
        out[i] = int(row.argmax())
    return out


def check_sources(cfg: Config, source: Source, sources: list[str]) -> None:
    """Fail before any work when a cf source cannot work with this data source."""
    if "true" in sources and source.causal is None:
        raise ConfigError(f"tune.cf_sources 'true' needs a data source with a causal model; "
                          f"{cfg.data.source!r} has none (use 'generated' or 'nearest')")


class CounterfactualFeatures:
    """x^cf features of the pairs for each cf source; 'true' and 'nearest' are computed for the
    pairs they are asked for (the shots), once, and cached in RUN/tune/cache/."""

    def __init__(self, cfg: Config, pairs: PairFeatures, vlm: VLM, source: Source, refs: list[SampleRef],
                 splits: dict[str, str], shards: list[Path], cache_dir: Path | None):
        self.cfg, self.pairs, self.vlm, self.source = cfg, pairs, vlm, source
        self.refs, self.splits, self.shards, self.cache_dir = refs, splits, shards, cache_dir
        self.stats: dict[str, dict] = {}
        self._rows: dict[str, dict[int, torch.Tensor]] = {}
        self.nearest_ids: dict[int, str] = {}
        """pair index -> the id of the real image chosen as its nearest counterfactual."""

    def prepare(self, sources: list[str], idx: np.ndarray) -> None:
        """Compute the features of every source in `sources` for the pair indices `idx`."""
        idx = np.unique(idx)
        if "true" in sources:
            self._rows["true"] = self._true(idx)
        if "nearest" in sources:
            self._rows["nearest"] = self._nearest(idx)

    def get(self, source: str, idx: np.ndarray) -> torch.Tensor:
        """(len(idx), D) counterfactual features of the pairs idx under `source`."""
        if source == "generated":
            return self.pairs.cf_feat[torch.from_numpy(idx)]
        rows = self._rows[source]
        return torch.stack([rows[int(i)] for i in idx])

    def _true(self, idx: np.ndarray) -> dict[int, torch.Tensor]:
        causal = self.source.causal
        ids = [self.pairs.factual_ids[i] for i in idx]
        origins = pair_origins(ids, self.refs, self.shards)
        targets = [int(self.pairs.cf_label[i]) for i in idx]
        images = encode_truths("true-cf", self.cfg, ids, origins, targets, causal.true_counterfactual, ids,
                               self.vlm, self.cache_dir)
        self.stats["true"] = images.stats
        return {int(i): images.feat[k] for k, i in enumerate(idx)}

    def _nearest(self, idx: np.ndarray) -> dict[int, torch.Tensor]:
        eval_split = self.cfg.tune.eval_split
        targets = np.array([int(self.pairs.cf_label[i]) for i in idx])
        wanted = set(targets.tolist())
        cands = [r for r in self.refs if not r.error and r.label in wanted and self.splits.get(r.id) != eval_split]
        fp = refs_fingerprint(self.cfg, cands)
        images = load_image_set(f"nearest-pool-not-{eval_split}", fp, [r.id for r in cands], [r.load for r in cands],
                                self.vlm, self.cache_dir, self.cfg.tune.encode_batch_size)
        label_of = {r.id: r.label for r in cands}
        cand_labels = np.array([label_of[i] for i in images.ids])
        t = torch.from_numpy(idx)
        best = nearest_indices(self.pairs.feat[t], [self.pairs.factual_ids[i] for i in idx], targets, images.feat,
                               images.ids, cand_labels)
        self.stats["nearest"] = {**images.stats, "candidates": len(images.ids)}
        self.nearest_ids.update({int(i): images.ids[b] for i, b in zip(idx, best)})
        return {int(i): images.feat[b] for i, b in zip(idx, best)}


def encode_truths(name: str, cfg: Config, ids: list[str], origins: dict[str, str], dos: list, render,
                  cache_ids: list[str], vlm, cache_dir) -> ImageSet:
    """Features of the causal model's true counterfactuals, `render(origin, do)` for each pair (a class
    flip's y*, a cue flip's (concept, value)), cached under a fingerprint of (factual id, origin, do). A
    pair the model cannot render is an error: the true rows would silently compare other shots."""
    fp = refs_fingerprint(cfg, [], extra=[(i, origins[i], d) for i, d in zip(ids, dos)])
    loaders = [lambda o=origins[i], d=d: render(o, d) for i, d in zip(ids, dos)]
    images = load_image_set(name, fp, cache_ids, loaders, vlm, cache_dir, cfg.tune.encode_batch_size)
    if images.skipped:
        raise InputError(f"tune.cf_sources 'true': the causal model could not render {images.skipped[0]}")
    return images
