"""Worst-group accuracy, the per-seed figures and the paired interval, against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cfgen.tune.protocol import cell_accuracies, paired_difference, split_metrics, worst_group

# 7 evaluation images: groups (environments) a / b, classes 0 (base) and 1 (novel)
GROUPS = ["a", "a", "a", "b", "b", "b", "b"]
LABELS = np.array([0, 0, 1, 0, 1, 1, 1])
CORRECT = np.array([True, False, True, True, True, False, True])


def test_cell_accuracies_and_worst_group_by_hand():
    cells = cell_accuracies(CORRECT, GROUPS, LABELS, {0: "circle", 1: "square"})
    # a/circle: 1 of 2; a/square: 1 of 1; b/circle: 1 of 1; b/square: 2 of 3
    assert cells == pytest.approx({"a/circle": 0.5, "a/square": 1.0, "b/circle": 1.0, "b/square": 2 / 3})
    assert list(cells) == ["a/circle", "a/square", "b/circle", "b/square"]
    assert worst_group(cells) == 0.5


def test_without_groups_the_worst_group_is_the_worst_class():
    cells = cell_accuracies(CORRECT, [""] * 7, LABELS, {0: "circle", 1: "square"})
    # circle: 2 of 3; square: 3 of 4
    assert cells == pytest.approx({"circle": 2 / 3, "square": 0.75})
    assert worst_group(cells) == pytest.approx(0.6666667, abs=1e-6)


def test_split_metrics_base_novel_hm_worst_group_by_hand():
    m = split_metrics(CORRECT, LABELS, GROUPS, base=[0], names={0: "circle", 1: "square"})
    # base images 0, 1, 3: 2 of 3 right; novel images 2, 4, 5, 6: 3 of 4
    assert m["base"] == pytest.approx(2 / 3)
    assert m["novel"] == pytest.approx(0.75)
    # HM = 2 * (2/3) * (3/4) / (2/3 + 3/4) = 1 / (17/12) = 12/17
    assert m["hm"] == pytest.approx(0.7058824, abs=1e-6)
    assert m["worst_group"] == 0.5
    assert m["cells"]["b/square"] == pytest.approx(2 / 3)


def test_paired_difference_three_seeds_by_hand():
    # d = [0.1, 0.2, 0.3]: mean 0.2, sd 0.1, t_{0.975, 2} = 4.302653, half-width 4.302653 * 0.1 / sqrt(3)
    d = paired_difference([0.6, 0.7, 0.9], [0.5, 0.5, 0.6])
    assert d["n"] == 3
    assert d["mean"] == pytest.approx(0.2)
    assert d["sd"] == pytest.approx(0.1)
    assert d["t"] == pytest.approx(4.302653, abs=1e-6)
    assert d["half_width"] == pytest.approx(0.248414, abs=1e-6)
    assert (d["low"], d["high"]) == (pytest.approx(-0.048414, abs=1e-6), pytest.approx(0.448414, abs=1e-6))


def test_paired_difference_five_seeds_by_hand():
    # d = [0.02, -0.01, 0.03, 0.00, 0.01]: mean 0.01; squared deviations 1, 4, 4, 1, 0 (x 1e-4) -> sd = sqrt(0.001/4)
    # = 0.0158114; t_{0.975, 4} = 2.776445; half-width = 2.776445 * 0.0158114 / sqrt(5) = 0.0196324
    d = paired_difference([0.52, 0.49, 0.53, 0.50, 0.51], [0.5] * 5)
    assert d["mean"] == pytest.approx(0.01)
    assert d["sd"] == pytest.approx(0.0158114, abs=1e-7)
    assert d["t"] == pytest.approx(2.776445, abs=1e-6)
    assert d["half_width"] == pytest.approx(0.0196324, abs=1e-7)
    assert d["low"] < 0 < d["high"]  # covers 0: no gain


def test_paired_difference_edge_cases():
    same = paired_difference([0.7, 0.8], [0.7, 0.8])
    assert (same["mean"], same["sd"], same["half_width"]) == (0.0, 0.0, 0.0)
    one = paired_difference([0.9], [0.8])
    assert one["mean"] == pytest.approx(0.1) and one["sd"] is None and one["low"] is None
    assert math.isclose(paired_difference([1.0, 0.0], [0.0, 0.0])["t"], 12.706205, abs_tol=1e-6)
    with pytest.raises(ValueError):
        paired_difference([], [])


def test_probe_halves_and_scores_by_hand():
    """The room-for-prompts probe: half of every (group, class) cell fits, the rest scores; on features
    where class k is the unit vector e_k the per-half probes are right everywhere."""
    from cfgen.tune.probe import balanced_halves, probe_scores

    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3])
    groups = np.array(["g", "g", "h", "h", "g", "g", "g", "g", "g", "g", "h", "h"], dtype=object)
    half = balanced_halves(labels, groups)
    for g, c in {(g, c) for g, c in zip(groups, labels)}:
        cell = (groups == g) & (labels == c)
        assert half[cell].sum() == cell.sum() // 2
    rng = np.random.default_rng(0)
    x = np.eye(4)[labels] + 0.01 * rng.standard_normal((len(labels), 4))
    out = probe_scores(x, labels, x, labels, groups, [0, 1], [2, 3], {0: "a", 1: "b", 2: "c", 3: "d"})
    assert (out["base"], out["novel"], out["hm"], out["worst_group"]) == (1.0, 1.0, 1.0, 1.0)
    # a probe that never saw class 3 cannot score the novel half: those images count as wrong
    seen = labels != 3
    out = probe_scores(x[seen], labels[seen], x, labels, groups, [0, 1], [2, 3], {0: "a", 1: "b", 2: "c", 3: "d"})
    assert out["base"] == 1.0 and out["novel"] == 0.0 and out["worst_group"] == 0.0
