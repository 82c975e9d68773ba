"""Cue-flip pairs beside the class flips: what plays x^cf of a shot when the pair keeps the class.

A class-flip pair (tune.pairs, the classifier path: circle on sand -> square on sand) changes the
class and keeps the cue; a cue-flip pair (tune.cue_pairs, the text path's do(environment): circle on
sand -> circle on grass) keeps the class and changes the cue. Both are made from the same pool
images, so a shot (a class-flip pair's factual image) finds its cue flip by factual id. The cue flip's
counterfactual for each cf source (tune.cf_sources), as for the class flips (cfsources.py):

    generated  the pair's own x^cf (cfgen's invert -> guide -> pack, guide.mode = 'text')
    true       the data source's causal model renders x's exogenous factors under the pair's do()
               (`causal.intervene(origin, concept, value)`: shapes-captioned's renderer)
    nearest    the real image of class y whose concept has the do()'s value (a circle on grass, from the
               samples outside tune.eval_split) nearest to x by cosine in the frozen feature space

An image may have several cue flips (guide.target = 'all': one per other environment); each is a row
of its own, the shot's factual image repeated beside it. A shot whose image has none (its pair was
rejected by pack's gates) keeps one row with a validity mask of False, the same for all three sources,
so they train on identical shots.

    cue = CueFlips(cfg, class_pairs, cue_pairs, vlm, source, refs, splits, cue_shards, cache_dir)
    cue.prepare(["generated", "true"], shot_indices)      # shot indices are class-pair indices
    pos, feat, ok = cue.get("true", shot_indices)          # (M,) position in shot_indices, (M, D), (M,) bool
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cfgen.config import Config
from cfgen.data.base import SampleRef, Source
from cfgen.errors import ConfigError, InputError
from cfgen.tune.backends import VLM
from cfgen.tune.cfsources import encode_truths, nearest_indices, pair_origins
from cfgen.tune.features import PairFeatures, load_image_set, refs_fingerprint


class CueFlips:
    """The cue-flip pair of each shot, and its x^cf features per cf source."""

    def __init__(self, cfg: Config, pairs: PairFeatures, cue: PairFeatures, vlm: VLM, source: Source,
                 refs: list[SampleRef], splits: dict[str, str], shards: list[Path], cache_dir: Path | None):
        self.cfg, self.pairs, self.cue, self.vlm, self.source = cfg, pairs, cue, vlm, source
        self.refs, self.splits, self.shards, self.cache_dir = refs, splits, shards, cache_dir
        kept = [i for i in range(len(cue.ids)) if int(cue.label[i]) == int(cue.cf_label[i])]
        if not kept:
            raise InputError("tune.cue_pairs: no pair keeps its class (cf_label = label): these are not cue flips")
        self.of_image: dict[str, list[int]] = {}
        for i in kept:  # every cue flip of an image, in shard order
            self.of_image.setdefault(cue.factual_ids[i], []).append(i)
        self.stats: dict[str, dict] = {}
        self._rows: dict[str, dict[int, torch.Tensor]] = {}

    def check(self, sources: list[str]) -> None:
        """Fail before any work when a cf source cannot give cue flips with this data source."""
        causal = self.source.causal
        if "true" in sources and not hasattr(causal, "intervene"):
            raise ConfigError(f"tune.cue_pairs with cf source 'true' needs a causal model that renders do() of any "
                              f"concept; data.source {self.cfg.data.source!r} has none (shapes-captioned has)")
        if "nearest" in sources and not any(r.concepts for r in self.refs):
            raise ConfigError(f"tune.cue_pairs with cf source 'nearest' needs each sample's concepts; "
                              f"data.source {self.cfg.data.source!r} gives none (shapes-captioned does)")

    def expand(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pos, rows): for each class-pair index idx[p], one entry (p, r) per cue pair r of its image,
        or (p, -1) when it has none."""
        pairs = [(p, r) for p, i in enumerate(idx) for r in self.of_image.get(self.pairs.factual_ids[i], [-1])]
        return np.array([p for p, _ in pairs], dtype=np.int64), np.array([r for _, r in pairs], dtype=np.int64)

    def prepare(self, sources: list[str], idx: np.ndarray) -> None:
        self.check(sources)
        rows = self.expand(np.unique(idx))[1]
        rows = np.unique(rows[rows >= 0])
        if "true" in sources:
            self._rows["true"] = self._true(rows)
        if "nearest" in sources:
            self._rows["nearest"] = self._nearest(rows)

    def get(self, source: str, idx: np.ndarray) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """The shots' cue flips under `source`: pos (M,) the position in idx of each one's shot, (M, D) x^cf
        features and (M,) bool, False for a shot without a cue flip (its row is the factual feature, and
        the mask keeps it out of every term)."""
        pos, rows = self.expand(idx)
        ok = torch.from_numpy(rows >= 0)
        out = self.pairs.feat[torch.from_numpy(idx[pos])].clone()
        for k, r in enumerate(rows):
            if r >= 0:
                out[k] = self.cue.cf_feat[r] if source == "generated" else self._rows[source][int(r)]
        return pos, out, ok

    def _do(self, r: int) -> tuple[str, str]:
        do = self.cue.do_of(r)
        if do is None:
            raise InputError(f"tune.cue_pairs: pair {self.cue.ids[r]} records no intervention (K.json "
                             "'intervention'), so no true or nearest counterfactual can be made for it")
        return do

    def _true(self, rows: np.ndarray) -> dict[int, torch.Tensor]:
        causal = self.source.causal
        ids = [self.cue.factual_ids[r] for r in rows]
        origins = pair_origins(ids, self.refs, self.shards)
        dos = [self._do(int(r)) for r in rows]
        images = encode_truths("true-cue", self.cfg, ids, origins, dos, lambda o, d: causal.intervene(o, *d)[0],
                               [self.cue.ids[r] for r in rows], self.vlm, self.cache_dir)
        self.stats["true"] = images.stats
        return {int(r): images.feat[k] for k, r in enumerate(rows)}

    def _nearest(self, rows: np.ndarray) -> dict[int, torch.Tensor]:
        eval_split = self.cfg.tune.eval_split
        labels = {int(self.cue.label[r]) for r in rows}
        cands = [r for r in self.refs if not r.error and r.label in labels and self.splits.get(r.id) != eval_split]
        fp = refs_fingerprint(self.cfg, cands)
        images = load_image_set(f"nearest-cue-not-{eval_split}", fp, [r.id for r in cands], [r.load for r in cands],
                                self.vlm, self.cache_dir, self.cfg.tune.encode_batch_size)
        by_id = {r.id: r for r in cands}
        cand_ids = np.array(images.ids)
        cand_label = np.array([by_id[i].label for i in images.ids])
        cand_value: dict[str, np.ndarray] = {}  # concept -> each candidate's value, built once per concept
        out = {}
        for r in rows:
            concept, value = self._do(int(r))
            if concept not in cand_value:
                cand_value[concept] = np.array([by_id[i].concepts.get(concept) for i in images.ids], dtype=object)
            y = int(self.cue.label[r])
            # the candidates of class y with the do()'s value, coded as 'class' y vs anything else
            keep = (cand_label == y) & (cand_value[concept] == value)
            if not (keep & (cand_ids != self.cue.factual_ids[r])).any():
                raise InputError(f"tune.cf_sources 'nearest': no real image of class {y} with {concept} = {value!r} "
                                 f"outside the evaluation split to pair with {self.cue.factual_ids[r]}")
            best = nearest_indices(self.cue.feat[[int(r)]], [self.cue.factual_ids[r]], np.array([1]), images.feat,
                                   images.ids, keep.astype(np.int64))
            out[int(r)] = images.feat[int(best[0])]
        self.stats["nearest"] = {**images.stats, "candidates": len(images.ids)}
        return out
