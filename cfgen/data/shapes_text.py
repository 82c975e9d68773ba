"""`shapes-text`: the shapes renderer with a caption over four concepts, one caused by the class.

    [data]
    source = "shapes-text"                        # 16x16 RGB, needs channels = 3
    classes = "../manifests/shapes/classes.txt"   # the class is the shape, as in `shapes`
    split = "../manifests/shapes/split.csv"       # the same ids and split rule as `shapes`
    shapes_classes = 3                            # K shapes, K colours, K environments (2 to 8)

Each sample has a concept state and a caption (`SampleRef.concepts`, `SampleRef.caption`):

    shape        the class, drawn uniformly, independent of everything else
    colour       := SHAPE_COLOUR[shape]: the causal edge, each shape is painted its own colour
    environment  the background tint (shapes' env), independent of the shape
    size         small / large, independent of the shape
    caption      "a small red circle on a sand background"

pipelines/shapes-text.graph.json is this model written out in FM-CGM's format (`write_graph`;
tests check the shipped file against it) and `graph(K)` is the same graph in memory. Unlike
`shapes`, the class never follows the environment (data.shapes_spurious is not used: the graph
has no environment -> shape edge, so the data must not have one); data.shapes_scale is not used
either, the size concept sets the object's size.

Exogenous factors, kept by every counterfactual: shapes' `Factors` of the sample (position,
stripes, noise), where the hue jitters a colour by at most HUE_JITTER and the radius places the
object within its size's range. The TRUE counterfactual under do(concept = value) renders the state
`graph(K).do(state, concept, value).after` from those same factors: do(shape = square) repaints
the object blue; do(environment = grass) changes the background alone. `read_concepts(image)` is
the renderer oracle: it reads each concept back from the pixels, with no knowledge of the factors.
"""

from __future__ import annotations

import colorsys
import dataclasses
import json
import math
from functools import cache

import numpy as np

from cfgen.concepts import ConceptGraph, Intervention
from cfgen.data import shapes
from cfgen.data.base import CausalModel, SampleRef, Source
from cfgen.errors import ConfigError

COLOUR_HUE = {"red": 0.0, "blue": 0.62, "yellow": 0.15, "green": 0.33, "purple": 0.77, "cyan": 0.5,
              "orange": 0.075, "magenta": 0.88}
"""HSV hue of each colour (saturation 0.85, value 1, as `shapes` paints); no two closer than 0.075."""
SHAPE_COLOUR = dict(zip(shapes.SHAPES, COLOUR_HUE))
"""The mechanism colour := f(shape): circle red, square blue, triangle yellow, diamond green, ..."""
HUE_JITTER = 0.012
"""The exogenous hue factor moves a colour's hue by at most this: a shade, never another colour."""
SIZE_RADII = {"small": (0.18, 0.21), "large": (0.25, 0.29)}
"""Radius range (unit image) of each size; shapes' radius factor, in [0.24, 0.29], places the object in it."""
BASE_RADII = (0.24, 0.29)
"""The range of shapes' own radius factor (data.shapes_scale = 1)."""


def origin(index: int) -> str:
    return f"shapes-text:{index}"


def index_of(origin_: str) -> int:
    prefix, _, num = origin_.partition(":")
    if prefix != "shapes-text" or not num.isdigit():
        raise ValueError(f"not a shapes-text origin: {origin_!r}")
    return int(num)


# -- the causal model -----------------------------------------------------------------------------


def graph_dict(classes: int = 3) -> dict:
    """The concept graph of the K-class dataset, in FM-CGM's extractor format plus cfgen's block."""
    names, envs = shapes.class_names(classes), shapes.environment_names(classes)
    return {
        "concepts": [
            {"id": "c1", "name": "shape", "current_value": names[0], "description": "The outline of the object."},
            {"id": "c2", "name": "colour", "current_value": SHAPE_COLOUR[names[0]],
             "description": "The colour the object is painted."},
            {"id": "c3", "name": "environment", "current_value": envs[0],
             "description": "The tint of the striped background."},
            {"id": "c4", "name": "size", "current_value": "small", "description": "How large the object is."},
        ],
        "relationships": [
            {"id": "r1", "cause_id": "c1", "effect_id": "c2",
             "description": "Each shape is painted its own colour, so changing the shape changes the colour."},
        ],
        "scene_summary": f"A small {SHAPE_COLOUR[names[0]]} {names[0]} on a {envs[0]} background.",
        "cfgen": {
            "domains": {
                "shape": {s: s for s in names},
                "colour": {SHAPE_COLOUR[s]: SHAPE_COLOUR[s] for s in names},
                "environment": {e: f"a {e} background" for e in envs},
                "size": {s: s for s in SIZE_RADII},
            },
            "mechanisms": {"colour": {"parents": ["shape"], "table": {s: SHAPE_COLOUR[s] for s in names}}},
            "caption": "a {size} {colour} {shape} on {environment}",
        },
    }


