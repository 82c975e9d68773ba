"""The guide stage's compute for guide.mode = 'text': do(concept = value) on each sample's caption.

    cfgen run --config pipelines/shapes-text.toml                              # graph + CSG
    cfgen run --config pipelines/shapes-text.toml --set text.propagate=false --set text.csg=false

FM-CGM's abduction -> action -> prediction, per factual image x0 with concept state S and caption Y:
    abduction   the DDIM trajectory of x0 under Y (csg.abduct), u its end;
    action      for each concept c of text.intervene and each value v (guide.target 'all': every other
                value of c's domain; 'random': one, from the sample's seed): S' = graph.do(S, c, v), which
                also changes c's descendants by the graph's mechanisms (text.propagate), Y' = caption(S');
    prediction  CSG (text.csg): one edit per changed concept k, its term eps(Y_k) - eps(Y) masked where
                k's new words are attended to and where the term is large, the rest of the image on x0's
                own trajectory (cfgen/csg.py); Y_k is caption(S with k set to S'[k]) (text.edit_prompt
                'concept', FM-CGM's, the terms summed) or Y' itself for every k ('counterfactual', the
                terms averaged where their masks overlap); without CSG, the reverse under Y' alone,
                unmasked: edit-friendly DDIM regeneration with the edited caption.
Why whole captions (csg's edit_reference 'base'): a small model trained on whole captions knows no lone
concept phrases, and eps(Y_k) - eps(Y) is then the change of k and nothing else. Why Y' can be better: a
model trained on captions that obey the graph never saw 'a red square' (the shape alone changed), while
Y' is a caption it knows (docs/text-interventions.md measures both).

The reconstruction stored beside each pair is decode(encode(x0)): the text path's round trip is exact
by construction (csg.py's r_i), so all a reconstruction can lose is the codec's (none for pixel models).
Each pair's guidance_scale is the scale its edit ran at: text.edit_scale with CSG, 1.0 without (csg_params).

`TextGuide` is this mode behind the guide stage's one interface (stages/guide_mode.py); the graph checks
(load_graph, checked_graph) also serve the invert stage and `cfgen verify`.
"""

from __future__ import annotations

import json
import re

import numpy as np
import torch

from cfgen.concepts import ConceptGraph, Intervention, check_edges, class_concept
from cfgen.config import Config
from cfgen.csg import ConceptEdit, CSGParams, abduct, csg_reverse, recording_cross_attention, token_positions
from cfgen.data.sources import open_source
from cfgen.errors import ConfigError
from cfgen.models.runtime import Models
from cfgen.stages.guide_mode import BatchResult
from cfgen.targets import sample_seed
from cfgen.tensors import to_model_space, to_uint8


def load_graph(cfg: Config, source) -> ConceptGraph:
    """text.graph, or the source's own graph (shapes-text); a source with neither is a config error."""
    if cfg.text.graph:
        return ConceptGraph.load(cfg.path(cfg.text.graph))
    graph = getattr(source.causal, "graph", None) if source.causal is not None else None
    if graph is None:
        raise ConfigError(f"guide.mode = 'text' needs text.graph (a concept graph JSON): data.source = "
                          f"{cfg.data.source!r} has no graph of its own")
    return graph


def checked_graph(cfg: Config, refs: list) -> ConceptGraph:
    """load_graph, checked against the config and the input samples `refs` before any work: text.intervene
    names concepts of the graph; every sample has a concept state the graph holds; where the source knows
    its own graph (the oracle pack judges each pair with), the graph sets no value the source lacks and
    has no edge the source says is not there (concepts.check_edges); and no two pairs get one key."""
    source = open_source(cfg)
    graph = load_graph(cfg, source)
    unknown = [c for c in cfg.text.intervene if c not in graph.domains]
    if unknown:
        raise ConfigError(f"text.intervene: {', '.join(map(repr, unknown))} not in the concept graph "
                          f"({', '.join(graph.concepts)})")
    if not all(r.concepts for r in refs):
        raise ConfigError(f"guide.mode = 'text' needs each sample's concept state: data.source = "
                          f"{cfg.data.source!r} gives none (shapes-text does)")
    for state in {tuple(sorted(r.concepts.items())) for r in refs}:
        try:
            graph.check_state(dict(state))
        except ConfigError as exc:
            raise ConfigError(f"the concept graph does not fit data.source {cfg.data.source!r}: "
                              f"a sample's {exc}") from None
    own = getattr(source.causal, "graph", None) if source.causal is not None else None
    for concept in graph.concepts if own is not None else ():
        knows = own.domains.get(concept, {})
        lacks = [v for v in graph.domains[concept] if v not in knows]
        if lacks:
            raise ConfigError(f"the concept graph does not fit data.source {cfg.data.source!r}: {concept} = "
                              f"{lacks[0]!r} is not a value the source knows ({', '.join(knows)}), "
                              "so no pair that sets it could be judged")
    if own is not None:
        check_edges(graph, own, cfg.data.source)
    _check_pair_keys(cfg, graph, refs)
    return graph


