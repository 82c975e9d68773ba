"""Cue-flip pairs (issue 28): the captioned shapes6 source and its graph, the invariance term, the
projection consumer, and `cfgen tune` end to end on cue flips."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cfgen.api import load_config
from cfgen.concepts import ConceptGraph
from cfgen.data import shapes, shapes_captioned
from cfgen.data.sources import list_samples, open_source
from cfgen.errors import ConfigError
from cfgen.tune.losses import augment_loss, invariance_loss
from cfgen.tune.project import Projected, choose_k, cue_directions, project_out
from cfgen.tune.select import Validation
from conftest import cfgen_here
from test_tune_cli import sets, table_labels, write_shards

ROOT = Path(__file__).resolve().parents[1]
SHAPES6 = str(ROOT / "pipelines" / "shapes6.toml")
SHAPES6_TEXT = str(ROOT / "pipelines" / "shapes6-text.toml")
SHAPES6_VLM = str(ROOT / "models" / "shapes6" / "vlm")
COUNT = 150  # 120 train + 30 test indices
FREE = ["data.shapes_count=300", "data.shapes_spurious=0.0"]  # ~7 train images per (environment, shape) cell


# -- the source and its graph ---------------------------------------------------------------------


def test_captioned_source_is_shapes6_pixel_for_pixel_with_a_state_and_caption():
    plain = list_samples(load_config(SHAPES6, [f"data.shapes_count={COUNT}"]))
    captioned = list_samples(load_config(SHAPES6, [f"data.shapes_count={COUNT}", "data.source=shapes-captioned"]))
    assert [(r.id, r.origin, r.label, r.group) for r in plain] == [(r.id, r.origin, r.label, r.group) for r in captioned]
    for a, b in zip(plain[:40], captioned[:40]):
        assert np.array_equal(a.load(), b.load())
        assert b.concepts == {"shape": shapes.SHAPES[b.label], "environment": b.group}
        assert b.caption == f"a {b.concepts['shape']} on a {b.group} background"


def test_the_renderer_oracle_reads_true_cue_flips_as_intervened_with_the_shape_kept():
    cfg = load_config(SHAPES6, [f"data.shapes_count={COUNT}", "data.source=shapes-captioned"])
    causal = open_source(cfg).causal
    for r in list_samples(cfg)[:30]:
        assert causal.read_concepts(r.load()) == r.concepts
        for env in ("sand", "teal"):
            image, iv = causal.intervene(r.origin, "environment", env)
            assert iv.after == {"shape": r.concepts["shape"], "environment": env}
            assert causal.read_concepts(image) == iv.after
            # the object's pixels are the factual's: only the background was repainted
            obj = shapes.coverage(r.label, shapes.from_config(cfg.data, shapes.index_of(r.origin)), 16) >= 1.0
            if env == r.concepts["environment"]:
                assert np.array_equal(image, r.load())
            else:
                assert np.array_equal(image[obj], r.load()[obj]) and not np.array_equal(image, r.load())


def test_the_graph_has_no_class_environment_edge_and_the_text_path_refuses_one(tmp_path):
    from cfgen.stages.text_guide import checked_graph

    g = shapes_captioned.graph(6)
    assert g.parents == {"shape": (), "environment": ()}
    assert g.do({"shape": "circle", "environment": "sand"}, "shape", "square").after["environment"] == "sand"
    cfg = load_config(SHAPES6_TEXT, [f"data.shapes_count={COUNT}"])
    refs = list_samples(cfg)
    assert checked_graph(cfg, refs).parents == g.parents  # the source's own graph passes
    bad = shapes_captioned.graph_dict(6)
    bad["relationships"] = [{"id": "r1", "cause_id": "c1", "effect_id": "c2", "description": "shape picks the scene"}]
    bad["cfgen"]["mechanisms"] = {"environment": {"parents": ["shape"], "table": dict(zip(shapes.SHAPES[:6],
                                                                                          shapes.ENVIRONMENT_NAMES))}}
    ConceptGraph.from_dict(bad)  # a well-formed graph ...
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    cfg = load_config(SHAPES6_TEXT, [f"data.shapes_count={COUNT}", f"text.graph={path}"])
    with pytest.raises(ConfigError, match="shape -> environment, which the source says is not there"):
        checked_graph(cfg, refs)  # ... that says what the source's data does not do


# -- the invariance term --------------------------------------------------------------------------


def test_invariance_term_against_a_hand_value():
    # two classes, scale 2: pair 0 is a cue flip (y_cf = y = 0), pair 1 a class flip (y = 1, y_cf = 0)
    cos = torch.tensor([[0.5, 0.1], [0.2, 0.4]])
    cos_cf = torch.tensor([[0.3, 0.3], [0.6, 0.1]])
    y, y_cf, valid = torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([True, True])
    # pair 0: p = softmax(1.0, 0.2) = (0.68997, 0.31003), q = (0.5, 0.5)
    p0 = 1 / (1 + math.exp(-0.8))
    kl = p0 * math.log(p0 / 0.5) + (1 - p0) * math.log((1 - p0) / 0.5)
    assert kl == pytest.approx(0.0740261, abs=1e-6)  # 0.68997 ln 1.37995 + 0.31003 ln 0.62005
    assert float(invariance_loss(cos, cos_cf, 2.0)[0]) == pytest.approx(kl, abs=1e-6)
    base, parts0 = augment_loss(cos, y, cos_cf, y_cf, valid, 2.0, lam=1.0)
    loss, parts = augment_loss(cos, y, cos_cf, y_cf, valid, 2.0, lam=1.0, invariance=0.5)
    assert parts["l_inv"] == pytest.approx(kl, abs=1e-6)  # the class flip (pair 1) is not in it
    assert float(loss) == pytest.approx(float(base) + 0.5 * kl, abs=1e-6)
    assert "l_inv" not in parts0
    # no cue flip in the batch: no term
    _, parts = augment_loss(cos, y, cos_cf, torch.tensor([1, 0]), valid, 2.0, lam=1.0, invariance=0.5)
    assert "l_inv" not in parts


# -- the projection -------------------------------------------------------------------------------


def test_projection_removes_a_known_direction_exactly():
    # features in R^3: the cue is the z axis; every pair moves along it by a different amount
    f = torch.tensor([[0.6, 0.0, 0.8], [0.0, 0.6, 0.8]])
    diffs = torch.tensor([[0.0, 0.0, -1.6], [0.0, 0.0, 0.4], [0.0, 0.0, 1.0]])
    u = cue_directions(diffs, 1)
    assert torch.allclose(u.abs(), torch.tensor([[0.0, 0.0, 1.0]]))
    assert torch.allclose(project_out(f, u), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    # zero-shot text vectors along x and y plus the cue: before, the cue decides; after, the shape does
    text = torch.tensor([[0.1, 0.0, 1.0], [0.0, 0.1, -1.0]])
    zero_shot = Projected(text, u[:0])
    cue_read = torch.tensor([[0.6, 0.0, 0.8], [0.6, 0.0, -0.8]])  # both class 0 by x, opposite cues
    assert torch.allclose(zero_shot.image_features(cue_read), cue_read)  # k = 0: zero-shot itself
    logits = lambda learner, x: learner.image_features(x) @ learner.class_features().t()  # noqa: E731
    assert logits(zero_shot, cue_read).argmax(1).tolist() == [0, 1]
    assert logits(Projected(text, u), cue_read).argmax(1).tolist() == [0, 0]
    # k chosen on held-out images: 1 direction is the first k that classifies them all
    val = Validation(feat=cue_read, label=torch.tensor([0, 0]), cf_feat=cue_read[:0], cf_label=torch.tensor([]).long(),
                     factual_ids=["a", "b"])
    k, scores = choose_k(diffs, [0, 1, 2], text, val, logits)
    assert (k, scores) == (1, {"k=0": 0.5, "k=1": 1.0, "k=2": 1.0})


# -- cfgen tune on cue flips ----------------------------------------------------------------------


def write_both_kinds(out: Path) -> tuple[Path, Path]:
    """Class flips (true class-flip renderings brightened by 12 grey levels) and cue flips (do(environment)
    of the next environment, brightened by 8; the odd-numbered images of each class also the one after) of
    6 train images per base class of a 300-image shapes6 with the class drawn independently of the
    environment (so that every (environment, shape) cell has real images for the nearest source)."""
    cfg = load_config(SHAPES6, [*FREE, "data.source=shapes-captioned"])
    causal = open_source(cfg).causal
    names = list(shapes.SHAPES[:6])
    class_rows, cue_rows, count = [], [], {0: 0, 1: 0, 2: 0}
    for r in list_samples(cfg, split="train"):
        if r.label not in count or count[r.label] == 6:
            continue
        count[r.label] += 1
        x = r.load()
        ycf = (r.label + 1) % 3
        flip = causal.true_counterfactual(r.origin, ycf).astype(int)
        class_rows.append((r.id, r.label, ycf, x, np.clip(flip + 12, 0, 255).astype(np.uint8)))
        for step in (1, 2) if count[r.label] % 2 else (1,):
            env = shapes.ENVIRONMENT_NAMES[(shapes.ENVIRONMENT_NAMES.index(r.group) + step) % 6]
            cue = causal.intervene(r.origin, "environment", env)[0].astype(int)
            cue_rows.append((f"{r.id}_do_environment_{env}", r.label, r.label, x,
                             np.clip(cue + 8, 0, 255).astype(np.uint8), f"do(environment={env})", r.id))
    return (write_shards(out / "class", class_rows, names),
            write_shards(out / "cue", [c[:5] for c in cue_rows], names, interventions=[c[5] for c in cue_rows],
                         factual_ids=[c[6] for c in cue_rows]))


def _cue_ids(cue_dir: Path) -> list[str]:
    from cfgen.shards import read_samples

    return [x["__key__"] for shard in sorted(cue_dir.glob("pairs-*.tar")) for x in read_samples(shard)]


def test_tune_end_to_end_on_cue_flips_every_source_kind_and_the_projection(tmp_path, monkeypatch, capsys):
    class_dir, cue_dir = write_both_kinds(tmp_path / "pairs")
    run = tmp_path / "run"
    overrides = [*FREE, "data.source=shapes-captioned", f"tune.vlm={SHAPES6_VLM}",
                 "tune.shots=3", "tune.seeds=[1, 2]", "tune.workers=1", 'tune.learners=["linear"]',
                 'tune.objectives=["augment"]', 'tune.cf_sources=["generated", "true", "nearest"]', "tune.rows=[]",
                 f"tune.cue_pairs={cue_dir}/pairs-*.tar", 'tune.kinds=["class", "cue", "both"]',
                 'tune.project=["generated", "true"]', "tune.select.image_lam=[1.0]", "tune.select.project_k=[0, 1, 2]"]
    code, stdout, stderr = cfgen_here(monkeypatch, capsys, "tune", "--config", SHAPES6, "--out", str(run), "--pairs",
                                      str(class_dir / "pairs-*.tar"), *sets(*overrides))
    assert code == 0, stderr
    sources = ["generated", "true", "nearest"]
    assert table_labels(stdout) == (["zero-shot", "Linear"] + [f"Linear+CF-aug[{s}]" for s in sources]
                                    + [f"Linear+CF-aug[{s}:{k}]" for k in ("cue", "both") for s in sources]
                                    + ["zero-shot+Project[generated:cue]", "zero-shot+Project[true:cue]"])
    metrics = json.loads((run / "tune" / "metrics.json").read_text())
    rows = metrics["rows"]
    assert rows["linear+augment[true:cue]"]["kind"] == "cue" and rows["linear+augment[true]"]["kind"] == "class"
    assert rows["zero_shot+project[true:cue]"]["baseline"] == "zero_shot"
    assert all(c["k"] in (0, 1, 2) for c in rows["zero_shot+project[true:cue]"]["chosen"])
    runs = json.loads((run / "tune" / "runs.json").read_text())
    shots = {i for r in runs["runs"] for i in r["shot_ids"]}
    # the do() of every cue flip of every shot's image, each rendered once (half of the images have two)
    per_image = Counter(key.split("_do_")[0] for key in _cue_ids(cue_dir))
    assert max(per_image.values()) == 2
    assert runs["cf_sources"]["true (cue flips)"]["images"] == sum(per_image[i] for i in shots)
    cue_run = runs["runs"][0]["methods"]["linear+augment[generated:cue]"]
    assert cue_run["l_inv"] >= 0 and "l_inv" not in runs["runs"][0]["methods"]["linear+augment[generated]"]
    assert {c["label"] for c in metrics["captured"]} >= {"Linear+CF-aug", "Linear+CF-aug[cue]", "Linear+CF-aug[both]",
                                                         "zero-shot+Project[cue]"}
    from safetensors.torch import load_file

    u = load_file(str(run / "tune" / "heads" / "zero_shot-project-true-cue-seed1.safetensors"))["directions"]
    k = rows["zero_shot+project[true:cue]"]["chosen"][0]["k"]
    assert u.shape[0] == k and (k == 0 or torch.allclose(u @ u.t(), torch.eye(k), atol=1e-5))


def test_cue_flip_features_of_each_source(tmp_path):
    from cfgen.tune.backends import EmbeddedVLM
    from cfgen.tune.cueflips import CueFlips
    from cfgen.tune.features import encode_images, expand_urls, load_pair_features

    class_dir, cue_dir = write_both_kinds(tmp_path / "pairs")
    cfg = load_config(SHAPES6, [*FREE, "data.source=shapes-captioned", "tune.eval_split=test"])
    vlm = EmbeddedVLM(Path(SHAPES6_VLM))
    pairs = load_pair_features(expand_urls(str(class_dir / "pairs-*.tar")), vlm, None)
    cue = load_pair_features(expand_urls(str(cue_dir / "pairs-*.tar")), vlm, None)
    source = open_source(cfg)
    refs = source.samples(list(shapes.SHAPES[:6]))
    splits = {r.id: shapes.split_of(shapes.index_of(r.origin)) for r in refs}
    flips = CueFlips(cfg, pairs, cue, vlm, source, refs, splits, expand_urls(str(cue_dir / "pairs-*.tar")), None)
    idx = np.arange(len(pairs.ids))
    flips.prepare(["true", "nearest"], idx)
    pos, gen, ok = flips.get("generated", idx)
    assert bool(ok.all()) and len(pos) == 27 and np.bincount(pos).tolist().count(2) == 9  # 9 images with two
    _, true, _ = flips.get("true", idx)
    _, near, _ = flips.get("nearest", idx)
    rows = flips.expand(idx)[1]
    for k in (0, 1, 5):
        r = rows[k]
        assert cue.factual_ids[r] == pairs.factual_ids[pos[k]]
        concept, value = cue.do_of(r)
        origin = next(x.origin for x in refs if x.id == pairs.factual_ids[pos[k]])
        image = source.causal.intervene(origin, concept, value)[0]
        assert torch.allclose(true[k], encode_images(vlm, image[None])[0], atol=1e-5)
        assert torch.equal(gen[k], cue.cf_feat[r]) and not torch.allclose(gen[k], true[k])
        # nearest: a real image of the same class with the do()'s environment, outside the test split
        y = int(pairs.label[pos[k]])
        cands = [x for x in refs if x.label == y and x.group == value and splits[x.id] != "test"
                 and x.id != pairs.factual_ids[pos[k]]]
        feats = encode_images(vlm, np.stack([x.load() for x in cands]))
        sims = torch.nn.functional.normalize(feats, dim=1) @ torch.nn.functional.normalize(pairs.feat[pos[k]], dim=0)
        assert torch.allclose(near[k], feats[int(sims.argmax())], atol=1e-5)


# -- the shipped cue-flip generator ----------------------------------------------------------------


def test_shipped_cue_flips_move_the_tint_as_far_as_the_true_do(tmp_path, monkeypatch, capsys):
    """pipelines/shapes6-text.toml with models/shapes6-text on 6 pool images, each in every other
    environment, gates on as make benchmark runs it: the oracle reads the asked environment and (all but at
    most one pair) the same shape, and along the line from the
    factual background's mean colour to the renderer's true do(environment)'s, the generated background
    goes about as far (text.edit_scale 2.0 went 1.20x-1.54x, 1.33x on average, every pair past it)."""
    run = tmp_path / "run"
    code, _, stderr = cfgen_here(monkeypatch, capsys, "run", "--config", SHAPES6_TEXT, "--out", str(run), *sets(
        f"data.shapes_count={COUNT}", "data.use_split=train", 'data.only_classes=["circle", "square", "triangle"]',
        "data.class_limit=2", "pack.require_flip=true"))
    assert code == 0, stderr
    cfg = load_config(SHAPES6_TEXT, [f"data.shapes_count={COUNT}"])
    causal = open_source(cfg).causal
    import io
    import tarfile

    from PIL import Image

    members: dict[str, dict[str, bytes]] = {}
    for path in sorted((run / "pairs").glob("pairs-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    assert 6 * 5 - 2 <= len(members) <= 6 * 5  # every other of the six environments (the gate may reject some)
    ratios, truth_l1, read = [], [], []
    for key, m in members.items():
        meta = json.loads(m["json"])
        origin = shapes.origin(int(meta["factual_id"].split("-")[1]))
        fact, cf = (np.asarray(Image.open(io.BytesIO(m[e]))).astype(float) / 255 for e in ("png", "cf.png"))
        true, iv = causal.intervene(origin, "environment", meta["concepts_after"]["environment"])
        true = true.astype(float) / 255
        read.append(causal.read_concepts((cf * 255).round().astype(np.uint8)))
        assert read[-1]["environment"] == iv.after["environment"]
        f = shapes.from_config(cfg.data, shapes.index_of(origin))
        bg = shapes.coverage(f.label, f, 16) == 0
        moved, wanted = (cf - fact)[bg].mean(0), (true - fact)[bg].mean(0)
        ratios.append(float(moved @ wanted / (wanted @ wanted)))
        truth_l1.append(np.abs(cf - true).mean())
    assert sum(r["shape"] != json.loads(m["json"])["label_name"] for r, m in zip(read, members.values())) <= 1
    assert 0.85 <= np.mean(ratios) <= 1.1 and 0.7 <= min(ratios) and max(ratios) <= 1.3, ratios
    assert np.mean(truth_l1) < 0.04  # 0.060 at edit scale 2.0
