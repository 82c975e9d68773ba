"""A dataset people can publish and load anywhere (issue 29): the card, the upload, the image formats.

The card is read back with huggingface_hub's DatasetCard.load and parsed as `datasets` parses it; the upload is
huggingface_hub's own upload_folder with the network calls replaced (what it would commit is checked, file by
file); the jpeg and webp runs are read back with `datasets.load_dataset(dir)` and webdataset. Everything offline.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import DIGITS, SMALL, cfgen_here, run_stages
from contract_spec import MEMBERS_BY_FORMAT, PAIR_FIELDS, has_type

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "pipelines" / "shapes.toml"
CARD_KEYS = {"license", "pretty_name", "task_categories", "size_categories", "tags", "configs", "dataset_info"}
PUBLISHED = ["README.md", "manifest.parquet", "pairs-000000.tar", "pairs-000001.tar", "pairs-000002.tar",
             "sizes.json", "stats.json"]


def _local_paths(run_dir: Path) -> list[str]:
    """Absolute paths of this machine a published file must not name."""
    return [str(run_dir.resolve()), str(ROOT), str(Path.home()), str(Path(run_dir).resolve().parent)]


def _repack(source_run: Path, dest: Path, config: Path, overrides: list[str]) -> dict:
    """`source_run`'s invert and guide shards, packed again into `dest` with `overrides` (the format)."""
    from cfgen.config import load_config
    from cfgen.stages.pack import run_pack

    for stage in ("invert", "guide"):
        shutil.copytree(source_run / stage, dest / stage)
    return run_pack(load_config(config, overrides), dest, overwrite=True)


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory) -> Path:
    """12 shapes (RGB, the renderer oracle), one scale: webp needs colour."""
    from cfgen.config import load_config

    run_dir = tmp_path_factory.mktemp("shapes_run")
    cfg = load_config(SHAPES, ["data.limit=12", "data.shard_size=6", "guide.escalation=[]", "pack.min_p_cf=0.0",
                               "pack.image_format=webp", "pack.image_quality=90", "pack.license=cc-by-4.0"])
    run_stages(cfg, run_dir)
    return run_dir


# ----------------------------------------------------------------------------- the card

def _card(run_dir: Path):
    from huggingface_hub import DatasetCard

    return DatasetCard.load(run_dir / "pairs" / "README.md")


def test_card_loads_validates_and_has_the_metadata_keys(digits_run):
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from datasets.utils.resources import __file__ as resources

    run_dir, stats = digits_run
    card = _card(run_dir)
    data = card.data.to_dict()
    assert CARD_KEYS <= set(data), set(data)
    assert data["license"] == "unknown"  # pack.license's default, a key, not a YAML comment
    assert data["pretty_name"] == "digits: factual / counterfactual image pairs"
    assert data["size_categories"] == ["n<1K"]  # 40 pairs
    assert json.loads((Path(resources).parent / "size_categories.json").read_text()).count("n<1K") == 1
    assert "image-to-image" in data["task_categories"] and "counterfactual" in data["tags"]
    # what load_dataset(dir) reads from it: the tars as the only data files, the features per member
    configs = MetadataConfigs.from_dataset_card_data(card.data)
    assert configs["default"]["data_files"] == [{"split": "train", "path": "pairs-*.tar"}]
    features = DatasetInfosDict.from_dataset_card_data(card.data)["default"].features
    assert list(features) == ["png", "txt", "cls", "cf.png", "cf.txt", "cf.cls", "json"]
    assert features["cls"].names[7] == "seven"
    assert list(features["json"]) == list(PAIR_FIELDS)
    assert list(features["json"]["concepts_before"]) == ["label"]
    # the body: the models by name and content hash, the guiding classifier named, figures by who measured them
    text = card.text
    assert "| guiding classifier (noise-aware) | digits/classifier (sha256 " in text
    assert "| diffusion model | digits/unet (sha256 " in text
    assert "flip rate by the guiding predictor, over the pairs whose do() changes the class" in text
    assert "## Bias, Risks, and Limitations" in text and "Round-trip error beside edit size" in text
    assert "| flip rate by an independent judge | not measured" in text


