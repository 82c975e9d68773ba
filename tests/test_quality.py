"""Quality metrics against hand-computed values; the pack gates; the truth metrics of a shapes run."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cfgen import quality
from cfgen.config import ConfigError, load_config
from cfgen.metrics import l1

ROOT = Path(__file__).resolve().parents[1]
# Tiny and fast: 5 DDIM steps, one scale, two shards of 6.
TINY = ["data.limit=12", "data.shard_size=6", "invert.steps=5", "guide.escalation=[]",
        "invert.batch_size=6", "guide.batch_size=6"]


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
