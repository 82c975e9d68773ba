"""Quality metrics against hand-computed values; the pack gates; the truth metrics of a shapes run."""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cfgen.quality import measures as quality
from cfgen.config import ConfigError, load_config
from cfgen.quality.distances import l1

ROOT = Path(__file__).resolve().parents[1]
# Tiny and fast: 5 DDIM steps, one scale, two shards of 6.
TINY = ["data.limit=12", "data.shard_size=6", "invert.steps=5", "guide.escalation=[]",
        "invert.batch_size=6", "guide.batch_size=6", "pack.min_p_cf=0.0"]  # 5 steps, no ladder: no shipped gate


def tiny_run(run_dir: Path, pipeline: str, overrides: list[str] | None = None) -> dict:
    from cfgen.stages.guide import run_guide
    from cfgen.stages.invert import run_invert
    from cfgen.stages.pack import run_pack

    cfg = load_config(ROOT / "pipelines" / f"{pipeline}.toml", TINY + (overrides or []))
    run_invert(cfg, run_dir)
    run_guide(cfg, run_dir)
    return run_pack(cfg, run_dir)


def img(values) -> np.ndarray:
    """uint8 (H, W, 1) from a nested list of grey levels."""
    return np.asarray(values, dtype=np.uint8)[:, :, None]


# ---------------------------------------------------------------- metrics, by hand

def test_changed_and_outside_change_by_hand():
    a = img([[0, 0], [0, 0]])
    b = img([[255, 20], [30, 0]])            # 1.0, 0.078, 0.118, 0 -> two pixels above 0.1
    assert quality.changed_mask(a, b).tolist() == [[True, False], [True, False]]
    assert quality.changed_fraction(a, b) == 0.5
    region = np.array([[True, False], [False, False]])   # the causal region holds the 255 change
    assert quality.outside_change(a, b, region) == pytest.approx(1 / 3)   # of 3 outside pixels, the 30 one
    assert np.isnan(quality.outside_change(a, b, np.ones((2, 2), dtype=bool)))
    rgb_a, rgb_b = np.zeros((1, 1, 3), np.uint8), np.array([[[0, 0, 40]]], np.uint8)
    assert quality.changed_fraction(rgb_a, rgb_b) == 1.0   # a change in any channel counts


def test_nearest_render_looks_only_inside_the_causal_region():
    renders = np.stack([img([[0, 0], [0, 0]]), img([[200, 0], [0, 0]]), img([[100, 0], [0, 0]])])
    region = np.array([[True, False], [False, False]])
    assert quality.nearest_render(img([[190, 255], [255, 255]]), renders, region) == 1  # outside ignored
    assert quality.nearest_render(img([[110, 0], [0, 0]]), renders, region) == 2
    assert quality.nearest_render(img([[10, 0], [0, 0]]), renders, np.ones((2, 2), bool)) == 0


def test_truth_metrics_by_hand():
    factual = img([[0, 0], [0, 0]])
    truth = img([[200, 0], [0, 0]])
    renders = np.stack([factual, truth])
    region = np.array([[True, False], [False, False]])
    cf = img([[180, 0], [0, 51]])             # nearly the truth, plus a change outside the region
    recon = img([[0, 0], [0, 4]])
    m = quality.truth_metrics(factual, cf, recon, renders, region, target=1)
    assert m["truth_l1"] == pytest.approx((20 + 51) / 4 / 255)
    assert m["truth_l1"] == l1(cf, truth)
    assert m["truth_closer"] is True                     # 71/1020 to truth < 231/1020 to factual
    assert m["oracle_label"] == 1 and m["oracle_flipped"] is True
    assert m["outside_change"] == pytest.approx(1 / 3)   # 51/255 = 0.2 > 0.1 on one of 3 pixels
    assert m["within_recon_bound"] is False              # 0.0696 > recon 4/4/255
    half = img([[100, 0], [0, 0]])                       # halfway: not closer to the truth
    m = quality.truth_metrics(factual, half, factual, renders, region, target=1)
    assert m["truth_closer"] is False
    assert quality.within_recon_bound(0.01, 0.01) and not quality.within_recon_bound(0.011, 0.01)


