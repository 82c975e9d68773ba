"""Pipeline configuration: one dataclass per TOML section, CLI overrides, validation.

Precedence is CLI (`--set section.key=value`) > TOML file > the defaults below.
Relative paths in a TOML file are resolved against the directory of that file,
so `pipelines/digits.toml` can say `unet = "../models/digits/unet"` and work
from any working directory. The resolved config is written next to every
stage's output (`config.toml`), so a run can be reproduced from its output.

    cfg = load_config("pipelines/digits.toml", overrides=["guide.scale=6"])
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w


class ConfigError(ValueError):
    """A config problem the user can fix; the CLI prints it as one line, exit 2."""


@dataclass
class PipelineConfig:
    name: str = "digits"
    """Pipeline name; the default run directory is runs/<name>."""
    seed: int = 0
    """Global seed; each sample's seed is derived from it and the sample id."""


@dataclass
class DataConfig:
    source: str = "digits"
    """'digits' (scikit-learn's handwritten digits), 'folder' (root/<class>/*.png) or 'manifest' (CSV/parquet of path,label)."""
    root: str = ""
    """Dataset root: the image folder, or the directory that manifest paths are relative to."""
    manifest: str = ""
    """CSV or parquet file with columns path,label (and optionally id) for source='manifest'."""
    classes: str = ""
    """Text file with one class name per line; line i is class index i. Empty: sorted folder names / labels."""
    split: str = ""
    """Optional CSV of id,split; with `use_split` set, only those ids are used."""
    use_split: str = ""
    """Which split to process ('' = every sample)."""
    image_size: int = 8
    """Side of the square images the models work on (pixels)."""
    channels: int = 1
    """1 for grayscale, 3 for RGB."""
    shard_size: int = 512
    """Samples per shard: the unit of work, retry and resumption."""
    limit: int = 0
    """Process only the first N samples (0 = all); handy for smoke runs."""
    max_image_pixels: int = 89_478_485
    """Images with more pixels than this are refused as decompression bombs (PIL's default)."""


@dataclass
class ModelConfig:
    unet: str = "../models/digits/unet"
    """Directory of a diffusers UNet2DModel (or a pipeline directory with unet/)."""
    scheduler: str = "../models/digits/scheduler"
    """Directory of a diffusers scheduler config; its alphas define the DDIM grid."""
    classifier: str = "../models/digits/classifier"
    """Directory of the noise-aware classifier p(y | x_t, t) (cfgen train classifier)."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda[:N]'."""


@dataclass
class InvertConfig:
    steps: int = 25
    """DDIM steps between t=0 and t_inv (the same grid is walked back by guide)."""
    t_inv: float = 0.6
    """Fraction of the schedule to invert to (0 < t_inv <= 1); shallower keeps more of the image."""
    batch_size: int = 256
    """Samples per forward pass (formed inside a shard; results do not depend on it)."""


@dataclass
class GuideConfig:
    target: str = "closest"
    """'closest' (predictor's top non-factual class), 'random', or a class index / name."""
    scale: float = 2.0
    """Guidance scale s in e^ = e - s*sqrt(1-a_t)*grad log p(y*|x_t,t)."""
    escalation: list[float] = field(default_factory=lambda: [4.0, 8.0, 16.0])
    """Larger scales retried, in order, for samples not yet flipped with confidence."""
    confidence: float = 0.99
    """A sample counts as done at a scale once the predictor gives y* at least this probability
    on the counterfactual (and ranks it first); below it, the next escalation scale is tried."""
    batch_size: int = 256
    """Samples per guided pass."""


@dataclass
class PackConfig:
    caption: str = "a photo of the digit {label_name}."
    """Caption template for K.txt / K.cf.txt; {label_name} is the class name."""
    require_flip: bool = False
    """Keep pairs whose counterfactual did not flip the predictor out of the shards."""


@dataclass
class TrainDiffusionConfig:
    steps: int = 4000
    batch_size: int = 128
    lr: float = 2e-4
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"


@dataclass
class TrainClassifierConfig:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    test_fraction: float = 0.2
    """Held-out share (stratified, seeded) on which accuracy is reported."""


