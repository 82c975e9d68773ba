"""Every bad input gets a recorded reason; every good sample comes out intact.

One dirty dataset (a manifest mixing good digits with every kind of bad image
and bad row) goes through invert -> guide -> pack once; each case is then
checked against the row it produced. Shard, model, config, disk and policy
cases follow, then a bounded fuzz test.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cfgen.data.images import decode_image
from conftest import DIGITS, ROOT, run_pipeline

CLASSES = ROOT / "manifests" / "digits" / "classes.txt"
NAMES = CLASSES.read_text().split()


def _digit(i: int) -> tuple[np.ndarray, int]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.rint(d.images[i] * 255 / 16).astype(np.uint8), int(d.target[i])


def _png(arr: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def _manifest_overrides(root: Path, manifest: Path, extra: list[str] | None = None) -> list[str]:
    return ["data.source=manifest", f"data.root={root.as_posix()!r}", f"data.manifest={manifest.as_posix()!r}",
            f"data.classes={CLASSES.as_posix()!r}", "data.limit=0", "data.shard_size=64",
            "data.max_image_pixels=40000", *(extra or [])]


def _write_manifest(path: Path, rows: list[tuple[str, str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "path", "label"])
        w.writerows(rows)


# (id, how the file is made, expected status, expected error prefix)
GOOD = ["good-0", "good-1", "good-2", "good-3"]


@pytest.fixture(scope="module")
def dirty_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dirty")
    img = root / "img"
    img.mkdir()
    rows = []
    for k, name in enumerate(GOOD):
        arr, label = _digit(k)
        (img / f"{name}.png").write_bytes(_png(arr))
        rows.append((name, f"img/{name}.png", NAMES[label]))
    arr, label = _digit(10)
    big = Image.fromarray(arr).resize((256, 256))  # 65,536 px > data.max_image_pixels = 40,000
    big.save(img / "bomb.png")
    (img / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (img / "truncated.png").write_bytes(_png(np.tile(arr, (8, 8)))[:120])
    (img / "empty.png").write_bytes(b"")
    (img / "dir.png").mkdir()
    (img / "text.png").write_text("this is not an image\n")
    Image.fromarray(arr).convert("CMYK").save(img / "cmyk.jpg")
    rgba = Image.fromarray(arr).convert("RGBA")
    rgba.putalpha(200)
    rgba.save(img / "rgba.png")
    Image.fromarray(arr).convert("P").save(img / "palette.png")
    Image.fromarray(arr.astype(np.uint16) * 257).save(img / "sixteen.png")   # mode I;16
    Image.fromarray(arr).convert("1").save(img / "onebit.png")
    Image.fromarray(arr[:1, :1]).save(img / "tiny.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    Image.fromarray(np.rot90(arr, 1).copy()).save(img / "exif.jpg", exif=exif, quality=95)
    label_name = NAMES[label]
    rows += [
        ("bomb", "img/bomb.png", label_name), ("corrupt", "img/corrupt.png", label_name),
        ("truncated", "img/truncated.png", label_name), ("empty", "img/empty.png", label_name),
        ("missing", "img/nope.png", label_name), ("directory", "img/dir.png", label_name),
        ("text", "img/text.png", label_name), ("cmyk", "img/cmyk.jpg", label_name),
        ("rgba", "img/rgba.png", label_name), ("palette", "img/palette.png", label_name),
        ("sixteen", "img/sixteen.png", label_name), ("onebit", "img/onebit.png", label_name),
        ("tiny", "img/tiny.png", label_name), ("exif", "img/exif.jpg", label_name),
        # manifest problems
        ("unknown-label", "img/good-0.png", "eleven"), ("empty-label", "img/good-0.png", ""),
        ("dup", "img/good-1.png", label_name), ("dup", "img/good-2.png", label_name),
        ("a.b c/d", "img/good-3.png", label_name), ("a_b_c_d", "img/good-3.png", label_name),
        ("escape", "../outside.png", label_name),
    ]
    (root / "outside.png").write_bytes(_png(arr))
    manifest = root / "manifest.csv"
    _write_manifest(manifest, rows)
    # one row whose bytes are not UTF-8
    with manifest.open("ab") as fh:
        fh.write(b"latin1-\xe9t\xe9,img/good-0.png," + label_name.encode() + b"\n")
    run_dir = root / "run"
    stats = run_pipeline(run_dir, _manifest_overrides(root, manifest))
    table = pq.read_table(run_dir / "pairs" / "manifest.parquet").to_pylist()
    return root, run_dir, stats, table


def _row(table, origin=None, id_prefix=None):
    hits = [r for r in table if (origin and r["origin"] == origin) or (id_prefix and r["id"].startswith(id_prefix))]
    assert len(hits) == 1, (origin, id_prefix, [r["id"] for r in table])
    return hits[0]


@pytest.mark.parametrize("origin, error", [
    ("img/bomb.png", "image too large: 256x256 pixels > 40000 (decompression bomb guard)"),
    ("img/corrupt.png", "not an image (unidentified format)"),  # a PNG signature, then garbage
    ("img/truncated.png", "corrupt image:"),
    ("img/empty.png", "empty file"),
    ("img/nope.png", "missing file:"),
    ("img/dir.png", "not a file:"),
    ("img/text.png", "not an image (unidentified format)"),
    ("../outside.png", "path escapes the dataset root: ../outside.png"),
])
def test_bad_images_fail_with_their_reason(dirty_run, origin, error):
    _, _, _, table = dirty_run
    row = _row(table, origin=origin)
    assert row["status"] == "failed"
    assert row["error"].startswith(error), row["error"]


@pytest.mark.parametrize("origin", ["img/cmyk.jpg", "img/rgba.png", "img/palette.png", "img/sixteen.png",
                                    "img/onebit.png", "img/tiny.png", "img/exif.jpg"])
def test_unusual_but_valid_images_are_processed(dirty_run, origin):
    root, run_dir, _, table = dirty_run
    row = _row(table, origin=origin)
    assert row["status"] == "ok", row["error"]
    pairs = _pairs(run_dir)
    expected = decode_image(root / origin, 8, 1)
    stored = np.asarray(Image.open(io.BytesIO(pairs[row["id"]]["png"])))
    assert np.array_equal(stored, expected[:, :, 0])


def test_exif_rotation_is_applied(dirty_run):
    root, run_dir, _, table = dirty_run
    upright, _ = _digit(10)
    got = decode_image(root / "img" / "exif.jpg", 8, 1)[:, :, 0].astype(int)
    # JPEG is lossy; the upright digit must match far better than the stored (rotated) pixels do
    assert np.abs(got - upright).mean() < 0.5 * np.abs(got - np.rot90(upright, 1)).mean()


def test_manifest_row_problems(dirty_run):
    _, _, _, table = dirty_run
    assert _row(table, id_prefix="unknown-label")["error"] == "label not in class list: 'eleven'"
    assert _row(table, id_prefix="empty-label")["error"] == "empty label"
    latin = [r for r in table if r["error"] == "non-UTF-8 text in the manifest row"]
    assert len(latin) == 1 and latin[0]["status"] == "failed"
    dups = [r for r in table if r["id"].startswith("dup")]
    assert len(dups) == 2 and len({r["id"] for r in dups}) == 2 and all(r["status"] == "ok" for r in dups)


def test_unsafe_ids_become_distinct_dot_free_keys(dirty_run):
    _, run_dir, _, table = dirty_run
    keys = [r["id"] for r in table if r["origin"] == "img/good-3.png"]
    assert len(keys) == 3 and len(set(keys)) == 3  # good-3, 'a.b c/d', 'a_b_c_d'
    assert all("." not in k and "/" not in k and " " not in k for k in keys)
    assert set(keys) <= set(_pairs(run_dir))


def test_good_samples_come_out_intact(dirty_run):
    root, run_dir, stats, table = dirty_run
    pairs = _pairs(run_dir)
    for name in GOOD:
        arr, label = _digit(GOOD.index(name))
        s = pairs[name]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), arr)
        assert int(s["cls"]) == label
    ok = [r for r in table if r["status"] == "ok"]
    assert stats["pairs"] == len(ok) == len(pairs) == 4 + 7 + 2 + 2  # good, odd modes, dups, unsafe ids
    assert stats["count"] == len(table) == 4 + 14 + 7 + 1  # every input row, none lost
    assert stats["failed"] == len(table) - len(ok)
    assert sum(stats["errors"].values()) == stats["failed"]


def _pairs(run_dir: Path) -> dict[str, dict]:
    from cfgen.shards import read_samples

    return {s["__key__"]: s for t in sorted((run_dir / "pairs").glob("pairs-*.tar")) for s in read_samples(t)}


# ----------------------------------------------------------------------------- shards

def _rewrite_tar(path: Path, edit) -> None:
    """Rewrite a shard, passing every (name, bytes) through edit (which may drop or change it)."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            out = edit(name, data)
            if out is not None:
                info = tarfile.TarInfo(name)
                info.size = len(out)
                tar.addfile(info, io.BytesIO(out))


