"""guide.mode = 'text' (issue 13): do(concept = value) on captions through the concept graph, end to end.

Tiny models saved to a temporary directory and loaded back by path, as a user's would be: a random
UNet2DConditionModel on the real, frozen MiniLM's token states (text_encoder.json names it), a DDIM
scheduler and a noise-aware classifier, on the captioned shapes (`shapes-text`, whose renderer is the
oracle). What is checked is the contract and the bookkeeping of text pairs: keys, captions, the
recorded intervention and propagated edits, the concept columns, the exact round trip with no edit,
and the confinement of CSG edits; whether a trained model obeys the text is the benchmark's business.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import run_stages, tame, write_config
from test_runstate import one_error_line
from contract_spec import PAIR_FIELDS, PAIR_MEMBERS, has_type

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ["circle", "square", "triangle"]
COLOUR_OF = {"circle": "red", "square": "blue", "triangle": "yellow"}   # the shipped graph's mechanism


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from cfgen.models.classifier import NoiseAwareClassifier
    from cfgen.models.text import CaptionEncoder

    root = tmp_path_factory.mktemp("text_models")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=384,
                                attention_head_dim=4, norm_num_groups=8)
    tame(unet).save_pretrained(root / "unet")
    DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False).save_pretrained(root / "scheduler")
    CaptionEncoder().save(root)
    NoiseAwareClassifier(in_channels=3, num_classes=3, sample_size=16, channels=(8, 8),
                         groups=4).save_pretrained(root / "classifier")
    return root


def _config(models_dir: Path, tmp: Path, **sections):
    table = {
        "pipeline": {"name": "text"},
        "data": {"source": "shapes-text", "classes": str(ROOT / "manifests/shapes/classes.txt"), "image_size": 16,
                 "channels": 3, "shard_size": 3, "shapes_count": 40, "limit": 4},
        "model": {"device": "cpu", "unet": str(models_dir / "unet"), "scheduler": str(models_dir / "scheduler"),
                  "classifier": str(models_dir / "classifier")},
        "invert": {"steps": 4, "t_inv": 0.5, "batch_size": 4},
        "guide": {"mode": "text", "target": "all", "batch_size": 8},
        "text": {"intervene": ["shape", "environment"], "edit_scale": 2.0, "threshold": 0.5},
    }
    return write_config(tmp / "pipeline.toml", table, sections)


_run = run_stages


def _pairs(run_dir: Path) -> dict[str, dict]:
    import webdataset as wds

    urls = sorted(str(p) for p in (run_dir / "pairs").glob("pairs-*.tar"))
    out = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        members = {k for k in s if not k.startswith("__")}
        assert members == set(PAIR_MEMBERS), members
        out[s["__key__"]] = s
    return out


def _img(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def text_run(models_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text_run")
    cfg = _config(models_dir, tmp)
    return tmp / "run", _run(cfg, tmp / "run")


def test_every_intervention_is_a_pair_with_its_edited_caption_and_record(text_run):
    from cfgen.data.shapes_text import graph, state

    run_dir, stats = text_run
    pairs = _pairs(run_dir)
    # 4 images x (2 other shapes + 2 other environments)
    assert stats["pairs"] == len(pairs) == 16
    for key, s in pairs.items():
        meta = json.loads(s["json"])
        assert list(meta) == list(PAIR_FIELDS) and all(has_type(meta, k) for k in PAIR_FIELDS)
        fid = meta["factual_id"]
        before = state(int(fid.split("-")[1]))
        record = json.loads(meta["edits"])
        concept, value = record["target_concept_name"], record["new_value"]
        assert key == f"{fid}_do_{concept}_{value}" and meta["intervention"] == f"do({concept}={value})"
        after = dict(before, **{concept: value})
        if concept == "shape":  # the graph's edge: the colour follows the shape
            after["colour"] = COLOUR_OF[value]
            assert record["propagated_changes"] == [{"concept_name": "colour", "original_value": before["colour"],
                                                     "new_value": COLOUR_OF[value], "reason": "propagated from shape"}]
            assert meta["cf_label_name"] == value and meta["cf_label"] == SHAPES.index(value)
        else:
            assert record["propagated_changes"] == [] and meta["cf_label"] == meta["label"]
        assert record["final_concept_states"] == after
        assert s["txt"].decode() == graph().caption(before)
        assert s["cf.txt"].decode() == graph().caption(after)


def test_manifest_has_the_concept_checks_and_stats_their_rates(text_run):
    run_dir, stats = text_run
    rows = [r for r in pq.read_table(run_dir / "pairs" / "manifest.parquet").to_pylist() if r["status"] == "ok"]
    assert len(rows) == 16
    for r in rows:
        assert r["intervened_ok"] is not None and r["non_descendants_ok"] is not None and r["truth_l1"] is not None
        shape = json.loads(r["edits"])["target_concept_name"] == "shape"
        assert (r["descendants_ok"] is not None) == shape  # environment has no descendants
        assert r["caption"] and r["cf_caption"] and r["intervention"].startswith("do(")
    c = stats["concepts"]
    assert c["all"]["pairs"] == 16 and c["shape"]["pairs"] == c["environment"]["pairs"] == 8
    assert c["shape"]["intervened_rate"] == np.mean([r["intervened_ok"] for r in rows
                                                     if r["intervention"].startswith("do(shape")])


def test_pairs_say_what_happened_as_the_renderer_oracle_reads_it(text_run):
    """K.json and the manifest name the do()'s concept, the concept states before and after, whether the do()
    changes the class (only then can it flip: do(environment) keeps the class and is no flip, whatever the
    predictor says), and the renderer oracle's verdict, read back here from each stored counterfactual."""
    from cfgen.data.shapes_text import graph, read_concepts, state
    from cfgen.report.page import class_counts, headline

    run_dir, stats = text_run
    g = graph()
    rows = {r["id"]: r for r in pq.read_table(run_dir / "pairs" / "manifest.parquet").to_pylist()}
    verdicts = {"shape": [], "environment": []}
    for key, s in _pairs(run_dir).items():
        meta, row = json.loads(s["json"]), rows[key]
        record = json.loads(meta["edits"])
        concept, value = record["target_concept_name"], record["new_value"]
        before = state(int(meta["factual_id"].split("-")[1]))
        after = g.do(before, concept, value).after
        assert meta["concept"] == row["concept"] == concept
        assert meta["concepts_before"] == dict(row["concepts_before"]) == {c: before[c] for c in g.concepts}
        assert meta["concepts_after"] == dict(row["concepts_after"]) == {c: after[c] for c in g.concepts}
        assert meta["changes_class"] == row["changes_class"] == (concept == "shape") == (meta["cf_label"] != meta["label"])
        if concept == "environment":
            assert meta["flipped"] is False and row["flipped"] is False  # the class was never to change
        else:
            assert meta["class_kept"] is False
        read = read_concepts(_img(s["cf.png"]))  # the oracle, on the stored counterfactual
        oracle = {"intervened_ok": read[concept] == after[concept],
                  "descendants_ok": all(read[d] == after[d] for d in g.descendants(concept)) if concept == "shape" else None,
                  "non_descendants_ok": all(read[n] == before[n] for n in g.non_descendants(concept))}
        for k, v in oracle.items():
            assert meta[k] == row[k] == v, (key, k)
        verdicts[concept].append(meta["flipped"] if concept == "shape" else meta["class_kept"])
    assert len(verdicts["shape"]) == len(verdicts["environment"]) == 8
    assert stats["flip_rate"] == np.mean(verdicts["shape"]) and stats["class_changing_pairs"] == 8
    assert stats["class_kept_rate"] == np.mean(verdicts["environment"]) and stats["class_keeping_pairs"] == 8
    # the report counts flips over the class-changing pairs only, and says what the rest kept
    counts = class_counts(list(rows.values()), SHAPES)
    assert sum(c["flips"] for c in counts) == 8 and sum(c["written"] for c in counts) == 16
    figures = {name: value for name, value, _ in headline(stats, None, run_dir, text=True)}
    assert figures["flip rate, classifier"] == f"{stats['flip_rate']:.3f}"
    assert figures["class kept, classifier"] == f"{stats['class_kept_rate']:.3f}"


