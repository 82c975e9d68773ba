"""The synthetic shapes dataset: a known causal model, its true counterfactuals, its spurious cue."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cfgen.config import ConfigError, load_config
from cfgen.data import shapes
from cfgen.data.sources import list_samples

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "pipelines" / "shapes.toml"


def test_factors_and_images_are_a_pure_function_of_the_index():
    a, b = shapes.factors(17, 0.9), shapes.factors(17, 0.9)
    assert a == b
    assert np.array_equal(shapes.render(a, a.label, 16), shapes.render(b, b.label, 16))
    assert shapes.factors(18, 0.9) != a
    assert shapes.index_of(shapes.origin(17)) == 17
    with pytest.raises(ValueError):
        shapes.index_of("digits:3")


@pytest.mark.parametrize("index", [0, 4, 9, 123, 2999])
def test_true_counterfactual_keeps_every_exogenous_factor_but_the_class(index):
    f = shapes.factors(index, 0.9)
    factual = shapes.render(f, f.label, 16).astype(int)
    region = shapes.causal_region(f, 16)
    any_object = np.zeros((16, 16), dtype=bool)
    for label in range(len(shapes.CLASSES)):
        any_object |= shapes.coverage(label, f, 16) > 0
    for other in range(len(shapes.CLASSES)):
        if other == f.label:
            continue
        truth = shapes.render(f, other, 16).astype(int)
        # background texture, environment tint and the noise: bit-identical wherever no object can be
        assert np.array_equal(truth[~any_object], factual[~any_object])
        assert (~region).sum() > 0 and np.array_equal(truth[~region], factual[~region])
        # position and size: the same area and centroid (to the pixel grid's resolution)
        cov_f, cov_t = shapes.coverage(f.label, f, 16), shapes.coverage(other, f, 16)
        assert cov_t.sum() == pytest.approx(cov_f.sum(), rel=0.03)
        ys, xs = np.mgrid[0:16, 0:16] + 0.5
        for grid in (xs, ys):
            assert (grid * cov_t).sum() / cov_t.sum() == pytest.approx((grid * cov_f).sum() / cov_f.sum(), abs=0.25)
        # colour: fully covered pixels carry the same object colour (up to the shared noise)
        full_f = shapes.coverage(f.label, f, 16) == 1
        full_t = shapes.coverage(other, f, 16) == 1
        both = full_f & full_t
        assert both.sum() >= 4
        assert np.abs(truth[both] - factual[both]).max() == 0
        # and the class did change: the shape differs on many pixels
        assert (np.abs(truth - factual).max(axis=2) > 25).sum() >= 6


def test_the_three_shapes_share_area_and_centroid_and_differ_clearly():
    x, y = shapes._grid(400, 1)
    masks = [shapes.shape_mask(k, 0.5, 0.45, 0.25, x, y) for k in range(3)]
    for m in masks:  # every class: area pi r^2, centroid (cx, cy)
        assert m.mean() == pytest.approx(np.pi * 0.25 ** 2, rel=0.02)
        assert x[m].mean() == pytest.approx(0.5, abs=2e-3)
        assert y[m].mean() == pytest.approx(0.45, abs=2e-3)
    # square half-side sqrt(pi)/2 r; equilateral triangle apex up, circumradius side/sqrt(3)
    assert y[masks[1]].min() == pytest.approx(0.45 - np.sqrt(np.pi) / 2 * 0.25, abs=3e-3)
    side = np.sqrt(4 * np.pi / np.sqrt(3)) * 0.25
    assert y[masks[2]].min() == pytest.approx(0.45 - side / np.sqrt(3), abs=3e-3)   # apex
    assert y[masks[2]].max() == pytest.approx(0.45 + side / np.sqrt(3) / 2, abs=3e-3)  # base
    assert x[masks[2]].max() - x[masks[2]].min() == pytest.approx(side, abs=6e-3)
    for i in range(3):
        for j in range(i + 1, 3):
            assert (masks[i] ^ masks[j]).mean() > 0.02


def test_group_balanced_weights_draw_every_cell_equally():
    from cfgen.models.training import group_balanced_weights

    groups = ["sand"] * 9 + ["grass"] * 1 + ["sand"] * 2
    labels = [0] * 9 + [0] + [1] * 2
    w = group_balanced_weights(groups, labels)
    cell_mass = {cell: float(sum(w[i] for i in range(12) if (groups[i], labels[i]) == cell))
                 for cell in set(zip(groups, labels))}
    assert cell_mass == {("sand", 0): pytest.approx(1.0), ("grass", 0): pytest.approx(1.0),
                         ("sand", 1): pytest.approx(1.0)}


def test_balance_groups_needs_a_source_with_groups():
    with pytest.raises(ConfigError, match="balance_groups"):
        load_config(ROOT / "pipelines" / "digits.toml", ["train.classifier.balance_groups=true"])


def test_spurious_cue_exists_in_train_only():
    fs = [shapes.factors(i, 0.9) for i in range(3000)]
    train = [f for f in fs if f.split == "train"]
    test = [f for f in fs if f.split == "test"]
    assert len(train) == 2400 and len(test) == 600
    match_train = np.mean([f.label == f.env for f in train])
    match_test = np.mean([f.label == f.env for f in test])
    assert match_train == pytest.approx(0.9 + 0.1 / 3, abs=0.03)   # background predicts the class
    assert match_test == pytest.approx(1 / 3, abs=0.06)            # ... and says nothing in test
    # classes stay balanced in both splits, so the cue is not a class prior
    for split in (train, test):
        counts = np.bincount([f.label for f in split], minlength=3) / len(split)
        assert np.all(np.abs(counts - 1 / 3) < 0.06)
    # with no spurious strength, train is as independent as test
    assert np.mean([shapes.factors(i, 0.0).label == shapes.factors(i, 0.0).env for i in range(0, 3000, 5)]) < 0.45


def test_background_tint_is_set_by_the_environment_not_the_class():
    f = shapes.factors(4, 0.9)
    g = shapes.Factors(**{**f.__dict__, "env": (f.env + 1) % 3})
    region = shapes.causal_region(f, 16)
    a, b = shapes.render(f, f.label, 16), shapes.render(g, f.label, 16)
    assert np.abs(a[~region].astype(int) - b[~region].astype(int)).mean() > 20
    assert np.array_equal(shapes.background(f, 16), shapes.background(shapes.Factors(**{**f.__dict__, "label": 2}), 16))


def test_split_manifest_is_the_rule_written_out(tmp_path):
    shapes.write_split(tmp_path / "split.csv", 3000)
    shipped = ROOT / "manifests" / "shapes" / "split.csv"
    assert shipped.read_text() == (tmp_path / "split.csv").read_text()
    assert (ROOT / "manifests" / "shapes" / "classes.txt").read_text().split() == list(shapes.CLASSES)


def test_shapes_source_lists_the_test_split_with_loadable_pixels():
    cfg = load_config(SHAPES)
    refs = list_samples(cfg)
    assert len(refs) == 600
    assert all(shapes.split_of(shapes.index_of(r.origin)) == "test" for r in refs)
    r = refs[5]
    f = shapes.factors(shapes.index_of(r.origin), cfg.data.shapes_spurious)
    assert r.id == shapes.sample_id(f.index) and r.label == f.label and r.error is None
    assert r.group == shapes.ENVIRONMENTS[f.env]   # the nuisance group balance_groups draws by
    pixels = r.load()
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels, shapes.render(f, f.label, 16))
    assert len(list_samples(cfg, split="train")) == 2400
    gray = load_config(SHAPES, ["data.channels=1"])
    assert list_samples(gray)[0].load().shape == (16, 16, 1)


def test_shapes_config_is_validated():
    with pytest.raises(ConfigError, match="shapes_spurious"):
        load_config(SHAPES, ["data.shapes_spurious=1.5"])
    with pytest.raises(ConfigError, match="shapes_count"):
        load_config(SHAPES, ["data.shapes_count=0"])
    digits_classes = (ROOT / "manifests" / "digits" / "classes.txt").as_posix()
    cfg = load_config(SHAPES, [f"data.classes='{digits_classes}'"])
    with pytest.raises(ConfigError, match="3 classes"):
        list_samples(cfg)


def test_a_class_balanced_pool_of_some_classes_from_the_train_split():
    """make benchmark's shots pool: data.only_classes, then the first data.class_limit of each class, then limit."""
    cfg = load_config(SHAPES, ["data.use_split=train", 'data.only_classes=["circle", "square"]', "data.class_limit=3"])
    refs = list_samples(cfg)
    assert [r.label for r in refs].count(0) == 3 and [r.label for r in refs].count(1) == 3 and len(refs) == 6
    train = [r for r in list_samples(load_config(SHAPES, ["data.use_split=train"])) if r.label in (0, 1)]
    first = [r.id for r in train if r.label == 0][:3] + [r.id for r in train if r.label == 1][:3]
    assert sorted(r.id for r in refs) == sorted(first)  # the first of each class, in the source's order
    assert [r.id for r in refs] == [r.id for r in train if r.id in first]
    assert len(list_samples(load_config(SHAPES, ["data.use_split=train", "data.class_limit=3", "data.limit=4"]))) == 4
    with pytest.raises(ConfigError, match="data.only_classes: 'hexagon' is not a class"):
        list_samples(load_config(SHAPES, ['data.only_classes=["hexagon"]']))
    with pytest.raises(ConfigError, match="data.class_limit must be >= 0"):
        load_config(SHAPES, ["data.class_limit=-1"])