def _invert_then(tmp_path: Path, damage, checksums: bool = True) -> tuple[dict, list[dict]]:
    """Run the small digits pipeline's invert, damage invert shard 0, then guide + pack.

    checksums=False blanks the shard's per-sample sha256 column first, and its marker's checksum of the
    parquet (as a shard written without them): the damage then reaches the decoders instead of being
    caught by the checksum."""
    from cfgen.config import load_config
    from cfgen.stages.guide import run_guide
    from cfgen.stages.invert import run_invert
    from cfgen.stages.pack import run_pack
    from conftest import SMALL

    cfg = load_config(DIGITS, SMALL + ["data.limit=20", "data.shard_size=10"])
    run_invert(cfg, tmp_path)
    if not checksums:
        rows_path = tmp_path / "invert" / "_state" / "invert-000000.parquet"
        rows = pq.read_table(rows_path)
        blank = pa.nulls(rows.num_rows, rows.schema.field("sha256").type)
        pq.write_table(rows.set_column(rows.schema.get_field_index("sha256"), "sha256", blank), rows_path)
        marker = tmp_path / "invert" / "_state" / "invert-000000_stats.json"
        marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "rows_sha256"}))
    damage(tmp_path / "invert" / "invert-000000.tar")
    run_guide(cfg, tmp_path)
    stats = run_pack(cfg, tmp_path)
    return stats, pq.read_table(tmp_path / "pairs" / "manifest.parquet").to_pylist()


