"""`shapes`: a synthetic dataset whose causal model is known, so counterfactuals can be checked.

    [data]
    source = "shapes"      # pipelines/shapes.toml; 16x16 RGB, classes circle / square / triangle
    shapes_classes = 6     # pipelines/shapes6.toml: + diamond / cross / ring, six environments
    shapes_scale = 0.8     # objects at 0.8 of the default size

Every image is rendered from independent exogenous factors (`Factors`, drawn
from the sample index alone):

    env      the environment, 0..K-1: it sets the background's tint (sand, grass, sky, ...)
    label    the class Y, 0..K-1: the SHAPE of the object -- the only causal feature
    cx, cy   the object's centroid;  radius  its size: every class has the area of a circle of this
             radius and its centroid at (cx, cy), so a shape swap moves no mass around
    hue      the object's colour;  stripe angle / phase / frequency  the background texture
    noise    per-pixel Gaussian noise (seeded by the index)

The spurious cue ("the camel in the desert"): in the train split the class
follows the environment -- Y = env with probability `spurious`, else uniform --
so the background tint predicts the class; in the test split Y is drawn
independently of env. Background is caused by env, never by Y, so it is not
a descendant of the class: the TRUE counterfactual of a sample under
do(Y = y*) is `render(factors, y*)` -- every factor kept, the shape swapped.

Which split an index belongs to is `split_of(index)` (every fifth sample is
test); manifests/shapes/split.csv is that rule written out (`write_split`).

K (`data.shapes_classes`, 3 to 8) takes the first K of `SHAPES` and of
`ENVIRONMENT_NAMES`; `data.shapes_scale` multiplies the object size. At their
defaults (3, 1.0) every factor and every pixel is what the 3-class renderer
drew (tests/test_shapes.py checks it against a frozen copy of that code).

`ShapesSource` is the data source; its `causal` model answers, for any sample,
the renderings under every class and the causal region (cfgen/quality/measures.py, cfgen/report/page.py).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np

from cfgen.data.base import CausalModel, SampleRef, Source
from cfgen.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "saltire")
"""Every shape the renderer draws, in class order: a K-class dataset has the first K."""
CLASSES = SHAPES[:3]
"""The classes of the default (K = 3) dataset."""
DATASET_SEED = 20240605
"""Fixed: the dataset is the same whatever pipeline.seed says (that seed is for guidance)."""
ENVIRONMENT_NAMES = ("sand", "grass", "sky", "rose", "violet", "teal", "slate", "olive")
ENV_TINT_TABLE = ((0.60, 0.48, 0.30), (0.26, 0.48, 0.24), (0.26, 0.38, 0.62), (0.64, 0.28, 0.34),
                  (0.44, 0.28, 0.62), (0.20, 0.52, 0.52), (0.40, 0.40, 0.44), (0.46, 0.46, 0.18))
"""Background base colour per environment (RGB in [0, 1]); environment k is the cue of class k."""
ENVIRONMENTS = ENVIRONMENT_NAMES[:3]
ENV_TINTS = ENV_TINT_TABLE[:3]
"""The environments of the default dataset: sand, grass, sky."""
MAX_CLASSES = len(SHAPES)
NOISE_SIGMA = 0.02
"""Std of the per-pixel noise, in [0, 1] intensity units."""
SUPERSAMPLE = 4
"""Sub-pixels per pixel side for anti-aliased shape edges."""


@dataclass(frozen=True)
class Factors:
    index: int
    split: str
    env: int
    label: int
    cx: float            # centre, in pixels of a unit image (0..1)
    cy: float
    radius: float        # size: the object's area is pi * radius**2 (unit image) whatever its class
    hue: float
    stripe_angle: float
    stripe_phase: float
    stripe_freq: float   # stripes per image side
    noise_seed: int
    classes: int = 3     # K: how many classes (and environments) the dataset has


def split_of(index: int) -> str:
    return "test" if index % 5 == 4 else "train"


def sample_id(index: int) -> str:
    return f"shapes-{index:05d}"


def origin(index: int) -> str:
    """The manifest `origin` of a shapes sample; later stages re-derive its factors from it."""
    return f"shapes:{index}"


def index_of(origin_: str) -> int:
    """The renderer index of a shapes origin ('shapes:42' -> 42)."""
    prefix, _, num = origin_.partition(":")
    if prefix != "shapes" or not num.isdigit():
        raise ValueError(f"not a shapes origin: {origin_!r}")
    return int(num)


def class_names(classes: int = 3) -> tuple[str, ...]:
    """The class names of a K-class dataset, in class order."""
    _check_classes(classes)
    return SHAPES[:classes]


def environment_names(classes: int = 3) -> tuple[str, ...]:
    _check_classes(classes)
    return ENVIRONMENT_NAMES[:classes]


def _check_classes(classes: int) -> None:
    if not 2 <= classes <= MAX_CLASSES:
        raise ValueError(f"shapes: 2 to {MAX_CLASSES} classes, got {classes}")


def factors(index: int, spurious: float, classes: int = 3, scale: float = 1.0) -> Factors:
    """The exogenous factors of sample `index`; a pure function of (index, spurious, classes, scale).

    `classes` = K (classes and environments), `scale` multiplies the object size (radius).
    """
    _check_classes(classes)
    rng = np.random.default_rng([DATASET_SEED, index])
    k = classes
    env = int(rng.integers(k))
    follows_env, free_label = rng.random(), int(rng.integers(k))
    split = split_of(index)
    label = env if split == "train" and follows_env < spurious else free_label
    return Factors(
        index=index, split=split, env=env, label=label,
        # The triangle reaches 1.555 radii above its centroid and 0.78 below: cy is kept low enough for it.
        cx=float(rng.uniform(0.38, 0.62)), cy=float(rng.uniform(0.46, 0.58)),
        radius=float(rng.uniform(0.24 * scale, 0.29 * scale)), hue=float(rng.random()),
        stripe_angle=float(rng.uniform(0, math.pi)), stripe_phase=float(rng.uniform(0, 2 * math.pi)),
        stripe_freq=float(rng.uniform(2.0, 4.0)), noise_seed=int(rng.integers(2**31)), classes=k)


def from_config(data, index: int) -> Factors:
    """`factors` of sample `index` under a `DataConfig` (shapes_spurious / _classes / _scale)."""
    return factors(index, data.shapes_spurious, data.shapes_classes, data.shapes_scale)


def _grid(size: int, sub: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel centres in unit coordinates, shape (size*sub, size*sub)."""
    c = (np.arange(size * sub) + 0.5) / (size * sub)
    return np.meshgrid(c, c, indexing="xy")


