"""invert -> guide -> pack on the shipped digits models: the output contract, end to end."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import pyarrow.parquet as pq
from PIL import Image

from conftest import run_pipeline
from contract_spec import PAIR_FIELDS, PAIR_MEMBERS, has_type

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _tars(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "pairs").glob("pairs-*.tar"))


def test_layout_and_counts(digits_run):
    run_dir, stats = digits_run
    pairs = run_dir / "pairs"
    assert [p.name for p in _tars(run_dir)] == ["pairs-000000.tar", "pairs-000001.tar", "pairs-000002.tar"]
    assert not list(run_dir.rglob("*.tmp")), "no temporary file may be left behind"
    sizes = json.loads((pairs / "sizes.json").read_text())
    assert sizes == {"pairs-000000.tar": 16, "pairs-000001.tar": 16, "pairs-000002.tar": 8}
    manifest = pq.read_table(pairs / "manifest.parquet").to_pylist()
    assert [r["id"] for r in manifest] == [f"digits-{i:05d}" for i in range(40)]
    assert {r["status"] for r in manifest} == {"ok"}
    assert stats["count"] == 40 and stats["pairs"] == 40 and stats["failed"] == 0
    assert sum(stats["per_class"].values()) == 40
    for stage in ("invert", "guide", "pairs"):
        assert (run_dir / stage / "config.toml").is_file()


def test_every_sample_has_exactly_the_contract_members(digits_run):
    run_dir, _ = digits_run
    for tar_file in _tars(run_dir):
        with tarfile.open(tar_file) as tar:
            names = tar.getnames()
            infos = tar.getmembers()
        assert all(i.mtime == infos[0].mtime and i.uid == 0 for i in infos)  # reproducible headers
        keys = []
        for name in names:  # members of one sample are contiguous
            key = name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
        assert len(keys) == len(set(keys))
        for key in keys:
            assert "." not in key
            members = sorted(n.split(".", 1)[1] for n in names if n.split(".", 1)[0] == key)
            assert members == sorted(PAIR_MEMBERS)


def test_json_schema_captions_and_classes(digits_run):
    run_dir, _ = digits_run
    from cfgen.shards import read_samples

    for tar_file in _tars(run_dir):
        for s in read_samples(tar_file):
            meta = json.loads(s["json"])
            assert list(meta) == list(PAIR_FIELDS)
            assert all(has_type(meta, k) for k in PAIR_FIELDS)
            assert meta["id"] == s["__key__"]
            assert int(s["cls"]) == meta["label"] and int(s["cf.cls"]) == meta["cf_label"]
            assert meta["cf_label"] != meta["label"]
            assert meta["label_name"] == CLASS_NAMES[meta["label"]]
            assert s["txt"].decode() == f"a photo of the digit {meta['label_name']}."
            assert s["cf.txt"].decode() == f"a photo of the digit {meta['cf_label_name']}."
            assert meta["steps"] == 25 and meta["t_inv"] == 0.6 and meta["target_strategy"] == "closest"
            f = np.asarray(Image.open(io.BytesIO(s["png"])), dtype=np.float64) / 255
            c = np.asarray(Image.open(io.BytesIO(s["cf.png"])), dtype=np.float64) / 255
            assert meta["l1"] == pytest.approx(np.abs(f - c).mean(), rel=1e-12)  # the recorded metric is the stored images'
            assert Image.open(io.BytesIO(s["png"])).format == "PNG"


def test_factual_image_is_the_real_digit(digits_run):
    from sklearn.datasets import load_digits

    from cfgen.shards import read_samples

    run_dir, _ = digits_run
    first = next(read_samples(_tars(run_dir)[0]))
    expected = np.rint(load_digits().images[0] * 255 / 16).astype(np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(first["png"]))), expected)


def test_round_trip_and_counterfactual_quality(digits_run):
    _, stats = digits_run
    assert stats["mean_recon_l1"] <= 0.02          # s = 0 gives the image back
    assert stats["flip_rate"] >= 0.9               # the guiding predictor's view
    assert 0.0 < stats["mean_l1"] < 0.2


def test_webdataset_reads_the_shards(digits_run):
    import webdataset as wds

    run_dir, _ = digits_run
    urls = [str(p) for p in _tars(run_dir)]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == 40
    s = samples[0]
    assert s["png"].size == (8, 8) and s["cf.png"].size == (8, 8)
    assert isinstance(s["cls"], int) and isinstance(s["json"], dict)
    assert s["txt"].startswith("a photo of the digit")


def test_hf_datasets_reads_the_shards(digits_run):
    from datasets import load_dataset

    run_dir, _ = digits_run
    ds = load_dataset("webdataset", data_files={"train": [str(p) for p in _tars(run_dir)]}, split="train")
    assert len(ds) == 40
    row = ds[0]
    assert row["__key__"] == "digits-00000"
    assert row["png"].size == (8, 8) and row["cf.png"].size == (8, 8)
    assert row["json"]["label"] == row["cls"]


def test_same_config_gives_byte_identical_shards(digits_run, tmp_path):
    run_dir, _ = digits_run
    run_pipeline(tmp_path)
    for a, b in zip(_tars(run_dir), _tars(tmp_path)):
        assert a.read_bytes() == b.read_bytes()


def test_results_do_not_depend_on_batch_or_shard_size(digits_run, tmp_path):
    run_dir, _ = digits_run
    from cfgen.shards import read_samples

    run_pipeline(tmp_path, ["data.shard_size=40", "invert.batch_size=40", "guide.batch_size=3"])
    ref = {s["__key__"]: s for t in _tars(run_dir) for s in read_samples(t)}
    other = {s["__key__"]: s for t in _tars(tmp_path) for s in read_samples(t)}
    assert ref.keys() == other.keys()
    for k in ref:
        a = np.asarray(Image.open(io.BytesIO(ref[k]["cf.png"])), dtype=int)
        b = np.asarray(Image.open(io.BytesIO(other[k]["cf.png"])), dtype=int)
        # float reductions may round differently by batch shape; never more than a grey level
        assert np.abs(a - b).max() <= 1
        assert json.loads(ref[k]["json"])["cf_label"] == json.loads(other[k]["json"])["cf_label"]


def test_finished_shards_are_skipped_on_rerun(digits_run):
    run_dir, _ = digits_run
    before = {p: p.stat().st_mtime_ns for p in _tars(run_dir)}
    run_pipeline(run_dir)
    assert {p: p.stat().st_mtime_ns for p in _tars(run_dir)} == before


def test_unreadable_image_becomes_a_failure_row(tmp_path):
    """An image folder with a corrupt file: it gets a row with its reason, the rest go on."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path / "images"
    for i in range(12):
        d = root / CLASS_NAMES[digits.target[i]]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(digits.images[i] * 255 / 16).astype(np.uint8), "L").save(d / f"img{i}.png")
    (root / "three" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "three" / "empty.png").write_bytes(b"")
    classes = Path(__file__).resolve().parents[1] / "manifests" / "digits" / "classes.txt"
    stats = run_pipeline(tmp_path / "run", ["data.source=folder", f"data.root={root.as_posix()!r}",
                                            f"data.classes={classes.as_posix()!r}", "data.limit=0"])
    manifest = {r["id"]: r for r in pq.read_table(tmp_path / "run" / "pairs" / "manifest.parquet").to_pylist()}
    assert stats["count"] == 14 and stats["pairs"] == 12 and stats["failed"] == 2
    broken = [r for r in manifest.values() if r["origin"].endswith("broken.png")][0]
    empty = [r for r in manifest.values() if r["origin"].endswith("empty.png")][0]
    # origins are relative to data.root (the manifest names no path of this machine), with the inversion's settings
    assert broken["origin"] == "three/broken.png" and not any(str(tmp_path) in r["origin"] for r in manifest.values())
    assert all(r["t_inv"] == 0.6 and r["steps"] == 25 for r in manifest.values())
    assert broken["status"] == "failed" and broken["error"].startswith("not an image")
    assert empty["status"] == "failed" and empty["error"] == "empty file"
    assert stats["errors"] == {"not an image (unidentified format)": 1, "empty file": 1}
    sizes = json.loads((tmp_path / "run" / "pairs" / "sizes.json").read_text())
    assert sum(sizes.values()) == 12


