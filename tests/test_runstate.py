"""A run never mixes, duplicates or silently loses samples (issue 12): fingerprints, the lock, checksums.

Each test drives the real CLI (in-process, through cfgen.cli.main) on a few digits and asserts the
exit code, the message, and what is on disk afterwards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "pipelines" / "digits.toml")
FAST = ["data.limit=12", "data.shard_size=6", "invert.steps=5", "guide.escalation=[]",
        "invert.batch_size=6", "guide.batch_size=6"]


def cli(capsys, *args: str, sets: list[str] = FAST) -> tuple[int, str, str]:
    """Run `cfgen args --set ...` in this process; (exit code, stdout, stderr)."""
    from cfgen.cli import main

    argv = ["cfgen", *args] + [a for s in sets for a in ("--set", s)]
    old, sys.argv = sys.argv, argv
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def tree(run_dir: Path) -> dict[str, str]:
    """sha256 of every file under a run directory (the lock files aside)."""
    return {p.relative_to(run_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and not p.name.startswith(".lock")}


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("cfgen:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    from cfgen.cli import main

    old, sys.argv = sys.argv, ["cfgen", "run", "--config", DIGITS, "--out", str(run)] + \
        [a for s in FAST for a in ("--set", s)]
    try:
        main()
    except SystemExit as exc:
        assert not exc.code
    finally:
        sys.argv = old
    return run


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock*"))
    return dst


# ------------------------------------------------------------------ resume trusts only what matches

def test_rerun_with_other_settings_is_refused_and_changes_nothing(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    before = tree(run)
    code, _, err = cli(capsys, "run", "--config", DIGITS, "--out", str(run),
                       sets=FAST + ["guide.scale=8", "guide.target=random"])
    assert code == 2
    line = one_error_line(err)
    assert line.startswith(f"cfgen: error: guide: {run / 'guide'} was made with other settings: ")
    assert "guide.target 'closest' -> 'random'" in line and "guide.scale 4.0 -> 8.0" in line
    assert "--overwrite" in line
    assert tree(run) == before  # config.toml included: the run's record still tells how it was made


def test_overwrite_starts_the_stage_afresh(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    code, _, err = cli(capsys, "guide", "--config", DIGITS, "--out", str(run), "--overwrite",
                       sets=FAST + ["guide.target=random"])
    assert code == 0, err
    rows = pq.read_table(run / "guide" / "_state" / "guide-000000.parquet").to_pylist()
    assert {r["target_strategy"] for r in rows} == {"random"}
    # pack now refuses: its input was remade with other settings, and its own shards say closest
    code, _, err = cli(capsys, "pack", "--config", DIGITS, "--out", str(run), sets=FAST + ["guide.target=random"])
    assert code == 2 and "guide.target 'closest' -> 'random'" in one_error_line(err)


def test_killed_guide_then_other_settings_never_mixes(finished_run, tmp_path, capsys):
    """A guide run killed after its first shard, re-run with other settings: refused, not mixed."""
    run = copy_run(finished_run, tmp_path / "run")
    (run / "guide" / "_state" / "guide-000001_stats.json").unlink()  # what a kill before the marker leaves
    before = tree(run)
    code, _, err = cli(capsys, "guide", "--config", DIGITS, "--out", str(run), sets=FAST + ["guide.scale=8"])
    assert code == 2 and "guide.scale 4.0 -> 8.0" in one_error_line(err)
    assert tree(run) == before
    code, _, err = cli(capsys, "guide", "--config", DIGITS, "--out", str(run))  # the same settings: resumes
    assert code == 0, err
    assert tree(run)["guide/guide-000001.tar"] == tree(finished_run)["guide/guide-000001.tar"]


def test_a_run_in_the_layout_before_contract_v4_is_refused_then_redone(finished_run, tmp_path, capsys):
    """A run directory whose bookkeeping lies beside the tars (cfgen before contract v4) is refused in one
    line and left as it was; --overwrite redoes it in today's layout."""
    run = copy_run(finished_run, tmp_path / "run")
    for stage in ("invert", "guide", "pairs"):
        for p in (run / stage / "_state").iterdir():
            p.rename(run / stage / p.name)
        (run / stage / "_state").rmdir()
    before = tree(run)
    code, _, err = cli(capsys, "run", "--config", DIGITS, "--out", str(run))
    assert code == 2
    assert one_error_line(err) == (f"cfgen: error: invert: {run / 'invert'} was made by an older cfgen (its "
                                   "bookkeeping beside the tars, before contract v4); re-run with --overwrite to "
                                   "redo this stage, or use another --out")
    assert tree(run) == before
    code, _, err = cli(capsys, "run", "--config", DIGITS, "--out", str(run), "--overwrite")
    assert code == 0, err
    assert not list((run / "pairs").glob("*_stats.json")) and (run / "pairs" / "_state" / "fingerprint.json").is_file()
    assert tree(run)["pairs/pairs-000000.tar"] == tree(finished_run)["pairs/pairs-000000.tar"]


