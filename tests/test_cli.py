"""The command line: --help, and one clear line with exit code 2 for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "pipelines" / "digits.toml")


def cfgen(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cfgen", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300)


def test_help_lists_the_stages():
    out = cfgen("--help")
    assert out.returncode == 0
    for command in ("invert", "guide", "pack", "run", "train", "evaluate"):
        assert command in out.stdout
    sub = cfgen("guide", "--help")
    assert sub.returncode == 0 and "--set" in sub.stdout and "--out" in sub.stdout


def test_help_is_printed_once_and_its_placeholders_read():
    """Bare `cfgen` prints the help once (not twice); flags show no `<bool>`, --set says what it takes."""
    import os

    bare = cfgen()
    assert bare.returncode == 2 and bare.stdout.count("Usage: cfgen") == 1 and bare.stderr == ""
    env = {**os.environ, "COLUMNS": "200"}
    for args in (["run"], ["train", "classifier"], ["publish"]):
        out = subprocess.run([sys.executable, "-m", "cfgen", *args, "--help"], capture_output=True, text=True,
                             cwd=ROOT, timeout=300, env=env)
        assert out.returncode == 0 and "<bool>" not in out.stdout and "<list[str]>" not in out.stdout, out.stdout
    run_help = cfgen("run", "--help").stdout
    assert "SECTION.KEY=VALUE" in run_help and "--overwrite" in run_help


def test_train_takes_o_like_every_stage(tmp_path):
    out = cfgen("train", "classifier", "--config", DIGITS, "-o", str(tmp_path / "clf"), "--set",
                "train.classifier.steps=2", "--set", "train.classifier.batch_size=8")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "clf" / "config.json").is_file()


@pytest.mark.parametrize("args,default", [(["run"], "runs/<pipeline.name>"),
                                          (["train", "vlm"], "runs/<pipeline.name>/models/vlm"),
                                          (["train", "diffusion"], "runs/<pipeline.name>/models/diffusion")])
def test_help_says_where_out_goes_by_default(args, default):
    """Square brackets in a help text are rich markup: '[default: ...]' vanished, leaving 'Run directory .'."""
    import os

    out = subprocess.run([sys.executable, "-m", "cfgen", *args, "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300, env={**os.environ, "COLUMNS": "250"})
    assert out.returncode == 0 and f"(default: {default}" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["run", "--config", "does/not/exist.toml"], "config file not found"),
    (["run", "--config", DIGITS, "--set", "guide.scale=-1"], "guide.scale"),
    (["run", "--config", DIGITS, "--set", "guide.sclae=2"], "unknown config key 'guide.sclae'"),
    (["run", "--config", DIGITS, "--set", "invert.steps=ten"], "invert.steps: expected an integer"),
    (["run", "--config", DIGITS, "--set", "invert.t_inv=1.5"], "invert.t_inv"),
    (["run", "--config", DIGITS, "--set", "invert.batch_size=0"], "invert.batch_size"),
    (["run", "--config", DIGITS, "--set", "model.unet=/nonexistent/unet"], "model directory not found"),
    (["run", "--config", DIGITS, "--set", "guide.target=eleven"], "guide.target"),
    (["run", "--config", DIGITS, "--set", "data.source=folder", "--set", "data.root=/nonexistent"],
     "data.root is not a directory"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    out = cfgen(*args, "--out", str(tmp_path / "run"))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cfgen: error:") and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_guide_before_invert_says_what_to_do(tmp_path):
    out = cfgen("guide", "--config", DIGITS, "--out", str(tmp_path / "run"))
    assert out.returncode == 2 and "run `cfgen invert` first" in out.stderr


def test_invalid_toml_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[guide\nscale = 2\n")
    out = cfgen("invert", "--config", str(bad))
    assert out.returncode == 2 and "invalid TOML" in out.stderr


def test_run_writes_pairs_and_evaluate_reads_them(tmp_path):
    run_dir = tmp_path / "run"
    out = cfgen("run", "--config", DIGITS, "--out", str(run_dir), "--set", "data.limit=24",
                "--set", "guide.scale=3")
    assert out.returncode == 0, out.stderr
    assert "pairs: 24 of 24 inputs" in out.stdout
    # progress counts samples (24, one shard), and each stage closes with one line of counts, rate and time
    import re

    err = out.stderr.replace("\r", "\n")
    assert re.search(r"guide: +\d+%.*\| 24/24 \[.*(sample/s|s/sample)\]", err)  # tqdm inverts a rate below 1/s
    for stage in ("invert", "guide", "pack"):
        assert re.search(rf"^{stage}: 24 input samples in 1 shard\(s\) -> 24 ok, 0 failed; [\d.]+ samples/s, \d+ s$",
                         err, flags=re.M), err[-2000:]
    assert "Loading weights" not in err
    import tomllib

    resolved = tomllib.loads((run_dir / "pairs" / "config.toml").read_text())
    assert resolved["guide"]["scale"] == 3.0
    assert resolved["model"]["unet"] == str(ROOT / "models" / "digits" / "unet")
    ev = cfgen("evaluate", str(run_dir))
    assert ev.returncode == 0, ev.stderr
    assert "flip rate by the judge" in ev.stdout
    # the figures stay where `cfgen report` reads them, outside the pairs folder
    import json

    judge = json.loads((run_dir / "evaluate" / "judge.json").read_text())
    assert f"flip rate by the judge                  {judge['oracle_flip_rate']:.3f}" in ev.stdout
    assert judge["pairs"] == 24 and len(judge["manifest_sha256"]) == 64


def test_bench_prints_its_figures_and_a_consistent_json_last_line():
    """`cfgen bench` on a few digits: every figure present, the ratios are the ratios of the rates."""
    import json

    out = cfgen("bench", "--config", DIGITS, "--samples", "20", "--reference-samples", "2",
                "--set", "data.shard_size=8", "--set", "guide.batch_size=5", "--set", "invert.steps=5",
                "--set", "guide.escalation=[]")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    r = json.loads(lines[-1])
    assert r["samples"] == 20 and r["batch_size"] == 5 and r["steps"] == 5
    for key in ("pairs_per_s", "compute_pairs_per_s", "reference_pairs_per_s", "unet_tflops"):
        assert r[key] > 0
    assert r["efficiency"] == pytest.approx(r["pairs_per_s"] / r["compute_pairs_per_s"])
    assert r["speedup_vs_reference"] == pytest.approx(r["pairs_per_s"] / r["reference_pairs_per_s"])
    assert r["unet_mfu"] is None and r["guide_mfu"] is None  # no bf16 peak on a CPU
    # Work per pair without escalation, by hand: invert.steps = 5 -> 5 reverse steps down to t = 0. The
    # first step at u (UNet + differentiated predictor) is shared by the s = 0 reconstruction and the guided
    # pass, which then take 4 UNet evaluations each, the guided pass also 4 predictor gradients; the
    # predictor is also read without grad (closest target, p_cf).
    w = r["per_pair"]
    steps = w["reverse_steps"]
    assert steps == 5
    # The shipped digits config edits locally (guide.mask, start 0.5): the masked steps k = 2..4 read the
    # factual trajectory up to x[3] and e[3], 4 inversion steps.
    assert w["unet_evals"] == 1 + 2 * (steps - 1) + 4 and w["predictor_backwards"] == steps
    assert w["unet_evals_unmasked"] == 1 + 2 * (steps - 1)
    assert w["kept_pairs"] == 1.0 and w["unet_evals_per_kept_pair"] == w["unet_evals"]  # no pack gate on digits
    assert w["predictor_forwards"] > w["predictor_backwards"]
    assert w["vae_encodes"] == w["vae_decodes"] == 0           # a pixel model
    assert w["gflop"] > 0
    assert r["guide_tflops"] == pytest.approx(w["gflop"] * r["compute_pairs_per_s"] / 1e3)
    text = "\n".join(lines[:-1])
    assert "end to end" in text and "compute alone" in text and "speed-up vs reference" in text


def test_invert_loads_no_predictor(tmp_path):
    """Inversion never reads the predictor: a missing classifier does not stop it."""
    out = cfgen("invert", "--config", DIGITS, "--out", str(tmp_path / "run"), "--set", "data.limit=4",
                "--set", "model.classifier=/nonexistent/classifier")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "invert" / "_state" / "invert-000000_stats.json").is_file()


def test_run_loads_each_model_once(tmp_path, monkeypatch):
    """`cfgen run` loads the UNet and the predictor once and hands them to invert and guide."""
    import cfgen.models.loading as loading
    from cfgen.cli import app

    calls = {"unet": 0, "predictor": 0}
    real_unet, real_predictor = loading.load_unet, loading.load_predictor

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(loading, "load_unet", count("unet", real_unet))
    monkeypatch.setattr(loading, "load_predictor", count("predictor", real_predictor))
    app(["run", "--config", DIGITS, "--out", str(tmp_path / "run"), "--set", "data.limit=4",
         "--set", "invert.steps=5", "--set", "guide.escalation=[]"], standalone_mode=False)
    assert calls == {"unet": 1, "predictor": 1}
    assert (tmp_path / "run" / "pairs" / "manifest.parquet").is_file()


def test_train_writes_a_new_directory_never_the_shipped_models(tmp_path):
    """`cfgen train classifier` without --out: runs/<pipeline.name>/models/classifier under the working
    directory, a `--set` to use it, the shipped classifier untouched; a second run refuses to overwrite."""
    import os

    shipped = ROOT / "models" / "digits" / "classifier"
    before = {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()}
    cmd = [sys.executable, "-m", "cfgen", "train", "classifier", "--config", str(ROOT / "pipelines" / "digits.toml"),
           "--set", "train.classifier.steps=2", "--set", "train.classifier.batch_size=8"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    made = tmp_path / "runs" / "digits" / "models" / "classifier"
    assert (made / "metrics.json").is_file() and (made / "config.json").is_file()
    # a --set path is read against the config's folder (pipelines/), not the working directory
    assert f"--set model.classifier={made.resolve()}" in out.stdout
    assert {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()} == before
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
    assert again.returncode == 2 and "already holds a trained model" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_docker_run_script_mounts_a_byo_recipe_and_runs_as_the_caller(tmp_path):
    """docker/run.sh with a stand-in `docker` that prints its arguments: the mounts a recipe's ../weights and
    ../data need, the caller's uid:gid, shared memory, and accelerate's --multi_gpu passed through."""
    import os
    import stat

    fake = tmp_path / "bin" / "docker"
    fake.parent.mkdir()
    fake.write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    work = tmp_path / "work"
    (work / "pipelines").mkdir(parents=True)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "ENTRYPOINT": "accelerate"}
    out = subprocess.run(["bash", str(ROOT / "docker" / "run.sh"), "launch", "--multi_gpu", "--num_processes", "8",
                          "-m", "cfgen", "run", "--config", "pipelines/my.toml"],
                         capture_output=True, text=True, cwd=work, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    args = out.stdout.splitlines()
    assert args[:2] == ["run", "--rm"] and "--ipc=host" in args
    assert args[args.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"
    mounts = {args[i + 1] for i, a in enumerate(args) if a == "-v"}
    assert mounts == {f"{work}/{d}:/app/{d}" for d in ("runs", "weights", "data", "pipelines")}
    assert all((work / d).is_dir() for d in ("runs", "weights", "data"))
    i = args.index("--entrypoint")
    assert args[i + 1:i + 3] == ["accelerate", "cfgen:cuda"]
    assert args[i + 3:] == ["launch", "--multi_gpu", "--num_processes", "8", "-m", "cfgen", "run", "--config",
                            "pipelines/my.toml"]


def test_python_api_writes_the_same_shards_as_the_cli(tmp_path):
    """`cfgen.run(config, out=..., overrides=...)` is what `cfgen run --config ... --set ...` calls: the same
    bytes in every shard, the same stats; stage by stage gives them too; a bad override is a UserError."""
    import importlib
    import json

    api = importlib.import_module("cfgen")
    from cfgen.errors import UserError

    sets = ["data.limit=12", "data.shard_size=6", "invert.batch_size=6", "guide.batch_size=6", "guide.escalation=[4.0]"]
    cli = cfgen("run", "--config", DIGITS, "--out", str(tmp_path / "cli"), *[a for s in sets for a in ("--set", s)])
    assert cli.returncode == 0, cli.stderr
    stats = api.run(DIGITS, out=tmp_path / "api", overrides=sets)
    api.invert(DIGITS, out=tmp_path / "staged", overrides=sets)
    api.guide(DIGITS, out=tmp_path / "staged", overrides=sets)
    staged = api.pack(DIGITS, out=tmp_path / "staged", overrides=sets)
    for stage in ("invert", "guide", "pairs"):
        names = sorted(p.name for p in (tmp_path / "cli" / stage).glob("*.tar"))
        assert len(names) == 2
        for other in ("api", "staged"):
            assert sorted(p.name for p in (tmp_path / other / stage).glob("*.tar")) == names
            for n in names:
                assert (tmp_path / other / stage / n).read_bytes() == (tmp_path / "cli" / stage / n).read_bytes()
    on_disk = json.loads((tmp_path / "cli" / "pairs" / "stats.json").read_text())
    assert stats["pairs"] == staged["pairs"] == on_disk["pairs"] == 12 and stats["mean_l1"] == on_disk["mean_l1"]
    with pytest.raises(UserError, match="guide.sclae"):
        api.run(DIGITS, out=tmp_path / "bad", overrides=["guide.sclae=2"])
    assert api.load_config(DIGITS, ["guide.target=all"]).guide.target == "all"


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_bars_are_quiet_unless_verbose(tmp_path, verbose):
    """transformers' and diffusers' own progress bars ("Loading weights") and advice are off unless --verbose."""
    import os

    code = ("import sys; from cfgen.cli import app\n"
            "try:\n    app(standalone_mode=False, prog_name='cfgen', args=sys.argv[1:])\nexcept Exception:\n    pass\n"
            "import cfgen.models.loading, transformers, diffusers\n"
            "print(transformers.utils.logging.is_progress_bar_enabled(), diffusers.utils.logging.is_progress_bar_enabled())")
    args = (["--verbose"] if verbose else []) + ["verify", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY",
                                                             "DIFFUSERS_VERBOSITY")}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert out.stdout.strip().splitlines()[-1] == ("True True" if verbose else "False False"), out.stderr
