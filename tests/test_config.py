"""Tests for cfgen.config: TOML loading, --set overrides, path resolution, validation."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from cfgen.config import Config, ConfigError, load_config, to_dict, write_resolved

REPO = Path(__file__).resolve().parents[1]
DIGITS_TOML = REPO / "pipelines" / "digits.toml"


def test_load_digits_toml_values():
    cfg = load_config(DIGITS_TOML)
    assert isinstance(cfg, Config)
    assert cfg.pipeline.name == "digits"
    assert cfg.pipeline.seed == 0
    assert cfg.data.source == "digits"
    assert cfg.data.image_size == 8
    assert cfg.data.channels == 1
    assert cfg.data.shard_size == 512
    assert cfg.invert.steps == 25
    assert cfg.invert.t_inv == 0.6
    assert cfg.guide.target == "closest"
    assert cfg.guide.scale == 4.0
    assert cfg.guide.escalation == [12.0, 32.0, 64.0]
    assert (cfg.guide.mask, cfg.guide.mask_threshold, cfg.guide.mask_dilation, cfg.guide.mask_start) == ("x0", 0.4, 1, 0.5)
    assert cfg.pack.require_flip is False
    assert cfg.train.diffusion.block_out_channels == [32, 64, 64]
    assert cfg.train.diffusion.lr == pytest.approx(2e-4)
    assert cfg.train.classifier.steps == 3000
    # Not in the file: stays at the dataclass default.
    assert cfg.train.classifier.test_fraction == 0.2
    assert cfg.base_dir == DIGITS_TOML.parent


def test_no_file_gives_defaults():
    cfg = load_config(None)
    assert cfg.data.source == "digits"
    assert cfg.guide.escalation == [4.0, 8.0, 16.0]
    assert cfg.base_dir == Path(".")


def test_overrides_are_typed():
    cfg = load_config(DIGITS_TOML, ["guide.scale=6", "guide.escalation=[1.0, 2.0]", "guide.target=seven"])
    assert cfg.guide.scale == 6.0
    assert type(cfg.guide.scale) is float
    assert cfg.guide.escalation == [1.0, 2.0]
    assert all(type(s) is float for s in cfg.guide.escalation)
    assert cfg.guide.target == "seven"
    # Untouched keys keep the TOML values.
    assert cfg.invert.t_inv == 0.6


def test_override_more_types():
    cfg = load_config(DIGITS_TOML, [
        "pack.require_flip=true",
        "data.limit=10",
        "guide.target=7",          # an int literal becomes the string '7'
        'pack.caption="digit {label_name}"',
        "train.classifier.test_fraction=0.25",
        "guide.escalation=[3, 5]",  # ints in a float list become floats
    ])
    assert cfg.pack.require_flip is True
    assert cfg.data.limit == 10
    assert cfg.guide.target == "7"
    assert cfg.pack.caption == "digit {label_name}"
    assert cfg.train.classifier.test_fraction == 0.25
    assert cfg.guide.escalation == [3.0, 5.0]


def test_later_override_wins():
    cfg = load_config(DIGITS_TOML, ["guide.scale=3", "guide.scale=5"])
    assert cfg.guide.scale == 5.0


def test_relative_paths_resolve_against_toml_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # cwd must not matter
    cfg = load_config(DIGITS_TOML)
    assert cfg.path(cfg.data.classes) == REPO / "manifests" / "digits" / "classes.txt"
    assert cfg.path(cfg.data.split) == REPO / "manifests" / "digits" / "split.csv"
    assert cfg.path(cfg.model.unet) == REPO / "models" / "digits" / "unet"
    assert cfg.path(cfg.data.classes).is_file()


def test_relative_paths_in_own_toml(tmp_path, monkeypatch):
    sub = tmp_path / "conf"
    sub.mkdir()
    toml = sub / "p.toml"
    toml.write_text('[data]\nsource = "folder"\nroot = "images"\nclasses = "../lists/c.txt"\n')
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    cfg = load_config(toml)
    assert cfg.path(cfg.data.root) == sub / "images"
    assert cfg.path(cfg.data.classes) == tmp_path / "lists" / "c.txt"
    # Absolute paths are left alone.
    assert cfg.path(str(tmp_path / "x")) == tmp_path / "x"


def _error_for(overrides):
    with pytest.raises(ConfigError) as info:
        load_config(DIGITS_TOML, overrides)
    return str(info.value)


@pytest.mark.parametrize("override, key", [
    ("guide.scale=-1", "guide.scale"),
    ("invert.t_inv=1.5", "invert.t_inv"),
    ("invert.t_inv=0", "invert.t_inv"),
    ("invert.batch_size=0", "invert.batch_size"),
    ("data.shard_size=0", "data.shard_size"),
    ("data.channels=2", "data.channels"),
    ("data.limit=-1", "data.limit"),
    ("guide.escalation=[1.0, -2.0]", "guide.escalation"),
    ("guide.scale=nan", "guide.scale"),
])
def test_out_of_range_values_raise(override, key):
    assert key in _error_for([override])


@pytest.mark.parametrize("override, key", [
    ("guide.scale=abc", "guide.scale"),
    ("invert.batch_size=2.5", "invert.batch_size"),
    ("data.shard_size=true", "data.shard_size"),
    ("pack.require_flip=1", "pack.require_flip"),
    ("guide.escalation=4.0", "guide.escalation"),
    ("guide.escalation=[1.0, \"x\"]", "guide.escalation[1]"),
    ("train.diffusion=5", "train.diffusion"),
])
def test_wrong_type_raises(override, key):
    assert key in _error_for([override])


@pytest.mark.parametrize("override, key", [
    ("guide.scael=3", "guide.scael"),
    ("nosuch.key=1", "nosuch"),
    ("train.diffusion.nope=1", "train.diffusion.nope"),
])
def test_unknown_key_raises(override, key):
    msg = _error_for([override])
    assert "unknown config key" in msg
    assert key in msg


def test_unknown_key_in_toml_file(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("[guide]\nscale = 2.0\nspeed = 3\n")
    with pytest.raises(ConfigError, match="guide.speed"):
        load_config(toml)


def test_wrong_type_in_toml_file(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text('[invert]\nsteps = "many"\n')
    with pytest.raises(ConfigError, match="invert.steps"):
        load_config(toml)


@pytest.mark.parametrize("text", ["guidescale=3", "guide.scale", "guide.=3", "=3"])
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(DIGITS_TOML, [text])


def test_missing_file_raises(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(missing)
    assert "nope.toml" in str(info.value)


def test_directory_as_config_raises(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path)


def test_invalid_toml_raises(tmp_path):
    toml = tmp_path / "broken.toml"
    toml.write_text("[guide\nscale = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(toml)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_to_dict_makes_paths_absolute():
    cfg = load_config(DIGITS_TOML)
    d = to_dict(cfg)
    assert "base_dir" not in d
    assert d["data"]["classes"] == str(REPO / "manifests" / "digits" / "classes.txt")
    assert d["model"]["classifier"] == str(REPO / "models" / "digits" / "classifier")
    assert d["data"]["root"] == ""  # empty paths stay empty
    assert d["guide"]["escalation"] == [12.0, 32.0, 64.0]
    assert d["train"]["diffusion"]["steps"] == 4000


def test_write_resolved_round_trip(tmp_path, monkeypatch):
    cfg = load_config(DIGITS_TOML, ["guide.scale=6", "guide.escalation=[1.0, 2.0]", "guide.target=seven",
                                    "data.limit=7", "pack.require_flip=true"])
    out_dir = tmp_path / "run" / "stage"
    written = write_resolved(cfg, out_dir)
    assert written == out_dir / "config.toml"
    assert written.is_file()
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.toml"]  # no .tmp left behind

    raw = tomllib.loads(written.read_text(encoding="utf-8"))
    assert raw["guide"]["scale"] == 6.0
    assert Path(raw["data"]["split"]).is_absolute()

    monkeypatch.chdir(tmp_path)  # reloading must not depend on cwd
    again = load_config(written)
    assert to_dict(again) == to_dict(cfg)
    assert again.guide.target == "seven"
    assert again.data.limit == 7
    assert again.path(again.data.split) == REPO / "manifests" / "digits" / "split.csv"


def test_write_resolved_overwrites(tmp_path):
    write_resolved(load_config(DIGITS_TOML, ["guide.scale=1"]), tmp_path)
    write_resolved(load_config(DIGITS_TOML, ["guide.scale=9"]), tmp_path)
    assert load_config(tmp_path / "config.toml").guide.scale == 9.0


def test_device_is_this_ranks_gpu_and_made_current(monkeypatch):
    """'auto' / 'cuda' mean cuda:<LOCAL_RANK>, set as the process's current device (else every rank's
    cuBLAS handles and autotuning land on GPU 0); an index the machine lacks is a config error."""
    import torch

    from cfgen.device import pick_device

    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("auto") == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]
    assert pick_device("cuda") == torch.device("cuda", 1)
    assert pick_device("cuda:0") == torch.device("cuda", 0) and current[-1] == torch.device("cuda", 0)
    assert pick_device("cpu") == torch.device("cpu") and len(current) == 3
    monkeypatch.setenv("LOCAL_RANK", "2")          # a third process on a two-GPU machine
    with pytest.raises(ConfigError, match="has 2 GPU"):
        pick_device("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        pick_device("cuda")


def test_fp16_is_refused_with_the_reason():
    """No loss scaling in the guidance gradient: fp16 would flush small per-pixel gradients to zero."""
    with pytest.raises(ConfigError, match="model.dtype='fp16' is refused: guidance gradients are not loss-scaled"):
        load_config(None, ["model.dtype=fp16"])
    assert load_config(None, ["model.dtype=bf16"]).model.dtype == "bf16"


def test_the_source_is_checked_where_a_config_meets_it_before_any_work():
    """config.py knows no source; api.load_config (every command's entry) checks the registry."""
    from cfgen.api import load_config as load_checked

    cfg = load_config(DIGITS_TOML, ["data.source=s3"])  # a string like any other, to the config alone
    assert cfg.data.source == "s3"
    with pytest.raises(ConfigError, match=r"data.source: unknown source 's3' \(known: digits, shapes, "):
        load_checked(DIGITS_TOML, ["data.source=s3"])
