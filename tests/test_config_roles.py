"""Every config field says what it is to a run directory (its Role, in the field's own metadata), and the
fingerprints that guard resumption are read off those roles: a setting that changes a stage's output
changes that stage's fingerprint, one that does not (threads, batch sizes) leaves every fingerprint alone."""

from __future__ import annotations

import copy
import dataclasses
import typing

import pytest

from cfgen.config import PATH_FIELDS, Config, GuideConfig, field_roles
from cfgen.runstate import ORDER, STAGE_KEYS, fingerprint

STAGES = ORDER  # the stages' handles for fingerprint(); their names and order are spelled out below


def _leaves():
    leaves = []
    for section in dataclasses.fields(Config):
        if section.name == "base_dir":
            continue
        stack = [(typing.get_type_hints(Config)[section.name], "")]
        while stack:
            cls, prefix = stack.pop()
            for f in dataclasses.fields(cls):
                hint = typing.get_type_hints(cls)[f.name]
                if dataclasses.is_dataclass(hint):
                    stack.append((hint, f"{prefix}{f.name}."))
                else:
                    leaves.append((section.name, prefix + f.name))
    return leaves


def test_every_field_of_every_section_has_a_role():
    roles = field_roles()
    leaves = _leaves()
    assert len(leaves) > 100  # the walk reached the nested tables too
    assert set(roles) == set(leaves)
    assert [k for k in leaves if roles[k] is None] == []


@dataclasses.dataclass
class _WidenedGuide(GuideConfig):
    new_knob: float = 1.0
    """A key added without saying which fingerprint it belongs to."""


@dataclasses.dataclass
class _WidenedConfig(Config):
    guide: _WidenedGuide = dataclasses.field(default_factory=_WidenedGuide)


def test_a_field_declared_without_a_role_is_reported_unclassified(monkeypatch):
    import cfgen.config as config_module

    monkeypatch.setattr(config_module, "Config", _WidenedConfig)
    roles = config_module.field_roles()
    assert roles[("guide", "new_knob")] is None
    assert roles[("guide", "scale")].stage == "guide"


def test_path_fields_are_the_paths():
    assert PATH_FIELDS == {
        ("data", "root"), ("data", "manifest"), ("data", "classes"), ("data", "split"),
        ("model", "unet"), ("model", "scheduler"), ("model", "classifier"), ("model", "vae"),
        ("model", "text_encoder"), ("model", "tokenizer"), ("model", "predictor_path"),
        ("text", "graph"), ("tune", "pairs"), ("tune", "cue_pairs"), ("tune", "vlm")}


# Which settings each stage's fingerprint holds, written out here rather than read from the package: a field
# that loses its Role (or gets another) changes what resumes, and this list is what catches it.
EXPECTED_STAGE_KEYS = {
    "invert": {("pipeline", "seed"), ("data", "source"), ("data", "use_split"), ("data", "image_size"),
               ("data", "channels"), ("data", "shard_size"), ("data", "limit"), ("data", "repeat"),
               ("data", "max_image_pixels"), ("data", "shapes_count"), ("data", "shapes_spurious"),
               ("data", "shapes_classes"), ("data", "shapes_scale"), ("data", "only_classes"),
               ("data", "class_limit"), ("model", "kind"), ("model", "prompt"), ("model", "dtype"),
               ("invert", "steps"), ("invert", "t_inv"), ("guide", "mode")},
    "guide": {("model", "predictor"), ("model", "clip_prompts"), ("model", "gradient"), ("guide", "target"),
              ("guide", "top_k"), ("guide", "scale"), ("guide", "escalation"), ("guide", "confidence"),
              ("guide", "mask"), ("guide", "mask_threshold"), ("guide", "mask_dilation"), ("guide", "mask_blur"),
              ("guide", "mask_start"), ("text", "intervene"), ("text", "propagate"), ("text", "csg"),
              ("text", "edit_scale"), ("text", "edit_prompt"), ("text", "threshold"), ("text", "warmup"),
              ("text", "intersect"), ("text", "preserve"), ("text", "mask_rule")},
    "pack": {("pack", "caption"), ("pack", "require_flip"), ("pack", "min_p_cf"), ("pack", "max_l1"),
             ("pack", "max_recon_l1"), ("pack", "image_format"), ("pack", "image_quality")},
}


def test_each_stage_fingerprints_exactly_the_settings_written_out_here():
    assert [s.name for s in STAGES] == ["invert", "guide", "pack"]  # the commands, in the order they run
    assert {stage: set(keys) for stage, keys in STAGE_KEYS.items()} == EXPECTED_STAGE_KEYS
    for stage, keys in EXPECTED_STAGE_KEYS.items():  # and the fingerprint itself carries each of them
        fp = fingerprint(next(s for s in STAGES if s.name == stage), Config(), refs=[])
        assert {f"{section}.{key}" for section, key in keys} <= set(fp["config"])


def _other_value(cfg: Config, section: str, key: str):
    """A valid value other than the current one, whatever the field's type."""
    if (section, key) == ("data", "source"):
        return "shapes"  # a name the registry knows: the fingerprint lists the source's classes
    hint = typing.get_type_hints(type(getattr(cfg, section)))[key]
    value = getattr(getattr(cfg, section), key)
    if typing.get_origin(hint) is typing.Literal:
        return next(c for c in typing.get_args(hint) if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 + 0.125
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, list):
        return [*value, "other"] if not value or isinstance(value[0], str) else [*value, value[-1] * 2]
    raise AssertionError(f"no other value for {section}.{key} = {value!r}")


def _fingerprints(cfg: Config) -> dict[str, dict]:
    return {s.name: fingerprint(s, cfg, refs=[]) for s in STAGES}


@pytest.mark.parametrize("section,key", [k for keys in STAGE_KEYS.values() for k in keys])
def test_a_stage_setting_changes_its_stage_fingerprint_and_no_earlier_one(section, key):
    cfg = Config()
    before = _fingerprints(cfg)
    changed = copy.deepcopy(cfg)
    setattr(getattr(changed, section), key, _other_value(cfg, section, key))
    after = _fingerprints(changed)
    stage = field_roles()[(section, key)].stage
    order = [s.name for s in STAGES]
    first = order.index(stage)
    for i, name in enumerate(order):
        moved = before[name]["config"] != after[name]["config"]
        assert moved == (i >= first), (section, key, name)


@pytest.mark.parametrize("section,key", [k for k, r in field_roles().items()
                                         if r.stage is None and not r.path and "." not in k[1]])
def test_a_setting_of_no_stage_leaves_every_fingerprint_alone(section, key):
    cfg = Config()
    changed = copy.deepcopy(cfg)
    setattr(getattr(changed, section), key, _other_value(cfg, section, key))
    assert _fingerprints(changed) == _fingerprints(cfg)


def test_the_known_runtime_settings_are_outside_every_fingerprint():
    # spelled out: how the work runs, not what it makes (a resume may change them)
    runtime = {("pipeline", "threads"), ("invert", "batch_size"), ("guide", "batch_size"), ("model", "device")}
    assert all(field_roles()[k].stage is None for k in runtime)
    assert all(k not in keys for keys in STAGE_KEYS.values() for k in runtime)