def test_card_names_no_local_path(digits_run):
    run_dir, _ = digits_run
    text = (run_dir / "pairs" / "README.md").read_text()
    for path in _local_paths(run_dir):
        assert path not in text, path
    assert "../models" not in text and "/models/digits" not in text


def test_card_quotes_the_judge_after_evaluate_and_drops_it_when_stale(digits_run, tmp_path):
    from cfgen.report.evaluate import evaluate_pairs, write_result

    run_dir = tmp_path / "run"
    shutil.copytree(digits_run[0], run_dir)
    result = evaluate_pairs(run_dir)
    write_result(run_dir, result)
    text = _card(run_dir).text
    row = next(line for line in text.splitlines() if line.startswith("| flip rate by an independent judge ("))
    assert row.endswith(f"| {result['oracle_flip_rate']:.4f} |")
    assert "The independent judge's figure above is the one to quote." in text
    # a re-pack changes the manifest: the judge measured other pairs, and the card no longer quotes it
    from cfgen.config import load_config
    from cfgen.stages.pack import run_pack

    run_pack(load_config(DIGITS, SMALL + ["pack.caption=a digit {label_name}."]), run_dir, overwrite=True)
    assert "| flip rate by an independent judge | not measured" in _card(run_dir).text


def test_bad_license_is_a_one_line_config_error():
    from cfgen.config import load_config
    from cfgen.errors import ConfigError

    with pytest.raises(ConfigError, match="pack.license"):
        load_config(DIGITS, ["pack.license=Not A License"])
    with pytest.raises(ConfigError, match="pack.image_format = 'webp' stores colour only"):
        load_config(DIGITS, ["pack.image_format=webp"])  # the digits are grey
    with pytest.raises(ConfigError, match="pack.image_quality"):
        load_config(DIGITS, ["pack.image_format=jpeg", "pack.image_quality=0"])


# ----------------------------------------------------------------------------- publishing

class OfflineApi:
    """huggingface_hub's HfApi with its network calls replaced: what upload_folder would commit is recorded."""

    def __new__(cls):
        from huggingface_hub import HfApi

        class Api(HfApi):
            def create_repo(self, repo_id, **kwargs):
                self.created = (repo_id, kwargs)

            def _validate_yaml(self, content, **kwargs):  # the Hub's online check of the card
                self.validated = content

            def create_commit(self, **kwargs):
                self.operations = kwargs["operations"]
                return "offline"

        return Api()


def test_upload_folder_sends_the_pairs_and_the_card_and_nothing_local(digits_run, monkeypatch):
    import huggingface_hub.hf_api as hf_api

    from cfgen import publish

    run_dir, _ = digits_run
    monkeypatch.setattr(hf_api, "is_xet_available", lambda: False)  # the single-commit path: create_commit
    api = OfflineApi()
    assert publish.upload(run_dir, "someone/digits-pairs", private=True, api=api) == "offline"
    assert api.created == ("someone/digits-pairs", {"repo_type": "dataset", "private": True, "exist_ok": True})
    sent = {op.path_in_repo: Path(op.path_or_fileobj) for op in api.operations}
    assert sorted(sent) == PUBLISHED == publish.published_files(run_dir)
    assert "config.toml" not in sent and not any(name.startswith("_state") for name in sent)
    assert api.validated == (run_dir / "pairs" / "README.md").read_text()  # the card is the dataset's README
    for name in ("README.md", "stats.json", "sizes.json"):
        text = sent[name].read_text()
        assert not any(path in text for path in _local_paths(run_dir)), name
    manifest = pq.read_table(sent["manifest.parquet"]).to_pylist()
    assert all(r["origin"].startswith("digits:") for r in manifest)