def test_bf16_autocast_path_keeps_the_contract_and_the_quality(digits_run, tmp_path):
    """model.dtype = bf16 runs the networks under bf16 autocast (this CPU has native bf16; the GPU default):
    every output finite, the contract intact, the s = 0 round trip within 0.01 L1 of fp32's, still flipping."""
    _, fp32 = digits_run
    stats = run_pipeline(tmp_path, ["model.dtype=bf16"])
    rows = pq.read_table(tmp_path / "pairs" / "manifest.parquet").to_pylist()
    assert stats["pairs"] == len(rows) == 40 and all(r["status"] == "ok" for r in rows)
    assert all(np.isfinite([r["l1"], r["recon_l1"], r["p_cf"]]).all() for r in rows)
    for tar in _tars(tmp_path):
        with tarfile.open(tar) as tf:
            keys: dict[str, set[str]] = {}
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                keys.setdefault(key, set()).add(ext)
            assert all(exts == set(PAIR_MEMBERS) for exts in keys.values())
    assert stats["mean_recon_l1"] <= fp32["mean_recon_l1"] + 0.01
    assert stats["flip_rate"] >= 0.9


def test_escalation_jobs_fill_the_batch_round_robin():
    from cfgen.stages.classifier_guide import escalation_jobs

    # samples 3 and 7 pending at scale indices 1 and 3 of 5, room for 6 passes
    assert escalation_jobs([3, 7], {3: 1, 7: 3}, 5, 6, fill=False) == [(3, 1), (7, 3)]
    assert escalation_jobs([3, 7], {3: 1, 7: 3}, 5, 6, fill=True) == [(3, 1), (7, 3), (3, 2), (7, 4), (3, 3), (3, 4)]
    assert escalation_jobs([3, 7], {3: 1, 7: 3}, 5, 3, fill=True) == [(3, 1), (7, 3), (3, 2)]


