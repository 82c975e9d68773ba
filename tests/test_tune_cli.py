"""`cfgen tune` end to end on small pair shards written in the contract format, and the feature cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cfgen.shards import atomic_tar
from contract_spec import pair_json

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "pipelines" / "digits.toml")
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PER_CLASS = 5


def _png(pixels: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pair_shards(tmp_path_factory) -> Path:
    return write_pair_shards(tmp_path_factory.mktemp("pairs"))


def write_pair_shards(out: Path) -> Path:
    """Two shards in the pack contract: 5 real digits per class as factual images, a real digit
    of class y+1 as the counterfactual."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    picks = {c: np.flatnonzero(bunch.target == c)[:PER_CLASS + 1] for c in range(10)}
    samples = []
    for c in range(10):
        for j in range(PER_CLASS):
            i, ycf = int(picks[c][j]), (c + 1) % 10
            cf = int(picks[ycf][j + 1])
            meta = {"id": f"digits-{i:05d}", "label": c, "label_name": NAMES[c], "cf_label": ycf,
                    "cf_label_name": NAMES[ycf], "target_strategy": "closest", "guidance_scale": 2.0, "t_inv": 0.6,
                    "steps": 25, "seed": i, "p_cf": 0.99, "flipped": True, "l1": 0.1, "l2": 0.2, "recon_l1": 0.01}
            samples.append({"__key__": meta["id"], "png": _png(images[i]),
                            "txt": f"a photo of the digit {NAMES[c]}.".encode(), "cls": str(c).encode(),
                            "cf.png": _png(images[cf]), "cf.txt": f"a photo of the digit {NAMES[ycf]}.".encode(),
                            "cf.cls": str(ycf).encode(), "json": pair_json(meta)})
    out.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(0).permutation(len(samples))
    for shard, rows in enumerate(np.array_split(order, 2)):
        with atomic_tar(out / f"pairs-{shard:06d}.tar") as tar:
            for r in rows:
                tar.write(samples[r])
    return out


def cfgen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cfgen", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


SMALL = ["--set", "tune.shots=2", "--set", "tune.epochs=4", "--set", "tune.seeds=[1, 2]", "--set", "tune.eval_split="]


def test_tune_end_to_end_writes_metrics_prompts_and_reuses_the_cache(pair_shards, tmp_path):
    run = tmp_path / "run"
    spec = str(pair_shards / "pairs-{000000..000001}.tar")
    out = cfgen("tune", "--config", DIGITS, "--out", str(run), "--pairs", spec, *SMALL)
    assert out.returncode == 0, out.stderr
    assert "2 encoded" in out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "base-to-novel accuracy, mean ± std over seeds 1, 2"
    assert [line.split()[0] for line in lines[2:]] == ["zero_shot", "baseline", "dicap"]

    metrics = json.loads((run / "tune" / "metrics.json").read_text())
    assert set(metrics) == {"zero_shot", "baseline", "dicap"}
    for method in metrics.values():
        assert set(method) == {"base", "new", "hm"}
        for fig in method.values():
            assert set(fig) == {"mean", "std"}
            assert 0.0 <= fig["mean"] <= 1.0 and fig["std"] >= 0.0
    runs = json.loads((run / "tune" / "runs.json").read_text())
    assert runs["base"] == [0, 1, 2, 3, 4] and runs["novel"] == [5, 6, 7, 8, 9]
    for row in runs["runs"]:
        # 2 shots x 5 base classes; everything else is held out (25 base + 25 novel - 10)
        assert row["shots"] == 10 and row["eval_pairs"] == 40
        for method in ("baseline", "dicap"):
            b, n = row[method]["base"], row[method]["new"]
            assert row[method]["hm"] == pytest.approx(0.0 if b + n == 0 else 2 * b * n / (b + n))
            # accuracies are fractions of 15 base / 25 novel held-out pairs
            assert round(b * 15, 4) == round(b * 15) and round(n * 25, 4) == round(n * 25)
    hm_seeds = [row["dicap"]["hm"] for row in runs["runs"]]
    assert metrics["dicap"]["hm"]["mean"] == pytest.approx(np.mean(hm_seeds))
    assert metrics["dicap"]["hm"]["std"] == pytest.approx(np.std(hm_seeds, ddof=1))

    from safetensors import safe_open

    with safe_open(str(run / "tune" / "prompts" / "dicap-seed2.safetensors"), framework="pt") as fh:
        assert fh.get_tensor("ctx").shape == (4, 384)
        meta = fh.metadata()
    assert json.loads(meta["base_classes"]) == [0, 1, 2, 3, 4] and meta["learner"] == "coop"
    assert len(list((run / "tune" / "prompts").glob("*.safetensors"))) == 4
    assert len(list((run / "tune" / "cache").glob("*/*.safetensors"))) == 2

    from cfgen.config import load_config
    from cfgen.tune.train import run_tune

    logs: list[str] = []
    cfg = load_config(DIGITS, [a for a in SMALL if a != "--set"])
    assert run_tune(cfg, run, spec, log=logs.append) == metrics  # seeded: the same figures again
    assert "(2 cached, 0 encoded)" in logs[0]


