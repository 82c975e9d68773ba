"""`cfgen tune` end to end on small pair shards written in the contract format, each counterfactual
source, the lockstep training of a learner's rows, and the feature caches."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cfgen.shards import atomic_tar
from conftest import cfgen_here
from contract_spec import pair_json

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "pipelines" / "digits.toml")
SHAPES = str(ROOT / "pipelines" / "shapes.toml")
DIGITS_VLM = str(ROOT / "models" / "digits" / "vlm")
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SHAPE_NAMES = ["circle", "square", "triangle"]
PER_CLASS = 5


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(out: Path, rows: list[tuple[str, int, int, np.ndarray, np.ndarray]], names: list[str],
                 n_shards: int = 2, interventions: list[str] | None = None,
                 factual_ids: list[str] | None = None) -> Path:
    """Pair shards in the pack contract from (id, label, cf_label, factual, counterfactual) rows; each
    pair's K.json intervention is do(label=<cf class>) and its factual id its own id unless
    `interventions` / `factual_ids` give them."""
    samples = []
    for k, (sid, y, ycf, x, xcf) in enumerate(rows):
        meta = {"id": sid, "label": y, "label_name": names[y], "cf_label": ycf, "cf_label_name": names[ycf],
                "target_strategy": "closest", "guidance_scale": 2.0, "t_inv": 0.6, "steps": 25, "seed": 0,
                "p_cf": 0.99, "flipped": True, "l1": 0.1, "l2": 0.2, "recon_l1": 0.01,
                "factual_id": factual_ids[k] if factual_ids else sid,
                "intervention": interventions[k] if interventions else f"do(label={names[ycf]})",
                "edits": json.dumps({"target_concept_name": "label", "original_value": names[y],
                                     "new_value": names[ycf], "propagated_changes": [], "final_concept_states": {}})}
        samples.append({"__key__": sid, "png": _png(x), "txt": f"a photo of a {names[y]}.".encode(),
                        "cls": str(y).encode(), "cf.png": _png(xcf), "cf.txt": f"a photo of a {names[ycf]}.".encode(),
                        "cf.cls": str(ycf).encode(), "json": pair_json(meta)})
    out.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(0).permutation(len(samples))
    for shard, part in enumerate(np.array_split(order, n_shards)):
        with atomic_tar(out / f"pairs-{shard:06d}.tar") as tar:
            for r in part:
                tar.write(samples[r])
    return out


def write_pair_shards(out: Path) -> Path:
    """5 real digits per class as factual images, a real digit of class y+1 as the counterfactual."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, :, :, None]
    picks = {c: np.flatnonzero(bunch.target == c)[:PER_CLASS + 1] for c in range(10)}
    rows = []
    for c in range(10):
        for j in range(PER_CLASS):
            i, ycf = int(picks[c][j]), (c + 1) % 10
            rows.append((f"digits-{i:05d}", c, ycf, images[i], images[int(picks[ycf][j + 1])]))
    return write_shards(out, rows, NAMES)


@pytest.fixture(scope="module")
def pair_shards(tmp_path_factory) -> Path:
    return write_pair_shards(tmp_path_factory.mktemp("pairs"))


SHAPES_COUNT = 100  # 80 train + 20 test images (every fifth is test)


def write_shapes_pairs(out: Path) -> Path:
    """4 train-split shapes per base class (circle, square); the 'generated' counterfactual is the
    true one brightened by 12 grey levels (so generated != true), targets alternate over the other classes."""
    from cfgen.data import shapes

    rows, count = [], {0: 0, 1: 0}
    for i in range(SHAPES_COUNT):
        f = shapes.factors(i, 0.9)
        if f.split != "train" or f.label not in count or count[f.label] == 4:
            continue
        ycf = (f.label + 1 + count[f.label] % 2) % 3
        count[f.label] += 1
        truth = shapes.render(f, ycf, 16).astype(int)
        rows.append((shapes.sample_id(i), f.label, ycf, shapes.render(f, f.label, 16),
                     np.clip(truth + 12, 0, 255).astype(np.uint8)))
    return write_shards(out, rows, SHAPE_NAMES)


@pytest.fixture(scope="module")
def shapes_pairs(tmp_path_factory) -> Path:
    return write_shapes_pairs(tmp_path_factory.mktemp("shapes_pairs"))


@pytest.fixture(scope="module")
def vlm():
    from cfgen.tune.backends import EmbeddedVLM

    return EmbeddedVLM(Path(DIGITS_VLM))