def test_truncated_input_shard_keeps_what_it_can(tmp_path):
    def truncate(path: Path):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    stats, table = _invert_then(tmp_path, truncate)
    lost = [r for r in table if r["status"] == "failed"]
    assert lost and all(r["error"].startswith("lost in a corrupt input shard: corrupt or truncated shard")
                        for r in lost)
    assert all(r["shard"] == 0 for r in lost)
    assert stats["pairs"] == 20 - len(lost) and stats["pairs"] > 10  # shard 1 whole, part of shard 0


def test_sample_missing_a_member(tmp_path):
    stats, table = _invert_then(tmp_path, lambda p: _rewrite_tar(
        p, lambda name, data: None if name == "digits-00003.noise.npy" else data))
    row = next(r for r in table if r["id"] == "digits-00003")
    assert row["status"] == "failed" and row["error"] == "input sample is missing members: noise.npy"
    assert stats["pairs"] == 19


def test_npy_that_needs_pickle_is_refused(tmp_path):
    def pickled(name, data):
        if name != "digits-00004.noise.npy":
            return data
        buf = io.BytesIO()
        np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
        return buf.getvalue()

    # the checksum its row recorded catches the swap first ...
    stats, table = _invert_then(tmp_path / "a", lambda p: _rewrite_tar(p, pickled))
    row = next(r for r in table if r["id"] == "digits-00004")
    assert (row["status"], row["error"]) == ("failed", "damaged input sample: its checksum differs from "
                                                       "invert-000000.parquet")
    assert stats["pairs"] == 19
    # ... and without one, the loader still refuses to unpickle
    stats, table = _invert_then(tmp_path / "b", lambda p: _rewrite_tar(p, pickled), checksums=False)
    row = next(r for r in table if r["id"] == "digits-00004")
    assert row["status"] == "failed"
    assert row["error"].startswith("unreadable input sample: Object arrays cannot be loaded when allow_pickle=False")
    assert stats["pairs"] == 19


# ----------------------------------------------------------------------------- models

@pytest.mark.parametrize("network", ["eps", "logits"])
def test_nan_from_a_network_fails_that_sample_only(tmp_path, monkeypatch, network):
    """NaN for the first sample of each full batch of 7: in invert (UNet) or in guide (predictor)."""
    from cfgen.config import load_config
    from cfgen.models.runtime import Models
    from cfgen.stages.guide import run_guide
    from cfgen.stages.invert import run_invert
    from cfgen.stages.pack import run_pack
    from conftest import SMALL

    original = getattr(Models, network)

    def poisoned(self, x, t):
        out = original(self, x, t)
        if out.shape[0] == 7:
            out = out.clone()
            out[0] = float("nan")
        return out

    cfg = load_config(DIGITS, SMALL + ["data.limit=14"])
    with monkeypatch.context() as patch:
        if network == "eps":  # the UNet breaks during inversion only
            patch.setattr(Models, "eps", poisoned)
        run_invert(cfg, tmp_path)
    with monkeypatch.context() as patch:
        if network == "logits":  # the predictor breaks during guidance only
            patch.setattr(Models, "logits", poisoned)
        run_guide(cfg, tmp_path)
    stats = run_pack(cfg, tmp_path)
    table = pq.read_table(tmp_path / "pairs" / "manifest.parquet").to_pylist()
    failed = {r["id"]: r["error"] for r in table if r["status"] == "failed"}
    assert set(failed) == {"digits-00000", "digits-00007"}  # the first of each batch of 7
    expected = ("non-finite noise from the UNet during inversion" if network == "eps"
                else "non-finite output from the UNet or the predictor")
    assert set(failed.values()) == {expected}
    assert stats["pairs"] == 12
    assert all(np.isfinite(r["l1"]) for r in table if r["status"] == "ok")


