"""`shapes`: a synthetic dataset whose causal model is known, so counterfactuals can be checked.

    [data]
    source = "shapes"      # pipelines/shapes.toml; 16x16 RGB, classes circle / square / triangle

Every image is rendered from independent exogenous factors (`Factors`, drawn
from the sample index alone):

    env      the environment, 0..K-1: it sets the background's tint (sand, grass, sky)
    label    the class Y: the SHAPE of the object -- the only causal feature
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
`ShapesSource` is the data source; its `causal` model answers, for any sample,
the renderings under every class and the causal region (quality.py, report.py).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np

from cfgen.data.base import CausalModel, SampleRef, Source
from cfgen.errors import ConfigError

CLASSES = ("circle", "square", "triangle")
DATASET_SEED = 20240605
"""Fixed: the dataset is the same whatever pipeline.seed says (that seed is for guidance)."""
ENVIRONMENTS = ("sand", "grass", "sky")
ENV_TINTS = ((0.60, 0.48, 0.30), (0.26, 0.48, 0.24), (0.26, 0.38, 0.62))
"""Background base colour per environment: sand, grass, sky (RGB in [0, 1])."""
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


def factors(index: int, spurious: float) -> Factors:
    """The exogenous factors of sample `index`; a pure function of (index, spurious)."""
    rng = np.random.default_rng([DATASET_SEED, index])
    k = len(CLASSES)
    env = int(rng.integers(k))
    follows_env, free_label = rng.random(), int(rng.integers(k))
    split = split_of(index)
    label = env if split == "train" and follows_env < spurious else free_label
    return Factors(
        index=index, split=split, env=env, label=label,
        # The triangle reaches 1.555 radii above its centroid and 0.78 below: cy is kept low enough for it.
        cx=float(rng.uniform(0.38, 0.62)), cy=float(rng.uniform(0.46, 0.58)),
        radius=float(rng.uniform(0.24, 0.29)), hue=float(rng.random()),
        stripe_angle=float(rng.uniform(0, math.pi)), stripe_phase=float(rng.uniform(0, 2 * math.pi)),
        stripe_freq=float(rng.uniform(2.0, 4.0)), noise_seed=int(rng.integers(2**31)))


def _grid(size: int, sub: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel centres in unit coordinates, shape (size*sub, size*sub)."""
    c = (np.arange(size * sub) + 0.5) / (size * sub)
    return np.meshgrid(c, c, indexing="xy")


SQUARE_HALF = math.sqrt(math.pi) / 2
"""Half-side of the square of area pi (radius 1)."""
TRIANGLE_SIDE = math.sqrt(4 * math.pi / math.sqrt(3))
"""Side of the equilateral triangle of area pi (radius 1)."""


def shape_mask(label: int, cx: float, cy: float, radius: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Inside-test of shape `label` at points (x, y).

    Every class has area pi * radius**2 and its centroid at (cx, cy): equal area and
    centroid make "the same object with another shape" well defined, so the true
    counterfactual is also the minimal edit (no class is a smaller, shifted copy of another).
    """
    dx, dy = x - cx, y - cy
    name = CLASSES[label]
    if name == "circle":
        return dx * dx + dy * dy <= radius * radius
    if name == "square":
        half = SQUARE_HALF * radius
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # equilateral triangle, apex up (image y grows downward): the centroid is a third of the
    # height above the base, so the base is at +R/2 and the apex at -R (R the circumradius)
    side = TRIANGLE_SIDE * radius
    circum = side / math.sqrt(3)
    top, base = -circum, circum / 2
    return (dy <= base) & (dy >= top) & (np.abs(dx) <= (dy - top) / math.sqrt(3))


def coverage(label: int, f: Factors, size: int) -> np.ndarray:
    """Anti-aliased alpha (size, size) in [0, 1] of the object of class `label`."""
    x, y = _grid(size, SUPERSAMPLE)
    m = shape_mask(label, f.cx, f.cy, f.radius, x, y).astype(np.float64)
    return m.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def background(f: Factors, size: int) -> np.ndarray:
    """The env-tinted striped background (size, size, 3) in [0, 1], no object, no noise."""
    x, y = _grid(size, 1)
    along = x * math.cos(f.stripe_angle) + y * math.sin(f.stripe_angle)
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * f.stripe_freq * along + f.stripe_phase)
    tint = np.asarray(ENV_TINTS[f.env])
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
    for label in range(len(CLASSES)):
        covered |= coverage(label, f, size) > 0
    padded = np.pad(covered, 1)
    out = np.zeros_like(covered)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= padded[dy:dy + size, dx:dx + size]
    return out


def all_renders(f: Factors, size: int, channels: int = 3) -> np.ndarray:
    """(K, size, size, channels): the image of these factors under every class."""
    return np.stack([render(f, label, size, channels) for label in range(len(CLASSES))])


def write_split(path, count: int) -> None:
    """manifests/shapes/split.csv: `id,split` by `split_of` for indices 0..count-1."""
    lines = ["id,split"] + [f"{sample_id(i)},{split_of(i)}" for i in range(count)]
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("\n".join(lines) + "\n")


class ShapesCausal(CausalModel):
    """The renderer as the causal model: a sample's factors re-derived from its origin ('shapes:<i>')."""

    def __init__(self, spurious: float, size: int, channels: int):
        self.spurious, self.size, self.channels = spurious, size, channels

    def _factors(self, origin_: str) -> Factors:
        return factors(index_of(origin_), self.spurious)

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
        return list(CLASSES)

    def samples(self, classes: list[str]) -> list[SampleRef]:
        d = self.cfg.data
        if len(classes) != len(CLASSES):
            raise ConfigError(f"data.classes: the shapes source has {len(CLASSES)} classes "
                              f"({', '.join(CLASSES)}), the class list has {len(classes)}")
        refs = []
        for i in range(d.shapes_count):
            f = factors(i, d.shapes_spurious)
            refs.append(SampleRef(id=sample_id(i), label=f.label, origin=origin(i), group=ENVIRONMENTS[f.env],
                                  load=(lambda f=f: render(f, f.label, d.image_size, d.channels))))
        return refs

    @property
    def causal(self) -> ShapesCausal:
        d = self.cfg.data
        return ShapesCausal(d.shapes_spurious, d.image_size, d.channels)
