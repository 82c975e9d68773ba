"""The consumers that use a counterfactual as an image of its class (DESIGN §10): the objectives against
hand-computed values, the image-side learners at step 0 and at convergence, the selection of lr / epochs /
lambda on held-out pairs (never the evaluation split), and `cfgen tune` end to end with each new learner."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cfgen.tune.losses import augment_loss, dicap_sym_loss
from test_tune_cli import (DIGITS, DIGITS_SMALL, NAMES, SHAPES, SHAPES_SMALL, cfgen_here, pair_shards,  # noqa: F401
                           sets, shapes_pairs, table_labels, vlm)

# A 2-sample batch, 2 classes, scale (1/tau) = 2; the counterfactuals' cosines with the two class vectors
COS = torch.tensor([[0.5, 0.1], [0.2, 0.4]])
COS_CF = torch.tensor([[0.3, 0.6], [0.7, 0.1]])
Y, Y_CF = torch.tensor([0, 1]), torch.tensor([1, 0])
L1 = 0.5 * (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(-0.4)))  # 0.4420581, as test_tune_losses


def test_counterfactual_augmentation_by_hand():
    # x^cf_0 is labelled 1: log(1 + e^{2(0.3-0.6)}); x^cf_1 is labelled 0: log(1 + e^{2(0.1-0.7)})
    l_cf = 0.5 * (math.log(1 + math.exp(-0.6)) + math.log(1 + math.exp(-1.2)))
    loss, parts = augment_loss(COS, Y, COS_CF, Y_CF, torch.tensor([True, True]), scale=2.0, lam=0.5)
    assert float(loss) == pytest.approx(0.6172507, abs=1e-6) == pytest.approx(L1 + 0.5 * l_cf, abs=1e-6)
    assert parts == pytest.approx({"l1": L1, "l_cf": l_cf}, abs=1e-6)
    # a counterfactual whose class is not trained is left out of the mean (not counted as 0)
    loss, parts = augment_loss(COS, Y, COS_CF, torch.tensor([1, -1]), torch.tensor([True, False]), 2.0, 1.0)
    assert parts["l_cf"] == pytest.approx(math.log(1 + math.exp(-0.6)), abs=1e-6)
    # none trained: the term is 0 and still differentiable (no nan from an empty mean)
    cf = COS_CF.clone().requires_grad_(True)
    loss, parts = augment_loss(COS, Y, cf, torch.tensor([-1, -1]), torch.tensor([False, False]), 2.0, 1.0)
    loss.backward()
    assert parts["l_cf"] == 0.0 and loss.item() == pytest.approx(L1, abs=1e-6) and torch.count_nonzero(cf.grad) == 0


def test_symmetric_dicap_by_hand():
    # L2: the factual class prefers x over x^cf: [cos(x_i, p_y), cos(x^cf_i, p_y)] = [0.5, 0.3], [0.4, 0.1]
    l2 = 0.5 * (math.log(1 + math.exp(-0.4)) + math.log(1 + math.exp(-0.6)))
    # L2*: the counterfactual's class prefers x^cf over x: [cos(x^cf, p_y*), cos(x, p_y*)] = [0.6, 0.1], [0.7, 0.2]
    l2_star = math.log(1 + math.exp(-1.0))
    loss, parts = dicap_sym_loss(COS, Y, COS_CF, Y_CF, torch.tensor([True, True]), scale=2.0, lam=2.0)
    assert float(loss) == pytest.approx(2.0190847, abs=1e-6) == pytest.approx(L1 + 2 * (l2 + l2_star), abs=1e-6)
    assert parts == pytest.approx({"l1": L1, "l2": l2, "l2_star": l2_star}, abs=1e-6)
    _, parts = dicap_sym_loss(COS, Y, COS_CF, torch.tensor([-1, 0]), torch.tensor([False, True]), 2.0, 1.0)
    assert parts["l2_star"] == pytest.approx(math.log(1 + math.exp(-1.0)), abs=1e-6)  # row 1 alone


def test_image_side_learners_start_exactly_at_zero_shot(vlm):
    from cfgen.tune.heads import ImageSideLearner, LinearHead, ResidualAdapter
    from cfgen.tune.losses import normalize
    from cfgen.tune.train import class_logits, make_task, predict_correct, zero_shot_text

    task = make_task(NAMES)
    zs = zero_shot_text(vlm, task, "a photo of a")
    feat = torch.randn(40, 384, generator=torch.Generator().manual_seed(3))
    labels = np.arange(40) % 10
    f = normalize(feat)
    zero_shot = ImageSideLearner(zs)
    # the zero-shot row is the prompt's text through the VLM's own text path, cosine-scored
    independent = f @ normalize(vlm.encode_text([f"a photo of a {n}." for n in NAMES])).t()
    assert torch.allclose(class_logits(zero_shot, f, torch.arange(10)), independent, atol=1e-5)
    head, adapter = LinearHead(zs), ResidualAdapter(zs, generator=torch.Generator().manual_seed(0))
    for classes in (task.base, task.novel):  # the head: bit for bit
        assert torch.equal(class_logits(head, f, classes), class_logits(zero_shot, f, classes))
        # the adapter renormalises f + 0: equal up to the last bit of the norm
        assert torch.allclose(class_logits(adapter, f, classes), class_logits(zero_shot, f, classes), atol=1e-6)
    for learner in (head, adapter):
        assert (predict_correct(learner, task, feat, labels) == predict_correct(zero_shot, task, feat, labels)).all()


def test_the_solved_linear_head_is_scikit_learns_logistic_regression(vlm):
    """Cross-entropy + |W|^2 / (2 C n) with an unpenalised bias, solved from the zero-shot start: the same
    probabilities as LogisticRegression(C) fitted from scratch (the problem is convex)."""
    from sklearn.linear_model import LogisticRegression

    from cfgen.config import load_config
    from cfgen.tune.fit import RowRun, solve_heads
    from cfgen.tune.losses import normalize
    from cfgen.tune.train import class_logits, make_task, zero_shot_text

    t = load_config(DIGITS, ["tune.head_c=0.5"]).tune
    task = make_task(NAMES[:6])  # base 0, 1, 2
    zs = zero_shot_text(vlm, task, "a photo of a")
    gen = torch.Generator().manual_seed(1)
    label = torch.tensor([0, 1, 2] * 8)
    feat = torch.randn(24, 384, generator=gen) + 2.0 * torch.nn.functional.one_hot(label, 384).float()
    heads, infos = solve_heads(task, [RowRun("dicap", 0.0, feat, 0.0)], feat, label, label, t, zs, scale=15.0)
    assert infos[0]["iterations"] > 1
    ours = torch.softmax(15.0 * class_logits(heads[0], normalize(feat), task.base), dim=1)
    ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=10000).fit(normalize(feat).numpy(), label.numpy())
    assert np.abs(ours.numpy() - ref.predict_proba(normalize(feat).numpy())).max() < 2e-3
    # the novel classes' rows never move
    assert torch.equal(heads[0].class_features(classes=task.novel), zs[task.novel] / zs[task.novel].norm(dim=-1,
                                                                                                          keepdim=True))


def test_grids_choices_and_ties():
    from cfgen.config import load_config
    from cfgen.tune.select import Choice, grid_for

    t = load_config(DIGITS, []).tune
    assert grid_for(t, "coop", None) == grid_for(t, "coop_csc", "cfvlm")  # no lambda to choose
    g = grid_for(t, "coop", "augment")
    assert (g.lrs, g.epochs, g.lams, g.longest) == ((0.002, 0.02, 0.2), (10, 25, 50), (1.0,), 50)
    assert grid_for(t, "cocoop", "dicap").epochs == (2, 5, 10)
    assert grid_for(t, "adapter", "dicap_sym") .lams == (0.5, 1.0, 2.0)
    assert grid_for(t, "linear", "augment") == grid_for(t, "linear", "augment").__class__((0.0,), (0,), (0.5, 1.0, 2.0))
    fixed = load_config(DIGITS, ["tune.select.mode=fixed", "tune.epochs=7", "tune.lam=0.3"]).tune
    assert grid_for(fixed, "coop", "dicap") == g.__class__((0.002,), (7,), (0.3,))
    assert grid_for(fixed, "adapter", None) == g.__class__((0.001,), (50,), (0.0,))

    class Stub(torch.nn.Module):
        def __init__(self, v):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([float(v)]))

    c = Choice()
    c.offer(0.5, (0.02, 25, 1.0), Stub(1))
    c.offer(0.5, (0.002, 50, 1.0), Stub(2))  # a tie: the smaller lr wins
    c.offer(0.5, (0.002, 50, 2.0), Stub(3))  # a tie with a larger lambda loses
    c.offer(0.4, (0.0001, 10, 0.5), Stub(4))  # worse
    assert c.key == (0.002, 50, 1.0) and float(c.state["w"]) == 2.0
    assert c.record() == {"lr": 0.002, "epochs": 50, "lam": 1.0, "criterion": 0.5,
                          "scores": {"lr=0.02,epochs=25,lam=1": 0.5, "lr=0.002,epochs=50,lam=1": 0.5,
                                     "lr=0.002,epochs=50,lam=2": 0.5, "lr=0.0001,epochs=10,lam=0.5": 0.4}}


def test_validation_set_is_the_pools_base_pairs_outside_the_shots():
    from cfgen.tune.select import validation_set

    ids = ["a", "b", "b", "c", "d", "e", "f"]  # b carries two pairs (two targets)
    label = np.array([0, 1, 1, 0, 2, 1, 0])
    cf_label = np.array([1, 0, 2, 2, 0, 0, 1])  # class 2 is novel
    pool = np.array([True, True, True, True, True, True, False])  # f is in the evaluation split
    feat = torch.arange(7, dtype=torch.float32)[:, None].repeat(1, 3)
    val = validation_set(ids, feat, -feat, label, cf_label, pool, shots=np.array([0]), base=[0, 1])
    assert val.factual_ids == ["b", "c", "e"]  # not the shot a, not the novel d, not f outside the pool; b once
    assert val.label.tolist() == [1, 0, 1] and val.feat[:, 0].tolist() == [1.0, 3.0, 5.0]
    assert val.cf_label.tolist() == [0, 0] and val.cf_feat[:, 0].tolist() == [-1.0, -5.0]  # base targets only
    # a shot's second pair shares its pixels: left out with it
    assert validation_set(ids, feat, -feat, label, cf_label, pool, np.array([1]), [0, 1]).factual_ids == ["a", "c", "e"]


def _tune(monkeypatch, capsys, run, shards, *overrides):
    code, stdout, stderr = cfgen_here(monkeypatch, capsys, "tune", "--config", SHAPES, "--out", str(run), "--pairs",
                                      str(shards / "pairs-*.tar"), *sets(*overrides))
    assert code == 0, stderr
    return stdout, stderr, json.loads((run / "tune" / "metrics.json").read_text())


SELECTED = [o for o in SHAPES_SMALL if not o.startswith("tune.select.mode")] + [
    "tune.select.lr=[0.002, 0.2]", "tune.select.epochs=[1, 2]", "tune.select.image_lr=[0.001, 0.01]",
    "tune.select.image_epochs=[2, 4]", "tune.select.image_lam=[0.5, 2.0]"]


def test_tune_with_the_image_side_learners_and_selection_end_to_end(shapes_pairs, tmp_path, monkeypatch, capsys):
    overrides = SELECTED + ['tune.learners=["linear", "adapter", "coop"]', 'tune.objectives=["augment", "dicap_sym"]',
                            'tune.cf_sources=["generated", "true"]',
                            'tune.rows=["linear+*", "adapter+augment[generated]", "coop+augment[generated]"]']
    stdout, stderr, metrics = _tune(monkeypatch, capsys, tmp_path / "run", shapes_pairs, *overrides)
    assert table_labels(stdout) == ["zero-shot", "Linear", "Linear+CF-aug[generated]", "Linear+CF-aug[true]",
                                    "Linear+DiCap-sym[generated]", "Linear+DiCap-sym[true]", "Adapter",
                                    "Adapter+CF-aug[generated]", "CoOp", "CoOp+CF-aug[generated]"]
    assert "share of the true counterfactuals' gain" in stdout and "Linear+CF-aug" in stdout.split("share of")[1]
    sel = metrics["protocol"]["selection"]
    assert sel["mode"] == "validation" and sel["criterion"].startswith("0.5 * accuracy of the validation factual")
    assert sel["grid"]["image_lam"] == [0.5, 2.0]
    runs = json.loads((tmp_path / "run" / "tune" / "runs.json").read_text())["runs"]
    for key, row in metrics["rows"].items():
        if key == "zero_shot":
            continue
        learner, objective = row["learner"], row["objective"]
        for seed_row, chosen in zip(runs, row["chosen"]):
            scores = seed_row["methods"][key]["chosen"]["scores"]
            assert chosen["criterion"] == max(scores.values())  # the best grid point was kept
            if learner == "linear":  # solved: only lambda is chosen
                assert (chosen["lr"], chosen["epochs"]) == (0.0, 0) and len(scores) == (1 if objective is None else 2)
            elif learner == "adapter":
                assert chosen["lr"] in (0.001, 0.01) and chosen["epochs"] in (2, 4)
                assert len(scores) == 2 * 2 * (1 if objective is None else 2)
            else:
                assert chosen["lr"] in (0.002, 0.2) and chosen["epochs"] in (1, 2) and chosen["lam"] == (
                    0.0 if objective is None else 1.0)
    heads = sorted(p.name for p in (tmp_path / "run" / "tune" / "heads").glob("*.safetensors"))
    assert len(heads) == 3 * 7 and "linear-augment-true-seed2.safetensors" in heads
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "tune" / "heads" / "adapter-augment-generated-seed1.safetensors"), "pt") as fh:
        assert set(fh.keys()) == {"down.weight", "up.weight"} and fh.get_tensor("up.weight").shape == (384, 96)
        assert json.loads(fh.metadata()["chosen"]) == {k: v for k, v in runs[0]["methods"][
            "adapter+augment[generated]"]["chosen"].items() if k != "scores"}
    with safe_open(str(tmp_path / "run" / "tune" / "heads" / "linear-seed3.safetensors"), "pt") as fh:
        assert set(fh.keys()) == {"delta", "bias"} and fh.get_tensor("delta").shape == (3, 384)
    # a linear head never moves a novel class: novel accuracy is zero-shot's, seed by seed
    for r in runs:
        assert r["methods"]["linear+augment[true]"]["novel"] == r["methods"]["zero_shot"]["novel"]


def test_selection_never_reads_the_evaluation_split(shapes_pairs, tmp_path, monkeypatch, capsys):
    """Shuffle the evaluation images' labels and groups: every figure moves, no choice does."""
    import cfgen.tune.train as train

    overrides = SELECTED + ['tune.learners=["linear", "coop"]', 'tune.objectives=["augment"]',
                            'tune.cf_sources=["generated"]', "tune.rows=[]"]
    _, _, honest = _tune(monkeypatch, capsys, tmp_path / "a", shapes_pairs, *overrides)
    real_load = train.load_eval_set

    def shuffled(*args, **kwargs):
        ev = real_load(*args, **kwargs)
        perm = np.random.default_rng(0).permutation(len(ev.label))
        return train.EvalSet(ev.ids, ev.feat, ev.label[perm], ev.group[perm], ev.stats)

    monkeypatch.setattr(train, "load_eval_set", shuffled)
    _, _, scrambled = _tune(monkeypatch, capsys, tmp_path / "b", shapes_pairs, *overrides)
    assert honest["rows"]["zero_shot"]["base"] != scrambled["rows"]["zero_shot"]["base"]
    for key in honest["order"]:
        assert honest["rows"][key]["chosen"] == scrambled["rows"][key]["chosen"]