@pytest.fixture
def one_thread():
    """As `cfgen tune` runs (train.cpu_threads): tiny text-encoder ops, one intra-op thread."""
    from cfgen.tune.train import cpu_threads

    with cpu_threads(torch.device("cpu")):
        yield


def cfgen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cfgen", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


DIGITS_SMALL = ["tune.shots=2", "tune.epochs=4", "tune.seeds=[1, 2]", "tune.eval_split=test",
                "tune.select.mode=fixed", "tune.workers=1"]
SHAPES_SMALL = [f"data.shapes_count={SHAPES_COUNT}", f"tune.vlm={DIGITS_VLM}", "tune.shots=2", "tune.epochs=2",
                "tune.seeds=[1, 2, 3]", "tune.select.mode=fixed", "tune.workers=1"]
FIGURES = ("worst_base", "worst_novel", "base", "novel", "hm", "worst_group")
ROW_KEYS = {"label", "learner", "objective", "cf_source", "kind", "baseline", *FIGURES, "delta", "seconds", "chosen"}
TABLE_HEAD = ["method", "worst", "base", "Δ", "worst", "base", "base", "novel", "worst", "novel", "HM", "Δ", "HM",
              "s/seed"]


def table_labels(stdout: str) -> list[str]:
    """The first word of each row of the printed table (between the column header and the gain summary)."""
    lines = stdout.strip().splitlines()
    rows = lines[3:]
    end = next((i for i, line in enumerate(rows) if line.startswith("share of the true")), len(rows))
    return [line.split()[0] for line in rows[:end]]
DELTA_KEYS = {"n", "mean", "sd", "t", "half_width", "low", "high"}