def test_gate_failures_name_every_failed_gate():
    row = {"flipped": False, "p_cf": 0.4, "l1": 0.3, "recon_l1": 0.05}
    assert quality.gate_failures(row, 0.0, 1.0, 1.0) == []
    assert quality.gate_failures(row, 0.0, 1.0, 1.0, require_flip=True) == ["not_flipped"]
    out = quality.gate_failures(row, 0.5, 0.2, 0.01)
    assert [g.split(":")[0] for g in out] == ["p_cf_below_min", "l1_above_max", "recon_l1_above_max"]
    assert out[0] == "p_cf_below_min: 0.400 < 0.5"
    assert quality.rate([True, None, False, True]) == pytest.approx(2 / 3)


def test_cld_by_hand():
    """CLD = log(exp(P(S_x* <= div)) + exp(P(S_x >= div))) (Sanchez & Tsaftaris 2022), on 1-pixel images:
    d(a, b) = |a - b| / 255.

    factual x = 0, counterfactual x* = 100: div = 100/255.
    real images of x's class y: 0 (x itself, left out), 20, 120, 200 -> S_x = {20, 120, 200}/255;
        S_x >= div for 120 and 200: P = 2/3.
    real images of the target class y*: 50, 100, 150, 250 -> S_x* = {50, 100, 150, 250}/255;
        S_x* <= div for 50 and 100 (a tie counts): P = 2/4 = 0.5.
    CLD = log(e^0.5 + e^(2/3)) = log(1.6487213 + 1.9477340) = log(3.5964553) = 1.2799487.
    With the benchmark's weights 0.8, 0.2: log(0.8 * 1.6487213 + 0.2 * 1.9477340) = log(1.7085238) = 0.5356297.
    """
    from cfgen.quality import cld
    def one(v):
        return img([[v]])

    refs = cld.References.of([(0, "x", one(0)), (0, "a", one(20)), (0, "b", one(120)), (0, "c", one(200)),
                              (1, "d", one(50)), (1, "e", one(100)), (1, "f", one(150)), (1, "g", one(250))])
    assert refs.of_class(0, exclude="x").ravel().tolist() == [20, 120, 200]
    assert refs.pair(one(0), one(100), 0, 1, origin="x") == pytest.approx(1.2799487, abs=1e-7)
    div = 100 / 255
    s_x, s_cf = np.array([20, 120, 200]) / 255, np.array([50, 100, 150, 250]) / 255
    assert cld.cld(div, s_x, s_cf) == pytest.approx(1.2799487, abs=1e-7)
    assert cld.cld(div, s_x, s_cf, w1=0.8, w2=0.2) == pytest.approx(0.5356297, abs=1e-7)
    # the factual image left in its own set would add d = 0, never >= div: P(S_x >= div) = 2/4, CLD = log(2 e^0.5)
    assert refs.pair(one(0), one(100), 0, 1) == pytest.approx(math.log(2 * math.exp(0.5)))
    # bounds: log 2 (closer than every y* image, further than every y image) .. 1 + log 2
    assert cld.cld(0.5, [0.1, 0.2], [0.9]) == pytest.approx(math.log(2))
    assert cld.cld(0.5, [0.9], [0.1, 0.2]) == pytest.approx(1 + math.log(2))
    assert np.isnan(cld.cld(0.5, [], [0.1]))
    assert refs.pair(one(0), one(100), 0, 2) is None                    # no real image of the target class
    assert cld.batch_cld(np.stack([one(0)]), np.stack([one(100)]), [0], [1], refs, ["x"]) == [refs.pair(
        one(0), one(100), 0, 1, origin="x")]
    # one per origin (data.repeat copies), at most per_class a class
    capped = cld.References.of([(0, "a", one(1)), (0, "a", one(2)), (0, "b", one(3)), (0, "c", one(4))], per_class=2)
    assert capped.of_class(0).ravel().tolist() == [1, 3]
    # larger images are box-downsampled to EMBED_SIDE a side: 2 x 2 blocks of 0 / 255 stripes -> 128
    stripes = np.zeros((2 * cld.EMBED_SIDE, 2 * cld.EMBED_SIDE, 1), np.uint8)
    stripes[:, ::2] = 255
    assert cld.embed(stripes).tolist() == [128] * cld.EMBED_SIDE ** 2
    assert cld.embed(img([[1, 2], [3, 4]])).tolist() == [1, 2, 3, 4]   # small images as they are