def _check_pair_keys(cfg: Config, graph: ConceptGraph, refs: list) -> None:
    """Every pair key of the run once (pair_key makes them dot-free, which can make two alike)."""
    owner: dict[str, str] = {}
    for r in refs:
        seed = sample_seed(cfg.pipeline.seed, r.id)
        for iv in plan(graph, r.concepts, cfg.text.intervene, cfg.guide.target, seed, cfg.text.propagate):
            key = pair_key(r.id, iv)
            if key in owner:
                raise ConfigError(f"two pairs would have the key {key!r} (samples {owner[key]!r} and {r.id!r}); "
                                  "rename the sample ids or the graph's values")
            owner[key] = r.id


def plan(graph: ConceptGraph, state: dict[str, str], concepts: list[str], target: str, seed: int,
         propagate: bool) -> list[Intervention]:
    """The interventions of one sample: per concept, every other value ('all') or one drawn from its seed."""
    out = []
    for k, concept in enumerate(concepts):
        others = [v for v in graph.domains[concept] if v != state[concept]]
        if not others:
            continue
        if target == "random":
            others = [others[int(np.random.default_rng([seed, k]).integers(len(others)))]]
        out += [graph.do(state, concept, v, propagate=propagate) for v in others]
    return out


def pair_key(factual_id: str, iv: Intervention) -> str:
    """<id>_do_<concept>_<value>, dot-free (a webdataset key ends at its first dot)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", f"{factual_id}_do_{iv.concept}_{iv.value}")


def intervention_text(iv: Intervention) -> str:
    return f"do({iv.concept}={iv.value})"


def edits_json(iv: Intervention) -> str:
    return json.dumps(iv.to_json(), sort_keys=True)


class TextGuide:
    """guide.mode = 'text' behind the guide stage's interface (stages/guide_mode.py): the pairs of each
    sample's interventions. Built before any work: the graph is checked against the config and the data
    (checked_graph), and each sample's concept state is kept by its id."""

    def __init__(self, cfg: Config, classes: list[str], refs: list):
        self.cfg, self.classes = cfg, classes
        self.graph = checked_graph(cfg, refs)
        self.states = {r.id: r.concepts for r in refs}
        self.params = csg_params(cfg)

    def refusal(self, row: dict) -> str | None:
        return None  # every class may be intervened on: the do()s come from the graph, not from the label

    def first_guess(self, steps: int) -> int:
        """Its reconstruction's cost only: how many do()s an image gets is known when its state is."""
        return steps

    @torch.no_grad()
    def batch(self, models: Models, grid: list[int], rows: list[dict], factual: np.ndarray,
              noise: np.ndarray) -> BatchResult:
        """Interventions on a batch of factual images (uint8 (B, H, W, C)); `noise` is not read: abduction
        inverts each image under its own caption here, on the same grid."""
        cfg, graph = self.cfg, self.graph
        states = [self.states[r["id"]] for r in rows]
        pairs = [(b, iv) for b, s in enumerate(states)
                 for iv in plan(graph, s, cfg.text.intervene, cfg.guide.target, rows[b]["seed"], cfg.text.propagate)]
        x0 = models.encode(to_model_space(torch.from_numpy(np.require(factual, requirements="W"))).to(models.device))
        captions = [graph.caption(s) for s in states]
        prompts = [_prompts(graph, iv, cfg.text.csg, cfg.text.edit_prompt) for _, iv in pairs]
        cf, finite, share = _edit(models, grid, self.params, x0, captions, [b for b, _ in pairs], prompts,
                                  factual.shape[1:], cfg.guide.batch_size)
        cc = class_concept(graph, self.classes)
        cf_labels = np.array([self.classes.index(iv.after[cc]) if cc else rows[b]["label"] for b, iv in pairs],
                             dtype=np.int64)
        p_cf, flipped = _judge(models, cf, cf_labels)
        src = np.array([b for b, _ in pairs], dtype=np.int64)
        fields = [{"id": pair_key(rows[b]["id"], iv), "intervention": intervention_text(iv), "edits": edits_json(iv),
                   "caption": captions[b], "cf_caption": graph.caption(iv.after), "concept": iv.concept,
                   "concepts_before": {c: iv.before[c] for c in graph.concepts},
                   "concepts_after": {c: iv.after[c] for c in graph.concepts}} for b, iv in pairs]
        recon = to_uint8(models.decode(x0))
        return BatchResult(src, fields, cf_labels, recon[src], cf, np.full(len(pairs), self.params.edit_scale),
                           p_cf, flipped & finite, finite & np.isfinite(p_cf), share if self.params.preserve else None)


def csg_params(cfg: Config) -> CSGParams:
    """The CSG settings of the run: text.*'s with CSG; without (text.csg = false), the reverse under the
    edited caption Y' alone, everywhere: e^ = eps(Y) + r_i + 1.0 * (eps(Y') - eps(Y)) = eps(Y') + r_i, no
    mask, nothing kept; so its edit scale is 1.0 whatever text.edit_scale says, and K.json records 1.0."""
    t = cfg.text
    if t.csg:
        return CSGParams(edit_scale=t.edit_scale, threshold=t.threshold, warmup=t.warmup, intersect=t.intersect,
                         preserve=t.preserve, edit_reference="base", mask_rule=t.mask_rule,
                         combine="mean" if t.edit_prompt == "counterfactual" else "sum")
    # threshold 0: every mask rule keeps every pixel, so the one term acts everywhere
    return CSGParams(edit_scale=1.0, threshold=0.0, warmup=0, intersect=False, preserve=False,
                     edit_reference="base", mask_rule=t.mask_rule)