def test_published_copy_reads_as_a_dataset_and_local_paths_are_refused(digits_run, tmp_path, capsys, monkeypatch):
    from datasets import load_dataset

    from cfgen import publish

    run_dir, stats = digits_run
    dest = tmp_path / "hub"
    assert publish.copy_to(run_dir, dest) == PUBLISHED
    pairs = load_dataset(str(dest), split="train")
    assert len(pairs) == stats["pairs"] and pairs.features["cf.cls"].names[0] == "zero"
    # a manifest that names a local path (an older cfgen wrote absolute origins) is not sent
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    table = pq.read_table(bad / "pairs" / "manifest.parquet").to_pylist()
    table[0]["origin"] = str(bad / "data" / "img0.png")
    pq.write_table(pq.read_table(bad / "pairs" / "manifest.parquet").from_pylist(
        table, schema=pq.read_schema(bad / "pairs" / "manifest.parquet")), bad / "pairs" / "manifest.parquet")
    capsys.readouterr()  # load_dataset's progress bars
    code, out, err = cfgen_here(monkeypatch, capsys, "publish", str(bad), "--dry-run")
    err = err.strip().splitlines()
    assert code == 2 and len(err) == 1 and out == ""
    assert err[0].startswith("cfgen: error: publish: manifest.parquet column origin names a local path (")


# ----------------------------------------------------------------------------- image formats