def _cfgen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cfgen", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_missing_weights_file(tmp_path):
    import shutil

    unet = tmp_path / "unet"
    shutil.copytree(ROOT / "models" / "digits" / "unet", unet)
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    out = _cfgen("invert", "--config", str(DIGITS), "--out", str(tmp_path / "run"), "--set", f"model.unet={unet}")
    assert out.returncode == 2
    assert out.stderr.strip() == f"cfgen: error: no weights file (diffusion_pytorch_model.safetensors or " \
                                 f"model.safetensors) in {unet}"


def test_pickle_checkpoint_needs_the_trust_flag(tmp_path):
    from cfgen.models.classifier import NoiseAwareClassifier

    clf = NoiseAwareClassifier.from_pretrained(ROOT / "models" / "digits" / "classifier")
    clf.save_pretrained(tmp_path / "clf", safe_serialization=False)
    assert (tmp_path / "clf" / "diffusion_pytorch_model.bin").is_file()
    args = ["run", "--config", str(DIGITS), "--out", str(tmp_path / "run"), "--set", "data.limit=4",
            "--set", "invert.steps=5", "--set", "guide.escalation=[]", "--set", f"model.classifier={tmp_path / 'clf'}"]
    refused = _cfgen(*args)
    assert refused.returncode == 2 and "is a pickle checkpoint" in refused.stderr
    assert "--trust-checkpoint" in refused.stderr
    trusted = _cfgen(*args, "--trust-checkpoint")
    assert trusted.returncode == 0, trusted.stderr


def test_steps_beyond_the_schedule_is_a_config_error(tmp_path):
    out = _cfgen("invert", "--config", str(DIGITS), "--out", str(tmp_path), "--set", "invert.steps=900",
                 "--set", "invert.t_inv=0.5")
    assert out.returncode == 2
    assert out.stderr.strip() == "cfgen: error: invert.steps: invert.steps=900 exceeds the 500 timesteps up to t_inv=0.5"