def _prompts(graph: ConceptGraph, iv: Intervention, csg: bool, edit_prompt: str) -> list[tuple[str, str]]:
    """(Y_k, the phrase of k's new value) per edit term: each changed concept (CSG), or Y' once."""
    if not csg:
        return [(graph.caption(iv.after), graph.phrase(iv.concept, iv.value))]
    if edit_prompt == "counterfactual":
        return [(graph.caption(iv.after), graph.phrase(e.concept, e.new)) for e in iv.edits]
    return [(graph.caption({**iv.before, e.concept: e.new}), graph.phrase(e.concept, e.new)) for e in iv.edits]


def _edit(models: Models, grid: list[int], params: CSGParams, x0: torch.Tensor, captions: list[str],
          source: list[int], prompts: list[list[tuple[str, str]]], image_shape: tuple[int, ...],
          batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Abduction of the batch's images x0 under their captions, then one csg_reverse per group of pairs
    (pair j: the image source[j], its terms' prompts[j]). Returns the uint8 counterfactuals, whether each
    is finite, and the share of each the edit could touch (the union of its last masks)."""
    # every caption of the batch encoded once, to one length (zero rows pad: models/text.py)
    texts = sorted(set(captions) | {y for ps in prompts for y, _ in ps})
    encoded = dict(zip(texts, models.text_states(texts)))
    eps = lambda x, t, emb: models.eps(x, t, emb)  # noqa: E731  (csg's TextEpsFn)
    Y = torch.stack([encoded[c] for c in captions])
    reference = abduct(eps, x0, Y, models.alphas_cumprod, grid, params)
    n = len(prompts)
    images, share, finite = np.zeros((n, *image_shape), dtype=np.uint8), np.ones(n), np.ones(n, dtype=bool)
    # one csg_reverse per number of edit terms (pairs of a call share it; a do() may change 1 or more concepts)
    by_terms: dict[int, list[int]] = {}
    for j, ps in enumerate(prompts):
        by_terms.setdefault(len(ps), []).append(j)
    for terms, js in by_terms.items():
        for lo in range(0, len(js), batch_size):
            part = js[lo: lo + batch_size]
            src = torch.tensor([source[j] for j in part], device=models.device)
            edits = _concept_edits(models, encoded, [prompts[j] for j in part], terms)
            if params.intersect and params.edit_scale:
                with recording_cross_attention(models.unet) as store:
                    out = csg_reverse(eps, reference.select(src), Y[src], edits, models.alphas_cumprod, grid, params,
                                      store=store)
            else:
                out = csg_reverse(eps, reference.select(src), Y[src], edits, models.alphas_cumprod, grid, params)
            x = models.decode(out.x)
            finite[part] = torch.isfinite(x).flatten(1).all(1).cpu().numpy()
            images[part] = to_uint8(x)
            share[part] = out.union.flatten(1).float().mean(1).cpu().numpy() if params.preserve else 1.0
    return images, finite, share


def _concept_edits(models: Models, encoded: dict[str, torch.Tensor], prompts: list[list[tuple[str, str]]],
                   terms: int) -> list[ConceptEdit]:
    """The `terms` edit terms of a group of pairs (prompts: each pair's (Y_k, phrase) per term), their
    prompts' encoder states stacked from `encoded` (caption -> states) and their words' token positions."""
    tokenizer = models.text.tokenizer
    length = next(iter(encoded.values())).shape[0]
    edits, stacked = [], {}
    for k in range(terms):
        texts_k = tuple(ps[k][0] for ps in prompts)
        # terms with the same prompts get the same tensor, which csg_reverse runs once
        if texts_k not in stacked:
            stacked[texts_k] = torch.stack([encoded[y] for y in texts_k])
        tokens = torch.zeros(len(prompts), length, dtype=torch.bool)
        for r, ps in enumerate(prompts):
            tokens[r, token_positions(tokenizer, *ps[k])] = True
        edits.append(ConceptEdit(stacked[texts_k], tokens))
    return edits


def _judge(models: Models, images: np.ndarray, cf_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """p(cf_label) on each stored counterfactual and whether it is the predictor's top class (guide.verdicts:
    a flip, or the class kept); NaN and False without a predictor."""
    n = len(images)
    if not n or models.classifier is None:
        return np.full(n, np.nan), np.zeros(n, dtype=bool)
    probs = torch.softmax(models.predict(to_model_space(torch.from_numpy(images)).to(models.device)), dim=-1)
    target = torch.from_numpy(cf_labels).to(probs.device)
    p_cf = probs.gather(1, target[:, None]).squeeze(1).double().cpu().numpy()
    return p_cf, (probs.argmax(1) == target).cpu().numpy()
