"""Trust, second round (issue 25): what a hostile or careless user still got through, each case a test.

    item  test                                                                  (text mode: test_text_mode.py)
    1     test_resume_refuses_a_switch_from_a_custom_graph_back_to_the_default  (test_text_mode)
    2     test_verify_vouches_for_text_pairs_and_catches_captions_of_another_graph  (test_text_mode)
    3     test_refused_values_are_one_line_and_write_nothing[duplicate-concept]
    4     test_ids_that_collide_under_repeat_are_refused
    5     test_the_api_checks_an_edited_config_again
    6     test_a_second_launch_is_refused_on_every_rank
    7     test_a_graph_with_a_value_the_source_lacks_is_refused_before_work  (test_text_mode)
    8     test_refused_values_are_one_line_and_write_nothing[image-size, max-pixels-*]
    9     test_edited_rows_are_redone_or_refused
    10    test_a_refusal_inside_the_lock_leaves_no_run_directory
    11    test_the_api_takes_one_override_as_a_string
    12    test_the_judge_is_fitted_on_the_source_whatever_the_run_processed
    13    test_tune_text_longer_than_clip_holds_is_one_line  (test_tune_backends),
          test_train_prints_a_set_path_that_resolves_from_the_config,
          test_a_classifier_of_another_noise_schedule_is_refused
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from test_runstate import DIGITS, FAST, ROOT, cli, copy_run, one_error_line, tree

CLASSES = ROOT / "manifests" / "digits" / "classes.txt"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trust") / "run"
    from cfgen import api

    api.run(DIGITS, out=run, overrides=FAST)
    return run


# ------------------------------------------------------------------ refusals: one line, exit 2, nothing written

@pytest.mark.parametrize("override, message", [
    ('text.intervene=["shape", "shape"]',
     "cfgen: error: text.intervene: a concept is listed twice (['shape', 'shape']); each gives its own pairs once"),
    ("data.image_size=12000", "cfgen: error: data.image_size=12000 makes 144,000,000-pixel images, more than "
                              "data.max_image_pixels=89,478,485"),
    ("data.max_image_pixels=0", "cfgen: error: data.max_image_pixels must be >= 1, got 0"),
    ("data.max_image_pixels=-1", "cfgen: error: data.max_image_pixels must be >= 1, got -1"),
], ids=["duplicate-concept", "image-size", "max-pixels-0", "max-pixels-negative"])
def test_refused_values_are_one_line_and_write_nothing(tmp_path, capsys, override, message):
    run = tmp_path / "run"
    code, _, err = cli(capsys, "run", "--config", DIGITS, "--out", str(run), sets=FAST + [override])
    assert code == 2 and one_error_line(err) == message
    assert not run.exists()


def test_ids_that_collide_under_repeat_are_refused(tmp_path, capsys):
    """A manifest with ids `a` and `a-r1` and data.repeat = 2 would write two `a-r1` samples."""
    root = tmp_path / "data"
    root.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.full((8, 8), 40, dtype=np.uint8)).save(root / f"{name}.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path,label\na,a.png,zero\na-r1,b.png,one\n")
    run = tmp_path / "run"
    sets = ["data.source=manifest", f"data.root={root}", f"data.manifest={manifest}", f"data.classes={CLASSES}",
            "data.split=", "tune.eval_split=", "data.repeat=2", "invert.steps=5", "guide.escalation=[]"]
    code, _, err = cli(capsys, "run", "--config", DIGITS, "--out", str(run), sets=sets)
    assert code == 2
    assert one_error_line(err) == ("cfgen: error: data: two input samples have the id 'a-r1' (data.repeat=2 names "
                                   "the k-th copy of a sample <id>-r<k>, and an input already has that id); "
                                   "ids must be unique")
    assert not run.exists()


def test_a_refusal_inside_the_lock_leaves_no_run_directory(tmp_path, capsys):
    """Refused after the lock was taken (nothing to guide; a source that cannot give this image size): the
    folders the lock created are gone again, however deep."""
    run = tmp_path / "new" / "deeper" / "run"
    code, _, err = cli(capsys, "guide", "--config", DIGITS, "--out", str(run))
    assert code == 2 and "run `cfgen invert` first" in one_error_line(err)
    assert not (tmp_path / "new").exists()
    code, _, err = cli(capsys, "run", "--config", DIGITS, "--out", str(run), sets=FAST + ["data.image_size=16"])
    assert code == 2 and "the digits source is 8x8" in one_error_line(err)
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "mine"
    (existing / "notes").mkdir(parents=True)  # a directory the user made: left as it was, no lock file in it
    code, _, _ = cli(capsys, "guide", "--config", DIGITS, "--out", str(existing))
    assert code == 2 and sorted(p.name for p in existing.iterdir()) == ["notes"]


# ------------------------------------------------------------------ the Python API

def test_the_api_checks_an_edited_config_again(tmp_path):
    """A Config edited after load_config is checked at the stage function, before anything is written."""
    import cfgen
    from cfgen.errors import ConfigError

    for section, key, value, message in [("guide", "scale", float("nan"), "guide.scale must be a finite number"),
                                         ("guide", "mask", "banana", "guide.mask: expected 'off', 'x0' or"),
                                         ("data", "limit", -3, "data.limit must be >= 0"),
                                         ("text", "intervene", "shape", "text.intervene: expected a list")]:
        cfg = cfgen.load_config(DIGITS, FAST)
        setattr(getattr(cfg, section), key, value)
        for stage in (cfgen.run, cfgen.invert, cfgen.guide, cfgen.pack):
            with pytest.raises(ConfigError, match=message):
                stage(cfg, out=tmp_path / "run")
        with pytest.raises(ConfigError, match=message):
            cfgen.load_config(cfg)
    assert not (tmp_path / "run").exists()


def test_the_api_takes_one_override_as_a_string(tmp_path):
    import cfgen
    from cfgen.errors import ConfigError

    assert cfgen.load_config(DIGITS, "guide.scale=4").guide.scale == 4.0
    with pytest.raises(ConfigError, match="unknown config key 'guide.sclae'"):
        cfgen.run(DIGITS, out=tmp_path / "run", overrides="guide.sclae=4")
    with pytest.raises(ConfigError, match=r"overrides: expected a list of 'section.key=value' strings, got \[4\]"):
        cfgen.run(DIGITS, out=tmp_path / "run", overrides=[4])
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ the lock is the run directory's

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_second_launch_is_refused_on_every_rank(tmp_path):
    """A 2-process launch on a directory a 1-process run is writing (here: holding its lock): both ranks
    exit 2 with the one line, and neither writes anything there."""
    from cfgen.runstate import run_lock

    run = tmp_path / "run"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "cfgen", "run", "--config", DIGITS, "--out", str(run), *[a for s in FAST for a in ("--set", s)]]
    with run_lock(run):
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        written = sorted(p.name for p in run.iterdir())
    line = f"cfgen: error: another cfgen process is writing {run.resolve()}; wait for it to finish, or use another --out"
    assert out.returncode != 0  # the launcher's own report of failed ranks follows; no rank has a traceback
    assert out.stderr.count(line) == 2, out.stderr[-3000:]  # rank 0 and rank 1
    assert f'File "{ROOT / "cfgen"}' not in out.stderr and "exitcode  : 2" in out.stderr, out.stderr[-3000:]
    assert written == [".lock"]  # the holder's lock file alone
    assert not run.exists()  # the lock's holder here created it, and released it empty


# ------------------------------------------------------------------ the state files are covered

def _edit_rows(path: Path, column: str, value) -> None:
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[0][column] = value
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def test_edited_rows_are_redone_or_refused(finished_run, tmp_path, capsys):
    """An edited _state/pairs-*.parquet is not merged: `cfgen run` redoes that shard, saying so. An edited
    invert parquet, which `cfgen guide` alone would read, is refused before any work."""
    run = copy_run(finished_run, tmp_path / "run")
    _edit_rows(run / "pairs" / "_state" / "pairs-000000.parquet", "label_name", "nine")
    code, _, err = cli(capsys, "run", "--config", DIGITS, "--out", str(run))
    assert code == 0, err
    assert ("pack: shard 0 is damaged (pairs-000000.parquet differs from the checksum its marker recorded); "
            "redoing it") in err
    same = ["pairs/_state/pairs-000000.parquet", "pairs/pairs-000000.tar", "pairs/manifest.parquet"]
    assert [tree(run)[k] for k in same] == [tree(finished_run)[k] for k in same]
    _edit_rows(run / "invert" / "_state" / "invert-000001.parquet", "label", 3)
    before = tree(run)
    code, _, err = cli(capsys, "guide", "--config", DIGITS, "--out", str(run), "--overwrite")
    assert code == 2
    assert one_error_line(err) == ("cfgen: error: invert shard 1 was changed after it was finished "
                                   "(invert-000001.parquet differs from the checksum its marker recorded); "
                                   "re-run `cfgen invert` to redo it")
    assert tree(run) == before


# ------------------------------------------------------------------ the judge

def test_the_judge_is_fitted_on_the_source_whatever_the_run_processed(finished_run, tmp_path, capsys):
    """The same judge for a run and for a part of it: fitted on the digits' train split, checked on its test
    split, and both counts and the held-out accuracy are printed, written and shown by the report."""
    part = copy_run(finished_run, tmp_path / "part")
    for p in [*(part / "pairs").glob("pairs-000001*"), *(part / "pairs" / "_state").glob("pairs-000001*")]:
        p.unlink()
    results = []
    for run in (finished_run, part):
        code, out, err = cli(capsys, "evaluate", str(run), sets=[])
        assert code == 0, err
        results.append(json.loads((run / "evaluate" / "judge.json").read_text()))
        r = results[-1]
        assert (f"independent judge                       SVC(rbf) on the data source's images: fitted on "
                f"{r['judge_fit_images']} images, held-out accuracy {r['judge_heldout_accuracy']:.3f} on "
                f"{r['judge_heldout_images']}") in out
    full, half = results
    assert (full["pairs"], half["pairs"]) == (12, 6)
    splits = [line.split(",") for line in (ROOT / "manifests" / "digits" / "split.csv").read_text().split()[1:]]
    assert full["judge_fit_images"] == half["judge_fit_images"] == sum(s == "train" for _, s in splits)
    assert full["judge_heldout_images"] == half["judge_heldout_images"] == sum(s == "test" for _, s in splits)
    assert full["judge_heldout_accuracy"] == half["judge_heldout_accuracy"] > 0.9
    from cfgen.report.page import write_report

    text = write_report(finished_run).read_text(encoding="utf-8")
    assert f"data source images it was fitted on</td><td class='num'>{full['judge_fit_images']}</td>" in text
    assert (f"held-out accuracy (on {full['judge_heldout_images']} other source images)</td>"
            f"<td class='num'>{full['judge_heldout_accuracy']:.3f}</td>") in text


# ------------------------------------------------------------------ trained models: where they are, what they knew

def test_train_prints_a_set_path_that_resolves_from_the_config(tmp_path):
    """`--set` paths resolve against the config's folder: the hint names the model from there."""
    from cfgen.config import load_config, write_resolved

    config = write_resolved(load_config(DIGITS), tmp_path / "conf")
    work = tmp_path / "work"
    work.mkdir()
    out = subprocess.run([sys.executable, "-m", "cfgen", "train", "classifier", "--config", str(config),
                          "--out", "models/clf", "--set", "train.classifier.steps=2", "--set", "data.limit=60"],
                         capture_output=True, text=True, cwd=work, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    hint = out.stdout.strip().splitlines()[-1].split("--set model.classifier=")[1]
    assert load_config(config, [f"model.classifier={hint}"]).path(hint) == (work / "models" / "clf").resolve()
    assert (work / "models" / "clf" / "noise_schedule.json").is_file()


def test_a_classifier_of_another_noise_schedule_is_refused(tmp_path, capsys):
    """Trained under the digits' cosine schedule, guided with a linear one: refused in one line. The shipped
    classifiers carry no record (unknown) and still load; at t = 0 alone ('x0' gradient) any schedule will do."""
    from diffusers import DDIMScheduler

    from cfgen.config import load_config
    from cfgen.models.training import train_classifier

    clf = tmp_path / "clf"
    train_classifier(load_config(DIGITS, ["train.classifier.steps=2", "data.limit=60"]), clf)
    record = json.loads((clf / "noise_schedule.json").read_text())
    assert record["beta_schedule"] == "squaredcos_cap_v2" and record["num_train_timesteps"] == 1000
    DDIMScheduler(beta_schedule="linear", clip_sample=False).save_pretrained(tmp_path / "linear")
    run = tmp_path / "run"
    sets = FAST + [f"model.classifier={clf}", f"model.scheduler={tmp_path / 'linear'}"]
    code, _, err = cli(capsys, "run", "--config", DIGITS, "--out", str(run), sets=sets)
    assert code == 2
    assert one_error_line(err) == (f"cfgen: error: model.classifier {clf} was trained under another noise schedule "
                                   "than model.scheduler (trained under 'squaredcos_cap_v2' with 1000 steps, "
                                   "model.scheduler is 'linear' with 1000 steps); train one under this scheduler "
                                   "(`cfgen train classifier`)")
    assert not run.exists()
    from cfgen.models.loading import load_models

    assert load_models(load_config(DIGITS, FAST + [f"model.classifier={clf}"])).classifier is not None
    assert load_models(load_config(DIGITS, sets + ["model.gradient=x0"])).classifier is not None
    assert not (ROOT / "models" / "digits" / "classifier" / "noise_schedule.json").exists()
    shipped = load_config(DIGITS, FAST + [f"model.scheduler={tmp_path / 'linear'}"])
    assert load_models(shipped).classifier is not None