def test_report_of_a_text_run_counts_no_class_keeping_flip(text_run):
    from cfgen.report.page import write_report

    run_dir, _ = text_run
    page = write_report(run_dir).read_text()
    assert "<h2>Per intervention</h2>" in page and "(no flip asked)" in page and "do(environment=" in page
    assert "One pair per class pair and intervened concept" in page
    # a do(environment) card's true counterfactual is the scene under that do(), not the class's rendering
    from cfgen.config import load_config
    from cfgen.data.sources import open_source
    from cfgen.report.page import _images

    cfg = load_config(run_dir / "pairs" / "config.toml")
    causal = open_source(cfg).causal
    rows = [r for r in pq.read_table(run_dir / "pairs" / "manifest.parquet").to_pylist() if r["concept"] == "environment"]
    for r in rows[:2]:
        truth = _images(cfg, run_dir, [r])[r["id"]]["truth"]
        assert (truth == causal.intervene(r["origin"], "environment", dict(r["concepts_after"])["environment"])[0]).all()
        assert not (truth == causal.true_counterfactual(r["origin"], r["label"])).all()


def test_csg_edits_stay_inside_their_masks(text_run):
    """With CSG the image outside the union of the concept masks IS the factual one: no pixel outside
    the mask fraction can change (pixel model: the factual trajectory ends at the image itself)."""
    run_dir, _ = text_run
    rows = {r["id"]: r for r in pq.read_table(run_dir / "pairs" / "manifest.parquet").to_pylist()}
    for key, s in _pairs(run_dir).items():
        changed = (_img(s["png"]) != _img(s["cf.png"])).any(axis=2).mean()
        assert 0 < rows[key]["mask_fraction"] < 1
        assert changed <= rows[key]["mask_fraction"] + 1e-9