@pytest.fixture(scope="module")
def jpeg_run(digits_run, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("jpeg_run")
    _repack(digits_run[0], dest, DIGITS, SMALL + ["pack.image_format=jpeg", "pack.image_quality=90"])
    return dest


def _members(run_dir: Path) -> list[set[str]]:
    import tarfile

    out = []
    for tar in sorted((run_dir / "pairs").glob("pairs-*.tar")):
        with tarfile.open(tar) as tf:
            by_key: dict[str, set[str]] = {}
            for name in tf.getnames():
                key, _, ext = name.partition(".")
                by_key.setdefault(key, set()).add(ext)
        out += by_key.values()
    return out


def test_png_is_the_guide_stages_bytes(digits_run):
    """pack.image_format = 'png' (the default) copies the lossless PNG of the guide shards, byte for byte."""
    from cfgen.shards import read_samples

    run_dir, _ = digits_run
    guide = {s["__key__"]: s for tar in sorted((run_dir / "guide").glob("guide-*.tar")) for s in read_samples(tar)}
    for tar in sorted((run_dir / "pairs").glob("pairs-*.tar")):
        for s in read_samples(tar):
            assert s["png"] == guide[s["__key__"]]["png"] and s["cf.png"] == guide[s["__key__"]]["cf.png"]


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lossy_runs_read_back_with_load_dataset_and_webdataset(fmt, jpeg_run, shapes_run, digits_run):
    import webdataset as wds
    from datasets import load_dataset

    run_dir = jpeg_run if fmt == "jpeg" else shapes_run
    ext, pil, size, mode = {"jpeg": ("jpg", "JPEG", 8, "L"), "webp": ("webp", "WEBP", 16, "RGB")}[fmt]
    assert all(m == set(MEMBERS_BY_FORMAT[fmt]) for m in _members(run_dir))
    stats = json.loads((run_dir / "pairs" / "stats.json").read_text())
    card = _card(run_dir)
    assert stats["image_format"] == fmt and f"| image format | {fmt.upper()}, quality 90 |" in card.text
    assert [f["name"] for f in card.data.to_dict()["dataset_info"]["features"]][:4] == [ext, "txt", "cls", f"cf.{ext}"]

    pairs = load_dataset(str(run_dir / "pairs"), split="train")
    assert len(pairs) == stats["pairs"] > 0
    pair = pairs[0]
    assert pair[ext].size == (size, size) and pair[ext].mode == mode and pair[f"cf.{ext}"].format == pil
    assert all(has_type(pair["json"], k) for k in PAIR_FIELDS)

    urls = sorted(str(p) for p in (run_dir / "pairs").glob("pairs-*.tar"))
    seen = 0
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"):
        assert isinstance(s[ext], Image.Image) and s[f"cf.{ext}"].size == (size, size)
        assert list(s["json"]) == list(PAIR_FIELDS)  # decoded by webdataset
        seen += 1
    assert seen == stats["pairs"]
    from cfgen.verify import verify_run

    assert verify_run(run_dir) == (stats["pairs"], [])


def test_jpeg_pairs_keep_the_json_and_the_readers_decode_them(jpeg_run, digits_run):
    """K.json does not change with the format; verify, evaluate and tune's reader take the jpg members."""
    from cfgen.report.evaluate import load_pairs
    from cfgen.shards import read_samples
    from cfgen.tune.features import read_shard_images
    from cfgen.verify import verify_run

    png = {s["__key__"]: s for t in sorted((digits_run[0] / "pairs").glob("*.tar")) for s in read_samples(t)}
    for tar in sorted((jpeg_run / "pairs").glob("pairs-*.tar")):
        for s in read_samples(tar):
            assert s["json"] == png[s["__key__"]]["json"]
            lossy = np.asarray(Image.open(io.BytesIO(s["jpg"])), dtype=float)
            exact = np.asarray(Image.open(io.BytesIO(png[s["__key__"]]["png"])), dtype=float)
            assert 0 < np.abs(lossy - exact).mean() / 255 < 0.05  # JPEG at 90: lossy, but close
    checked, problems = verify_run(jpeg_run)
    assert checked == 40 and problems == []
    assert load_pairs(jpeg_run)["cf"].shape == (40, 8, 8, 1)
    shard = read_shard_images(sorted((jpeg_run / "pairs").glob("pairs-*.tar"))[0])
    assert shard.images.shape == (16, 8, 8, 1)


def test_webloader_with_more_workers_than_shards_as_the_readme_says(shapes_run):
    """Two shards, four workers: the README's recipe (workers capped by the shards, empty_check off) reads
    every pair once."""
    import webdataset as wds

    folder = shapes_run / "pairs"
    urls = [str(folder / name) for name in json.loads((folder / "sizes.json").read_text())]
    loader = wds.WebLoader(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"),
                           num_workers=min(4, len(urls)), batch_size=None)
    keys = [s["__key__"] for s in loader]
    assert len(urls) == 2 and sorted(keys) == sorted(set(keys)) and len(keys) == sum(
        json.loads((folder / "sizes.json").read_text()).values())


def test_v5_pairs_still_read(tmp_path):
    """Pairs of contract v5 (PNG members, no v6 fields): tune's reader and evaluate's read them as before."""
    from cfgen.data.images import encode_png
    from cfgen.report.evaluate import load_pairs
    from cfgen.shards import atomic_tar
    from cfgen.tune.features import read_shard_images

    v5 = ["id", "label", "label_name", "cf_label", "cf_label_name", "target_strategy", "guidance_scale", "t_inv",
          "steps", "seed", "p_cf", "flipped", "l1", "l2", "recon_l1", "factual_id", "intervention", "edits"]
    (tmp_path / "pairs").mkdir()
    with atomic_tar(tmp_path / "pairs" / "pairs-000000.tar") as tar:
        for i in range(4):
            y, ycf = i % 2, 1 - i % 2
            meta = dict.fromkeys(v5, "x") | {"id": f"s{i}", "label": y, "cf_label": ycf, "factual_id": f"s{i}"}
            tar.write({"__key__": f"s{i}", "png": encode_png(np.full((8, 8, 1), 10 * i, np.uint8)),
                       "cf.png": encode_png(np.full((8, 8, 1), 5 * i, np.uint8)), "txt": b"a", "cf.txt": b"b",
                       "cls": str(y).encode(), "cf.cls": str(ycf).encode(), "json": json.dumps(meta).encode()})
    shard = read_shard_images(tmp_path / "pairs" / "pairs-000000.tar")
    assert shard.images.shape == (4, 8, 8, 1) and shard.cf_label.tolist() == [1, 0, 1, 0]
    assert load_pairs(tmp_path)["factual"][3].max() == 30