def test_jobs_in_forked_processes_give_the_figures_of_one_process(shapes_pairs, tmp_path, monkeypatch, capsys):
    overrides = SELECTED + ['tune.learners=["linear", "coop"]', 'tune.objectives=["augment"]',
                            'tune.cf_sources=["generated"]', "tune.rows=[]"]
    _, err_one, one = _tune(monkeypatch, capsys, tmp_path / "a", shapes_pairs, *overrides, "tune.workers=1")
    _, err_two, two = _tune(monkeypatch, capsys, tmp_path / "b", shapes_pairs, *overrides, "tune.workers=2")
    assert "jobs in" not in err_one and "6 (seed, learner) jobs in 2 processes of one thread each" in err_two
    for key in one["order"]:
        for k in ("worst_base", "base", "novel", "hm", "delta", "chosen"):
            assert one["rows"][key][k] == two["rows"][key][k]


def test_without_an_eval_split_the_validation_images_are_left_out_of_evaluation(pair_shards, tmp_path, monkeypatch,
                                                                                capsys):
    overrides = [o for o in DIGITS_SMALL if not o.startswith(("tune.select.mode", "tune.eval_split"))] + [
        "tune.eval_split=", 'tune.learners=["linear"]', 'tune.objectives=["augment"]', "tune.workers=2"]
    code, _, stderr = cfgen_here(monkeypatch, capsys, "tune", "--config", DIGITS, "--out", str(tmp_path / "run"),
                                 "--pairs", str(pair_shards / "pairs-*.tar"), *sets(*overrides))
    assert code == 0, stderr
    assert "2 (seed, learner) jobs in 2 processes of one thread each" in stderr
    runs = json.loads((tmp_path / "run" / "tune" / "runs.json").read_text())["runs"]
    for r in runs:  # 1797 digits: the 10 shots and the 15 other base-class pairs' images are not evaluated
        assert (r["shots"], r["validation_images"], r["validation_counterfactuals"]) == (10, 15, 12)
        assert r["eval_images"] == 1797 - 10 - 15