def write_graph(path, classes: int = 3) -> None:
    """pipelines/shapes-text.graph.json: `graph_dict` written out."""
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(json.dumps(graph_dict(classes), indent=2) + "\n")


@cache
def graph(classes: int = 3) -> ConceptGraph:
    return ConceptGraph.from_dict(graph_dict(classes), where=f"shapes-text ({classes} classes)")


def factors(index: int, classes: int = 3) -> shapes.Factors:
    """shapes' exogenous factors of sample `index`, the class drawn independently of the environment."""
    return shapes.factors(index, 0.0, classes)


def state(index: int, classes: int = 3) -> dict[str, str]:
    """The factual concept state of sample `index`."""
    f = factors(index, classes)
    # the size is a root drawn from its own stream, so shapes' factors (and their stream) stay as they are
    big = int(np.random.default_rng([shapes.DATASET_SEED, index, 1]).integers(2))
    shape = shapes.SHAPES[f.label]
    return {"shape": shape, "colour": SHAPE_COLOUR[shape], "environment": shapes.ENVIRONMENT_NAMES[f.env],
            "size": tuple(SIZE_RADII)[big]}


def placed(f: shapes.Factors, state_: dict[str, str]) -> shapes.Factors:
    """The factors shapes' renderer draws for `state_`: class, environment, radius and hue set by the
    concepts, each within its value by the exogenous factor of `f` (position, stripes, noise as they are)."""
    lo, hi = SIZE_RADII[state_["size"]]
    u = (f.radius - BASE_RADII[0]) / (BASE_RADII[1] - BASE_RADII[0])
    hue = (COLOUR_HUE[state_["colour"]] + HUE_JITTER * (2 * f.hue - 1)) % 1.0
    return dataclasses.replace(f, label=shapes.SHAPES.index(state_["shape"]),
                               env=shapes.ENVIRONMENT_NAMES.index(state_["environment"]),
                               radius=lo + u * (hi - lo), hue=hue)


def render_state(f: shapes.Factors, state_: dict[str, str], size: int) -> np.ndarray:
    """uint8 (size, size, 3): the image of `state_` with the exogenous factors of `f`."""
    g = placed(f, state_)
    return shapes.render(g, g.label, size)


def true_counterfactual(index: int, concept: str, value: str, classes: int = 3,
                        size: int = 16) -> tuple[np.ndarray, Intervention]:
    """Sample `index` under do(concept = value): the rendering and the intervention (every edit)."""
    iv = graph(classes).do(state(index, classes), concept, value)
    return render_state(factors(index, classes), iv.after, size), iv


# -- the renderer oracle --------------------------------------------------------------------------

CORE = 0.93
"""Max channel above which a pixel is the object's core: the object's value is 1, a background's
at most 0.70 x 1.1 (rose at its brightest stripe), plus noise."""
BACKGROUND = 0.80
"""Max channel below which a pixel is surely background (no more than a sliver of object)."""


