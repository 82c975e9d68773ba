"""The `cfgen` command line: parse, load the config, call a stage function.

    cfgen run    --config pipelines/digits.toml            # invert, guide, pack
    cfgen invert --config pipelines/digits.toml --out runs/digits
    cfgen guide  --config pipelines/digits.toml --set guide.scale=6
    cfgen pack   --config pipelines/digits.toml
    cfgen train diffusion|classifier|vlm --config pipelines/digits.toml
    cfgen evaluate runs/digits
    cfgen tune   --config pipelines/digits.toml [--pairs 'runs/digits/pairs/pairs-{000000..000003}.tar'] [--bench]
    cfgen sweep  --config pipelines/shapes.toml --scales 1,2,4,8,16   # flip rate vs scale
    cfgen report runs/shapes                                        # -> runs/shapes/report/report.html
    cfgen publish runs/digits --repo you/digits-pairs                 # the pairs as a Hugging Face dataset

User errors (bad config, missing files or weights) print one line and exit 2.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cfgen.config import Config
from cfgen.errors import RunFailed, UserError

app = typer.Typer(help="Generate factual/counterfactual image pairs as WebDataset shards.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def _version(value: bool) -> None:
    if value:
        from cfgen import __version__

        typer.echo(f"cfgen {__version__}")
        raise typer.Exit()


QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
"""Without --verbose: the libraries' own bars ("Loading weights") and advice stay quiet; cfgen's bars and
errors are unaffected. Set before transformers / diffusers are imported, which read them at import."""


@app.callback()
def _main_options(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                        help="Print the version and exit.")] = False,
                  verbose: Annotated[bool, typer.Option("--verbose", help="Also show the progress bars and "
                                                        "warnings of transformers, diffusers and torch.")] = False):
    """Generate factual/counterfactual image pairs as WebDataset shards."""
    if not verbose:
        import warnings

        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
        for lib in ("transformers", "diffusers", "torch", "huggingface_hub", "accelerate", "webdataset"):
            warnings.filterwarnings("ignore", module=rf"{lib}(\.|$)")


def _flags_take_no_value() -> None:
    """typer >= 0.2x writes each option's type in the help, flags included (`--overwrite <bool>`), which reads
    as if the flag took a value: a flag shows none."""
    try:
        from typer.core import TyperOption
    except ImportError:
        return
    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "cfgen", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    display_type_rich.cfgen = True
    TyperOption.display_type_rich = display_type_rich


_flags_take_no_value()
train_app = typer.Typer(help="Train the embedded models on the configured dataset.", no_args_is_help=True)
app.add_typer(train_app, name="train")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Pipeline TOML file (pipelines/*.toml).")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default: runs/<pipeline.name> of the config).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", metavar="SECTION.KEY=VALUE",
                                                     help="Override a config value (repeatable).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Start the stage(s) afresh: delete what an earlier run left in their folders.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for torch (wins over "
                       "OMP_NUM_THREADS and pipeline.threads; default: the cores this process may use / LOCAL_WORLD_SIZE).")]


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


def _load(config: Path, sets: list[str] | None, threads: int | None = None) -> Config:
    """Load and check everything that can be checked before any work starts (api.load_config); then the
    thread policy, before any torch work."""
    from cfgen import api

    cfg = api.load_config(config, sets or [])
    _threads(threads, cfg)
    return cfg


def _threads(flag: int | None, cfg: Config | None = None) -> None:
    """Every command's first step: size torch's thread pools (cfgen/threads.py). The stages say so when
    their work starts; train and tune call `_announce` after their own checks; evaluate and report, whose
    checks run inside their work, stay silent."""
    from cfgen.threads import configure

    configure(flag, cfg.pipeline.threads if cfg is not None else 0)


def _announce() -> None:
    from cfgen.threads import announce

    announce()


def _run_dir(cfg: Config, out: Path | None) -> Path:
    from cfgen import api

    return api.run_dir(cfg, out)


FailFastOpt = Annotated[bool, typer.Option("--fail-fast", help="Stop at the first failed sample (exit 1).")]
TrustOpt = Annotated[bool, typer.Option("--trust-checkpoint",
                                         help="Allow pickle (.bin/.pt) weights, which can run code when loaded.")]


def _stage_config(config: Path, sets: list[str] | None, fail_fast: bool, trust: bool,
                  threads: int | None = None) -> Config:
    flags = (["pipeline.fail_fast=true"] if fail_fast else []) + (["model.trust_checkpoint=true"] if trust else [])
    return _load(config, [*(sets or []), *flags], threads)


@app.command()
def invert(config: ConfigOpt, out: OutOpt = None, set: SetOpt = None, overwrite: OverwriteOpt = False,
           fail_fast: FailFastOpt = False, trust_checkpoint: TrustOpt = False, threads: ThreadsOpt = None):
    """Abduction: DDIM-invert every input image to its exogenous noise (RUN/invert/)."""
    from cfgen import api

    api.invert(_stage_config(config, set, fail_fast, trust_checkpoint, threads), out, overwrite=overwrite)


@app.command()
def guide(config: ConfigOpt, out: OutOpt = None, set: SetOpt = None, overwrite: OverwriteOpt = False,
          fail_fast: FailFastOpt = False, trust_checkpoint: TrustOpt = False, threads: ThreadsOpt = None):
    """Action + prediction: guided reverse DDIM from the noise to the counterfactual (RUN/guide/)."""
    from cfgen import api

    api.guide(_stage_config(config, set, fail_fast, trust_checkpoint, threads), out, overwrite=overwrite)


@app.command()
def pack(config: ConfigOpt, out: OutOpt = None, set: SetOpt = None, overwrite: OverwriteOpt = False,
         fail_fast: FailFastOpt = False, threads: ThreadsOpt = None):
    """Write the pair shards, manifest.parquet, stats.json and sizes.json (RUN/pairs/)."""
    from cfgen import api
    from cfgen.contract import PAIRS

    cfg = _stage_config(config, set, fail_fast, False, threads)
    _echo_summary(api.pack(cfg, out, overwrite=overwrite, check=False))  # the summary first, then the verdict
    api.check_failures(cfg, api.run_dir(cfg, out), PAIRS)


@app.command()
def run(config: ConfigOpt, out: OutOpt = None, set: SetOpt = None, overwrite: OverwriteOpt = False,
        fail_fast: FailFastOpt = False, trust_checkpoint: TrustOpt = False, threads: ThreadsOpt = None):
    """invert, guide and pack in order (the models are loaded once, for both invert and guide)."""
    from cfgen import api
    from cfgen.contract import PAIRS

    cfg = _stage_config(config, set, fail_fast, trust_checkpoint, threads)
    _echo_summary(api.run(cfg, out, overwrite=overwrite, check=False))  # the summary first, then the verdict
    api.check_failures(cfg, api.run_dir(cfg, out), PAIRS)


@app.command()
def verify(run_dir: Annotated[Path, typer.Argument(help="A run directory with pairs/ (e.g. runs/digits).")]):
    """Re-read every pair shard and check members, images, JSON schema and counts (exit 1 on problems)."""
    from cfgen.verify import verify_run  # no torch here (nor a thread policy): it reads and decodes only

    checked, problems = verify_run(run_dir)
    for line in problems:
        typer.echo(line)
    typer.echo(f"verified {checked} samples: {len(problems)} problem(s)")
    if problems:
        raise typer.Exit(1)


def _echo_summary(stats: dict | None) -> None:
    if stats is not None:  # None on the ranks that do not merge
        typer.echo(_summary(stats))


def _summary(stats: dict) -> str:
    import math

    from cfgen.quality.measures import EDIT_WITHIN_RECON_WARN_RATE

    truth = ""
    if "oracle_flip_rate" in stats:
        truth = (f"oracle flip rate {stats['oracle_flip_rate']:.3f}; closer to the true counterfactual "
                 f"{stats['truth_closer_rate']:.3f}; ")
    mean_cld = stats.get("mean_cld")
    cld = f"; mean cld {mean_cld:.3f}" if mean_cld is not None and not math.isnan(mean_cld) else ""
    p_cf = f" (mean p(y*) {stats['mean_p_cf']:.3f})" if stats.get("mean_p_cf") is not None else ""
    if "class_kept_rate" in stats:  # text mode: do()s that keep the class are no flips
        p_cf += f"; class kept {stats['class_kept_rate']:.3f} ({stats['class_keeping_pairs']} pairs)"
    seconds = stats.get("seconds") or {}
    timing = ("; " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())) if seconds else ""
    out = (f"pairs: {stats['pairs']} of {stats['count']} inputs (failed {stats['failed']}, "
           f"rejected {stats['rejected']}); flip rate {stats['flip_rate']:.3f}{p_cf}; {truth}mean l1 {stats['mean_l1']:.4f}; "
           f"mean recon_l1 {stats['mean_recon_l1']:.4f}{cld}{timing} -> {stats['pairs_dir']}")
    within = stats.get("edit_within_recon_rate")
    if within is not None and within > EDIT_WITHIN_RECON_WARN_RATE:  # nan (no pairs) compares False
        out += (f"\nwarning: {within:.0%} of pairs changed the image no more than the s = 0 round trip does "
                "(l1 <= recon_l1): they may be noise, not edits")
    return out


@app.command()
def evaluate(run_dir: Annotated[Path, typer.Argument(help="A run directory with pairs/ (e.g. runs/digits).")],
             threads: ThreadsOpt = None):
    """Judge the pairs with an independent clean classifier; compare l1 with the nearest real image.
    Also writes RUN/evaluate/judge.json, which `cfgen report` shows."""
    from cfgen.report.evaluate import evaluate_pairs, format_report, write_result

    _threads(threads)  # not announced: the judge's own errors come later and must stay one line

    result = evaluate_pairs(run_dir)
    typer.echo(format_report(result))
    typer.echo(f"-> {write_result(run_dir, result)} (shown by `cfgen report`)")


@app.command()
def sweep(config: ConfigOpt, out: OutOpt = None, set: SetOpt = None, overwrite: OverwriteOpt = False,
          scales: Annotated[str, typer.Option(help="Comma-separated guidance scales, each run alone.")] = "1,2,4,8,16",
          limit: Annotated[int, typer.Option(help="Samples to sweep (the first N of the configured split).")] = 300,
          masks: Annotated[str, typer.Option(help="Localized-edit variants to compare, e.g. 'off,x0,x0:0.3' "
                                                  "(off, x0 or gradient, optionally :threshold); default: "
                                                  "guide.mask as configured.")] = "",
          threads: ThreadsOpt = None):
    """Guide the first --limit samples at each scale (and with escalation) per mask variant; print a table,
    write RUN/sweep/sweep.json."""
    from cfgen.report.sweep import format_table, parse_masks, run_sweep

    try:
        values = [float(s) for s in scales.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--scales: expected comma-separated numbers, got {scales!r}") from None
    if limit < 1:
        raise UserError("--limit must be >= 1")
    cfg = _load(config, set, threads)
    variants = parse_masks(masks, cfg)
    typer.echo(format_table(run_sweep(cfg, _run_dir(cfg, out), values, limit, overwrite, variants)))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory with pairs/ and guide/ (e.g. runs/shapes).")],
           threads: ThreadsOpt = None):
    """Write RUN_DIR/report/report.html: contact sheets, metric histograms, flip rate vs scale, confusion."""
    from cfgen.report.page import write_report

    _threads(threads)  # not announced: a missing run must stay a one-line error

    typer.echo(f"wrote {write_report(run_dir)}")


@app.command()
def publish(run_dir: Annotated[Path, typer.Argument(help="A run directory with pairs/ (e.g. runs/digits).")],
            repo: Annotated[Optional[str], typer.Option("--repo", help="Hugging Face dataset repository, "
                                                        "USER/NAME (created if missing).")] = None,
            to: Annotated[Optional[Path], typer.Option("--to", help="Copy what would be uploaded to this new "
                                                       "folder instead.")] = None,
            private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
            dry_run: Annotated[bool, typer.Option("--dry-run", help="Check and list the files; send nothing.")] = False):
    """Upload RUN/pairs as a Hugging Face dataset, its card as README.md (not config.toml or _state/)."""
    from cfgen import publish as pub

    if dry_run or (repo is None and to is None):
        pub.check(run_dir)
        for name in pub.published_files(run_dir):
            typer.echo(name)
        if not dry_run:
            raise UserError("publish: give --repo USER/NAME (the Hub) or --to DIR (a local folder); "
                            "the files above are what would go")
        return
    if repo is not None and to is not None:
        raise UserError("publish: give --repo or --to, not both")
    if to is not None:
        typer.echo(f"copied {len(pub.copy_to(run_dir, to))} files to {to}")
        return
    info = pub.upload(run_dir, repo, private=private)
    typer.echo(f"uploaded to https://huggingface.co/datasets/{repo} ({getattr(info, 'commit_url', info)})")


@app.command()
def bench(config: ConfigOpt, set: SetOpt = None,
          samples: Annotated[int, typer.Option(help="Samples through the guide stage.")] = 1024,
          reference_samples: Annotated[int, typer.Option(help="Samples for the one-at-a-time reference.")] = 32,
          threads: ThreadsOpt = None):
    """Guide-stage throughput: end to end vs compute alone vs a one-at-a-time fp32 reference."""
    from cfgen.bench.guide import format_bench, run_bench

    if samples < 1 or reference_samples < 1:
        raise UserError("--samples and --reference-samples must be >= 1")
    typer.echo(format_bench(run_bench(_load(config, set, threads), samples, reference_samples)))


def _train_out(cfg: Config, out: Path | None, component: str) -> Path:
    """Where `cfgen train` writes: --out, else a fresh runs/<pipeline.name>/models/<component> -- never the
    models the config points at (the shipped ones) unless --out names them."""
    path = out if out is not None else Path("runs") / cfg.pipeline.name / "models" / component
    if out is None and path.exists() and any(path.iterdir()):
        raise UserError(f"{path} already holds a trained model; pass --out to choose where this one goes "
                        f"(or remove it)")
    return path


def _set_path(cfg: Config, path: Path) -> str:
    """`path` as a `--set` value for this config, which reads a relative path against the config's folder:
    relative to it when that is short (pipelines/x.toml -> ../runs/...), else absolute."""
    path = Path(path).resolve()
    relative = os.path.relpath(path, cfg.base_dir.resolve())
    return str(path) if relative.startswith(os.path.join(os.pardir, os.pardir)) else relative


TRAIN_OUT_HELP = "Output dir (default: runs/<pipeline.name>/models/{}; the models the config uses are only replaced " \
           "when --out names them)."


@train_app.command("diffusion")
def train_diffusion_cmd(config: ConfigOpt, set: SetOpt = None,
                        out: Annotated[Optional[Path], typer.Option("--out", "-o", help=TRAIN_OUT_HELP.format("diffusion"))] = None,
                        threads: ThreadsOpt = None):
    """Train the UNet noise predictor; writes OUT/unet and OUT/scheduler (a text-conditioned one, with
    train.diffusion.text_encoder, also OUT/text_encoder.json and OUT/metrics.json)."""
    from cfgen.models.training import train_diffusion

    cfg = _load(config, set, threads)
    path = _train_out(cfg, out, "diffusion")
    _announce()
    path = train_diffusion(cfg, path)
    typer.echo(f"saved unet/ and scheduler/ to {path}; use them with --set model.unet={_set_path(cfg, path / 'unet')} "
               f"--set model.scheduler={_set_path(cfg, path / 'scheduler')}")


@train_app.command("classifier")
def train_classifier_cmd(config: ConfigOpt, set: SetOpt = None,
                         out: Annotated[Optional[Path], typer.Option("--out", "-o", help=TRAIN_OUT_HELP.format("classifier"))] = None,
                         threads: ThreadsOpt = None):
    """Train the noise-aware classifier p(y|x_t,t); prints held-out accuracy by t."""
    import json

    from cfgen.models.training import train_classifier

    cfg = _load(config, set, threads)
    path = _train_out(cfg, out, "classifier")
    _announce()
    typer.echo(json.dumps(train_classifier(cfg, path), indent=2))
    typer.echo(f"saved to {path}; use it with --set model.classifier={_set_path(cfg, path)}")


@train_app.command("vlm")
def train_vlm_cmd(config: ConfigOpt, set: SetOpt = None,
                  out: Annotated[Optional[Path], typer.Option("--out", "-o", help=TRAIN_OUT_HELP.format("vlm"))] = None,
                  threads: ThreadsOpt = None):
    """Train the embedded VLM's image tower against frozen MiniLM caption embeddings (LiT)."""
    import json

    from cfgen.tune.vlm import train_vlm

    cfg = _load(config, set, threads)
    path = _train_out(cfg, out, "vlm")
    _announce()
    typer.echo(json.dumps(train_vlm(cfg, path), indent=2))
    typer.echo(f"saved to {path}; use it with --set tune.vlm={_set_path(cfg, path)}")