def test_tune_digits_end_to_end_writes_the_table_metrics_prompts_and_reuses_the_caches(pair_shards, tmp_path):
    run = tmp_path / "run"
    spec = str(pair_shards / "pairs-{000000..000001}.tar")
    overrides = DIGITS_SMALL + ['tune.cf_sources=["generated", "nearest"]']
    out = cfgen("tune", "--config", DIGITS, "--out", str(run), "--pairs", spec, *sets(*overrides))
    assert out.returncode == 0, out.stderr
    assert "(0 cached, 2 encoded)" in out.stderr and "360 evaluation images (encoded)" in out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("base-to-novel accuracy on the 'test' split (360 images, 10 (group, class) cells), "
                               "2 shots per base class; mean ± std over seeds 1, 2")
    assert lines[2].split() == TABLE_HEAD
    assert table_labels(out.stdout) == ["zero-shot", "CoOp", "CoOp+DiCap[generated]", "CoOp+DiCap[nearest]"]

    metrics = json.loads((run / "tune" / "metrics.json").read_text())
    assert set(metrics) == {"protocol", "order", "rows", "captured"}
    assert metrics["order"] == ["zero_shot", "coop", "coop+dicap[generated]", "coop+dicap[nearest]"]
    p = metrics["protocol"]
    assert (p["eval_split"], p["eval_images"], p["base"], p["novel"]) == ("test", 360, [0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    assert sorted(p["cells"]) == sorted(NAMES) and sum(p["cells"].values()) == 360  # no groups: one cell per class
    # 50 pairs, 8 of them test ids (never shots); hyper-parameters are fixed in advance and said so
    assert (p["pairs"], p["shot_pool"], p["shots"], p["seeds"]) == (50, 42, 2, [1, 2])
    assert p["selection"]["mode"] == "fixed" and p["selection"]["rule"].startswith("fixed in advance")
    assert (p["hyperparameters"]["lam"], p["hyperparameters"]["epochs"], p["hyperparameters"]["lr"]) == (1.0, 4, 0.002)
    for key, row in metrics["rows"].items():
        assert set(row) == ROW_KEYS
        for k in FIGURES:
            assert set(row[k]) == {"mean", "std"} and 0.0 <= row[k]["mean"] <= 1.0
        assert (row["delta"] is None) == (key in ("zero_shot", "coop"))
        # fixed mode: every seed's 'choice' is the config's own lr / epochs / lambda
        expected = [] if key == "zero_shot" else [{"lr": 0.002, "epochs": 4, "lam": 0.0 if key == "coop" else 1.0,
                                                   "criterion": 0.0}] * 2
        assert row["chosen"] == expected
    row = metrics["rows"]["coop+dicap[nearest]"]
    assert (row["learner"], row["objective"], row["cf_source"], row["baseline"]) == ("coop", "dicap", "nearest", "coop")
    assert set(row["delta"]) == set(FIGURES) and set(row["delta"]["hm"]) == DELTA_KEYS

    runs = json.loads((run / "tune" / "runs.json").read_text())
    splits = dict(line.split(",") for line in (ROOT / "manifests" / "digits" / "split.csv").read_text().split()[1:])
    for r in runs["runs"]:
        assert r["shots"] == 10 and r["eval_images"] == 360
        assert all(splits[i] == "train" for i in r["shot_ids"])  # shots never come from the evaluation split
        for key, m in r["methods"].items():
            assert m["worst_group"] == min(m["cells"].values())
            assert m["hm"] == pytest.approx(0.0 if m["base"] + m["novel"] == 0 else
                                            2 * m["base"] * m["novel"] / (m["base"] + m["novel"]))
            # base accuracy: a fraction of the 180 base-class test digits
            assert round(m["base"] * 180, 4) == round(m["base"] * 180)
    # nearest: a train-split digit of the target class (y + 1 here), never the shot itself
    from sklearn.datasets import load_digits

    label = {f"digits-{i:05d}": int(c) for i, c in enumerate(load_digits().target)}
    assert runs["nearest_counterfactuals"]
    for shot, real in runs["nearest_counterfactuals"].items():
        assert real != shot and splits[real] == "train" and label[real] == (label[shot] + 1) % 10

    from safetensors import safe_open

    with safe_open(str(run / "tune" / "prompts" / "coop-dicap-nearest-seed2.safetensors"), framework="pt") as fh:
        assert fh.get_tensor("ctx").shape == (4, 384)
        meta = fh.metadata()
    assert json.loads(meta["base_classes"]) == [0, 1, 2, 3, 4] and meta["learner"] == "coop"
    assert meta["cf_source"] == "nearest"
    assert len(list((run / "tune" / "prompts").glob("*.safetensors"))) == 6
    assert len(list((run / "tune" / "cache").glob("*/*.safetensors"))) == 2

    from cfgen.config import load_config
    from cfgen.tune.train import run_tune

    logs: list[str] = []
    again = run_tune(load_config(DIGITS, overrides), run, spec, log=logs.append)
    assert "(2 cached, 0 encoded)" in logs[0] and "360 evaluation images (cached)" in logs[0]
    assert "(encoded)" not in logs[0]  # the nearest-image pool too
    for key in metrics["order"]:  # seeded: the same figures again (the timings differ)
        for k in (*FIGURES, "delta"):
            assert again["rows"][key][k] == metrics["rows"][key][k]


def test_tune_shapes_every_cf_source_learner_and_objective(shapes_pairs, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    overrides = SHAPES_SMALL + ['tune.learners=["coop", "cocoop"]', 'tune.objectives=["dicap", "cfvlm"]',
                                'tune.cf_sources=["generated", "true", "nearest"]', "tune.rows=[]"]
    code, stdout, stderr = cfgen_here(monkeypatch, capsys, "tune", "--config", SHAPES, "--out", str(run), "--pairs",
                                      str(shapes_pairs / "pairs-*.tar"), *sets(*overrides))
    assert code == 0, stderr
    labels = table_labels(stdout)
    sources = ["generated", "true", "nearest"]
    assert labels == (["zero-shot", "CoOp"] + [f"CoOp+{o}[{s}]" for o in ("DiCap", "CF-VLM") for s in sources]
                      + ["CoCoOp"] + [f"CoCoOp+{o}[{s}]" for o in ("DiCap", "CF-VLM") for s in sources])
    metrics = json.loads((run / "tune" / "metrics.json").read_text())
    p = metrics["protocol"]
    assert (p["eval_split"], p["eval_images"], p["base"], p["novel"]) == ("test", 20, [0, 1], [2])
    assert all("/" in cell and cell.split("/")[0] in ("sand", "grass", "sky") for cell in p["cells"])
    assert len(metrics["rows"]) == 15 and set(metrics["order"]) == set(metrics["rows"])
    runs = json.loads((run / "tune" / "runs.json").read_text())["runs"]
    shots = {i for r in runs for i in r["shot_ids"]}  # 'true' renders each distinct shot of the seeds once
    assert f"true: {len(shots)} images (encoded)" in stderr
    for key, row in metrics["rows"].items():
        per_seed = [r["methods"][key] for r in runs]
        for m in per_seed:
            assert m["worst_group"] == min(m["cells"].values()) and len(m["cells"]) == len(p["cells"])
        if row["baseline"] is None:
            continue
        # the paired interval, by hand from the per-seed figures: t_{0.975, 2} = 4.302653
        d = np.array([m["worst_group"] for m in per_seed]) - np.array([r["methods"][row["baseline"]]["worst_group"]
                                                                       for r in runs])
        dw = row["delta"]["worst_group"]
        assert dw["n"] == 3 and dw["mean"] == pytest.approx(d.mean())
        assert dw["half_width"] == pytest.approx(4.302653 * d.std(ddof=1) / np.sqrt(3), abs=1e-6)
    from safetensors.torch import load_file

    state = load_file(str(run / "tune" / "prompts" / "cocoop-cfvlm-true-seed3.safetensors"))
    assert state["ctx"].shape == (4, 384) and state["meta_net.0.weight"].shape == (24, 384)
    assert set(runs[0]["methods"]["cocoop+cfvlm[true]"]) >= {"align", "csd", "fcd"}
    # the gain summary: one line per objective with generated, true and nearest rows, from the deltas
    captured = {(c["learner"], c["objective"]): c for c in metrics["captured"]}
    assert set(captured) == {(lr, o) for lr in ("coop", "cocoop") for o in ("dicap", "cfvlm")}
    c = captured[("coop", "dicap")]
    d_gen = metrics["rows"]["coop+dicap[generated]"]["delta"]["worst_base"]["mean"]
    d_true = metrics["rows"]["coop+dicap[true]"]["delta"]["worst_base"]["mean"]
    assert (c["delta_generated"], c["delta_true"]) == (d_gen, d_true)
    assert c["share"] == (pytest.approx(d_gen / d_true) if abs(d_true) > 1e-12 else None)
    near = [r["methods"]["coop+dicap[nearest]"]["worst_base"] for r in runs]
    gen = [r["methods"]["coop+dicap[generated]"]["worst_base"] for r in runs]
    assert c["generated_minus_nearest"]["mean"] == pytest.approx(np.mean(gen) - np.mean(near))
    assert set(runs[0]["methods"]["coop+dicap[generated]"]) >= {"l1", "l2"}


def test_true_and_nearest_counterfactual_features(shapes_pairs, tmp_path, vlm, one_thread):
    """'true' is the renderer's image of the shot's factors under y*; 'nearest' the closest real train
    image of class y* by cosine (checked against every candidate)."""
    from cfgen.config import load_config
    from cfgen.data import shapes
    from cfgen.data.sources import load_class_names, open_source, split_ids
    from cfgen.tune.cfsources import CounterfactualFeatures
    from cfgen.tune.features import encode_images, expand_urls, load_pair_features
    from cfgen.tune.losses import normalize

    cfg = load_config(SHAPES, SHAPES_SMALL)
    shards = expand_urls(str(shapes_pairs / "pairs-*.tar"))
    pairs = load_pair_features(shards, vlm, None)
    source = open_source(cfg)
    refs = source.samples(load_class_names(cfg))
    splits = split_ids(cfg)
    cfs = CounterfactualFeatures(cfg, pairs, vlm, source, refs, splits, shards, tmp_path / "cache")
    idx = np.array([0, 3, 5])
    cfs.prepare(["true", "nearest"], idx)
    truth = np.stack([shapes.render(shapes.factors(int(pairs.ids[i].split("-")[1]), 0.9), int(pairs.cf_label[i]), 16)
                      for i in idx])
    assert torch.allclose(cfs.get("true", idx), encode_images(vlm, truth), atol=1e-5)
    assert torch.equal(cfs.get("generated", idx), pairs.cf_feat[torch.from_numpy(idx)])
    assert not torch.allclose(cfs.get("generated", idx), cfs.get("true", idx), atol=1e-3)
    near = cfs.get("nearest", idx)
    for k, i in enumerate(idx):
        chosen = cfs.nearest_ids[int(i)]
        ref = next(r for r in refs if r.id == chosen)
        assert ref.label == int(pairs.cf_label[i]) and splits[chosen] == "train" and chosen != pairs.ids[i]
        cands = [r for r in refs if r.label == ref.label and splits[r.id] == "train" and r.id != pairs.ids[i]]
        feats = normalize(encode_images(vlm, np.stack([r.load() for r in cands])))
        best = cands[int((feats @ normalize(pairs.feat[i])).argmax())]
        assert best.id == chosen
        assert torch.allclose(near[k], encode_images(vlm, ref.load()[None])[0], atol=1e-5)


@pytest.mark.parametrize("kind", ["coop", "coop_csc", "cocoop", "adapter"])
def test_a_learners_rows_trained_in_lockstep_equal_separate_runs(kind, vlm, one_thread):
    """Same init, same batches, own gradients (and own learning rates): one encoder call for all rows
    changes nothing."""
    from cfgen.config import load_config
    from cfgen.tune.fit import RowRun, fit_rows
    from cfgen.tune.train import make_task, zero_shot_text

    t = load_config(DIGITS, ["tune.epochs=2", "tune.batch_size=4"]).tune
    task = make_task(NAMES[:4])  # base 0, 1; novel 2, 3
    zs = zero_shot_text(vlm, task, "a photo of a")
    gen = torch.Generator().manual_seed(0)
    feat, cf_a, cf_b = (torch.randn(6, 384, generator=gen) for _ in range(3))
    label, cf_label = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([1, 2, 3, 0, 2, 3])
    lr = 0.01 if kind == "adapter" else 0.002
    rows = [RowRun("dicap", 0.0, cf_a, lr), RowRun("dicap", 1.0, cf_b, lr), RowRun("cfvlm", 1.0, cf_a, lr),
            RowRun("augment", 1.0, cf_b, lr), RowRun("dicap_sym", 2.0, cf_a, 2 * lr)]
    together, infos, _ = fit_rows(vlm, task, kind, rows, feat, label, cf_label, t, 7, 2, zs)
    params = [torch.cat([p.detach().flatten() for p in learner.parameters()]) for learner in together]
    assert not torch.allclose(params[0], params[1])  # the objectives did differ
    for r, learner, info in zip(rows, together, infos):
        alone, info_alone, _ = fit_rows(vlm, task, kind, [r], feat, label, cf_label, t, 7, 2, zs)
        for a, b in zip(learner.parameters(), alone[0].parameters()):
            assert torch.allclose(a, b, atol=1e-5)
        assert info == pytest.approx(info_alone[0], abs=1e-5)


def test_true_source_without_a_causal_model_is_one_line_exit_2(pair_shards, tmp_path, monkeypatch, capsys):
    code, _, stderr = cfgen_here(monkeypatch, capsys, "tune", "--config", DIGITS, "--out", str(tmp_path / "run"),
                                 "--pairs", str(pair_shards / "pairs-*.tar"), *sets('tune.cf_sources=["generated", "true"]'))
    assert code == 2, stderr
    assert stderr.strip().splitlines() == [
        ("cfgen: error: tune.cf_sources 'true' needs a data source with a causal model; 'digits' has none "
         "(use 'generated' or 'nearest')")]


def test_feature_cache_matches_fresh_encoding_and_follows_the_shard(pair_shards, tmp_path, vlm):
    import os
    import shutil

    from cfgen.tune.features import load_pair_features

    shard = tmp_path / "pairs-000000.tar"
    shutil.copy(pair_shards / "pairs-000000.tar", shard)
    fresh = load_pair_features([shard], vlm, cache_dir=None)
    first = load_pair_features([shard], vlm, cache_dir=tmp_path / "cache")
    cached = load_pair_features([shard], vlm, cache_dir=tmp_path / "cache")
    assert (first.stats["cache_misses"], cached.stats["cache_hits"]) == (1, 1)
    assert torch.equal(cached.feat, fresh.feat) and torch.equal(cached.cf_feat, fresh.cf_feat)
    assert cached.ids == fresh.ids and torch.equal(cached.label, fresh.label)
    assert cached.names == {c: NAMES[c] for c in range(10)}
    st = shard.stat()  # a rewritten shard (new mtime) gets a new key; its stale entry is dropped
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = load_pair_features([shard], vlm, cache_dir=tmp_path / "cache")
    assert again.stats["cache_misses"] == 1
    assert len(list((tmp_path / "cache").glob("*/*.safetensors"))) == 1


def test_image_set_cache_key_follows_the_samples_and_the_pixels_not_the_stage_filters():
    from cfgen.config import load_config
    from cfgen.data.sources import load_class_names, open_source
    from cfgen.tune.features import refs_fingerprint

    def key(*overrides: str, n: int = 10) -> str:
        cfg = load_config(SHAPES, list(overrides))
        return refs_fingerprint(cfg, open_source(cfg).samples(load_class_names(cfg))[:n])

    base = key()
    assert key("data.limit=5", "data.use_split=train", "data.class_limit=3") == base  # which samples a stage runs
    assert key("data.shapes_spurious=0.5") != base  # other pixels / labels
    assert key(n=9) != base  # another sample list
    assert key("data.image_size=8") != base


def test_tune_user_error_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    code, _, stderr = cfgen_here(monkeypatch, capsys, "tune", "--config", DIGITS, "--out", str(tmp_path / "run"),
                                 "--pairs", "/nonexistent/pairs-{000000..000001}.tar")
    assert code == 2, stderr
    assert stderr.strip().splitlines() == ["cfgen: error: pair shard not found: /nonexistent/pairs-000000.tar (and 1 more)"]


@pytest.mark.parametrize("overrides, message", [
    (["tune.shots=4"], "tune.shots=4 but class 'one' has only 3 training pairs outside tune.eval_split='test'"),
    (['tune.learners=["maple"]'],
     "tune.learners[0]: expected 'coop', 'coop_csc', 'cocoop', 'linear' or 'adapter', got 'maple'"),
    (['tune.select.image_lam=[]'], "tune.select.image_lam: give one or more distinct finite numbers >= 0"),
    (['tune.select.mode=test'], "tune.select.mode: expected 'validation' or 'fixed', got 'test'"),
    (["tune.workers=-1"], "tune.workers must be >= 0"),
    (['tune.cf_sources=["none"]'], "tune.cf_sources[0]: expected 'generated', 'true' or 'nearest', got 'none'"),
    (['tune.objectives=["dicap", "dicap"]'], "tune.objectives: give one or more distinct values"),
    (['tune.rows=["cocoop+dicap[generated]"]'], "tune.rows: 'cocoop+dicap[generated]' is not one of tune.learners"),
    (["tune.vlm=/nonexistent"], "tune.vlm: model directory not found: /nonexistent"),
    (["tune.n_ctx=3", "tune.shots=2"], "tune.ctx_init 'a photo of a' is 4 tokens for this text encoder but tune.n_ctx = 3"),
    (["tune.eval_split=test", "data.split="], "tune.eval_split='test' needs data.split"),
    (["tune.eval_split=", 'tune.cf_sources=["nearest"]'], "tune.cf_sources 'nearest' needs tune.eval_split"),
])
def test_tune_config_errors_name_the_key(pair_shards, tmp_path, overrides, message):
    from cfgen.config import load_config
    from cfgen.errors import UserError
    from cfgen.tune.train import run_tune

    with pytest.raises(UserError) as err:
        cfg = load_config(DIGITS, overrides)
        run_tune(cfg, tmp_path / "run", str(pair_shards / "pairs-*.tar"), log=lambda _: None)
    assert message in str(err.value)


def test_the_replaced_single_learner_and_objective_keys_still_load():
    """The config.toml of runs made before tune.learners / tune.objectives."""
    from cfgen.config import load_config

    t = load_config(DIGITS, ["tune.learner=cocoop", "tune.objective=cfvlm"]).tune
    assert (t.learners, t.objectives) == (["cocoop"], ["cfvlm"])


def test_rows_are_zero_shot_then_per_learner_its_baseline_and_the_chosen_combinations():
    from cfgen.config import load_config
    from cfgen.tune.train import plan_methods

    t = load_config(SHAPES).tune  # the benchmark stand-in: the cf-source ablation on CoOp only
    assert [(m.key, m.label, m.baseline) for m in plan_methods(t)] == [
        ("zero_shot", "zero-shot", None), ("coop", "CoOp", None),
        ("coop+dicap[generated]", "CoOp+DiCap[generated]", "coop"), ("coop+dicap[true]", "CoOp+DiCap[true]", "coop"),
        ("coop+dicap[nearest]", "CoOp+DiCap[nearest]", "coop"),
        ("coop+cfvlm[generated]", "CoOp+CF-VLM[generated]", "coop"), ("coop+cfvlm[true]", "CoOp+CF-VLM[true]", "coop"),
        ("coop+cfvlm[nearest]", "CoOp+CF-VLM[nearest]", "coop"),
        ("cocoop", "CoCoOp", None), ("cocoop+dicap[generated]", "CoCoOp+DiCap[generated]", "cocoop"),
        ("cocoop+cfvlm[generated]", "CoCoOp+CF-VLM[generated]", "cocoop")]
    every = load_config(SHAPES, ["tune.rows=[]", 'tune.learners=["cocoop"]', 'tune.objectives=["cfvlm"]']).tune
    assert [m.key for m in plan_methods(every)] == ["zero_shot", "cocoop", "cocoop+cfvlm[generated]",
                                                     "cocoop+cfvlm[true]", "cocoop+cfvlm[nearest]"]
