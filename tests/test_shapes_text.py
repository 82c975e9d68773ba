"""shapes-text: captions over four concepts, a real causal edge shape -> colour, true counterfactuals
under do() on any concept, and the renderer oracle that reads the concepts back (cfgen/data/shapes_text.py)."""

from __future__ import annotations

import colorsys
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from cfgen.concepts import ConceptGraph, Edit
from cfgen.config import ConfigError, load_config
from cfgen.data import shapes
from cfgen.data import shapes_text as st
from cfgen.data.sources import list_samples, open_source

ROOT = Path(__file__).resolve().parents[1]
SHAPES_TOML = ROOT / "pipelines" / "shapes.toml"
TEXT = ["data.source=shapes-text"]
INDICES = [0, 1, 4, 9, 123, 2999]


def object_coverage(index: int, state: dict) -> np.ndarray:
    g = st.placed(st.factors(index), state)
    return shapes.coverage(g.label, g, 16)


def core_hue(image: np.ndarray, cover: np.ndarray) -> float:
    rgb = image[cover == 1].astype(float).mean(axis=0) / 255
    return colorsys.rgb_to_hsv(*rgb)[0]


def test_the_shipped_graph_is_the_renderers_model_written_out(tmp_path):
    shipped = ROOT / "pipelines" / "shapes-text.graph.json"
    st.write_graph(tmp_path / "g.json")
    assert shipped.read_text() == (tmp_path / "g.json").read_text()
    g = ConceptGraph.load(shipped)
    assert g == st.graph(3)
    assert g.parents == {"shape": (), "colour": ("shape",), "environment": (), "size": ()}
    assert g.mechanisms["colour"] == {("circle",): "red", ("square",): "blue", ("triangle",): "yellow"}


@pytest.mark.parametrize("index", INDICES)
def test_do_shape_changes_shape_and_colour_and_keeps_environment_size_and_every_exogenous_factor(index):
    before = st.state(index)
    f = st.factors(index)
    factual = st.render_state(f, before, 16)
    assert st.read_concepts(factual) == before
    for shape in shapes.CLASSES:
        if shape == before["shape"]:
            continue
        truth, iv = st.true_counterfactual(index, "shape", shape)
        colour = {"circle": "red", "square": "blue", "triangle": "yellow"}[shape]   # the graph's table
        assert iv.after == {**before, "shape": shape, "colour": colour}
        assert iv.edits == (Edit("shape", before["shape"], shape, "intervened"),
                            Edit("colour", before["colour"], colour, "propagated from shape"))
        # every exogenous factor kept (position, radius: shapes gives every class the same area and
        # centroid; stripes, noise): only the class and the hue (a new colour, the same jitter) differ
        a, b = st.placed(f, before), st.placed(f, iv.after)
        assert dataclasses.replace(b, label=a.label, hue=a.hue) == a
        assert (b.hue - st.COLOUR_HUE[colour]) % 1 == pytest.approx((a.hue - st.COLOUR_HUE[before["colour"]]) % 1)
        # pixels outside both objects: identical (background, tint, stripes, noise)
        cov_f, cov_t = object_coverage(index, before), object_coverage(index, iv.after)
        outside = (cov_f == 0) & (cov_t == 0)
        assert outside.sum() > 100 and np.array_equal(truth[outside], factual[outside])
        # repainted: the core has the new colour's hue, and the oracle reads the intervened state
        gap = abs(core_hue(truth, cov_t) - st.COLOUR_HUE[colour]) % 1
        assert min(gap, 1 - gap) < 0.03   # hue is circular: red sits at 0 and 1
        assert st.read_concepts(truth) == iv.after


@pytest.mark.parametrize("index", INDICES)
def test_do_environment_changes_only_the_background(index):
    before = st.state(index)
    factual = st.render_state(st.factors(index), before, 16)
    cover = object_coverage(index, before)
    for env in shapes.ENVIRONMENTS:
        if env == before["environment"]:
            continue
        truth, iv = st.true_counterfactual(index, "environment", env)
        assert iv.after == {**before, "environment": env} and iv.changed == {"environment"}
        assert np.array_equal(truth[cover == 1], factual[cover == 1])              # the object, to the bit
        moved = np.abs(truth.astype(int) - factual.astype(int)).max(axis=2) > 20
        assert moved[cover == 0].mean() > 0.9                                     # the background retinted
        assert st.read_concepts(truth) == iv.after