SQUARE_HALF = math.sqrt(math.pi) / 2
"""Half-side of the square of area pi (radius 1)."""
TRIANGLE_SIDE = math.sqrt(4 * math.pi / math.sqrt(3))
"""Side of the equilateral triangle of area pi (radius 1)."""
DIAMOND_HALF = math.sqrt(math.pi / 2)
"""Half-diagonal of the square of area pi stood on a corner (radius 1): area 2 h^2."""
CROSS_ARM = math.sqrt(9 * math.pi / 20)
"""Half-length of the plus sign of area pi (radius 1) whose arms are a third of its span wide:
two 2a x 2a/3 bars overlap in a (2a/3)^2 square, area 4a(2a/3) - (2a/3)^2 = 20a^2/9."""
RING_HOLE = 0.5
"""Inner radius of the ring as a share of its outer radius."""
RING_OUTER = 1 / math.sqrt(1 - RING_HOLE ** 2)
"""Outer radius of the ring of area pi (radius 1): pi (R^2 - (qR)^2) = pi."""
STAR_INNER = 0.5
"""Inner-vertex radius of the five-pointed star as a share of its outer radius."""
STAR_OUTER = math.sqrt(math.pi / (5 * STAR_INNER * math.sin(math.pi / 5)))
"""Outer radius of the star of area pi (radius 1): ten triangles of area R r sin(36 deg) / 2."""


def _star_inside(dx: np.ndarray, dy: np.ndarray, outer: float) -> np.ndarray:
    """Five-pointed star, a point up, centred at the origin: inside its radial boundary."""
    inner = STAR_INNER * outer
    # angle from the upward point, folded into one 72-degree sector and mirrored to [0, 36] degrees
    theta = np.arctan2(dx, -dy)
    sector = 2 * math.pi / 5
    phi = np.abs(np.mod(theta + sector / 2, sector) - sector / 2)
    # the edge from the point (outer, 0) to the inner vertex (inner, 36 deg), in polar form
    p1 = np.array([outer, 0.0])
    p2 = np.array([inner * math.cos(sector / 2), inner * math.sin(sector / 2)])
    edge = p2 - p1
    normal = np.array([edge[1], -edge[0]]) / math.hypot(*edge)
    dist = abs(float(p1 @ normal))          # distance of the edge's line from the centre
    alpha = math.atan2(normal[1], normal[0])
    if float(p1 @ normal) < 0:
        alpha += math.pi
    rho = np.hypot(dx, dy)
    return rho * np.cos(phi - alpha) <= dist