def test_other_shard_size_is_refused(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    sets = [s for s in FAST if not s.startswith("data.shard_size")] + ["data.shard_size=4"]
    code, _, err = cli(capsys, "run", "--config", DIGITS, "--out", str(run), sets=sets)
    assert code == 2 and "data.shard_size 6 -> 4" in one_error_line(err)
    code, _, err = cli(capsys, "run", "--config", DIGITS, "--out", str(run), "--overwrite", sets=sets)
    assert code == 0, err
    manifest = pq.read_table(run / "pairs" / "manifest.parquet").to_pylist()
    assert len(manifest) == 12 and len({r["id"] for r in manifest}) == 12  # no stale shard merged in
    assert sorted(p.name for p in (run / "pairs").glob("*.tar")) == [f"pairs-{i:06d}.tar" for i in range(3)]


def _folder(root: Path, per_class: int, start: int = 0) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in (0, 1):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for k, i in enumerate(np.flatnonzero(d.target == c)[start:start + per_class]):
            Image.fromarray(np.rint(d.images[i] * 255 / 16).astype(np.uint8)).save(root / str(c) / f"{k + start}.png")


def _folder_sets(root: Path, classes: Path) -> list[str]:
    return ["data.source=folder", f"data.root={root}", f"data.classes={classes}", "data.split=", "tune.eval_split=",
            "data.limit=0",
            "invert.steps=5", "guide.escalation=[]", "data.shard_size=8"]


@pytest.fixture()
def folder_data(tmp_path) -> tuple[Path, Path]:
    root = tmp_path / "data"
    _folder(root, 4)
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"{c}\n" for c in range(10)))  # as many as the shipped digits classifier reads
    return root, classes


def test_added_or_deleted_images_are_refused(folder_data, tmp_path, capsys):
    root, classes = folder_data
    run = tmp_path / "run"
    sets = _folder_sets(root, classes)
    assert cli(capsys, "run", "--config", DIGITS, "--out", str(run), sets=sets)[0] == 0
    before = tree(run)
    _folder(root, 3, start=4)  # three more images per class
    code, _, err = cli(capsys, "run", "--config", DIGITS, "--out", str(run), sets=sets)
    assert code == 2 and "the input samples (8 -> 14, or changed files)" in one_error_line(err)
    for p in sorted(root.rglob("*.png"))[:5]:
        p.unlink()
    code, _, err = cli(capsys, "run", "--config", DIGITS, "--out", str(run), sets=sets)
    assert code == 2 and "the input samples (8 -> 9, or changed files)" in one_error_line(err)
    assert tree(run) == before


def test_changed_model_weights_are_refused(finished_run, tmp_path, capsys):
    import shutil

    run = copy_run(finished_run, tmp_path / "run")
    clf = tmp_path / "classifier"
    shutil.copytree(ROOT / "models" / "digits" / "classifier", clf)
    (clf / "metrics.json").write_text("{}")  # any byte of the model directory counts
    code, _, err = cli(capsys, "guide", "--config", DIGITS, "--out", str(run), sets=FAST + [f"model.classifier={clf}"])
    assert code == 2 and "the files of model.classifier" in one_error_line(err)