def test_cocoop_with_the_cfvlm_objective_runs_and_reports_under_its_name(pair_shards, tmp_path):
    from cfgen.config import load_config
    from cfgen.tune.train import run_tune

    cfg = load_config(DIGITS, ["tune.eval_split=", "tune.shots=2", "tune.epochs=2", "tune.seeds=[1]",
                               "tune.learner=cocoop", "tune.objective=cfvlm"])
    metrics = run_tune(cfg, tmp_path / "run", str(pair_shards / "pairs-*.tar"), log=lambda _: None)
    assert set(metrics) == {"zero_shot", "baseline", "cfvlm"}
    assert all(0.0 <= m[k]["mean"] <= 1.0 for m in metrics.values() for k in ("base", "new", "hm"))
    runs = json.loads((tmp_path / "run" / "tune" / "runs.json").read_text())["runs"][0]
    assert set(runs["cfvlm"]) >= {"align", "csd", "fcd"} and set(runs["baseline"]) >= {"l1"}
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "run" / "tune" / "prompts" / "cfvlm-seed1.safetensors"))
    assert state["ctx"].shape == (4, 384) and state["meta_net.0.weight"].shape == (24, 384)
    assert state["meta_net.2.weight"].shape == (384, 24)


def test_feature_cache_matches_fresh_encoding_and_follows_the_shard(pair_shards, tmp_path):
    import shutil

    from cfgen.tune.backends import EmbeddedVLM
    from cfgen.tune.features import load_pair_features

    shard = tmp_path / "pairs-000000.tar"
    shutil.copy(pair_shards / "pairs-000000.tar", shard)
    vlm = EmbeddedVLM(ROOT / "models" / "digits" / "vlm")
    fresh = load_pair_features([shard], vlm, cache_dir=None)
    first = load_pair_features([shard], vlm, cache_dir=tmp_path / "cache")
    cached = load_pair_features([shard], vlm, cache_dir=tmp_path / "cache")
    assert (first.stats["cache_misses"], cached.stats["cache_hits"]) == (1, 1)
    assert torch.equal(cached.feat, fresh.feat) and torch.equal(cached.cf_feat, fresh.cf_feat)
    assert cached.ids == fresh.ids and torch.equal(cached.label, fresh.label)
    assert cached.names == {c: NAMES[c] for c in range(10)}
    import os

    st = shard.stat()  # a rewritten shard (new mtime) gets a new key; its stale entry is dropped
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = load_pair_features([shard], vlm, cache_dir=tmp_path / "cache")
    assert again.stats["cache_misses"] == 1
    assert len(list((tmp_path / "cache").glob("*/*.safetensors"))) == 1


def test_tune_user_error_is_one_line_and_exit_2(tmp_path):
    out = cfgen("tune", "--config", DIGITS, "--out", str(tmp_path / "run"), "--pairs", "/nonexistent/pairs-{000000..000001}.tar")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == ["cfgen: error: pair shard not found: /nonexistent/pairs-000000.tar (and 1 more)"]


@pytest.mark.parametrize("overrides, message", [
    (["tune.shots=9"], "tune.shots=9 but class 'zero' has only 5 training pairs"),
    (["tune.learner=maple"], "tune.learner: expected 'coop' or 'cocoop', got 'maple'"),
    (["tune.vlm=/nonexistent"], "tune.vlm: model directory not found: /nonexistent"),
    (["tune.n_ctx=3", "tune.shots=2"], "tune.ctx_init 'a photo of a' is 4 tokens for this text encoder but tune.n_ctx = 3"),
    (["tune.eval_split=test", "data.split="], "tune.eval_split='test' needs data.split"),
])
def test_tune_config_errors_name_the_key(pair_shards, tmp_path, overrides, message):
    from cfgen.config import load_config
    from cfgen.errors import UserError
    from cfgen.tune.train import run_tune

    with pytest.raises(UserError) as err:
        cfg = load_config(DIGITS, ["tune.eval_split="] + overrides)
        run_tune(cfg, tmp_path / "run", str(pair_shards / "pairs-*.tar"), log=lambda _: None)
    assert message in str(err.value)
