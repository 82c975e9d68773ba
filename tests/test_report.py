"""`cfgen sweep` and `cfgen report` on a tiny shapes run: a page that opens offline, images that exist."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from cfgen.config import load_config
from test_quality import ROOT, TINY, tiny_run


@pytest.fixture(scope="module")
def shapes_report(tmp_path_factory) -> tuple[Path, dict, Path, dict]:
    from cfgen.report import write_report
    from cfgen.sweep import run_sweep

    from cfgen.stages.pack import run_pack

    run_dir = tmp_path_factory.mktemp("shapes_report")
    tiny_run(run_dir, "shapes")
    l1s = sorted(r["l1"] for r in pq.read_table(run_dir / "pairs" / "manifest.parquet").to_pylist())
    # re-pack with a gate between the 6th and 7th L1: exactly 6 of the 12 pairs rejected
    gated = load_config(ROOT / "pipelines" / "shapes.toml", TINY + [f"pack.max_l1={(l1s[5] + l1s[6]) / 2}"])
    stats = run_pack(gated, run_dir, overwrite=True)
    cfg = load_config(ROOT / "pipelines" / "shapes.toml", TINY)
    sweep = run_sweep(cfg, run_dir, [1.0, 4.0], limit=6)
    return run_dir, sweep, write_report(run_dir), stats


def _refs(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    return re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", text)


def test_every_referenced_image_exists_and_nothing_is_remote(shapes_report):
    _, _, page, _ = shapes_report
    refs = _refs(page)
    images = [r for r in refs if r.endswith(".png")]
    assert len(images) >= 6
    for ref in refs:
        assert not re.match(r"^[a-z]+://|^//", ref), f"remote reference {ref}"
        assert (page.parent / ref).is_file(), f"missing {ref}"
    text = page.read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    for png in ("histograms.png", "confusion.png", "flip_vs_scale.png"):
        assert png in images
        assert Image.open(page.parent / png).format == "PNG"


def test_cards_are_factual_cf_difference_truth_strips(shapes_report):
    from cfgen.report import ZOOM

    run_dir, _, page, stats = shapes_report
    cards = [r for r in _refs(page) if r.startswith("cards/")]
    assert cards
    w, h = Image.open(page.parent / cards[0]).size
    assert (w, h) == ((4 * 16 + 3) * ZOOM, 16 * ZOOM)       # 4 panels of 16 px + 3 gaps
    text = page.read_text(encoding="utf-8")
    rows = pq.read_table(run_dir / "pairs" / "manifest.parquet").to_pylist()
    # the worst sheet holds 8 of the 12 guided pairs, so of the 6 rejected some are shown, with their reason
    rejected = [r["id"] for r in rows if r["status"] == "rejected"]
    assert stats["rejected"] == len(rejected) == 6
    shown = [rid for rid in rejected if f"<b>{rid}</b>" in text]
    assert shown
    for rid in shown:
        card_html = text[text.index(f"<b>{rid}</b>"):].split("</div>", 1)[0]
        assert "rejected: l1_above_max" in card_html
    assert "<th>mean_cld</th>" in text and "<th>edit_within_recon_rate</th>" in text and "mean CLD" in text
    manifest_pairs = {(r["label"], r["cf_label"]) for r in rows if r["status"] == "ok"}
    assert text.count("median-L1") == 1
    assert len(set(cards)) >= len(manifest_pairs)


def test_sweep_rows_and_table(shapes_report):
    from cfgen.sweep import format_table

    run_dir, sweep, _, _ = shapes_report
    assert json.loads((run_dir / "sweep" / "sweep.json").read_text()) == sweep
    assert [r["scale"] for r in sweep["rows"]] == [1.0, 4.0, "escalation"]
    for r in sweep["rows"]:
        assert r["samples"] == 6
        for k in ("flip_rate", "oracle_flip_rate", "truth_closer_rate", "within_recon_bound_rate"):
            assert 0.0 <= r[k] <= 1.0
        assert r["mean_truth_l1"] > 0 and r["mean_l1"] > 0
        assert 0.0 <= r["edit_within_recon_rate"] <= 1.0
        assert math.isnan(r["mean_cld"]) or math.log(2) <= r["mean_cld"] <= 1 + math.log(2)
    table = format_table(sweep).splitlines()
    assert len(table) == 3 + 3 and table[1].startswith("mask | scale | flip (predictor) | flip (oracle) | mean L1 | changed")
    # the configured mask (pipelines/shapes.toml: x0, tau 0.2) is the one variant swept by default
    assert {r["mask"] for r in sweep["rows"]} == {"x0 tau=0.2"}
    assert all(0.0 < r["mean_mask_fraction"] <= 1.0 for r in sweep["rows"])
    assert "| mean CLD |" in table[1]
    assert not (run_dir / "invert" / "_state").joinpath("invert-000002_stats.json").exists()  # the run's shards untouched


def test_report_without_a_sweep_says_how_to_get_one(shapes_report, tmp_path):
    import shutil

    from cfgen.report import write_report

    run_dir, _, _, _ = shapes_report
    for stage in ("guide", "pairs"):
        shutil.copytree(run_dir / stage, tmp_path / stage)
    page = write_report(tmp_path)
    assert "No sweep yet" in page.read_text()
    assert all((page.parent / r).is_file() for r in _refs(page))
    assert not (page.parent / "flip_vs_scale.png").exists()


def test_cli_report_on_a_missing_run_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from cfgen.cli import main

    monkeypatch.setattr(sys, "argv", ["cfgen", "report", str(tmp_path / "nope")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cfgen: error: report:") and len(err.splitlines()) == 1


def test_report_shows_the_tune_table_when_the_run_has_one(shapes_report, tmp_path):
    import shutil

    from cfgen.report import write_report

    run_dir, _, page, _ = shapes_report
    assert "Prompt tuning" not in page.read_text()  # no RUN/tune/metrics.json: no section, still a report
    for stage in ("guide", "pairs"):
        shutil.copytree(run_dir / stage, tmp_path / stage)
    fig = {"mean": 0.75, "std": 0.05}
    delta = {"n": 5, "mean": 0.04, "sd": 0.02, "t": 2.776445, "half_width": 0.024833, "low": 0.015167, "high": 0.064833}
    rows = {
        "zero_shot": {"label": "zero-shot", "learner": None, "objective": None, "cf_source": None, "baseline": None,
                      "base": fig, "novel": fig, "hm": fig, "worst_group": fig, "delta": None,
                      "seconds": {"mean": 0.1, "total": 0.5}},
        "coop": {"label": "CoOp", "learner": "coop", "objective": None, "cf_source": None, "baseline": None,
                 "base": fig, "novel": fig, "hm": fig, "worst_group": fig, "delta": None,
                 "seconds": {"mean": 2.0, "total": 10.0}},
        "coop+dicap[true]": {"label": "CoOp+DiCap[true]", "learner": "coop", "objective": "dicap", "cf_source": "true",
                             "baseline": "coop", "base": fig, "novel": fig, "hm": fig,
                             "worst_group": {"mean": 0.62, "std": 0.03},
                             "delta": {k: delta for k in ("base", "novel", "hm", "worst_group")},
                             "seconds": {"mean": 2.0, "total": 10.0}},
    }
    metrics = {"protocol": {"eval_split": "test", "eval_images": 600, "cells": {"sand/circle": 70, "sky/square": 60},
                            "classes": ["circle", "square", "triangle"], "base": [0, 1], "novel": [2], "pairs": 150,
                            "shot_pool": 150, "shots": 16, "seeds": [1, 2, 3, 4, 5],
                            "hyperparameters": {"selection": "fixed in advance", "lam": 1.0, "epochs": 50,
                                                "cocoop_epochs": 10, "lr": 0.002}},
               "order": ["zero_shot", "coop", "coop+dicap[true]"], "rows": rows}
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "metrics.json").write_text(json.dumps(metrics))
    text = write_report(tmp_path).read_text()
    section = text[text.index("<h2>Prompt tuning (cfgen tune)</h2>"):]
    assert "600 images, 2 (group, class) cells" in section and "CoCoOp 10" in section
    order = [section.index(f"<td>{label}</td>") for label in ("zero-shot", "CoOp", "CoOp+DiCap[true]")]
    assert order == sorted(order)
    assert "<td>0.620 ± 0.030</td><td>+0.040 [+0.015, +0.065]</td><td>+0.040 [+0.015, +0.065]</td>" in section


def test_sweep_mask_variants_parse_and_refuse():
    from cfgen.config import load_config
    from cfgen.errors import ConfigError
    from cfgen.sweep import mask_label, parse_masks
    from conftest import DIGITS

    cfg = load_config(DIGITS, [])
    assert parse_masks("", cfg) == [{"mask": cfg.guide.mask, "mask_threshold": cfg.guide.mask_threshold}]
    variants = parse_masks("off, x0:0.3,gradient", cfg)
    assert variants == [{"mask": "off", "mask_threshold": cfg.guide.mask_threshold},
                        {"mask": "x0", "mask_threshold": 0.3},
                        {"mask": "gradient", "mask_threshold": cfg.guide.mask_threshold}]
    assert [mask_label(v) for v in variants[:2]] == ["off", "x0 tau=0.3"]
    for bad in ("x0:1.5", "attention", "x0:high", "off:0.2"):
        with pytest.raises(ConfigError, match="--masks"):
            parse_masks(bad, cfg)