def test_a_setting_newer_than_the_run_reads_as_its_default(finished_run, tmp_path, capsys):
    """A run made before a setting existed (its fingerprint lacks the key) was made with what is now the
    default: resuming under the default is allowed, any other value is refused by name."""
    run = copy_run(finished_run, tmp_path / "run")
    for stage in ("guide", "pairs"):
        path = run / stage / "_state" / "fingerprint.json"
        fp = json.loads(path.read_text())
        assert fp["config"].pop("text.edit_prompt") == "concept"  # the default, recorded by today's runs
        path.write_text(json.dumps(fp))
    before = tree(run)
    code, _, err = cli(capsys, "guide", "--config", DIGITS, "--out", str(run), sets=FAST + ["text.edit_prompt=counterfactual"])
    assert code == 2 and "text.edit_prompt 'concept' -> 'counterfactual'" in one_error_line(err)
    assert tree(run) == before
    code, _, err = cli(capsys, "run", "--config", DIGITS, "--out", str(run))
    assert code == 0, err


# ------------------------------------------------------------------ inputs that crashed a run

def test_non_utf8_file_name_is_recorded_and_processed(folder_data, tmp_path, capsys):
    root, classes = folder_data
    name = os.fsdecode(b"caf\xe9-\xff.png")
    (root / "0" / "0.png").rename(root / "0" / name)
    run = tmp_path / "run"
    code, out, err = cli(capsys, "run", "--config", DIGITS, "--out", str(run), sets=_folder_sets(root, classes))
    assert code == 0, err
    manifest = pq.read_table(run / "pairs" / "manifest.parquet").to_pylist()
    row = next(r for r in manifest if "caf" in r["origin"])
    assert row["origin"].endswith("0/caf\\xe9-\\xff.png") and row["status"] == "ok"
    assert "." not in row["id"]