@app.command()
def tune(config: ConfigOpt, out: OutOpt = None, set: SetOpt = None,
         pairs: Annotated[Optional[str], typer.Option(
             "--pairs", help="Pair shards: a path, glob or brace list (default: tune.pairs, else RUN_DIR/pairs/pairs-*.tar).")] = None,
         bench: Annotated[bool, typer.Option("--bench", help="Time an epoch with the feature cache vs re-encoding.")] = False,
         threads: ThreadsOpt = None):
    """Learn on the pairs: zero-shot, each learner without and with them, per objective and cf source (RUN/tune/)."""
    cfg = _load(config, set, threads)
    _announce()
    run_dir = _run_dir(cfg, out)
    log = lambda msg: typer.echo(msg, err=True)  # noqa: E731
    if bench:
        from cfgen.tune.bench import bench_cache, format_bench

        typer.echo(format_bench(bench_cache(cfg, run_dir, pairs, log=log)))
        return
    from cfgen.tune.protocol import format_table
    from cfgen.tune.train import run_tune

    typer.echo(format_table(run_tune(cfg, run_dir, pairs, log=log)))


def _usage_errors() -> tuple[type[BaseException], ...]:
    """click's exceptions: typer >= 0.26 vendors click (typer._click), older typers use click itself."""
    import importlib

    found = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(name).ClickException)
        except ImportError:
            pass
    return tuple(found)