@pytest.mark.parametrize("preserve", [True, False])
def test_no_edit_gives_the_factual_image_back(models_dir, tmp_path, preserve):
    """Same caption, no edit (s_e = 0): with preserve the factual trajectory is kept, byte for byte; without,
    the reverse under the factual caption retraces the inversion (csg.py's r_i) up to float32 rounding,
    which the uint8 image hides (tests/test_csg.py: 1e-12 in float64)."""
    cfg = _config(models_dir, tmp_path, text={"intervene": ["size"], "edit_scale": 0.0, "preserve": preserve})
    stats = _run(cfg, tmp_path / "run")
    pairs = _pairs(tmp_path / "run")
    assert stats["pairs"] == len(pairs) == 4
    for s in pairs.values():
        diff = np.abs(_img(s["png"]).astype(int) - _img(s["cf.png"]).astype(int))
        assert diff.max() == 0 if preserve else diff.max() <= 1 and diff.mean() < 1e-3
        assert json.loads(s["json"])["recon_l1"] == 0.0


def test_counterfactual_edit_prompts_change_only_edits_of_more_than_one_concept(models_dir, tmp_path):
    """text.edit_prompt = 'counterfactual': every term's prompt is the whole edited caption. do(environment)
    changes one concept, whose term is that caption either way: byte for byte the same pairs. do(shape) also
    changes the colour: two terms, now one direction averaged over their masks, not two summed."""
    images = {}
    for prompt in ("concept", "counterfactual"):
        (tmp_path / prompt).mkdir()
        cfg = _config(models_dir, tmp_path / prompt, text={"intervene": ["shape", "environment"], "edit_scale": 2.0,
                                                           "threshold": 0.5, "edit_prompt": prompt})
        _run(cfg, tmp_path / prompt / "run")
        images[prompt] = {k: s["cf.png"] for k, s in _pairs(tmp_path / prompt / "run").items()}
    assert images["concept"].keys() == images["counterfactual"].keys()
    env = [k for k in images["concept"] if "_do_environment_" in k]
    shape = [k for k in images["concept"] if "_do_shape_" in k]
    assert len(env) == len(shape) == 8
    assert all(images["concept"][k] == images["counterfactual"][k] for k in env)
    assert any(images["concept"][k] != images["counterfactual"][k] for k in shape)


@pytest.fixture(scope="module")
def plain_run(models_dir, tmp_path_factory) -> Path:
    """Text without the graph and without CSG: the reverse under the edited caption alone (text.edit_scale
    is the config's 2.0, as in text_run)."""
    tmp = tmp_path_factory.mktemp("plain_run")
    _run(_config(models_dir, tmp, text={"intervene": ["shape"], "propagate": False, "csg": False}), tmp / "run")
    return tmp / "run"