def test_one_class_or_a_class_list_unlike_the_classifier_is_refused_before_work(tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text("zero\n")
    code, _, err = cli(capsys, "run", "--config", DIGITS, "--out", str(tmp_path / "a"), sets=FAST + [f"data.classes={one}"])
    assert code == 2 and "lists 1 class; a counterfactual changes the class" in one_error_line(err)
    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    root = tmp_path / "data"
    for c in "abc":
        (root / c).mkdir(parents=True)
        Image.new("L", (8, 8), 40).save(root / c / "x.png")
    code, _, err = cli(capsys, "run", "--config", DIGITS, "--out", str(tmp_path / "b"),
                       sets=["data.source=folder", f"data.root={root}", f"data.classes={three}", "data.split=",
                             "tune.eval_split="])
    assert code == 2
    assert "has 10 outputs but the class list has 3 classes" in one_error_line(err)
    assert not (tmp_path / "b" / "invert").exists() or not list((tmp_path / "b" / "invert").glob("*.tar"))


def test_out_inside_the_data_root_is_refused(folder_data, capsys):
    root, classes = folder_data
    before = sorted(p.name for p in root.iterdir())
    code, _, err = cli(capsys, "run", "--config", DIGITS, "--out", str(root / "runs"), sets=_folder_sets(root, classes))
    assert code == 2 and "is inside data.root" in one_error_line(err)
    assert sorted(p.name for p in root.iterdir()) == before  # nothing created in the dataset


@pytest.mark.parametrize("caption, shown", [("{foo}", "{foo}"), ("{label_name.__class__.__mro__}", "{label_name.__class__.__mro__}"),
                                             ("{label_name!r}", "{label_name!r}"), ("{label_name:>30}", "{label_name:>30}")])
def test_caption_templates_are_checked_before_work(tmp_path, capsys, caption, shown):
    code, _, err = cli(capsys, "run", "--config", DIGITS, "--out", str(tmp_path / "run"),
                       sets=FAST + [f"pack.caption='{caption}'"])
    assert code == 2
    assert one_error_line(err) == (f"cfgen: error: pack.caption: {caption!r} uses {shown}; "
                                   "the only field allowed is {label_name}")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ weak spots

def test_remote_code_in_a_predictor_config_is_never_run(tmp_path, capsys):
    """A config.json with auto_map pointing at code beside it: no prompt, no import of that code."""
    from transformers import ViTConfig, ViTForImageClassification

    path = tmp_path / "vit"
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=16, num_labels=10,
                       id2label={i: str(i) for i in range(10)}, label2id={str(i): i for i in range(10)})
    ViTForImageClassification(config).save_pretrained(path)
    marker = tmp_path / "code-ran"
    (path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                  "from transformers import ViTForImageClassification as EvilModel\n")
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForImageClassification": "evil.EvilModel", "AutoConfig": "evil.EvilModel"}
    (path / "config.json").write_text(json.dumps(cfg))
    out = subprocess.run([sys.executable, "-m", "cfgen", "run", "--config", DIGITS, "--out", str(tmp_path / "run"),
                          "--set", "model.predictor=hf_classifier", "--set", f"model.predictor_path={path}",
                          "--set", "model.gradient=x0", *[a for s in FAST for a in ("--set", s)]],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert not marker.exists(), "the model folder's own code ran"
    assert "[y/N]" not in out.stdout + out.stderr
    assert out.returncode in (0, 2), out.stderr
    if out.returncode == 2:
        assert len([x for x in out.stderr.splitlines() if x.startswith("cfgen:")]) == 1


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "cfgen", "run", "--config", DIGITS, "--out", str(run),
            "--set", "data.limit=200", "--set", "invert.steps=10", "--set", "data.shard_size=20"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / ".lock").is_file() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        second = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert one_error_line(second.stderr) == (f"cfgen: error: another cfgen process is writing {run.resolve()}; "
                                                 "wait for it to finish, or use another --out")
    finally:
        first.kill()
        first.wait()
    # SIGKILL leaves the lock file but not the lock: the same command resumes
    again = subprocess.run(args,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr
    assert not list(run.rglob("*.tmp"))


def _rewrite_member(tar_path: Path, key: str, member: str, new: bytes) -> None:
    """Replace one member's bytes in a tar, keeping every header (a same-size in-place tampering)."""
    data = bytearray(tar_path.read_bytes())
    with tarfile.open(tar_path) as tar:
        info = tar.getmember(f"{key}.{member}")
    assert len(new) == info.size
    data[info.offset_data: info.offset_data + info.size] = new
    tar_path.write_bytes(bytes(data))


def test_an_altered_intermediate_is_caught(finished_run, tmp_path, capsys):
    """noise.npy rewritten to another valid array of the same size: guide fails that sample, not 'ok'."""
    run = copy_run(finished_run, tmp_path / "run")
    tar = run / "invert" / "invert-000000.tar"
    with tarfile.open(tar) as t:
        member = t.extractfile("digits-00000.noise.npy").read()
    arr = np.load(io.BytesIO(member))
    buf = io.BytesIO()
    np.save(buf, (arr * 3).astype(arr.dtype))
    _rewrite_member(tar, "digits-00000", "noise.npy", buf.getvalue())
    code, _, err = cli(capsys, "guide", "--config", DIGITS, "--out", str(run), "--overwrite")
    assert code == 0, err
    rows = {r["id"]: r for r in pq.read_table(run / "guide" / "_state" / "guide-000000.parquet").to_pylist()}
    assert rows["digits-00000"]["status"] == "failed"
    assert rows["digits-00000"]["error"] == "damaged input sample: its checksum differs from invert-000000.parquet"
    assert rows["digits-00001"]["status"] == "ok"


def test_run_over_a_damaged_finished_run_redoes_the_damaged_shard(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    tar = run / "pairs" / "pairs-000001.tar"
    with tarfile.open(tar) as t:
        key = t.getnames()[0].split(".")[0]
        cls = t.extractfile(f"{key}.cls").read()
    _rewrite_member(tar, key, "cls", b"9" if cls != b"9" else b"8")
    code, _, err = cli(capsys, "run", "--config", DIGITS, "--out", str(run))
    assert code == 0, err
    assert "pack: shard 1 is damaged (pairs-000001.tar differs from the checksum its marker recorded); redoing it" in err
    assert tree(run)["pairs/pairs-000001.tar"] == tree(finished_run)["pairs/pairs-000001.tar"]


def test_verify_compares_pairs_with_the_manifest(finished_run, tmp_path, capsys):
    """A label changed consistently in K.json and K.cls: the pair still parses, but it is not what was written."""
    run = copy_run(finished_run, tmp_path / "run")
    tar = run / "pairs" / "pairs-000000.tar"
    with tarfile.open(tar) as t:
        key = t.getnames()[0].split(".")[0]
        meta = json.loads(t.extractfile(f"{key}.json").read())
        cls = t.extractfile(f"{key}.cls").read()
        txt = t.extractfile(f"{key}.txt").read()
    new_label = (meta["label"] + 1) % 10 if meta["label"] + 1 != meta["cf_label"] else (meta["label"] + 2) % 10
    new_json = json.dumps({**meta, "label": new_label}).encode()
    if len(new_json) == len(json.dumps(meta).encode()) and len(str(new_label)) == len(cls):
        _rewrite_member(tar, key, "json", new_json)
        _rewrite_member(tar, key, "cls", str(new_label).encode())
    _rewrite_member(tar, key, "txt", txt.replace(b"digit", b"DIGIT"))
    code, out, _ = cli(capsys, "verify", str(run), sets=[])
    assert code == 1
    assert f"pairs-000000.tar: {key}: members differ from the checksum in manifest.parquet" in out
    assert f"pairs-000000.tar: {key}: txt: not the caption pack.caption makes of label_name" in out


def test_empty_input_is_an_error_and_stats_never_hold_nan(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "0").mkdir(parents=True)
    (root / "1").mkdir()
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"{c}\n" for c in range(10)))
    code, _, err = cli(capsys, "run", "--config", DIGITS, "--out", str(tmp_path / "run"), sets=_folder_sets(root, classes))
    assert code == 2 and one_error_line(err) == "cfgen: error: no input samples: data.source='folder' lists none"
    from cfgen.shards import atomic_write_json

    atomic_write_json(tmp_path / "s.json", {"mean": float("nan"), "x": [float("inf"), 1.0]})
    assert json.loads((tmp_path / "s.json").read_text()) == {"mean": None, "x": [None, 1.0]}


def test_links_out_of_the_root_and_stray_files_are_accounted_for(folder_data, tmp_path, capsys):
    root, classes = folder_data
    outside = tmp_path / "elsewhere.png"
    Image.new("L", (8, 8), 10).save(outside)
    (root / "0" / "link.png").symlink_to(outside)
    (root / "stray.png").write_bytes(outside.read_bytes())
    (root / "1" / "notes.txt").write_text("hello")
    run = tmp_path / "run"
    code, _, err = cli(capsys, "run", "--config", DIGITS, "--out", str(run),
                       sets=_folder_sets(root, classes) + ["pipeline.max_failure_fraction=0.5"])
    assert code == 0, err
    manifest = pq.read_table(run / "pairs" / "manifest.parquet").to_pylist()
    rows = {Path(r["origin"]).name: r for r in manifest}
    assert rows["link.png"]["error"] == "path escapes the dataset root (symbolic link)"
    assert rows["stray.png"]["error"] == "file directly under data.root, not in a class folder"
    assert rows["notes.txt"]["error"] == "not an image file (extension '.txt')"
    assert len(manifest) == 11 and sum(r["status"] == "ok" for r in manifest) == 8  # every file has its row