class Interrupted(BaseException):
    """SIGINT or SIGTERM. Not a KeyboardInterrupt, which click swallows into an exit code: this one unwinds
    through every `finally` (temporaries removed, the lock released) up to main, which says how to resume."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, _frame) -> None:
    raise Interrupted(signum)


def _usage_message(exc) -> str:
    ctx = getattr(exc, "ctx", None)
    hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    return f"cfgen: error: {exc.format_message()}{hint}"


def main() -> None:
    import signal

    from cfgen.threads import prepare_environment

    prepare_environment()  # before torch is imported: OpenMP reads its wait policy when it loads
    # the handlers are main's alone: restored when it returns, so that a caller running main in its own
    # process (the tests) keeps its own
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, _on_signal)
    if before[signal.SIGINT] is not signal.SIG_IGN:  # a shell's background job ignores Ctrl-C: keep it so
        signal.signal(signal.SIGINT, _on_signal)
    try:
        _run_app()
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def _run_app() -> None:
    import signal

    try:
        code = app(standalone_mode=False, prog_name="cfgen")  # returns typer.Exit's code instead of exiting
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as exc:
        typer.echo(f"cfgen: error: {exc}", err=True)
        sys.exit(2)
    except RunFailed as exc:
        typer.echo(f"cfgen: failed: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        if exc.errno in _DISK_ERRNOS:
            # Finished shards were committed atomically and stay valid; re-run to resume.
            typer.echo(f"cfgen: failed: {os.strerror(exc.errno)} while writing {exc.filename or 'output'}; "
                       "finished shards are kept, re-run the same command to resume", err=True)
            sys.exit(1)
        if isinstance(exc, (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)):
            typer.echo(f"cfgen: error: {exc}", err=True)  # a path the user gave
            sys.exit(2)
        raise
    except Interrupted as exc:
        typer.echo(f"cfgen: interrupted ({signal.Signals(exc.signum).name}); finished shards are kept: "
                   "re-run the same command to resume", err=True)
        sys.exit(128 + exc.signum)
    except _usage_errors() as exc:  # usage errors arrive here in standalone_mode=False
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `cfgen` or `cfgen train`: the help, not an error
            # the error was made from ctx.get_help(), which typer's rich help already printed (its message is
            # then ''); asking for the help again would print it twice
            text = exc.format_message()
            if text:
                typer.echo(text)
            sys.exit(2)
        typer.echo(_usage_message(exc), err=True)
        sys.exit(getattr(exc, "exit_code", 2) or 2)


if __name__ == "__main__":
    main()