def test_without_the_graph_only_the_intervened_words_change(plain_run):
    from cfgen.data.shapes_text import graph, state

    for s in _pairs(plain_run).values():
        meta = json.loads(s["json"])
        before = state(int(meta["factual_id"].split("-")[1]))
        record = json.loads(meta["edits"])
        assert record["propagated_changes"] == []
        assert s["cf.txt"].decode() == graph().caption(dict(before, shape=record["new_value"]))  # colour kept
    rows = pq.read_table(plain_run / "pairs" / "manifest.parquet").to_pylist()
    assert all(r["mask_fraction"] is None for r in rows)  # unmasked regeneration


def test_k_json_records_the_scale_each_edit_ran_at(models_dir, text_run, plain_run, tmp_path):
    """guidance_scale is the scale the edit ran at: text.edit_scale with CSG; without CSG the reverse
    follows the edited caption at 1.0 (e^ = eps(Y) + r_i + 1.0 * (eps(Y') - eps(Y))) whatever text.edit_scale
    says. Checked on what each mode makes of one image at two edit scales: without CSG the same pairs, each
    saying 1.0; with CSG other pairs, each saying its own scale."""
    from cfgen.contract import INVERT
    from cfgen.data.images import decode_image
    from cfgen.data.sources import list_samples, load_class_names
    from cfgen.models.loading import load_models
    from cfgen.shards import npy_load, read_rows, read_samples
    from cfgen.stages.common import config_grid
    from cfgen.stages.guide import open_mode

    for run_dir, scale in ((text_run[0], 2.0), (plain_run, 1.0)):  # both runs' text.edit_scale: 2.0
        assert {json.loads(s["json"])["guidance_scale"] for s in _pairs(run_dir).values()} == {scale}
        rows = pq.read_table(run_dir / "pairs" / "manifest.parquet").to_pylist()
        assert {r["guidance_scale"] for r in rows} == {scale}

    sample = next(iter(read_samples(INVERT.tar(plain_run, 0))))
    row = next(r for r in read_rows(INVERT.rows(plain_run, 0)) if r["id"] == sample["__key__"])
    factual = decode_image(sample["png"], 16, 3)[None]
    noise = npy_load(sample["noise.npy"])[None]
    made = {}
    for csg in (False, True):
        for edit_scale in (2.0, 7.0):
            (tmp_path / f"{csg}{edit_scale}").mkdir()
            cfg = _config(models_dir, tmp_path / f"{csg}{edit_scale}",
                          text={"intervene": ["shape"], "csg": csg, "edit_scale": edit_scale})
            models = made.get("models") or load_models(cfg)
            made["models"] = models
            mode = open_mode(cfg, load_class_names(cfg), list_samples(cfg))
            made[csg, edit_scale] = mode.batch(models, config_grid(cfg, models.num_train_timesteps), [row], factual,
                                               noise)
    for edit_scale in (2.0, 7.0):
        assert made[False, edit_scale].scale.tolist() == [1.0, 1.0]
        assert made[True, edit_scale].scale.tolist() == [edit_scale, edit_scale]
    assert np.array_equal(made[False, 2.0].cf, made[False, 7.0].cf)
    assert not np.array_equal(made[True, 2.0].cf, made[True, 7.0].cf)


def test_classifier_pairs_on_a_concept_source_record_do_label_and_get_concept_checks(models_dir, tmp_path):
    cfg = _config(models_dir, tmp_path, guide={"mode": "classifier", "target": "closest", "scale": 2.0,
                                               "escalation": [], "batch_size": 4})
    stats = _run(cfg, tmp_path / "run")
    for s in _pairs(tmp_path / "run").values():
        meta = json.loads(s["json"])
        assert meta["intervention"] == f"do(label={meta['cf_label_name']})"
        assert json.loads(meta["edits"])["propagated_changes"] == []
        assert s["txt"].decode() == f"a photo of the digit {meta['label_name']}."  # pack.caption, as before
    assert stats["concepts"]["shape"]["pairs"] == stats["pairs"] == 4  # judged as do(shape = y*)


