"""The prompt-learning objectives against values worked out by hand, and lambda = 0 = plain CoOp."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cfgen.config import ConfigError
from cfgen.tune.losses import cfvlm_loss, dicap_loss
from cfgen.tune.protocol import harmonic_mean, sample_shots, split_classes, summarize

# A 2-sample batch, 2 classes, scale (1/tau) = 2.
COS = torch.tensor([[0.5, 0.1], [0.2, 0.4]])
Y = torch.tensor([0, 1])


def test_dicap_l1_is_cross_entropy_over_class_prompts():
    # L1 = 1/2 [log(1 + e^{2(0.1-0.5)}) + log(1 + e^{2(0.2-0.4)})] = 1/2 [log(1+e^-0.8) + log(1+e^-0.4)]
    expected = 0.5 * (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(-0.4)))
    assert expected == pytest.approx(0.4420581, abs=1e-6)
    loss, parts = dicap_loss(COS, Y, torch.zeros(2), None, scale=2.0, lam=0.0)
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert parts["l1"] == pytest.approx(expected, abs=1e-6)


def test_dicap_l2_contrasts_factual_against_counterfactual():
    s_pos = torch.tensor([0.5, 0.4])  # cos(true-class prompt, factual image)
    s_neg = torch.tensor([0.3, 0.45])  # cos(true-class prompt, counterfactual image)
    # L2 = 1/2 [log(1 + e^{2(0.3-0.5)}) + log(1 + e^{2(0.45-0.4)})] = 1/2 [log(1+e^-0.4) + log(1+e^0.1)]
    l2 = 0.5 * (math.log(1 + math.exp(-0.4)) + math.log(1 + math.exp(0.1)))
    assert l2 == pytest.approx(0.6287061, abs=1e-6)
    loss, parts = dicap_loss(COS, Y, s_pos, s_neg, scale=2.0, lam=0.5)
    assert parts["l2"] == pytest.approx(l2, abs=1e-6)
    assert float(loss) == pytest.approx(0.4420581 + 0.5 * 0.6287061, abs=1e-6)  # 0.7564112


def test_lambda_zero_is_plain_coop_loss_and_gradients():
    torch.manual_seed(0)
    base = torch.randn(4, 3)
    y = torch.tensor([0, 2, 1, 2])
    s_neg_src = torch.randn(4)

    def grads(use_dicap: bool):
        cos = base.clone().requires_grad_(True)
        neg = s_neg_src.clone().requires_grad_(True)
        if use_dicap:
            loss, _ = dicap_loss(cos, y, cos.gather(1, y[:, None]).squeeze(1), neg, scale=7.0, lam=0.0)
        else:
            loss = F.cross_entropy(7.0 * cos, y)  # CoOp's objective, written independently
        loss.backward()
        return loss.detach(), cos.grad, neg.grad

    l_dicap, g_dicap, gneg = grads(True)
    l_ce, g_ce, _ = grads(False)
    assert torch.equal(l_dicap, l_ce)
    assert torch.equal(g_dicap, g_ce)
    assert torch.count_nonzero(gneg) == 0  # the counterfactual term contributes nothing
    # and lambda > 0 does change the gradient
    cos = base.clone().requires_grad_(True)
    dicap_loss(cos, y, cos.gather(1, y[:, None]).squeeze(1), s_neg_src, 7.0, 1.0)[0].backward()
    assert not torch.allclose(cos.grad, g_ce)


def test_cfvlm_objective_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # normalized factual image features
    prompts = torch.tensor([[0.6, 0.8], [0.8, 0.6]])  # normalized class prompts p_0, p_1
    cos = image @ prompts.t()  # [[0.6, 0.8], [0.8, 0.6]]
    text_true = prompts[Y]
    s_cf_cf = torch.tensor([0.3, 0.7])  # cos(x_cf, p_{y_cf})
    s_cf_true = torch.tensor([0.55, 0.2])  # cos(x_cf, p_y)
    loss, parts = cfvlm_loss(cos, Y, image, text_true, s_cf_cf, s_cf_true, torch.tensor([True, True]),
                             scale=2.0, alpha=1.0, beta=0.45, gamma=0.55, margin_csd=0.2, margin_fcd=0.2)
    # i2t and t2i are both log(1 + e^{2(0.8-0.6)}) per sample -> align = log(1 + e^0.4)
    align = math.log(1 + math.exp(0.4))
    assert parts["align"] == pytest.approx(align, abs=1e-6)  # 0.9129782
    # csd = mean(max(0, 0.2-0.6+0.3), max(0, 0.2-0.6+0.7)) = mean(0, 0.3)
    assert parts["csd"] == pytest.approx(0.15, abs=1e-6)
    # fcd = mean(max(0, 0.2-0.6+0.55), max(0, 0.2-0.6+0.2)) = mean(0.15, 0)
    assert parts["fcd"] == pytest.approx(0.075, abs=1e-6)
    assert float(loss) == pytest.approx(align + 0.45 * 0.15 + 0.55 * 0.075, abs=1e-6)  # 1.0217282


def test_cfvlm_masks_same_class_negatives_and_untrained_counterfactual_classes():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    prompts = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    y = torch.tensor([0, 0])  # both images of class 0: neither is a negative for the other's prompt
    cos = image @ prompts.t()
    loss, parts = cfvlm_loss(cos, y, image, prompts[y], torch.tensor([0.3, 0.9]), torch.tensor([0.0, 0.0]),
                             torch.tensor([True, False]), scale=2.0, margin_csd=0.2, margin_fcd=0.2)
    # t2i = 0; i2t = 1/2 [log(1+e^{2(0.8-0.6)}) + log(1+e^{2(0.6-0.8)})]
    i2t = 0.5 * (math.log(1 + math.exp(0.4)) + math.log(1 + math.exp(-0.4)))
    assert parts["align"] == pytest.approx(0.5 * i2t, abs=1e-6)
    # only sample 0 has a counterfactual class with a prompt: max(0, 0.2-0.6+0.3) = 0
    assert parts["csd"] == pytest.approx(0.0, abs=1e-7)
    # fcd = mean(max(0, 0.2-0.6), max(0, 0.2-0.8)) = 0
    assert parts["fcd"] == 0.0
    assert float(loss) == pytest.approx(0.5 * i2t, abs=1e-6)


def test_base_to_novel_split_and_shots():
    assert split_classes([7, 3, 0, 9, 1]) == ([0, 1, 3], [7, 9])  # sorted, first ceil(5/2) are base
    assert split_classes(list(range(10))) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    labels = torch.arange(10).repeat(5).numpy()  # 5 samples per class
    pool = labels >= 0
    a = sample_shots(labels, pool, [0, 1], shots=3, seed=1)
    assert len(a) == 6 and sorted(set(labels[a])) == [0, 1]
    assert (sample_shots(labels, pool, [0, 1], shots=3, seed=1) == a).all()  # seeded
    assert not (sample_shots(labels, pool, [0, 1], shots=3, seed=2) == a).all()
    with pytest.raises(ConfigError, match="tune.shots=6 but class 0 has only 5"):
        sample_shots(labels, pool, [0], shots=6, seed=1)


def test_summary_mean_std_and_harmonic_mean():
    assert harmonic_mean(0.9, 0.6) == pytest.approx(0.72)
    assert harmonic_mean(0.0, 0.0) == 0.0
    seeds = [{"base": 0.9, "novel": 0.6, "hm": 0.72, "worst_group": 0.5},
             {"base": 0.7, "novel": 0.6, "hm": 2 * 0.7 * 0.6 / 1.3, "worst_group": 0.3}]
    s = summarize(seeds, ("base", "novel", "hm", "worst_group"))
    assert set(s) == {"base", "novel", "hm", "worst_group"}
    assert s["base"] == {"mean": pytest.approx(0.8), "std": pytest.approx(math.sqrt(0.02))}  # ddof=1
    assert s["novel"] == {"mean": pytest.approx(0.6), "std": pytest.approx(0.0)}
    assert s["hm"]["mean"] == pytest.approx((0.72 + 0.6461538) / 2)  # HM per seed, then averaged
    assert s["worst_group"] == {"mean": pytest.approx(0.4), "std": pytest.approx(math.sqrt(0.02))}