@pytest.mark.parametrize("index", INDICES)
def test_do_size_and_do_colour_change_nothing_else(index):
    before = st.state(index)
    other = "large" if before["size"] == "small" else "small"
    truth, iv = st.true_counterfactual(index, "size", other)
    assert iv.after == {**before, "size": other} and iv.changed == {"size"}
    cov_f, cov_t = object_coverage(index, before), object_coverage(index, iv.after)
    ratio = cov_t.sum() / cov_f.sum()
    assert (ratio > 1.4) if other == "large" else (ratio < 0.72)
    assert st.read_concepts(truth) == iv.after
    # colour has no descendants: a circle painted blue stays a circle (off the table, but a valid do())
    colour = next(c for c in ("red", "blue", "yellow") if c != before["colour"])
    truth, iv = st.true_counterfactual(index, "colour", colour)
    assert iv.after == {**before, "colour": colour} and iv.changed == {"colour"}
    factual = st.render_state(st.factors(index), before, 16)
    outside = cov_f == 0
    assert np.array_equal(truth[outside], factual[outside])
    assert st.read_concepts(truth) == iv.after


@pytest.mark.parametrize("classes", [3, 6])
def test_the_oracle_reads_back_every_concept_of_300_renderings(classes):
    g = st.graph(classes)
    rng = np.random.default_rng(0)
    hits = {c: 0 for c in g.concepts}
    for i in range(300):
        s = st.state(i, classes)
        # half factual images, half true counterfactuals under a random do(), with their noise as rendered
        if i % 2:
            concept = g.concepts[rng.integers(len(g.concepts))]
            s = g.do(s, concept, list(g.domains[concept])[rng.integers(len(g.domains[concept]))]).after
        read = st.read_concepts(st.render_state(st.factors(i, classes), s, 16), classes)
        for c in g.concepts:
            hits[c] += read[c] == s[c]
    assert {c: n / 300 for c, n in hits.items()} == {c: 1.0 for c in g.concepts}


def test_the_source_gives_each_sample_its_state_caption_and_pixels():
    cfg = load_config(SHAPES_TOML, TEXT)
    refs = list_samples(cfg)
    assert len(refs) == 600   # the shapes ids and split file serve both sources
    r = refs[7]
    i = st.index_of(r.origin)
    assert r.origin == f"shapes-text:{i}" and r.id == shapes.sample_id(i) and shapes.split_of(i) == "test"
    assert r.concepts == st.state(i) and r.label == shapes.CLASSES.index(r.concepts["shape"])
    assert r.group == r.concepts["environment"]
    s = r.concepts
    assert r.caption == f"a {s['size']} {s['colour']} {s['shape']} on a {s['environment']} background"
    pixels = r.load()
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels, st.render_state(st.factors(i), s, 16))
    # the class never follows the environment, in train either (the graph has no such edge)
    train = list_samples(cfg, split="train")
    assert np.mean([t.concepts["environment"] == shapes.ENVIRONMENTS[t.label] for t in train]) < 0.4
    # and both sizes occur, in every class
    for shape in shapes.CLASSES:
        sizes = [t.concepts["size"] for t in train if t.concepts["shape"] == shape]
        assert 0.4 < sizes.count("small") / len(sizes) < 0.6


def test_the_causal_model_answers_class_counterfactuals_with_the_colour_changed():
    cfg = load_config(SHAPES_TOML, TEXT)
    causal = open_source(cfg).causal
    r = list_samples(cfg)[3]
    renders = causal.renders(r.origin)
    assert renders.shape == (3, 16, 16, 3)
    assert np.array_equal(renders[r.label], r.load())   # do(shape = its own shape) is the factual image
    for k in range(3):
        assert causal.read_concepts(renders[k]) == {**r.concepts, "shape": shapes.CLASSES[k],
                                                    "colour": st.SHAPE_COLOUR[shapes.CLASSES[k]]}
        changed = np.abs(renders[k].astype(int) - renders[r.label].astype(int)).max(axis=2) > 0
        assert not changed[~causal.region(r.origin)].any()    # nothing moves outside the causal region
    image, iv = causal.intervene(r.origin, "size", "large" if r.concepts["size"] == "small" else "small")
    assert causal.read_concepts(image) == iv.after and causal.state(r.origin) == r.concepts


def test_other_sources_carry_no_concepts_and_shapes_text_refuses_grayscale():
    shapes_refs = list_samples(load_config(SHAPES_TOML))
    assert shapes_refs[0].concepts == {} and shapes_refs[0].caption == ""
    with pytest.raises(ConfigError, match="shapes-text captions name colours"):
        list_samples(load_config(SHAPES_TOML, TEXT + ["data.channels=1"]))