def _cli(tmp_path: Path, cfg_path: Path, *sets: str):
    args = [sys.executable, "-m", "cfgen", "run", "--config", str(cfg_path), "--out", str(tmp_path / "run")]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_bad_graphs_and_concepts_are_one_line_errors_before_work(models_dir, tmp_path):
    _config(models_dir, tmp_path)
    cfg_path = tmp_path / "pipeline.toml"
    bad = tmp_path / "bad.json"
    bad.write_text('{"concepts": [{"id": "c1", "name": "shape"}], "relationships": [{"id": "r1", "cause_id": "c1", '
                   '"effect_id": "c9"}]}')
    out = _cli(tmp_path, cfg_path, f"text.graph={bad}")
    lines = [line for line in out.stderr.splitlines() if line.startswith("cfgen:")]
    assert out.returncode == 2 and len(lines) == 1 and str(bad) in lines[0], out.stderr
    assert not (tmp_path / "run" / "invert").exists()
    out = _cli(tmp_path, cfg_path, 'text.intervene=["weather"]')
    lines = [line for line in out.stderr.splitlines() if line.startswith("cfgen:")]
    assert out.returncode == 2 and len(lines) == 1 and "'weather'" in lines[0], out.stderr
    out = _cli(tmp_path, cfg_path, "guide.target=closest")
    assert out.returncode == 2 and "guide.target = 'all' or 'random'" in out.stderr
    out = _cli(tmp_path, cfg_path, "text.edit_prompt=both")
    lines = [line for line in out.stderr.splitlines() if line.startswith("cfgen:")]
    assert out.returncode == 2 and len(lines) == 1 and "text.edit_prompt" in lines[0], out.stderr
    assert not (tmp_path / "run" / "invert").exists()