def test_missing_manifest_column(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,label\nimg/a.png,one\n")
    out = _cfgen("run", "--config", str(DIGITS), "--out", str(tmp_path / "run"),
                 *[a for o in _manifest_overrides(tmp_path, manifest) for a in ("--set", o)])
    assert out.returncode == 2 and "needs columns 'path' and 'label'" in out.stderr


# ----------------------------------------------------------------------------- disk and policy

def test_output_directory_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run directory should go")
    out = _cfgen("invert", "--config", str(DIGITS), "--out", str(blocker / "run"), "--set", "data.limit=4")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("cfgen: error:")


def test_disk_full_stops_cleanly_and_keeps_finished_shards(tmp_path, monkeypatch, capsys):
    import cfgen.shards as shards
    from cfgen.cli import main

    real = shards.atomic_write_rows
    calls = {"n": 0}

    def full_on_second(path, rows, schema):
        calls["n"] += 1
        if calls["n"] == 2:
            path.with_name(path.name + ".tmp").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, rows, schema)

    monkeypatch.setattr("cfgen.stages.common.atomic_write_rows", full_on_second)
    monkeypatch.setattr(sys, "argv", ["cfgen", "invert", "--config", str(DIGITS), "--out", str(tmp_path),
                                      "--set", "data.limit=24", "--set", "data.shard_size=8"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "No space left on device while writing" in err and "re-run the same command to resume" in err
    done = sorted(p.name for p in (tmp_path / "invert" / "_state").glob("*_stats.json"))
    assert done == ["invert-000000_stats.json"]  # the finished shard stays valid
    assert len(list(shards.read_samples(tmp_path / "invert" / "invert-000000.tar"))) == 8
    # resume: the same command finishes the rest
    monkeypatch.setattr("cfgen.stages.common.atomic_write_rows", real)
    main()  # returns normally: success
    assert len(list((tmp_path / "invert" / "_state").glob("*_stats.json"))) == 3
    assert not list(tmp_path.rglob("*.tmp"))


def test_failure_threshold_exits_1_with_a_summary(dirty_run):
    root, _, _, _ = dirty_run
    out = _cfgen("run", "--config", str(DIGITS), "--out", str(root / "strict"),
                 *[a for o in _manifest_overrides(root, root / "manifest.csv", ["pipeline.max_failure_fraction=0.1"])
                   for a in ("--set", o)])
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("cfgen: failed: pairs: 11 of 26 samples failed (> pipeline.max_failure_fraction=0.1): ")
    assert "empty file x1" in last
    assert (root / "strict" / "pairs" / "manifest.parquet").is_file()  # the work done is still written


def test_fail_fast_stops_at_the_first_error(dirty_run):
    root, _, _, _ = dirty_run
    out = _cfgen("invert", "--config", str(DIGITS), "--out", str(root / "fast"), "--fail-fast",
                 *[a for o in _manifest_overrides(root, root / "manifest.csv") for a in ("--set", o)])
    assert out.returncode == 1
    assert "cfgen: failed: invert shard 0: sample bomb" in out.stderr
    assert not list((root / "fast" / "invert" / "_state").glob("*_stats.json"))  # that shard is not committed


# ----------------------------------------------------------------------------- verify

def test_verify_accepts_a_good_run_and_names_problems(digits_run, tmp_path):
    import shutil

    run_dir, _ = digits_run
    ok = _cfgen("verify", str(run_dir))
    assert ok.returncode == 0 and ok.stdout.strip().endswith("verified 40 samples: 0 problem(s)")
    bad = tmp_path / "bad"
    shutil.copytree(run_dir / "pairs", bad / "pairs")

    def damage(name, data):
        if name == "digits-00001.cf.png":
            return data[:20]  # a PNG that does not decode
        if name == "digits-00002.cf.cls":
            return None  # a missing member
        if name == "digits-00003.json":
            return b'{"id": "digits-00003"}'
        return data

    _rewrite_tar(bad / "pairs" / "pairs-000000.tar", damage)
    out = _cfgen("verify", str(bad))
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert "pairs-000000.tar: digits-00001: cf.png: does not decode (OSError)" in lines  # truncated PNG data
    assert "pairs-000000.tar: digits-00002: members: missing ['cf.cls'], unexpected []" in lines
    assert any(line.startswith("pairs-000000.tar: digits-00003: json: keys") for line in lines)
    # and each of the three no longer matches the checksum its manifest row recorded
    for key in ("digits-00001", "digits-00002", "digits-00003"):
        assert any(line.startswith(f"pairs-000000.tar: {key}: ") and "differ from the checksum in manifest.parquet"
                   in line for line in lines), key
    assert lines[-1] == "verified 40 samples: 6 problem(s)"


# ----------------------------------------------------------------------------- fuzz

def test_fuzzed_images_and_shards_never_crash_and_verify_clean(tmp_path):
    """Random byte flips in input images and in an intermediate shard (bounded: 24 images, 1 shard)."""
    from cfgen.verify import verify_run

    rng = random.Random(1234)
    img = tmp_path / "img"
    img.mkdir()
    rows = []
    for i in range(24):
        arr, label = _digit(i)
        data = bytearray(_png(arr) if i % 2 else _png(arr, "RGB"))
        for _ in range(rng.randint(0, 6)):  # 0-6 flipped bytes, headers included
            data[rng.randrange(len(data))] = rng.randrange(256)
        if i % 5 == 0:
            data = data[: rng.randrange(1, len(data))]
        (img / f"f{i}.png").write_bytes(bytes(data))
        rows.append((f"f{i}", f"img/f{i}.png", NAMES[label]))
    manifest = tmp_path / "fuzz.csv"
    _write_manifest(manifest, rows)
    overrides = _manifest_overrides(tmp_path, manifest, ["data.shard_size=8", "pipeline.max_failure_fraction=1.0"])

    from cfgen.config import load_config
    from cfgen.stages.guide import run_guide
    from cfgen.stages.invert import run_invert
    from cfgen.stages.pack import run_pack
    from conftest import SMALL

    cfg = load_config(DIGITS, SMALL + overrides)
    run_dir = tmp_path / "run"
    run_invert(cfg, run_dir)
    shard = run_dir / "invert" / "invert-000001.tar"
    data = bytearray(shard.read_bytes())
    for _ in range(8):
        data[rng.randrange(len(data))] = rng.randrange(256)
    shard.write_bytes(bytes(data))
    run_guide(cfg, run_dir)
    stats = run_pack(cfg, run_dir)
    checked, problems = verify_run(run_dir)
    assert problems == []
    assert checked == stats["pairs"]
    assert stats["count"] == 24  # every input has its row, whatever happened to it