def test_edit_within_recon_and_the_summary_warning():
    from cfgen.cli import _summary

    assert quality.edit_within_recon(0.01, 0.01) and not quality.edit_within_recon(0.011, 0.01)
    stats = {"pairs": 10, "count": 10, "failed": 0, "rejected": 0, "flip_rate": 1.0, "mean_l1": 0.05,
             "mean_recon_l1": 0.01, "pairs_dir": "runs/x/pairs", "mean_cld": 0.9, "edit_within_recon_rate": 0.23}
    out = _summary(stats)
    assert "mean cld 0.900" in out
    assert out.splitlines()[1] == ("warning: 23% of pairs changed the image no more than the s = 0 round trip does "
                                   "(l1 <= recon_l1): they may be noise, not edits")
    for quiet in (quality.EDIT_WITHIN_RECON_WARN_RATE, 0.0, float("nan")):
        assert "warning" not in _summary({**stats, "edit_within_recon_rate": quiet})
    old = {k: v for k, v in stats.items() if k not in ("mean_cld", "edit_within_recon_rate")}
    assert _summary(old) == ("pairs: 10 of 10 inputs (failed 0, rejected 0); flip rate 1.000; mean l1 0.0500; "
                             "mean recon_l1 0.0100 -> runs/x/pairs")     # stats.json of an older run
    # p(y*) beside the flip rate (a flip at p 0.41 is not a confident one), and the stage timings
    full = _summary({**stats, "mean_p_cf": 0.41, "seconds": {"invert": 11.4, "guide": 73.2, "pack": 2.0}})
    assert full.splitlines()[0] == ("pairs: 10 of 10 inputs (failed 0, rejected 0); flip rate 1.000 (mean p(y*) 0.410); "
                                    "mean l1 0.0500; mean recon_l1 0.0100; mean cld 0.900; invert 11 s, guide 73 s, "
                                    "pack 2 s -> runs/x/pairs")


def test_gate_values_are_validated():
    for bad in ("pack.min_p_cf=1.5", "pack.max_l1=-0.1", "pack.max_recon_l1=-1"):
        with pytest.raises(ConfigError):
            load_config(ROOT / "pipelines" / "digits.toml", [bad])


# ---------------------------------------------------------------- gates in pack

