"""One line and exit 2 for every usage error, a message on interrupt (issue 12, the 'one-line errors promised')."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "pipelines" / "digits.toml")
FAST = ["--set", "data.limit=4", "--set", "invert.steps=5", "--set", "guide.escalation=[]"]


def cfgen(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cfgen", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kwargs)


def single_line(out: subprocess.CompletedProcess) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "cfgen: error: No such option: --bogus"),  # click may add "(Possible options: --verbose)"
    (["frobnicate"], "cfgen: error: No such command 'frobnicate'. (see `cfgen --help`)"),
    (["run"], "cfgen: error: Missing option '--config' / '-c'. (see `cfgen run --help`)"),
    (["run", "--config", DIGITS, "--frob"], "cfgen: error: No such option: --frob"),
])
def test_usage_errors_are_one_line_exit_2(args, message):
    out = cfgen(*args)
    assert out.returncode == 2
    assert single_line(out).startswith(message)
    if args == ["--bogus"]:
        assert single_line(out).endswith("(see `cfgen --help`)")


def test_version_and_bare_command():
    out = cfgen("--version")
    assert out.returncode == 0 and out.stdout.strip() == "cfgen 0.1.0" and out.stderr == ""
    bare = cfgen()
    assert bare.returncode == 2 and "Traceback" not in bare.stdout + bare.stderr and "invert" in bare.stdout


@pytest.mark.parametrize("override, message", [
    ("model.device=banana", "cfgen: error: model.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'banana'"),
    ("data.image_size=6", "cfgen: error: data.image_size=6 does not fit the UNet: the side it denoises (6) must be "
                          "a multiple of 4 (it was trained at 8)"),
    ("data.image_size=16", "cfgen: error: data: the digits source is 8x8 grayscale (image_size=8, channels=1)"),
])
def test_bad_values_are_one_line(tmp_path, override, message):
    out = cfgen("run", "--config", DIGITS, "--out", str(tmp_path / "run"), "--set", override)
    assert out.returncode == 2 and single_line(out) == message


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is here")
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    out = cfgen("run", "--config", DIGITS, "--out", str(tmp_path / "run"), "--set", "model.device=cuda")
    assert out.returncode == 2
    assert single_line(out) == "cfgen: error: model.device='cuda' but no CUDA GPU is available here (use 'auto' or 'cpu')"


def test_image_size_unlike_the_model_is_one_line(tmp_path):
    root = tmp_path / "data"
    from PIL import Image

    for c in "ab":
        (root / c).mkdir(parents=True)
        Image.new("L", (10, 10), 60).save(root / c / "x.png")
    (tmp_path / "classes.txt").write_text("a\nb\n")
    clf = tmp_path / "clf"
    from cfgen.models.classifier import NoiseAwareClassifier

    NoiseAwareClassifier(in_channels=1, num_classes=2, sample_size=10).save_pretrained(clf)
    out = cfgen("run", "--config", DIGITS, "--out", str(tmp_path / "run"), "--set", "data.source=folder",
                "--set", f"data.root={root}", "--set", f"data.classes={tmp_path / 'classes.txt'}", "--set", "data.split=", "--set", "tune.eval_split=",
                "--set", "data.image_size=10", "--set", f"model.classifier={clf}")
    assert out.returncode == 2
    assert single_line(out) == ("cfgen: error: data.image_size=10 does not fit the UNet: the side it denoises (10) "
                                "must be a multiple of 4 (it was trained at 8)")


@pytest.mark.parametrize("damage", ["garbage", "wrong_shape"])
def test_bad_safetensors_are_one_line(tmp_path, damage):
    unet = tmp_path / "unet"
    shutil.copytree(ROOT / "models" / "digits" / "unet", unet)
    weights = unet / "diffusion_pytorch_model.safetensors"
    if damage == "garbage":
        weights.write_bytes(os.urandom(4096))
    else:  # valid safetensors of another model: the shapes UNet
        shutil.copy(ROOT / "models" / "shapes" / "unet" / "diffusion_pytorch_model.safetensors", weights)
    out = cfgen("invert", "--config", DIGITS, "--out", str(tmp_path / "run"), "--set", f"model.unet={unet}", *FAST)
    assert out.returncode == 2
    assert single_line(out).startswith(f"cfgen: error: cannot load a UNet2DModel from {unet}: ")


def test_read_only_out_is_exit_2(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: a read-only directory cannot be made here")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    out = cfgen("run", "--config", DIGITS, "--out", str(ro / "run"), *FAST)
    assert out.returncode == 2 and "cannot write the run directory" in single_line(out)


def test_unwritable_out_is_exit_2(tmp_path):
    """An --out below a regular file cannot be created, whoever runs it."""
    (tmp_path / "file").write_text("x")
    out = cfgen("run", "--config", DIGITS, "--out", str(tmp_path / "file" / "run"), *FAST)
    assert out.returncode == 2
    assert single_line(out).startswith(f"cfgen: error: cannot write the run directory {tmp_path / 'file' / 'run'}")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_says_how_to_resume(tmp_path, sig, code):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "cfgen", "run", "--config", DIGITS, "--out", str(run), "--set", "data.limit=200",
            "--set", "invert.steps=10", "--set", "data.shard_size=20"]
    # Ctrl-C in a foreground shell: a suite started as a background job passes SIGINT on ignored, and cfgen
    # (rightly) keeps an ignored SIGINT ignored, so the child gets the default disposition back first
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not list((run / "invert" / "_state").glob("*_stats.json")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code
    assert err.strip().splitlines()[-1] == (f"cfgen: interrupted ({signal.Signals(sig).name}); finished shards are "
                                            "kept: re-run the same command to resume")
    assert not list(run.rglob("*.tmp"))
