"""Tests for cfgen.targets (per-sample seeds, counterfactual label choice) and cfgen.quality.distances."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from cfgen.quality.distances import l1, l2, mean
from cfgen.targets import choose_targets, resolve_fixed_target, sample_seed

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


# ---------------------------------------------------------------- sample_seed

def test_sample_seed_hand_checked():
    expected = int.from_bytes(hashlib.sha256(b"0:abc").digest()[:4], "big") & 0x7FFFFFFF
    assert sample_seed(0, "abc") == expected
    expected7 = int.from_bytes(hashlib.sha256(b"7:digits-00042").digest()[:4], "big") & 0x7FFFFFFF
    assert sample_seed(7, "digits-00042") == expected7


def test_sample_seed_stable_and_31_bit():
    seeds = [sample_seed(0, f"digits-{i:05d}") for i in range(500)]
    assert seeds == [sample_seed(0, f"digits-{i:05d}") for i in range(500)]
    assert all(isinstance(s, int) and 0 <= s < 2**31 for s in seeds)
    assert len(set(seeds)) == 500  # distinct ids give distinct seeds (no collisions here)


def test_sample_seed_depends_on_id_and_global_seed():
    assert sample_seed(0, "abc") != sample_seed(0, "abd")
    assert sample_seed(0, "abc") != sample_seed(1, "abc")
    # The ":" separator keeps (1, "2x") and (12, "x") apart.
    assert sample_seed(1, "2x") != sample_seed(12, "x")


# ---------------------------------------------------------------- choose_targets: closest

def test_closest_picks_top_non_factual_logit():
    logits = torch.tensor([
        [5.0, 3.0, 1.0, 4.0],    # label 0 is top; next best is class 3
        [0.1, 0.2, 9.0, 0.3],    # label 1; top is class 2
        [2.0, 8.0, 7.0, -1.0],   # label 1 is top; next best is class 2
        [-3.0, -1.0, -2.0, -5.0],  # label 3; all negative; best other is class 1
    ])
    labels = torch.tensor([0, 1, 1, 3])
    out = choose_targets("closest", logits, labels, [0, 0, 0, 0], ["a", "b", "c", "d"])
    assert out.tolist() == [3, 2, 2, 1]
    assert out.dtype == torch.long
    # The caller's logits are not modified.
    assert logits[0, 0].item() == 5.0


def test_closest_ignores_seeds_and_handles_half_precision():
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], dtype=torch.float16)
    labels = torch.tensor([2, 0])
    a = choose_targets("closest", logits, labels, [1, 2], ["x", "y", "z"])
    b = choose_targets("closest", logits, labels, [99, 100], ["x", "y", "z"])
    assert a.tolist() == [1, 1] == b.tolist()


def test_closest_never_returns_label():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 10, generator=g)
    labels = logits.argmax(dim=1)  # worst case: the label is always the top logit
    out = choose_targets("closest", logits, labels, [0] * 200, NAMES)
    assert (out != labels).all()
    expected = logits.clone()
    expected[torch.arange(200), labels] = -math.inf
    assert out.tolist() == expected.argmax(dim=1).tolist()


# ---------------------------------------------------------------- choose_targets: random

def _random(labels, seeds, k=10):
    logits = torch.zeros(len(labels), k)
    return choose_targets("random", logits, torch.tensor(labels), seeds, NAMES[:k]).tolist()


def test_random_never_returns_label_and_covers_others():
    seeds = [sample_seed(0, f"s{i}") for i in range(400)]
    for label in (0, 3, 9):
        out = _random([label] * len(seeds), seeds)
        assert label not in out
        assert set(out) == set(range(10)) - {label}


def test_random_reproducible_from_seeds_alone():
    seeds = [sample_seed(0, f"digits-{i:05d}") for i in range(50)]
    labels = [i % 10 for i in range(50)]
    first = _random(labels, seeds)
    assert first == _random(labels, seeds)
    # Independent of batch composition, order and logits: each sample alone gives the same answer.
    alone = [_random([lab], [s])[0] for lab, s in zip(labels, seeds)]
    assert alone == first
    rev = _random(labels[::-1], seeds[::-1])
    assert rev == first[::-1]
    logits = torch.randn(50, 10)
    assert choose_targets("random", logits, torch.tensor(labels), seeds, NAMES).tolist() == first


def test_random_matches_documented_rule():
    # r ~ U{0..k-2} from the sample's own generator, shifted past the label.
    for seed in (0, 1, 12345, 2**31 - 1):
        for label in (0, 4, 9):
            r = int(np.random.default_rng(seed).integers(9))
            assert _random([label], [seed]) == [r if r < label else r + 1]


def test_random_two_classes_is_the_other_one():
    assert _random([0, 1, 0, 1], [1, 2, 3, 4], k=2) == [1, 0, 1, 0]


def test_random_differs_across_seeds():
    seeds = list(range(100))
    out = _random([5] * 100, seeds)
    assert len(set(out)) > 1


# ---------------------------------------------------------------- choose_targets: fixed / invalid

def test_fixed_target_by_name_and_index():
    logits = torch.zeros(3, 10)
    labels = torch.tensor([1, 2, 3])
    by_name = choose_targets("seven", logits, labels, [0, 0, 0], NAMES)
    assert by_name.tolist() == [7, 7, 7]
    assert by_name.dtype == labels.dtype
    assert choose_targets("3", logits, labels, [0, 0, 0], NAMES).tolist() == [3, 3, 3]
    assert choose_targets("0", logits, labels, [0, 0, 0], NAMES).tolist() == [0, 0, 0]


def test_fixed_target_name_wins_over_index():
    # A class literally named "1" at index 0: the name is matched first.
    names = ["1", "0"]
    assert resolve_fixed_target("1", names) == 0
    assert resolve_fixed_target("0", names) == 1


def test_resolve_fixed_target():
    assert resolve_fixed_target("closest", NAMES) is None
    assert resolve_fixed_target("random", NAMES) is None
    assert resolve_fixed_target("nine", NAMES) == 9
    assert resolve_fixed_target("9", NAMES) == 9


@pytest.mark.parametrize("strategy", ["banana", "10", "-1", "Seven", "", "closests"])
def test_invalid_strategy_raises(strategy):
    logits = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="guide.target"):
        choose_targets(strategy, logits, torch.tensor([0, 1]), [0, 1], NAMES)


# ---------------------------------------------------------------- metrics

def test_l1_l2_hand_computed():
    a = np.array([[0, 255]], dtype=np.uint8)
    b = np.array([[255, 255]], dtype=np.uint8)
    assert l1(a, b) == pytest.approx(0.5)                 # (255 + 0) / 2 / 255
    assert l2(a, b) == pytest.approx(math.sqrt(0.5))      # sqrt((255^2 + 0) / 2) / 255


def test_l1_l2_no_uint8_wraparound():
    a = np.array([10], dtype=np.uint8)
    b = np.array([20], dtype=np.uint8)
    assert l1(a, b) == pytest.approx(10 / 255)            # uint8 a-b would wrap to 246
    assert l1(b, a) == pytest.approx(10 / 255)
    assert l2(a, b) == pytest.approx(10 / 255)


def test_l1_l2_three_values():
    a = np.array([0, 51, 102], dtype=np.uint8).reshape(1, 3, 1)
    b = np.array([51, 51, 0], dtype=np.uint8).reshape(1, 3, 1)
    # |diff| = 51, 0, 102 -> mean 51 -> 0.2; rms = sqrt((51^2 + 102^2) / 3) / 255
    assert l1(a, b) == pytest.approx(0.2)
    assert l2(a, b) == pytest.approx(math.sqrt((51**2 + 102**2) / 3) / 255)
    assert isinstance(l1(a, b), float) and isinstance(l2(a, b), float)


def test_l1_l2_identical_and_extremes():
    a = np.full((8, 8, 1), 37, dtype=np.uint8)
    assert l1(a, a) == 0.0
    assert l2(a, a) == 0.0
    black = np.zeros((8, 8, 3), dtype=np.uint8)
    white = np.full((8, 8, 3), 255, dtype=np.uint8)
    assert l1(black, white) == pytest.approx(1.0)
    assert l2(black, white) == pytest.approx(1.0)


def test_mean_skips_none():
    assert mean([1.0, None, 3.0]) == pytest.approx(2.0)
    assert mean([0.25]) == pytest.approx(0.25)
    assert math.isnan(mean([]))
    assert math.isnan(mean([None, None]))


# ---------------------------------------------------------------- several targets per image

def test_all_lists_every_other_class_in_class_order():
    from cfgen.targets import choose_target_sets, targets_per_image

    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [3.0, 0.0, 0.0, 1.0]])
    out = choose_target_sets("all", 1, logits, torch.tensor([1, 3]), [0, 0], NAMES[:4])
    assert out.tolist() == [[0, 2, 3], [0, 1, 2]]
    assert targets_per_image("all", 1, 4) == 3


def test_closest_top_k_ranks_the_other_classes():
    from cfgen.targets import choose_target_sets, targets_per_image

    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [3.0, 0.5, 0.5, 9.0]])
    labels = torch.tensor([1, 3])
    # sample 0 (label 1): 3 (2.0) then 2 (1.0); sample 1 (label 3): 0 (3.0), then the tie 1/2 in class order
    assert choose_target_sets("closest", 2, logits, labels, [0, 0], NAMES[:4]).tolist() == [[3, 2], [0, 1]]
    assert choose_target_sets("closest", 3, logits, labels, [0, 0], NAMES[:4]).tolist() == [[3, 2, 0], [0, 1, 2]]
    # top_k = 1 is today's 'closest'
    assert choose_target_sets("closest", 1, logits, labels, [0, 0], NAMES[:4]).tolist() == [[3], [0]]
    assert targets_per_image("closest", 9, 4) == 3  # capped at the other classes
    assert targets_per_image("random", 1, 4) == 1 and targets_per_image("2", 1, 4) == 1
