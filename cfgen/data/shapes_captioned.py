"""`shapes-captioned`: the `shapes` images, pixel for pixel, each with a concept state and a caption.

    [data]
    source = "shapes-captioned"      # pipelines/shapes6-text.toml: the benchmark's own images
    shapes_classes = 6               # as pipelines/shapes6.toml: same factors, same spurious split,
    shapes_spurious = 0.97           # same ids and origins ('shapes:<i>'), so a pair of this source is
    shapes_scale = 0.9               # a pair of shapes6's pool

Each sample is `shapes`' sample i (`shapes.from_config`), captioned over two concepts:

    shape        the class (the object's outline)
    environment  the background tint
    caption      "a circle on a sand background"

The object's hue, size, position, stripes and noise are exogenous factors the caption does not name;
every counterfactual keeps them. The graph has NO edge between the two concepts: in the train split
the shape follows the environment 97% of the time, but that is selection (`shapes.factors` draws the
label from the environment's value for the train split only), not a mechanism: the renderer paints the
background from the environment alone and the object from the shape alone, so do(environment = v)
repaints the background and keeps the shape, and do(shape = s) keeps the background (`shapes`' own true
counterfactual). The graph says so, and the text path refuses a text.graph that says otherwise
(`concepts.check_edges`, called by text_guide.checked_graph).

The renderer oracle is shapes-text's (`shapes_text.read_concepts`), its shape and environment read back.
"""

from __future__ import annotations

import dataclasses
from functools import cache

import numpy as np

from cfgen.concepts import ConceptGraph, Intervention
from cfgen.data import shapes, shapes_text
from cfgen.data.base import SampleRef
from cfgen.errors import ConfigError

CONCEPTS = ("shape", "environment")


def graph_dict(classes: int = 6) -> dict:
    """The concept graph in FM-CGM's extractor format plus cfgen's block: two roots, no edge."""
    names, envs = shapes.class_names(classes), shapes.environment_names(classes)
    return {
        "concepts": [
            {"id": "c1", "name": "shape", "current_value": names[0], "description": "The outline of the object."},
            {"id": "c2", "name": "environment", "current_value": envs[0],
             "description": "The tint of the striped background."},
        ],
        # No shape -> environment edge: the train split's correlation is selection, not mechanism.
        "relationships": [],
        "scene_summary": f"A {names[0]} on a {envs[0]} background.",
        "cfgen": {
            "domains": {"shape": {s: s for s in names}, "environment": {e: f"a {e} background" for e in envs}},
            "mechanisms": {},
            "caption": "a {shape} on {environment}",
        },
    }


@cache
def graph(classes: int = 6) -> ConceptGraph:
    return ConceptGraph.from_dict(graph_dict(classes), where=f"shapes-captioned ({classes} classes)")


def state(f: shapes.Factors) -> dict[str, str]:
    return {"shape": shapes.SHAPES[f.label], "environment": shapes.ENVIRONMENT_NAMES[f.env]}


def render_state(f: shapes.Factors, state_: dict[str, str], size: int) -> np.ndarray:
    """uint8 (size, size, 3): the factors of `f` with the shape and environment of `state_`."""
    g = dataclasses.replace(f, env=shapes.ENVIRONMENT_NAMES.index(state_["environment"]))
    return shapes.render(g, shapes.SHAPES.index(state_["shape"]), size)


class ShapesCaptionedCausal(shapes.ShapesCausal):
    """`shapes`' causal model (class renders, causal region) plus do() on either concept and the oracle."""

    def __init__(self, data):
        super().__init__(data)
        self.classes = data.shapes_classes
        self.graph = graph(self.classes)

    def state(self, origin_: str) -> dict[str, str]:
        return state(self._factors(origin_))

    def intervene(self, origin_: str, concept: str, value: str) -> tuple[np.ndarray, Intervention]:
        """(H, W, 3) uint8 under do(concept = value), and the intervention (no edges: nothing propagates)."""
        f = self._factors(origin_)
        iv = self.graph.do(state(f), concept, value)
        return render_state(f, iv.after, self.size), iv

    def read_concepts(self, image: np.ndarray) -> dict[str, str]:
        read = shapes_text.read_concepts(image, self.classes)
        return {c: read[c] for c in CONCEPTS}


class ShapesCaptionedSource(shapes.ShapesSource):
    name = "shapes-captioned"

    def samples(self, classes: list[str]) -> list[SampleRef]:
        d = self.cfg.data
        if d.channels != 3:
            raise ConfigError(f"data.channels: shapes-captioned names background tints, so it needs 3 channels, "
                              f"got {d.channels}")
        g = graph(d.shapes_classes)
        refs = super().samples(classes)
        for r in refs:
            r.concepts = state(shapes.from_config(d, shapes.index_of(r.origin)))
            r.caption = g.caption(r.concepts)
        return refs

    @property
    def causal(self) -> ShapesCaptionedCausal:
        return ShapesCaptionedCausal(self.cfg.data)