def test_filled_escalation_rounds_keep_every_pair_as_it_was(tmp_path):
    """Filling escalation rounds with later scales (the GPU default) changes the work, not one pixel."""
    import torch

    from cfgen.config import load_config
    from cfgen.models.loading import load_models
    from cfgen.stages.common import config_grid
    from cfgen.stages.classifier_guide import counterfactuals
    from cfgen.stages.invert import read_inverted, run_invert
    from conftest import DIGITS, SMALL

    cfg = load_config(DIGITS, SMALL + ["data.limit=12"])
    run_invert(cfg, tmp_path)
    samples = read_inverted(tmp_path)
    noise = torch.from_numpy(np.stack([s.arrays(cfg)[1] for s in samples]))
    targets = torch.tensor([(s.meta["label"] + 3) % 10 for s in samples])
    models = load_models(cfg)
    grid = config_grid(cfg, models.num_train_timesteps)
    scales = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]  # small first scales: most samples escalate
    plain = counterfactuals(models, noise, targets, grid, scales, 0.99, fill=False)
    filled = counterfactuals(models, noise, targets, grid, scales, 0.99, fill=True)
    assert len(set(plain[1].tolist())) >= 3                       # escalation really happened
    for a, b in zip(plain, filled):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("target, top_k, per_image", [("all", 1, 9), ("closest", 3, 3)])
def test_several_targets_per_image_keep_the_contract(tmp_path, target, top_k, per_image):
    """guide.target = 'all' / top-K: one ordinary pair per target, keyed <factual_id>_to_<y*>, with the same
    members and K.json schema as every pair; grouped by factual_id, each image has its targets exactly once."""
    import webdataset as wds

    run_pipeline(tmp_path, ["data.limit=5", "guide.escalation=[]", f"guide.target={target!r}", f"guide.top_k={top_k}"])
    run_dir = tmp_path
    urls = sorted(str(p) for p in (tmp_path / "pairs").glob("pairs-*.tar"))
    by_factual: dict[str, list[int]] = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        key = sample["__key__"]
        assert sorted(k for k in sample if not k.startswith("__")) == sorted(PAIR_MEMBERS)
        meta = json.loads(sample["json"])
        assert list(meta) == list(PAIR_FIELDS)
        assert "." not in key and key == f"{meta['factual_id']}_to_{meta['cf_label']}" and meta["id"] == key
        assert int(sample["cf.cls"]) == meta["cf_label"] != meta["label"] == int(sample["cls"])
        by_factual.setdefault(meta["factual_id"], []).append(meta["cf_label"])
    assert sorted(by_factual) == [f"digits-{i:05d}" for i in range(5)]
    for targets in by_factual.values():
        assert len(targets) == len(set(targets)) == per_image
    manifest = pq.read_table(tmp_path / "pairs" / "manifest.parquet").to_pylist()
    assert len(manifest) == 5 * per_image and {r["status"] for r in manifest} == {"ok"}
    assert sorted({r["factual_id"] for r in manifest}) == sorted(by_factual)
    if target == "all":
        labels = {r["factual_id"]: r["label"] for r in manifest}
        assert all(sorted(t) == [c for c in range(10) if c != labels[f]] for f, t in by_factual.items())
    from cfgen.report.evaluate import evaluate_pairs

    ev = evaluate_pairs(run_dir)
    assert ev["pairs"] == 5 * per_image and ev["factual_images"] == 5


