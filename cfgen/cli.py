"""The `cfgen` command line: parse, load the config, call a stage function.

    cfgen run    --config pipelines/digits.toml            # invert, guide, pack
    cfgen invert --config pipelines/digits.toml --out runs/digits
    cfgen guide  --config pipelines/digits.toml --set guide.scale=6
    cfgen pack   --config pipelines/digits.toml
    cfgen train diffusion|classifier --config pipelines/digits.toml
    cfgen evaluate runs/digits

User errors (bad config, missing files or weights) print one line and exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cfgen.config import Config, ConfigError, load_config

app = typer.Typer(help="Generate factual/counterfactual image pairs as WebDataset shards.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
train_app = typer.Typer(help="Train the embedded models on the configured dataset.", no_args_is_help=True)
app.add_typer(train_app, name="train")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Pipeline TOML file (pipelines/*.toml).")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory [default: runs/<pipeline name>].")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config value: section.key=value (repeatable).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Redo shards that are already finished.")]


class UserError(Exception):
    """Anything the user can fix; printed as one line, exit code 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from cfgen.data.images import ImageDecodeError
    from cfgen.models.loading import ModelLoadError
    from cfgen.shards import ShardError

    return (ConfigError, UserError, ModelLoadError, ShardError, ImageDecodeError, FileNotFoundError,
            PermissionError, NotADirectoryError, IsADirectoryError)


def _load(config: Path, sets: list[str] | None) -> Config:
    """Load and check everything that can be checked before any work starts."""
    from cfgen.data.sources import load_class_names
    from cfgen.targets import resolve_fixed_target

    cfg = load_config(config, sets or [])
    try:
        resolve_fixed_target(cfg.guide.target, load_class_names(cfg))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return cfg


def _run_dir(cfg: Config, out: Path | None) -> Path:
    return out if out is not None else Path("runs") / cfg.pipeline.name


@app.command()
def invert(config: ConfigOpt, out: OutOpt = None, set: SetOpt = None, overwrite: OverwriteOpt = False):
    """Abduction: DDIM-invert every input image to its exogenous noise (RUN/invert/)."""
    from cfgen.stages.invert import run_invert

    cfg = _load(config, set)
    run_invert(cfg, _run_dir(cfg, out), overwrite=overwrite)


@app.command()
def guide(config: ConfigOpt, out: OutOpt = None, set: SetOpt = None, overwrite: OverwriteOpt = False):
    """Action + prediction: guided reverse DDIM from the noise to the counterfactual (RUN/guide/)."""
    from cfgen.stages.guide import run_guide

    cfg = _load(config, set)
    run_guide(cfg, _run_dir(cfg, out), overwrite=overwrite)


@app.command()
def pack(config: ConfigOpt, out: OutOpt = None, set: SetOpt = None, overwrite: OverwriteOpt = False):
    """Write the pair shards, manifest.parquet, stats.json and sizes.json (RUN/pairs/)."""
    from cfgen.stages.pack import run_pack

    cfg = _load(config, set)
    stats = run_pack(cfg, _run_dir(cfg, out), overwrite=overwrite)
    typer.echo(_summary(stats))


@app.command()
def run(config: ConfigOpt, out: OutOpt = None, set: SetOpt = None, overwrite: OverwriteOpt = False):
    """invert, guide and pack in order."""
    from cfgen.stages.guide import run_guide
    from cfgen.stages.invert import run_invert
    from cfgen.stages.pack import run_pack

    cfg = _load(config, set)
    run_dir = _run_dir(cfg, out)
    run_invert(cfg, run_dir, overwrite=overwrite)
    run_guide(cfg, run_dir, overwrite=overwrite)
    typer.echo(_summary(run_pack(cfg, run_dir, overwrite=overwrite)))


def _summary(stats: dict) -> str:
    return (f"pairs: {stats['pairs']} of {stats['count']} inputs (failed {stats['failed']}); "
            f"flip rate {stats['flip_rate']:.3f}; mean l1 {stats['mean_l1']:.4f}; "
            f"mean recon_l1 {stats['mean_recon_l1']:.4f} -> {stats['pairs_dir']}")


@app.command()
def evaluate(run_dir: Annotated[Path, typer.Argument(help="A run directory with pairs/ (e.g. runs/digits).")]):
    """Judge the pairs with an independent clean classifier; compare l1 with the nearest real image."""
    from cfgen.evaluate import evaluate_pairs, format_report

    typer.echo(format_report(evaluate_pairs(run_dir)))


@train_app.command("diffusion")
def train_diffusion_cmd(config: ConfigOpt, set: SetOpt = None,
                        out: Annotated[Optional[Path], typer.Option(help="Output dir [default: parent of model.unet].")] = None):
    """Train the UNet2DModel noise predictor; writes OUT/unet and OUT/scheduler."""
    from cfgen.models.training import train_diffusion

    path = train_diffusion(_load(config, set), out)
    typer.echo(f"saved unet/ and scheduler/ to {path}")


@train_app.command("classifier")
def train_classifier_cmd(config: ConfigOpt, set: SetOpt = None,
                         out: Annotated[Optional[Path], typer.Option(help="Output dir [default: model.classifier].")] = None):
    """Train the noise-aware classifier p(y|x_t,t); prints held-out accuracy by t."""
    import json

    from cfgen.models.training import train_classifier

    typer.echo(json.dumps(train_classifier(_load(config, set), out), indent=2))


def main() -> None:
    try:
        app(standalone_mode=False)
    except _user_errors() as exc:
        typer.echo(f"cfgen: error: {exc}", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("cfgen: aborted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in standalone_mode=False
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