def alpha_of(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The object's estimated coverage (H, W), its colour (3,) and the background's mean colour (3,).

    A pixel is tint * b * (1 - alpha) + colour * alpha, the stripes' brightness b unknown: with the
    tint's direction (from the clearly-background pixels) and the colour (from the core), each pixel's
    two coefficients are a least-squares fit over its three channels, and alpha is the colour's.
    """
    img = image.astype(np.float64) / 255.0
    v = img.max(axis=2)
    core = v > CORE
    if not core.any():
        core = v >= np.sort(v, axis=None)[-3]
    colour = img[core].mean(axis=0)
    clear = v < BACKGROUND
    tint = img[clear].mean(axis=0) if clear.any() else img.mean(axis=(0, 1))
    basis = np.stack([tint, colour], axis=1)                       # (3, 2)
    coef = np.linalg.lstsq(basis, img.reshape(-1, 3).T, rcond=None)[0]  # (2, H*W)
    alpha = np.clip(coef[1].reshape(v.shape), 0.0, 1.0)
    alpha[alpha < 0.1] = 0.0  # the noise of background pixels, not object
    alpha[core] = 1.0
    bg = img[alpha == 0].mean(axis=0) if (alpha == 0).any() else tint
    return alpha, colour, bg


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


def _direction(rgb) -> np.ndarray:
    rgb = np.asarray(rgb, dtype=np.float64)
    return rgb / max(float(np.linalg.norm(rgb)), 1e-9)


def read_concepts(image: np.ndarray, classes: int = 3) -> dict[str, str]:
    """Each concept's value as the renderer would have drawn it, read from uint8 (H, W, 3) pixels alone.

        shape        the K-class template nearest to the object's coverage, placed at its centroid with
                     its area (every class has the same area and centroid, so this is fair to each)
        colour       the table hue nearest to the hue of the object's core
        environment  the tint nearest in direction to the background's colour (stripes only scale it)
        size         small or large by the radius of the covered area, cut halfway between the ranges
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"read_concepts: expected (H, W, 3) pixels, got {image.shape}")
    alpha, colour, bg = alpha_of(image)
    h, w = alpha.shape
    radius = math.sqrt(alpha.sum() / (h * w) / math.pi)
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = (xs * alpha).sum() / alpha.sum() / w, (ys * alpha).sum() / alpha.sum() / h

    def misfit(shape: str) -> float:
        return float(np.abs(alpha - shapes.coverage_at(shapes.SHAPES.index(shape), cx, cy, radius, h)).sum())

    names = shapes.class_names(classes)
    hue = colorsys.rgb_to_hsv(*colour)[0]
    tints = {e: _direction(shapes.ENV_TINT_TABLE[k]) for k, e in enumerate(shapes.environment_names(classes))}
    cut = (SIZE_RADII["small"][1] + SIZE_RADII["large"][0]) / 2
    return {"shape": min(names, key=misfit),
            "colour": min((SHAPE_COLOUR[s] for s in names), key=lambda c: _hue_distance(hue, COLOUR_HUE[c])),
            "environment": max(tints, key=lambda e: float(tints[e] @ _direction(bg))),
            "size": "small" if radius < cut else "large"}


# -- the source -----------------------------------------------------------------------------------


class ShapesTextCausal(CausalModel):
    """The renderer as the causal model over concepts, asked per sample by origin ('shapes-text:<i>').

    As a CausalModel (cfgen/quality/measures.py, cfgen/report/page.py) class k means do(shape = k-th shape): its true
    counterfactual is repainted too. `intervene` answers do() on any concept.
    """

    def __init__(self, data):
        self.classes, self.size = data.shapes_classes, data.image_size
        self.graph = graph(self.classes)

    def state(self, origin_: str) -> dict[str, str]:
        return state(index_of(origin_), self.classes)

    def intervene(self, origin_: str, concept: str, value: str) -> tuple[np.ndarray, Intervention]:
        """(H, W, 3) uint8 under do(concept = value), and the intervention with its propagated edits."""
        return true_counterfactual(index_of(origin_), concept, value, self.classes, self.size)

    def read_concepts(self, image: np.ndarray) -> dict[str, str]:
        return read_concepts(image, self.classes)

    def renders(self, origin_: str) -> np.ndarray:
        return np.stack([self.true_counterfactual(origin_, k) for k in range(self.classes)])

    def region(self, origin_: str) -> np.ndarray:
        """Where any class's object can be at this sample's size (the colour changes only inside it)."""
        i = index_of(origin_)
        return shapes.causal_region(placed(factors(i, self.classes), state(i, self.classes)), self.size)

    def true_counterfactual(self, origin_: str, label: int) -> np.ndarray:
        return self.intervene(origin_, "shape", shapes.SHAPES[label])[0]


class ShapesTextSource(Source):
    name = "shapes-text"
    records_groups = True  # the environment

    def class_names(self) -> list[str]:
        return list(shapes.class_names(self.cfg.data.shapes_classes))

    def samples(self, classes: list[str]) -> list[SampleRef]:
        d = self.cfg.data
        k = d.shapes_classes
        if d.channels != 3:
            raise ConfigError(f"data.channels: shapes-text captions name colours, so it needs 3 channels, "
                              f"got {d.channels}")
        if len(classes) != k:
            raise ConfigError(f"data.classes: the shapes-text source has {k} classes "
                              f"({', '.join(shapes.class_names(k))}), the class list has {len(classes)}")
        g = graph(k)
        refs = []
        for i in range(d.shapes_count):
            f, s = factors(i, k), state(i, k)
            refs.append(SampleRef(id=shapes.sample_id(i), label=f.label, origin=origin(i), group=s["environment"],
                                  concepts=s, caption=g.caption(s),
                                  load=(lambda f=f, s=s: render_state(f, s, d.image_size))))
        return refs

    @property
    def causal(self) -> ShapesTextCausal:
        return ShapesTextCausal(self.cfg.data)