@dataclass
class TrainConfig:
    diffusion: TrainDiffusionConfig = field(default_factory=TrainDiffusionConfig)
    classifier: TrainClassifierConfig = field(default_factory=TrainClassifierConfig)


@dataclass
class Config:
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    invert: InvertConfig = field(default_factory=InvertConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    base_dir: Path = field(default=Path("."), repr=False)
    """Directory relative paths are resolved against (the TOML file's directory)."""

    def path(self, value: str) -> Path:
        """Resolve a path from the config against the config file's directory."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()


# Fields that hold paths: written back absolute so a resolved config is portable.
_PATH_FIELDS = {
    ("data", "root"), ("data", "manifest"), ("data", "classes"), ("data", "split"),
    ("model", "unet"), ("model", "scheduler"), ("model", "classifier"),
}


def _coerce(value, typ, key: str):
    """Check/convert one TOML or CLI value to the dataclass field's type."""
    origin = typing.get_origin(typ)
    if origin is list:
        (item_t,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_t, f"{key}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {typ}")


def _fill(obj, table: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj) if f.name != "base_dir"}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a table")
            _fill(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    try:  # TOML literal: numbers, booleans, lists, quoted strings
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string
    return parts, value


def _nest(parts: list[str], value) -> dict:
    out: dict = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        out = {p: out}
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file, then `section.key=value` overrides; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        cfg.base_dir = path.resolve().parent
        _fill(cfg, table, "")
    for text in overrides or []:
        parts, value = _parse_override(text)
        _fill(cfg, _nest(parts, value), "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range checks that must fail before any work starts."""
    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    need(cfg.data.source in ("digits", "folder", "manifest"),
         f"data.source: expected 'digits', 'folder' or 'manifest', got {cfg.data.source!r}")
    need(cfg.data.image_size > 0, "data.image_size must be > 0")
    need(cfg.data.channels in (1, 3), "data.channels must be 1 or 3")
    need(cfg.data.shard_size > 0, "data.shard_size must be > 0")
    need(cfg.data.limit >= 0, "data.limit must be >= 0")
    need(cfg.invert.steps > 0, "invert.steps must be > 0")
    need(0.0 < cfg.invert.t_inv <= 1.0, f"invert.t_inv must be in (0, 1], got {cfg.invert.t_inv}")
    need(cfg.invert.batch_size > 0, "invert.batch_size must be > 0")
    need(cfg.guide.batch_size > 0, "guide.batch_size must be > 0")
    need(0.0 <= cfg.guide.confidence < 1.0, f"guide.confidence must be in [0, 1), got {cfg.guide.confidence}")
    need(cfg.guide.scale >= 0 and math.isfinite(cfg.guide.scale),
         f"guide.scale must be a finite number >= 0, got {cfg.guide.scale}")
    need(all(s >= 0 and math.isfinite(s) for s in cfg.guide.escalation),
         "guide.escalation: scales must be finite and >= 0")
    for section in ("diffusion", "classifier"):
        t = getattr(cfg.train, section)
        need(t.steps > 0 and t.batch_size > 0 and t.lr > 0,
             f"train.{section}: steps, batch_size and lr must be > 0")
    need(0.0 < cfg.train.classifier.test_fraction < 1.0, "train.classifier.test_fraction must be in (0, 1)")


def to_dict(cfg: Config) -> dict:
    """The resolved config as a TOML-ready dict, paths made absolute."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name == "base_dir":
            continue
        out[f.name] = dataclasses.asdict(getattr(cfg, f.name))
    for section, key in _PATH_FIELDS:
        if out[section][key]:
            out[section][key] = str(cfg.path(out[section][key]))
    return out


def write_resolved(cfg: Config, directory: Path) -> Path:
    """Write config.toml next to a stage's output; it loads back with load_config."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "config.toml"
    tmp = target.with_suffix(".toml.tmp")
    tmp.write_text(tomli_w.dumps(to_dict(cfg)), encoding="utf-8")
    tmp.replace(target)
    return target