def test_stable_diffusion_layout_runs_text_mode_with_no_code(tmp_path):
    """A Stable Diffusion layout (latent UNet2DConditionModel, VAE, CLIP text encoder and tokenizer) on disk:
    text mode needs only the config. CLIP's states attend to their padding (no zero rows), the latent
    path decodes the counterfactual, and the pairs keep the contract."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cfgen.data.shapes_text import graph
    from cfgen.models.classifier import NoiseAwareClassifier
    from cfgen.bench.random_models import bpe_tokenizer

    g = graph()
    words = sorted({w for c in g.concepts for phrase in g.domains[c].values() for w in phrase.split()} | {"on"})
    sd = tmp_path / "sd"
    torch.manual_seed(0)
    tokenizer = bpe_tokenizer(words, model_max_length=16)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4)
    tame(unet).save_pretrained(sd / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=4, layers_per_block=1, sample_size=16, scaling_factor=4.0).save_pretrained(sd / "vae")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                 bos_token_id=0, eos_token_id=1, pad_token_id=1)).save_pretrained(sd / "text_encoder")
    tokenizer.save_pretrained(sd / "tokenizer")
    DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False).save_pretrained(sd / "scheduler")
    NoiseAwareClassifier(in_channels=4, num_classes=3, sample_size=8, channels=(8, 8),
                         groups=4).save_pretrained(sd / "classifier")
    cfg = _config(tmp_path, tmp_path, model={"unet": str(sd / "unet"), "scheduler": str(sd / "scheduler"),
                                             "classifier": str(sd / "classifier")},
                  text={"intervene": ["shape"]})
    stats = _run(cfg, tmp_path / "run")
    pairs = _pairs(tmp_path / "run")
    assert stats["pairs"] == len(pairs) == 8 and stats["concepts"]["shape"]["pairs"] == 8
    for s in pairs.values():
        meta = json.loads(s["json"])
        assert list(meta) == list(PAIR_FIELDS) and _img(s["cf.png"]).shape == (16, 16, 3)
        assert s["cf.txt"].decode() == g.caption(json.loads(meta["edits"])["final_concept_states"])


# ------------------------------------------------------------------ trust (issue 25): graphs, resume, verify

def _graph_file(path: Path, caption: str | None = None, environments: dict | None = None) -> Path:
    """The shipped graph, with another caption template and/or environment domain."""
    from cfgen.data.shapes_text import graph_dict

    data = graph_dict()
    if caption is not None:
        data["cfgen"]["caption"] = caption
    if environments is not None:
        data["cfgen"]["domains"]["environment"] = environments
    path.write_text(json.dumps(data))
    return path


def _cli_here(capsys, *args: str) -> tuple[int, str, str]:
    """`cfgen args` in this process: (exit code, stdout, stderr)."""
    from test_runstate import cli

    return cli(capsys, *args, sets=[])


def test_resume_refuses_a_switch_from_a_custom_graph_back_to_the_default(models_dir, tmp_path, capsys):
    """A custom text.graph (its own caption template) then the default (text.graph = ""): guide's fingerprint
    records the graph only when it is set, and a key on one side only is a change, so the resume is refused."""
    custom = _graph_file(tmp_path / "custom.json", caption="{size} {colour} {shape} on {environment}")
    cfg = _config(models_dir, tmp_path, text={"intervene": ["shape"], "graph": str(custom)})
    run = tmp_path / "run"
    _run(cfg, run)
    before = sorted(p.name for p in (run / "guide").glob("*.tar"))
    for command in ("run", "guide"):
        code, _, err = _cli_here(capsys, command, "--config", str(tmp_path / "pipeline.toml"), "--out", str(run),
                                 "--set", "text.graph=")
        assert code == 2
        assert one_error_line(err) == (f"cfgen: error: guide: {run / 'guide'} was made with other settings: "
                                       "text.graph (set then, unset now). Re-run with --overwrite to redo this stage, "
                                       "or use another --out")
    assert sorted(p.name for p in (run / "guide").glob("*.tar")) == before


def test_verify_vouches_for_text_pairs_and_catches_captions_of_another_graph(text_run, tmp_path, capsys):
    """Text pairs are captioned by the concept graph, not pack.caption: a clean run verifies clean, and pairs
    whose captions another graph made (the config beside them names the default one) are named."""
    import shutil
    import tomllib

    import tomli_w

    run_dir, stats = text_run
    code, out, _ = _cli_here(capsys, "verify", str(run_dir))
    assert code == 0 and out.strip() == f"verified {stats['pairs']} samples: 0 problem(s)"
    mixed = tmp_path / "run"
    shutil.copytree(run_dir, mixed)
    config = mixed / "pairs" / "config.toml"
    resolved = tomllib.loads(config.read_text())
    other = _graph_file(tmp_path / "other.json", caption="{shape} {colour} {size} on {environment}")
    resolved["text"]["graph"] = str(other)
    config.write_text(tomli_w.dumps(resolved))
    code, out, _ = _cli_here(capsys, "verify", str(mixed))
    assert code == 1
    problems = out.strip().splitlines()[:-1]
    assert len(problems) == 2 * stats["pairs"]
    assert all(p.endswith(("txt: not the caption the concept graph makes of the state before the do()",
                           "cf.txt: not the caption the concept graph makes of final_concept_states"))
               for p in problems)


def test_a_graph_with_a_value_the_source_lacks_is_refused_before_work(models_dir, tmp_path, capsys):
    """An environment the renderer cannot draw: pack's oracle could never judge those pairs. Refused before
    invert, in one line; so is a graph without a value the source's samples have."""
    cfg_path = tmp_path / "pipeline.toml"
    _config(models_dir, tmp_path, text={"intervene": ["environment"]})
    envs = {"sand": "a sand background", "grass": "a grass background", "sky": "a sky background"}
    more = _graph_file(tmp_path / "more.json", environments={**envs, "lava": "a lava background"})
    code, _, err = _cli_here(capsys, "run", "--config", str(cfg_path), "--out", str(tmp_path / "run"),
                             "--set", f"text.graph={more}")
    assert code == 2
    assert one_error_line(err) == ("cfgen: error: the concept graph does not fit data.source 'shapes-text': "
                                   "environment = 'lava' is not a value the source knows (sand, grass, sky), so no "
                                   "pair that sets it could be judged")
    fewer = _graph_file(tmp_path / "fewer.json", environments={"sand": "a sand background"})
    code, _, err = _cli_here(capsys, "run", "--config", str(cfg_path), "--out", str(tmp_path / "run"),
                             "--set", f"text.graph={fewer}")
    assert code == 2 and "the concept graph does not fit data.source 'shapes-text': a sample's environment: " in err
    assert not (tmp_path / "run").exists()