@pytest.fixture(scope="module")
def digits_tiny(tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("digits_tiny")
    return run_dir, tiny_run(run_dir, "digits")


def _tar_keys(pairs: Path) -> list[str]:
    keys = []
    for tar in sorted(pairs.glob("pairs-*.tar")):
        with tarfile.open(tar) as t:
            keys += sorted({n.split(".", 1)[0] for n in t.getnames()})
    return keys


def test_default_gates_keep_every_pair(digits_tiny):
    run_dir, stats = digits_tiny
    assert stats["pairs"] == stats["count"] == 12 and stats["rejected"] == 0
    assert stats["rejected_by_gate"] == {}
    rows = pq.read_table(run_dir / "pairs" / "manifest.parquet").to_pylist()
    assert all(0.0 <= r["changed_fraction"] <= 1.0 for r in rows)
    assert all(r["truth_l1"] is None for r in rows)   # no causal model for real digits
    assert "oracle_flip_rate" not in stats


def test_pack_records_cld_and_the_within_recon_flag(digits_tiny):
    from cfgen.quality import cld
    from cfgen.shards import read_samples

    run_dir, stats = digits_tiny
    rows = {r["id"]: r for r in pq.read_table(run_dir / "pairs" / "manifest.parquet").to_pylist()}
    for r in rows.values():
        assert r["edit_within_recon"] == (r["l1"] <= r["recon_l1"])
        assert r["cld"] is None or math.log(2) <= r["cld"] <= 1 + math.log(2)
    assert stats["edit_within_recon_rate"] == pytest.approx(np.mean([r["edit_within_recon"] for r in rows.values()]))
    assert stats["mean_cld"] == pytest.approx(np.mean([r["cld"] for r in rows.values() if r["cld"] is not None]))
    # every pair is written (default gates), so the reference sets are the factual images of the pairs
    samples = [s for tar in sorted((run_dir / "pairs").glob("pairs-*.tar")) for s in read_samples(tar)]
    factual = np.stack([np.asarray(Image.open(io.BytesIO(s["png"])))[:, :, None] for s in samples])
    cf = np.stack([np.asarray(Image.open(io.BytesIO(s["cf.png"])))[:, :, None] for s in samples])
    meta = [rows[s["__key__"]] for s in samples]
    refs = cld.References.of((m["label"], m["origin"], f) for m, f in zip(meta, factual))
    again = cld.batch_cld(factual, cf, [m["label"] for m in meta], [m["cf_label"] for m in meta], refs,
                          [m["origin"] for m in meta])
    assert again == [m["cld"] for m in meta]


def test_gates_reject_with_reasons_count_them_and_keep_them_out_of_the_tars(digits_tiny, tmp_path):
    from cfgen.stages.pack import run_pack

    src, _ = digits_tiny
    for stage in ("invert", "guide"):
        shutil.copytree(src / stage, tmp_path / stage)
    rows = pq.read_table(src / "pairs" / "manifest.parquet").to_pylist()
    l1s = sorted(r["l1"] for r in rows)
    max_l1 = (l1s[5] + l1s[6]) / 2                        # exactly 6 of 12 are further than this
    cfg = load_config(ROOT / "pipelines" / "digits.toml",
                      TINY + [f"pack.max_l1={max_l1}", "pack.min_p_cf=0.999999", "pack.max_recon_l1=1.0"])
    stats = run_pack(cfg, tmp_path)
    manifest = pq.read_table(tmp_path / "pairs" / "manifest.parquet").to_pylist()
    assert len(manifest) == 12                            # every input keeps its row
    too_far = {r["id"] for r in rows if r["l1"] > max_l1}
    unsure = {r["id"] for r in rows if r["p_cf"] < 0.999999}
    rejected = {r["id"] for r in manifest if r["status"] == "rejected"}
    assert rejected == too_far | unsure and len(too_far) == 6
    for r in manifest:
        if r["status"] == "rejected":
            reasons = [g.split(":")[0] for g in r["error"].split("; ")]
            assert ("l1_above_max" in reasons) == (r["id"] in too_far)
            assert ("p_cf_below_min" in reasons) == (r["id"] in unsure)
        else:
            assert r["error"] is None
    assert stats["rejected"] == len(rejected) and stats["pairs"] == 12 - len(rejected)
    assert stats["rejected_by_gate"] == {k: v for k, v in {"p_cf_below_min": len(unsure),
                                                           "l1_above_max": len(too_far)}.items() if v}
    assert sum(stats["errors"].values()) == len(rejected)  # by first reason
    assert sorted(_tar_keys(tmp_path / "pairs")) == sorted({r["id"] for r in manifest} - rejected)
    sizes = json.loads((tmp_path / "pairs" / "sizes.json").read_text())
    assert sum(sizes.values()) == 12 - len(rejected)


# ---------------------------------------------------------------- truth metrics of a shapes run

def test_shapes_run_records_truth_metrics_that_match_the_stored_images(tmp_path):
    from cfgen.data import shapes
    from cfgen.shards import read_samples

    stats = tiny_run(tmp_path, "shapes")
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "pairs" / "manifest.parquet").to_pylist()}
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) == 12
    for key in ("oracle_flip_rate", "truth_closer_rate", "within_recon_bound_rate", "mean_truth_l1",
                "mean_outside_change"):
        assert key in stats
    assert stats["oracle_flip_rate"] == pytest.approx(np.mean([r["oracle_label"] == r["cf_label"] for r in ok]))
    assert stats["truth_closer_rate"] == pytest.approx(np.mean([r["truth_closer"] for r in ok]))
    for tar in sorted((tmp_path / "pairs").glob("pairs-*.tar")):
        for s in read_samples(tar):
            r = rows[s["__key__"]]
            meta = json.loads(s["json"])
            assert "truth_l1" not in meta                        # K.json keeps its contract
            f = shapes.factors(shapes.index_of(r["origin"]), 0.9)
            factual = np.asarray(Image.open(io.BytesIO(s["png"])))
            cf = np.asarray(Image.open(io.BytesIO(s["cf.png"])))
            truth = shapes.render(f, r["cf_label"], 16)
            assert np.array_equal(factual, shapes.render(f, r["label"], 16))
            assert r["truth_l1"] == pytest.approx(l1(cf, truth), rel=1e-12)
            assert r["truth_closer"] == (l1(cf, truth) < l1(cf, factual))
            assert r["oracle_flipped"] == (r["oracle_label"] == r["cf_label"])
            assert r["within_recon_bound"] == (r["truth_l1"] <= r["recon_l1"])
