"""The Python API: the same stages the command line runs, for notebooks and other programs.

    import cfgen
    stats = cfgen.run("pipelines/digits.toml", out="runs/digits", overrides=["guide.scale=4"])
    cfgen.invert(...); cfgen.guide(...); stats = cfgen.pack(...)     # or stage by stage
    cfg = cfgen.load_config("pipelines/digits.toml", ["guide.target=all"])   # a Config, checked

Every function takes a pipeline TOML path (or an already loaded Config), an optional run directory
(default runs/<pipeline.name>, relative to the working directory) and `overrides` in the CLI's
`--set section.key=value` form. Errors are exceptions: cfgen.errors.UserError (bad config or input:
the CLI's exit 2) and RunFailed (more than pipeline.max_failure_fraction of the samples failed:
exit 1; `check=False` skips that check, for a caller that reports first, as the CLI does). The CLI (cli.py) is a thin layer over these functions, so both write the same shards.
"""

from __future__ import annotations

from pathlib import Path

from cfgen.config import Config
from cfgen.errors import ConfigError, RunFailed

ConfigLike = str | Path | Config


def load_config(config: ConfigLike, overrides: list[str] | tuple[str, ...] | str = ()) -> Config:
    """Load a pipeline TOML with overrides and check what can be checked before any work starts. A Config
    is checked again (its fields may have been edited since it was loaded): every stage function calls this."""
    from cfgen.config import load_config as load_toml, validate
    from cfgen.data.sources import check_source, load_class_names
    from cfgen.targets import resolve_fixed_target

    overrides = _override_list(overrides)
    if isinstance(config, Config):
        if overrides:
            raise ConfigError("overrides apply to a TOML path; edit a loaded Config's fields directly")
        cfg = config
        validate(cfg)
    elif isinstance(config, (str, Path)):
        cfg = load_toml(Path(config), overrides)
    else:
        raise ConfigError(f"config: expected a pipeline TOML path or a Config, got {type(config).__name__}")
    check_source(cfg)
    try:
        resolve_fixed_target(cfg.guide.target, load_class_names(cfg))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return cfg


def _override_list(overrides) -> list[str]:
    """`overrides` as a list of 'section.key=value' strings; one string is taken as one override."""
    if isinstance(overrides, str):
        return [overrides]
    if not isinstance(overrides, (list, tuple)) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"overrides: expected a list of 'section.key=value' strings, got {overrides!r}")
    return list(overrides)


def run_dir(cfg: Config, out: str | Path | None = None) -> Path:
    """The run directory: `out`, else runs/<pipeline.name>."""
    return Path(out) if out is not None else Path("runs") / cfg.pipeline.name


def check_failures(cfg: Config, out: Path, stage) -> None:
    """RunFailed when more than pipeline.max_failure_fraction of a stage's inputs failed."""
    from cfgen.stages.common import failure_summary

    summary = failure_summary(stage, out)
    if summary["count"] and summary["failed"] / summary["count"] > cfg.pipeline.max_failure_fraction:
        reasons = ", ".join(f"{k} x{v}" for k, v in summary["errors"].items())
        raise RunFailed(f"{stage.folder}: {summary['failed']} of {summary['count']} samples failed "
                        f"(> pipeline.max_failure_fraction={cfg.pipeline.max_failure_fraction}): {reasons}")


def _stage(config: ConfigLike, out, overrides, overwrite: bool, check: bool, name: str):
    """One stage by name (invert, guide or pack): its run_* function, then the failure check."""
    from cfgen import contract
    from cfgen.stages import guide as guide_stage, invert as invert_stage, pack as pack_stage

    runner, stage = {"invert": (invert_stage.run_invert, contract.INVERT), "guide": (guide_stage.run_guide, contract.GUIDE),
                     "pack": (pack_stage.run_pack, contract.PAIRS)}[name]
    cfg = load_config(config, overrides)
    result = runner(cfg, run_dir(cfg, out), overwrite=overwrite)
    if check:
        check_failures(cfg, run_dir(cfg, out), stage)
    return result


def invert(config: ConfigLike, out: str | Path | None = None, overrides=(), overwrite: bool = False,
           check: bool = True) -> Path:
    """Stage 1 (abduction) into OUT/invert/; returns that folder."""
    return _stage(config, out, overrides, overwrite, check, "invert")


def guide(config: ConfigLike, out: str | Path | None = None, overrides=(), overwrite: bool = False,
          check: bool = True) -> Path:
    """Stage 2 (action + prediction) into OUT/guide/; returns that folder."""
    return _stage(config, out, overrides, overwrite, check, "guide")


def pack(config: ConfigLike, out: str | Path | None = None, overrides=(), overwrite: bool = False,
         check: bool = True) -> dict | None:
    """Stage 3 into OUT/pairs/; returns stats.json's content (None on the ranks of a launch that do not merge)."""
    return _stage(config, out, overrides, overwrite, check, "pack")


def run(config: ConfigLike, out: str | Path | None = None, overrides=(), overwrite: bool = False,
        check: bool = True) -> dict | None:
    """invert, guide and pack in order, the models loaded once and the run directory locked across the three;
    returns stats.json's content."""
    from cfgen.contract import PAIRS
    from cfgen.models.loading import load_models
    from cfgen.runstate import run_lock
    from cfgen.stages.guide import run_guide
    from cfgen.stages.invert import run_invert
    from cfgen.stages.pack import run_pack

    cfg = load_config(config, overrides)
    folder = run_dir(cfg, out)
    with run_lock(folder, cfg):  # held across the three stages: no other process slips in between
        models = load_models(cfg)
        run_invert(cfg, folder, overwrite=overwrite, models=models)
        run_guide(cfg, folder, overwrite=overwrite, models=models)
        stats = run_pack(cfg, folder, overwrite=overwrite)
    if check:
        check_failures(cfg, folder, PAIRS)
    return stats