def shape_mask(label: int, cx: float, cy: float, radius: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Inside-test of shape `label` at points (x, y).

    Every class has area pi * radius**2 and its centroid at (cx, cy): equal area and
    centroid make "the same object with another shape" well defined, so the true
    counterfactual is also the minimal edit (no class is a smaller, shifted copy of another).
    """
    dx, dy = x - cx, y - cy
    name = SHAPES[label]
    if name == "circle":
        return dx * dx + dy * dy <= radius * radius
    if name == "square":
        half = SQUARE_HALF * radius
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if name == "diamond":
        return np.abs(dx) + np.abs(dy) <= DIAMOND_HALF * radius
    if name in ("cross", "saltire"):
        if name == "saltire":  # the plus sign turned by 45 degrees
            dx, dy = (dx + dy) / math.sqrt(2), (dy - dx) / math.sqrt(2)
        a = CROSS_ARM * radius
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= a) & (ay <= a / 3)) | ((ax <= a / 3) & (ay <= a))
    if name == "ring":
        d2, outer = dx * dx + dy * dy, RING_OUTER * radius
        return (d2 <= outer * outer) & (d2 >= (RING_HOLE * outer) ** 2)
    if name == "star":
        return _star_inside(dx, dy, STAR_OUTER * radius)
    # equilateral triangle, apex up (image y grows downward): the centroid is a third of the
    # height above the base, so the base is at +R/2 and the apex at -R (R the circumradius)
    side = TRIANGLE_SIDE * radius
    circum = side / math.sqrt(3)
    top, base = -circum, circum / 2
    return (dy <= base) & (dy >= top) & (np.abs(dx) <= (dy - top) / math.sqrt(3))


def coverage(label: int, f: Factors, size: int) -> np.ndarray:
    """Anti-aliased alpha (size, size) in [0, 1] of the object of class `label`."""
    return coverage_at(label, f.cx, f.cy, f.radius, size)


def coverage_at(label: int, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    """`coverage` of a shape placed by hand (unit coordinates): what an oracle matches a mask against."""
    x, y = _grid(size, SUPERSAMPLE)
    m = shape_mask(label, cx, cy, radius, x, y).astype(np.float64)
    return m.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def background(f: Factors, size: int) -> np.ndarray:
    """The env-tinted striped background (size, size, 3) in [0, 1], no object, no noise."""
    x, y = _grid(size, 1)
    along = x * math.cos(f.stripe_angle) + y * math.sin(f.stripe_angle)
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * f.stripe_freq * along + f.stripe_phase)
    tint = np.asarray(ENV_TINT_TABLE[f.env])
    return tint[None, None, :] * (0.75 + 0.35 * stripes[:, :, None])


def render(f: Factors, label: int, size: int, channels: int = 3) -> np.ndarray:
    """uint8 (size, size, channels): the image of these factors with class `label`.

    `render(f, f.label, ...)` is the factual image; any other label gives its
    true counterfactual (same env, position, size, colour, texture and noise).
    """
    alpha = coverage(label, f, size)[:, :, None]
    colour = np.asarray(colorsys.hsv_to_rgb(f.hue, 0.85, 1.0))
    img = background(f, size) * (1 - alpha) + colour[None, None, :] * alpha
    img = img + np.random.default_rng(f.noise_seed).normal(0.0, NOISE_SIGMA, img.shape)
    img = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    if channels == 1:  # ITU-R 601 luma, as PIL's convert('L')
        img = np.rint(img @ np.array([0.299, 0.587, 0.114]))[:, :, None].astype(np.uint8)
    return img


def causal_region(f: Factors, size: int) -> np.ndarray:
    """Pixels (size, size) bool where ANY class's object could be, dilated by one pixel.

    Outside it, a counterfactual of this sample should change nothing.
    """
    covered = np.zeros((size, size), dtype=bool)
    for label in range(f.classes):
        covered |= coverage(label, f, size) > 0
    padded = np.pad(covered, 1)
    out = np.zeros_like(covered)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= padded[dy:dy + size, dx:dx + size]
    return out


def all_renders(f: Factors, size: int, channels: int = 3) -> np.ndarray:
    """(K, size, size, channels): the image of these factors under every class."""
    return np.stack([render(f, label, size, channels) for label in range(f.classes)])


def write_split(path, count: int) -> None:
    """manifests/<name>/split.csv: `id,split` by `split_of` for indices 0..count-1."""
    lines = ["id,split"] + [f"{sample_id(i)},{split_of(i)}" for i in range(count)]
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("\n".join(lines) + "\n")


class ShapesCausal(CausalModel):
    """The renderer as the causal model: a sample's factors re-derived from its origin ('shapes:<i>')."""

    def __init__(self, data):
        self.data, self.size, self.channels = data, data.image_size, data.channels

    def _factors(self, origin_: str) -> Factors:
        return from_config(self.data, index_of(origin_))

    def renders(self, origin_: str) -> np.ndarray:
        return all_renders(self._factors(origin_), self.size, self.channels)

    def region(self, origin_: str) -> np.ndarray:
        return causal_region(self._factors(origin_), self.size)

    def true_counterfactual(self, origin_: str, label: int) -> np.ndarray:
        return render(self._factors(origin_), label, self.size, self.channels)


class ShapesSource(Source):
    name = "shapes"
    records_groups = True  # the environment

    def class_names(self) -> list[str]:
        return list(class_names(self.cfg.data.shapes_classes))

    def samples(self, classes: list[str]) -> list[SampleRef]:
        d = self.cfg.data
        names, envs = class_names(d.shapes_classes), environment_names(d.shapes_classes)
        if len(classes) != len(names):
            raise ConfigError(f"data.classes: the shapes source has {len(names)} classes "
                              f"({', '.join(names)}), the class list has {len(classes)}")
        refs = []
        for i in range(d.shapes_count):
            f = from_config(d, i)
            refs.append(SampleRef(id=sample_id(i), label=f.label, origin=origin(i), group=envs[f.env],
                                  load=(lambda f=f: render(f, f.label, d.image_size, d.channels))))
        return refs

    @property
    def causal(self) -> ShapesCausal:
        return ShapesCausal(self.cfg.data)