def test_pairs_folder_opens_as_a_folder_with_its_dataset_card(digits_run, tmp_path):
    """RUN/pairs/README.md (a Hugging Face dataset card): load_dataset(folder), streamed or not, reads the
    tars only -- each pair once, not the manifest or stats beside them -- with the class names as a
    ClassLabel and K.json as a struct; the card says how the pairs were made."""
    from datasets import load_dataset

    run_dir, stats = digits_run
    folder = run_dir / "pairs"
    ds = load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == stats["pairs"] == 40
    assert sorted(ds.column_names) == sorted(PAIR_MEMBERS)
    assert ds.features["cls"].names == CLASS_NAMES and ds.features["cf.cls"].names == CLASS_NAMES
    metas = ds["json"]
    assert len({m["id"] for m in metas}) == 40 and all(m["factual_id"] == m["id"] for m in metas)
    for row in ds.select(range(5)):
        assert ds.features["cf.cls"].int2str(row["cf.cls"]) == row["json"]["cf_label_name"]
        assert row["png"].size == (8, 8)
    streamed = list(load_dataset(str(folder), split="train", streaming=True))
    assert len(streamed) == 40 and sorted(s["json"]["id"] for s in streamed) == sorted(m["id"] for m in metas)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "license" in card.split("---")[1]
    assert "| localized edits | x0 (threshold 0.4" in card and f"| pairs written | {stats['pairs']} |" in card


def test_every_reader_of_the_pairs_folder_counts_each_pair_once(digits_run):
    """The folder holds the tars and the files a reader asks for by name, and nothing a folder reader would
    take for data: webdataset on a brace list, open_clip's sizes.json, pyarrow.dataset and pandas on the
    manifest, and pyarrow.dataset on the folder itself (skipping what is not parquet) each see 40 pairs once.
    The per-shard bookkeeping lives in `_state/`, which pyarrow's discovery skips (its leading underscore)."""
    import pandas as pd
    import pyarrow.dataset as pads
    import webdataset as wds

    run_dir, stats = digits_run
    folder = run_dir / "pairs"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["README.md", "_state", "config.toml", "manifest.parquet", "sizes.json", "stats.json",
         "pairs-000000.tar", "pairs-000001.tar", "pairs-000002.tar"])
    samples = list(wds.WebDataset(str(folder / "pairs-{000000..000002}.tar"), shardshuffle=False).decode("pil"))
    ids = [json.loads(s["json"])["id"] if isinstance(s["json"], bytes) else s["json"]["id"] for s in samples]
    assert len(ids) == len(set(ids)) == 40
    assert all(s["json"]["label_name"] == CLASS_NAMES[s["cls"]] for s in samples)
    assert sum(json.loads((folder / "sizes.json").read_text()).values()) == 40
    manifest = folder / "manifest.parquet"
    assert pads.dataset(manifest).count_rows() == 40
    frame = pd.read_parquet(manifest)
    assert len(frame) == frame["id"].nunique() == 40 and set(frame["id"]) == set(ids)
    assert set(frame["label_name"]) <= set(CLASS_NAMES)
    assert pads.dataset(folder, format="parquet", exclude_invalid_files=True).count_rows() == 40
    # the bookkeeping is all there, per shard, where the stages and resume read it
    assert sorted(p.name for p in (folder / "_state").iterdir()) == sorted(
        ["fingerprint.json"] + [f"pairs-00000{i}{s}" for i in range(3) for s in (".parquet", "_stats.json")])
