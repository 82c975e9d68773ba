"""`cfgen sweep` and `cfgen report` on a tiny shapes run: a page that opens offline, images that exist."""

from __future__ import annotations

import html
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
    from cfgen.report.page import write_report
    from cfgen.report.sweep import run_sweep

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


def _section(text: str, heading: str) -> str:
    """The page from the <h2> starting with `heading` to the next <h2>."""
    start = text.index(f"<h2>{heading}")
    end = text.find("<h2>", start + 4)
    return text[start:end if end >= 0 else len(text)]


def _cards(text: str) -> list[str]:
    return re.findall(r"<div class='card'.*?</div></div>", text, flags=re.DOTALL)


def _captions(card: str) -> list[str]:
    return [html.unescape(c) for c in re.findall(r"<figcaption>(.*?)</figcaption>", card)]


def _tables(text: str) -> list[list[list[str]]]:
    """Every <table> as rows of cell texts (th and td, unescaped)."""
    return [[[html.unescape(c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", tr, flags=re.DOTALL)]
             for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", table, flags=re.DOTALL)]
            for table in re.findall(r"<table.*?</table>", text, flags=re.DOTALL)]


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


def test_cards_show_factual_recon_cf_difference_truth(shapes_report):
    from cfgen.report.html import DISPLAY_PX

    run_dir, _, page, stats = shapes_report
    text = page.read_text(encoding="utf-8")
    cards = _cards(text)
    assert cards
    for card in cards:  # shapes knows its causal model: five panels, each shown DISPLAY_PX a side
        assert _captions(card) == ["factual", "round trip s = 0", "counterfactual", "|difference|",
                                   "true counterfactual"]
        for src, cls, w, h in re.findall(r"<img src='([^']+)' class='(\w+)' width='(\d+)' height='(\d+)'", card):
            assert (int(w), int(h)) == (DISPLAY_PX, DISPLAY_PX) and cls == "px"  # 16 px images: enlarged, pixelated
            assert Image.open(page.parent / src).size == (16, 16)               # stored pixel for pixel
    rows = pq.read_table(run_dir / "pairs" / "manifest.parquet").to_pylist()
    # the worst sheet holds 8 of the 12 guided pairs, so of the 6 rejected some are shown, with their reason
    rejected = [r["id"] for r in rows if r["status"] == "rejected"]
    assert stats["rejected"] == len(rejected) == 6
    for rid in rejected:
        card = next(c for c in cards if f"<b>{rid}</b>" in c)
        assert "rejected: l1_above_max" in card
    assert "mean CLD" in text and "edits within the round-trip error" in text and "flip rate, renderer oracle" in text
    manifest_pairs = {(r["label"], r["cf_label"]) for r in rows if r["status"] == "ok"}
    assert text.count("median-L1") == 1
    sheet = _section(text, "One pair per class pair")
    assert len(_cards(sheet)) == len(manifest_pairs)


def test_sweep_rows_and_table(shapes_report):
    from cfgen.report.sweep import format_table

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

    from cfgen.report.page import write_report

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

    from cfgen.report.page import write_report

    run_dir, _, page, _ = shapes_report
    assert "Tuning on the pairs" not in page.read_text()  # no RUN/tune/metrics.json: no section, still a report
    for stage in ("guide", "pairs"):
        shutil.copytree(run_dir / stage, tmp_path / stage)
    fig = {"mean": 0.75, "std": 0.05}
    delta = {"n": 5, "mean": 0.04, "sd": 0.02, "t": 2.776445, "half_width": 0.024833, "low": 0.015167, "high": 0.064833}
    rows = {
        "zero_shot": {"label": "zero-shot", "learner": None, "objective": None, "cf_source": None, "baseline": None,
                      "worst_base": fig, "worst_novel": fig, "base": fig, "novel": fig, "hm": fig, "worst_group": fig,
                      "delta": None, "seconds": {"mean": 0.1, "total": 0.5}},
        "coop": {"label": "CoOp", "learner": "coop", "objective": None, "cf_source": None, "baseline": None,
                 "worst_base": fig, "worst_novel": fig, "base": fig, "novel": fig, "hm": fig, "worst_group": fig,
                 "delta": None, "seconds": {"mean": 2.0, "total": 10.0}},
        "coop+augment[true]": {"label": "CoOp+CF-aug[true]", "learner": "coop", "objective": "augment",
                               "cf_source": "true", "baseline": "coop", "worst_base": {"mean": 0.62, "std": 0.03},
                               "worst_novel": fig, "base": {"mean": 0.88, "std": 0.01}, "novel": fig, "hm": fig,
                               "worst_group": fig,
                               "delta": {k: delta for k in ("worst_base", "worst_novel", "base", "novel", "hm",
                                                            "worst_group")},
                               "seconds": {"mean": 2.0, "total": 10.0}},
    }
    metrics = {"protocol": {"eval_split": "test", "eval_images": 600, "cells": {"sand/circle": 70, "sky/square": 60},
                            "classes": ["circle", "square", "triangle"], "base": [0, 1], "novel": [2], "pairs": 150,
                            "shot_pool": 150, "shots": 16, "seeds": [1, 2, 3, 4, 5],
                            "selection": {"mode": "validation", "criterion": "0.5 * accuracy of the validation ..."}},
               "order": ["zero_shot", "coop", "coop+augment[true]"], "rows": rows,
               "captured": [{"learner": "coop", "objective": "augment", "label": "CoOp+CF-aug",
                             "delta_generated": 0.5, "delta_true": 0.25, "share": 2.0}]}
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "metrics.json").write_text(json.dumps(metrics))
    text = write_report(tmp_path).read_text()
    section = text[text.index("<h2>Tuning on the pairs (cfgen tune)</h2>"):]
    assert "600 images, 2 (group, class) cells" in section and "chosen per seed and row on held-out pairs" in section
    order = [section.index(f"<td>{label}</td>") for label in ("zero-shot", "CoOp", "CoOp+CF-aug[true]")]
    assert order == sorted(order)
    # worst base, its paired difference, then base: the table leads with the worst group
    assert ("<td>CoOp+CF-aug[true]</td><td>0.620 ± 0.030</td><td>+0.040 [+0.015, +0.065]</td><td>0.880 ± 0.010</td>"
            in section)
    assert "share captured 2.00" in section
    # a metrics.json of an older cfgen (no worst base / novel) still shows, those cells empty
    for r in rows.values():
        del r["worst_base"], r["worst_novel"]
    metrics["protocol"] = {**metrics["protocol"], "hyperparameters": {"selection": "fixed in advance"}}
    del metrics["protocol"]["selection"], metrics["captured"]
    (tmp_path / "tune" / "metrics.json").write_text(json.dumps(metrics))
    section = write_report(tmp_path).read_text().split("<h2>Tuning on the pairs (cfgen tune)</h2>")[1]
    assert "hyper-parameters fixed in advance" in section and "<td>CoOp</td><td></td><td></td><td>0.750 ± 0.050</td>" in section


def test_sweep_mask_variants_parse_and_refuse():
    from cfgen.config import load_config
    from cfgen.errors import ConfigError
    from cfgen.report.sweep import mask_label, parse_masks
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


# ----------------------------------------------------------------------------- a run written by hand

CLASSES = ["cat", "dog", "fox"]
# id, label, cf_label, status, error, p_cf, flipped, l1, recon_l1
HAND_ROWS = [
    ("a0", 0, 1, "ok", None, 0.9, True, 0.05, 0.01),
    ("a1", 0, 1, "ok", None, 0.8, True, 0.06, 0.01),
    ("a2", 0, 2, "ok", None, 0.4, False, 0.01, 0.02),  # the edit is within the round trip's error
    ("a3", 1, 0, "ok", None, 0.7, True, 0.04, 0.01),
    ("a4", 1, 0, "rejected", "p_cf_below_min: 0.300 < 0.5", 0.3, False, 0.04, 0.01),
    ("a5", 2, 1, "rejected", "p_cf_below_min: 0.200 < 0.5; l1_above_max: 0.3000 > 0.2", 0.2, False, 0.3, 0.01),
    ("a6", 2, None, "failed", "unreadable image: truncated file", None, None, None, None),
    ("a7", -1, None, "failed", "not an image file (extension '.txt')", None, None, None, None),  # no class
]


MANIFEST_ROW_COLUMNS = (
    "id", "factual_id", "shard", "origin", "status", "error", "label", "label_name", "cf_label", "cf_label_name",
    "target_strategy", "guidance_scale", "seed", "p_cf", "flipped", "l1", "l2", "recon_l1", "intervention", "edits",
    "caption", "cf_caption", "mask_fraction", "changed_fraction", "edit_within_recon", "cld", "oracle_label",
    "oracle_flipped", "truth_l1", "truth_closer", "within_recon_bound", "outside_change", "intervened_ok",
    "descendants_ok", "non_descendants_ok", "sha256")
"""Every manifest.parquet column (README, Output contract, and the quality columns of the docs), by hand."""


def hand_run(root: Path, size: int, within_rate: float = 0.25) -> Path:
    """A run directory with config, one guide shard, manifest and stats written here, no model involved:
    what the report reads, at any image size, in milliseconds."""
    import io
    import tarfile

    import numpy as np
    import pyarrow as pa

    def make_row(**values) -> dict:
        """A manifest row as the README's contract describes one, every column spelled out here."""
        row = dict.fromkeys(MANIFEST_ROW_COLUMNS)
        assert set(values) <= set(row), set(values) - set(row)
        return {**row, **values}

    run = root / f"run{size}"
    for d in ("data", "pairs", "guide"):
        (run / d).mkdir(parents=True)
    (run / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (run / "pairs" / "config.toml").write_text(
        f'[pipeline]\nname = "hand{size}"\n[data]\nsource = "folder"\nroot = "{run / "data"}"\n'
        f'classes = "{run / "classes.txt"}"\nimage_size = {size}\nchannels = 3\n[pack]\nmin_p_cf = 0.5\n'
        'max_l1 = 0.2\n')
    rng = np.random.default_rng(size)
    rows = []
    with tarfile.open(run / "guide" / "guide-000000.tar", "w") as tar:
        for rid, label, cf, status, error, p_cf, flipped, l1, recon_l1 in HAND_ROWS:
            rows.append(make_row(id=rid, factual_id=rid, shard=0, origin=f"data/{rid}.png", status=status, error=error,
                                 label=label, label_name=CLASSES[label] if label >= 0 else None, cf_label=cf,
                                 cf_label_name=None if cf is None else CLASSES[cf], guidance_scale=None if cf is None
                                 else 4.0 if rid != "a1" else 8.0, p_cf=p_cf, flipped=flipped, l1=l1, recon_l1=recon_l1,
                                 edit_within_recon=None if l1 is None else l1 <= recon_l1))
            if status == "failed":
                continue
            for member in ("png", "cf.png", "recon.png"):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
                info = tarfile.TarInfo(f"{rid}.{member}")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))
    pq.write_table(pa.Table.from_pylist(rows), run / "pairs" / "manifest.parquet")
    stats = {"count": 8, "pairs": 4, "failed": 2, "rejected": 2, "flip_rate": 0.75, "mean_p_cf": 0.7,
             "mean_l1": 0.04, "mean_recon_l1": 0.0125, "edit_within_recon_rate": within_rate,
             "errors": {"unreadable image": 1, "not an image file (extension '.txt')": 1, "p_cf_below_min": 2}, "per_scale": {"4.0": 3, "8.0": 1},
             "per_class": {"cat": 3, "dog": 1}, "seconds": {"guide": 3.0, "invert": 1.5, "pack": 0.5}}
    (run / "pairs" / "stats.json").write_text(json.dumps(stats))
    return run


@pytest.fixture(scope="module")
def hand_reports(tmp_path_factory) -> dict[int, Path]:
    """The report of the same hand-written run at 8 px and at 320 px (above THUMB_PX)."""
    from cfgen.report.page import write_report

    root = tmp_path_factory.mktemp("hand")
    return {size: write_report(hand_run(root, size)) for size in (8, 320)}


def test_figure_tables_are_tables_not_json(hand_reports):
    text = hand_reports[8].read_text(encoding="utf-8")
    cells = [c for t in _tables(text) for row in t for c in row]
    assert cells and not [c for c in cells if "{" in c or "}" in c]
    rows = {r[0]: r[1:] for t in _tables(text) for r in t if r}
    assert rows["flip rate, guiding predictor"][0] == "0.750" and rows["mean p(y*)"][0] == "0.700"
    # seconds per stage in the order the stages run, with the total
    timing = next(t for t in _tables(text) if t[0] == ["stage", "seconds", "share"])
    assert [r[:2] for r in timing[1:]] == [["invert", "1.5"], ["guide", "3.0"], ["pack", "0.5"], ["total", "5.0"]]
    # failures by reason, rejections by gate (a5 fails two gates: counted under each)
    reasons = next(t for t in _tables(text) if t[0] == ["status", "reason", "count"])
    assert sorted(reasons[1:]) == [["failed", "not an image file (extension '.txt')", "1"],
                                   ["failed", "unreadable image", "1"], ["rejected", "l1_above_max", "1"],
                                   ["rejected", "p_cf_below_min", "2"]]
    scales = next(t for t in _tables(text) if t[0] == ["scale s", "pairs", "flip rate"])
    assert scales[1:] == [["4", "3", "0.667"], ["8", "1", "1.000"]]


def test_per_class_counts_match_the_manifest(hand_reports):
    from collections import Counter

    page = hand_reports[8]
    manifest = pq.read_table(page.parent.parent / "pairs" / "manifest.parquet").to_pylist()
    table = _tables(_section(page.read_text(encoding="utf-8"), "Per class"))[0]
    assert table[0] == ["factual class", "written", "rejected", "failed", "flip rate", "mean p(y*)",
                        "→ cat", "→ dog", "→ fox"]
    body = {r[0]: r[1:] for r in table[1:]}
    for c, name in enumerate(CLASSES):
        mine = [r for r in manifest if r["label"] == c]
        ok = [r for r in mine if r["status"] == "ok"]
        status = Counter(r["status"] for r in mine)
        targets = Counter(r["cf_label"] for r in ok)
        assert body[name][:3] == [str(status["ok"]), str(status["rejected"]), str(status["failed"])]
        assert body[name][5:] == [str(targets[j]) for j in range(len(CLASSES))]
        flip = f"{sum(r['flipped'] for r in ok) / len(ok):.3f}" if ok else "n/a"
        assert body[name][3] == flip
    assert body["cat"][3:] == ["0.667", "0.700", "0", "2", "1"]  # by hand: a0, a1 flipped, a2 not
    assert body["(no label)"] == ["0", "0", "1", "n/a", "n/a", "0", "0", "0"]  # a7: failed before it had a class
    assert body["all"] == ["4", "2", "2", "0.750", "0.700", "1", "2", "1"]     # the totals of stats.json


def test_rejected_and_failed_sections_list_them_with_reasons_and_images(hand_reports):
    text = hand_reports[8].read_text(encoding="utf-8")
    rejected = _section(text, "Rejected pairs")
    assert rejected.startswith("<h2>Rejected pairs (2)</h2>")
    listed = {r[0]: r for r in _tables(rejected)[0][1:]}
    assert set(listed) == {"a4", "a5"}
    assert listed["a5"][1:3] == ["fox → dog", "p_cf_below_min: 0.200 < 0.5; l1_above_max: 0.3000 > 0.2"]
    cards = _cards(rejected)
    assert len(cards) == 2 and all("rejected: p_cf_below_min" in c for c in cards)
    assert all(len(_captions(c)) == 4 for c in cards)  # their images, from the guide shard
    failed = _tables(_section(text, "Failed inputs (2)"))[0]
    assert failed[1:] == [["a6", "data/a6.png", "unreadable image: truncated file"],
                          ["a7", "data/a7.png", "not an image file (extension '.txt')"]]


def test_every_card_holds_the_round_trip_from_the_guide_shard(hand_reports):
    import numpy as np

    from cfgen.shards import read_samples

    page = hand_reports[8]
    guide = {s["__key__"]: s for s in read_samples(page.parent.parent / "guide" / "guide-000000.tar")}
    cards = _cards(page.read_text(encoding="utf-8"))
    assert {re.search(r"<b>(\w+)</b>", c).group(1) for c in cards} == set(guide)
    for card in cards:
        rid = re.search(r"<b>(\w+)</b>", card).group(1)
        srcs = dict(zip(_captions(card), re.findall(r"<img src='([^']+)'", card)))
        for caption, member in (("factual", "png"), ("round trip s = 0", "recon.png"), ("counterfactual", "cf.png")):
            shown = np.asarray(Image.open(page.parent / srcs[caption]))
            assert (shown == np.asarray(Image.open(io_bytes(guide[rid][member])))).all(), (rid, caption)
    # the names and p(y*) on the card; the noise-sized edit flagged
    a2 = next(c for c in cards if "<b>a2</b>" in c)
    assert "cat → fox" in html.unescape(a2) and "p(y*) 0.400" in a2 and "edit ≤ round-trip error" in html.unescape(a2)


def io_bytes(data: bytes):
    import io

    return io.BytesIO(data)


def test_cards_have_one_display_size_whatever_the_resolution(hand_reports):
    from cfgen.report.page import THUMB_PX
    from cfgen.report.html import DISPLAY_PX

    card_widths = set()
    for size, page in hand_reports.items():
        text = page.read_text(encoding="utf-8")
        assert f"width: {DISPLAY_PX}px; height: {DISPLAY_PX}px" in text  # the CSS of every card image
        imgs = re.findall(r"<img src='(cards/[^']+)' class='(\w+)' width='(\d+)' height='(\d+)'", text)
        assert len({src for src, *_ in imgs}) == 6 * 4  # six guided pairs, four panels each (a card may recur)
        assert {(int(w), int(h)) for _, _, w, h in imgs} == {(DISPLAY_PX, DISPLAY_PX)}
        stored = {Image.open(page.parent / src).size for src, *_ in imgs}
        if size == 8:   # enlarged by the browser: pixelated, the original PNG pixel for pixel
            assert stored == {(8, 8)} and {cls for _, cls, *_ in imgs} == {"px"}
            assert all(src.endswith(".png") for src, *_ in imgs)
        else:           # a thumbnail, not the 320 px original, shrunk smoothly
            assert stored == {(THUMB_PX, THUMB_PX)} and {cls for _, cls, *_ in imgs} == {"smooth"}
            assert max((page.parent / src).stat().st_size for src, *_ in imgs) < 320 * 320 * 3 / 4
        card_widths |= set(re.findall(r"<div class='card' style='width:(\d+)px'>", text))
    assert len(card_widths) == 1  # the same card, at 8 px and at 320 px


def test_histograms_have_labelled_axes_and_fitted_ranges(hand_reports):
    from cfgen.report.plots import HISTOGRAMS, histogram_figure

    page = hand_reports[8]
    rows = pq.read_table(page.parent.parent / "pairs" / "manifest.parquet").to_pylist()
    fig = histogram_figure(rows, {"p_cf": 0.5, "l1": 0.2})
    axes = {ax.get_title(): ax for ax in fig.axes if ax.axison}
    assert set(axes) == {HISTOGRAMS[c][0] for c in ("l1", "recon_l1", "p_cf")} | {"edit vs round-trip error"}
    for title, ax in axes.items():
        assert ax.get_xlabel() and ax.get_ylabel(), title
    assert axes["p(y*)"].get_ylabel() == "pairs" and "p(target class" in axes["p(y*)"].get_xlabel()
    # fitted to the guided pairs' p(y*) 0.2 .. 0.9, not a fixed 0 .. 1; the gate at 0.5 drawn inside
    assert axes["p(y*)"].get_xlim() == pytest.approx((0.2, 0.9))
    assert any(list(line.get_xdata()) == [0.5, 0.5] for line in axes["p(y*)"].get_lines())
    assert axes["edit L1"].get_xlim() == pytest.approx((0.01, 0.3))


def test_judge_figures_shown_when_measured_and_marked_stale_after_a_repack(tmp_path):
    from cfgen.report.evaluate import write_result
    from cfgen.report.page import write_report

    def rows(text: str) -> dict[str, list[str]]:
        return {r[0]: r[1:] for t in _tables(text) for r in t if r}

    run = hand_run(tmp_path, 8)
    text = write_report(run).read_text(encoding="utf-8")
    assert rows(text)["flip rate, independent judge"] == ["not measured", f"run `cfgen evaluate {run}`"]
    assert f"not measured, run `cfgen evaluate {run}`" in _section(text, "Figures")
    write_result(run, {"pairs": 4, "factual_images": 4, "judge": "SVC(rbf) on the data source's images",
                       "judge_fit_images": 1437, "judge_heldout_images": 360, "judge_heldout_accuracy": 0.9,
                       "oracle_flip_rate": 0.25, "mean_l1": 0.04, "mean_nearest_target_l1": 0.2,
                       "l1_over_nearest": 0.2})
    text = write_report(run).read_text(encoding="utf-8")
    assert rows(text)["flip rate, independent judge"][0] == "0.250"
    note = rows(text)["flip rate, independent judge"][1]
    assert "fitted on 1437 of the data source's images (held-out accuracy 0.900)" in note
    assert rows(text)["flip rate by the judge"] == ["0.250"]
    assert rows(text)["data source images it was fitted on"] == ["1437"]
    assert rows(text)["held-out accuracy (on 360 other source images)"] == ["0.900"]
    assert "STALE" not in text
    manifest = run / "pairs" / "manifest.parquet"
    pq.write_table(pq.read_table(manifest).slice(0, 6), manifest)  # packed again: other pairs
    text = write_report(run).read_text(encoding="utf-8")
    assert "STALE" in rows(text)["flip rate, independent judge"][1]
    assert "measured before the pairs were last packed" in text


@pytest.mark.parametrize("rate, warned", [(0.5, True), (0.05, False)])
def test_a_warning_when_edits_are_no_larger_than_the_round_trip(tmp_path, rate, warned):
    from cfgen.report.page import write_report

    text = write_report(hand_run(tmp_path, 8, within_rate=rate)).read_text(encoding="utf-8")
    boxes = re.findall(r"<div class='warn'>(.*?)</div>", text)
    assert bool(boxes) == warned
    if warned:
        assert "50% of the written pairs changed the image no more than the s = 0 round trip" in html.unescape(boxes[0])
