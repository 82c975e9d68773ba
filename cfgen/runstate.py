"""What a run directory remembers of how it was made, and who may write to it.

Each stage folder holds `_state/fingerprint.json`, written before its first shard: the config
keys that determine the stage's output (its own and its upstream stages'), the class
list, a digest of the input sample list (ids, labels, origins, and each file's size and
mtime), a digest of every model directory it reads, and the contract version. A re-run
whose fingerprint differs is refused before any work, in one line naming what changed
(exit 2), and leaves the directory as it was; `--overwrite` starts the stage afresh.
A later stage also checks that its input stage was made with the settings it would use.

    with run_lock(run_dir):                           # one writer per run directory
        claim(INVERT, cfg, run_dir, overwrite)        # refuse a run made differently, else record ours
        require_upstream(INVERT, cfg, run_dir)        # (guide) the invert shards match this config

Not in the fingerprint, because they do not change the output: batch sizes, the device,
the failure policy, --trust-checkpoint, gradient checkpointing. Model files are digested
by content (files over 256 MiB: size plus their first and last 16 MiB).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from cfgen import distributed
from cfgen.config import Config, stage_keys
from cfgen.contract import CONTRACT_VERSION, GUIDE, INVERT, PAIRS, Stage
from cfgen.errors import InputError, UserError

FINGERPRINT = "fingerprint.json"

# Config keys per stage that determine its output; each stage also depends on the ones before it. Read off
# the fields' own Role (cfgen/config.py). Path-valued keys are left out: what they point at is digested
# instead (inputs, classes, models).
STAGE_KEYS = stage_keys()
ORDER = (INVERT, GUIDE, PAIRS)
BIG_FILE = 256 << 20
EDGE = 16 << 20


class RunStateError(UserError):
    """The run directory was made with other settings, or another process is writing it."""


def _file_digest(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(f"{size}\0".encode())
    with path.open("rb") as fh:
        if size <= BIG_FILE:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        else:  # a multi-GB checkpoint: its size and both ends, not a minute of hashing per stage
            h.update(fh.read(EDGE))
            fh.seek(size - EDGE)
            h.update(fh.read(EDGE))


def dir_digest(path: Path) -> str:
    """sha256 over the relative names and contents of the files under `path` ('absent' if there is none)."""
    if not path.exists():
        return "absent"
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(f"{p.relative_to(path) if p != path else p.name}\0".encode())
        _file_digest(p, h)
    return h.hexdigest()


def _model_dirs(stage: Stage, cfg: Config) -> dict[str, Path]:
    from cfgen.models.weights import component_dir

    m = cfg.model
    out = {"model.unet": cfg.path(m.unet), "model.scheduler": cfg.path(m.scheduler),
           "model.vae": component_dir(cfg, m.vae, "vae"),
           "model.text_encoder": component_dir(cfg, m.text_encoder, "text_encoder"),
           "model.tokenizer": component_dir(cfg, m.tokenizer, "tokenizer")}
    if ORDER.index(stage) >= 1:
        if cfg.text.graph:
            out["text.graph"] = cfg.path(cfg.text.graph)
        if m.predictor == "noise_aware":
            out["model.classifier"] = cfg.path(m.classifier)
        else:
            out["model.predictor_path"] = cfg.path(m.predictor_path)
    return out


def _inputs_digest(cfg: Config, refs: list | None) -> dict:
    from cfgen.data.sources import list_samples

    h = hashlib.sha256()
    refs = list_samples(cfg) if refs is None else refs
    for r in refs:
        h.update(f"{r.id}\t{r.label}\t{r.origin}\t{r.error}\t{r.stamp}\t{r.caption}\n".encode("utf-8", "backslashreplace"))
    return {"count": len(refs), "digest": h.hexdigest()}


def fingerprint(stage: Stage, cfg: Config, refs: list | None = None) -> dict:
    """What determines `stage`'s output under `cfg` (see the module docstring); `refs`: list_samples(cfg)
    when the caller has it already."""
    from cfgen.data.sources import load_class_names

    keys = [k for s in ORDER[: ORDER.index(stage) + 1] for k in STAGE_KEYS[s.name]]
    config = {f"{section}.{key}": getattr(getattr(cfg, section), key) for section, key in keys}
    return {"contract": CONTRACT_VERSION, "stage": stage.name, "config": config,
            "classes": load_class_names(cfg), "inputs": _inputs_digest(cfg, refs),
            "models": {k: dir_digest(p) for k, p in _model_dirs(stage, cfg).items()}}


def _default_settings() -> dict:
    cfg = Config()
    return {f"{section}.{key}": getattr(getattr(cfg, section), key) for keys in STAGE_KEYS.values()
            for section, key in keys}


def differences(old: dict, new: dict) -> list[str]:
    """What changed from `old` to `new`, one short phrase each."""
    out = []
    if old.get("contract") != new["contract"]:
        out.append(f"output contract version {old.get('contract')} -> {new['contract']}")
    defaults = _default_settings()
    old_config = old.get("config", {})
    for key in [*new["config"], *(k for k in old_config if k not in new["config"])]:
        # a setting newer than the run: the run was made with what is now its default (so a run from
        # before text.edit_prompt existed resumes under 'concept', the only rule there was)
        before = old_config.get(key, defaults.get(key, "<unset>"))
        value = new["config"].get(key, "<unset>")
        if before != value:
            out.append(f"{key} {before!r} -> {value!r}")
    if old.get("classes") != new["classes"]:
        out.append("the class list")
    before = old.get("inputs", {})
    if before.get("digest") != new["inputs"]["digest"]:
        out.append(f"the input samples ({before.get('count')} -> {new['inputs']['count']}, or changed files)")
    # a model key is recorded only when it is used (text.graph when set): absent on one side is a change too
    old_models = old.get("models", {})
    for key in [*new["models"], *(k for k in old_models if k not in new["models"])]:
        if key not in new["models"]:
            out.append(f"{key} (set then, unset now)")
        elif key not in old_models:
            out.append(f"{key} (unset then, set now)")
        elif old_models[key] != new["models"][key]:
            out.append(f"the files of {key}")
    return out


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}


def claim(stage: Stage, cfg: Config, run_dir: Path, overwrite: bool = False, refs: list | None = None) -> None:
    """Refuse `run_dir` if `stage` was made there with other settings; else record this config's fingerprint.

    With `overwrite`, the stage's folder is emptied first (by rank 0, then a barrier), so shards of
    an earlier shard layout cannot survive into the new manifest.
    """
    new = fingerprint(stage, cfg, refs)
    folder = stage.dir(run_dir)
    path = stage.state(run_dir) / FINGERPRINT
    if overwrite:
        if distributed.is_main() and folder.exists():
            shutil.rmtree(folder)
        distributed.barrier()
    else:
        if (folder / FINGERPRINT).is_file() or any(folder.glob(f"{stage.prefix}-*_stats.json")):
            raise RunStateError(f"{stage.name}: {folder} was made by an older cfgen (its bookkeeping beside the tars, "
                                "before contract v4); re-run with --overwrite to redo this stage, or use another --out")
        old = _read(path)
        if old is None and stage.finished(run_dir):
            raise RunStateError(f"{stage.name}: {folder} holds finished shards but no {FINGERPRINT} (made by an "
                                "older cfgen?); re-run with --overwrite to redo this stage, or use another --out")
        if old is not None:
            changed = differences(old, new)
            if changed:
                raise RunStateError(f"{stage.name}: {folder} was made with other settings: {'; '.join(changed)}. "
                                    "Re-run with --overwrite to redo this stage, or use another --out")
            return
        # every rank has read the folder before rank 0 records into it (and any rank finishes a shard
        # there): a rank that looked later would see finished shards of this very run and refuse them
        distributed.barrier()
    if distributed.is_main():  # a new record: the fingerprint, and the resolved config it was made with
        from cfgen.config import write_resolved
        from cfgen.shards import atomic_write_json

        path.parent.mkdir(parents=True, exist_ok=True)
        write_resolved(cfg, folder)
        atomic_write_json(path, new)


def require_upstream(stage: Stage, cfg: Config, run_dir: Path, refs: list | None = None) -> None:
    """The input stage's shards were made with what this config says (else: which command to re-run).
    `refs`: list_samples(cfg) when the caller has it already (it also claims its own stage with them)."""
    old = _read(stage.state(run_dir) / FINGERPRINT)
    if old is None:
        return  # nothing finished there: the caller reports the missing shards
    changed = differences(old, fingerprint(stage, cfg, refs))
    if changed:
        raise InputError(f"the {stage.name} shards in {stage.dir(run_dir)} were made with other settings: "
                         f"{'; '.join(changed)}. Re-run `cfgen {stage.name}` with this config (--overwrite)")


_held: dict[Path, tuple[int, object]] = {}


def check_out_dir(cfg: Config, run_dir: Path) -> None:
    """A run directory inside the input data would become part of it (a class folder, more images)."""
    from cfgen.data.sources import open_source

    root = open_source(cfg).input_root()
    if root is not None and Path(run_dir).resolve().is_relative_to(root.resolve()):
        raise UserError(f"the run directory {run_dir} is inside data.root {root}; choose an --out outside the dataset")


LOCK = ".lock"
"""RUN/.lock: held (flock) by rank 0 of the one launch writing the run directory."""


@contextmanager
def run_lock(run_dir: Path, cfg: Config | None = None):
    """Hold `run_dir`'s lock (re-entrant within a process): one launch writes a run directory at a time.

    Rank 0 takes an exclusive flock on RUN/.lock and tells every rank of its launch whether it got it, so a
    second process, or every rank of a second launch, exits 2 at once; a killed holder leaves nothing stuck
    (flock dies with it). The lock file goes when the lock is released, and so do the folders taking it
    created if nothing was written into them: a refusal inside the lock (a stage's own check) leaves the
    disk as it was. With `cfg`, a run directory inside the input data is refused first, before anything
    is created."""
    if cfg is not None:
        check_out_dir(cfg, run_dir)
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        count, fh = _held[run_dir]
        _held[run_dir] = (count + 1, fh)
        try:
            yield
        finally:
            count, fh = _held[run_dir]
            _held[run_dir] = (count - 1, fh)
        return
    fh, refusal, created = None, None, _missing(run_dir)
    if distributed.is_main():
        fh, refusal = _take(run_dir)
    refusal = distributed.from_main(refusal)  # every rank of this launch goes on, or stops, with rank 0
    if refusal is not None:
        kind, message = refusal
        raise UserError(message) if kind == "w" else RunStateError(message)
    _held[run_dir] = (1, fh)
    try:
        yield
    finally:
        _held.pop(run_dir, None)
        if fh is not None:
            _release(run_dir, fh, created)


def _take(run_dir: Path) -> tuple[object, tuple[str, str] | None]:
    """(the open lock file, None), or (None, (kind, message)): 'w' the directory cannot be written, 'b' busy."""
    path = run_dir / LOCK
    while True:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fh = open(path, "a+")
        except OSError as exc:
            return None, ("w", f"cannot write the run directory {run_dir}: {exc.strerror or exc}")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return None, ("b", f"another cfgen process is writing {run_dir}; wait for it to finish, "
                               "or use another --out")
        try:
            if os.path.samestat(os.fstat(fh.fileno()), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        fh.close()  # its holder removed this file as it let go (_release): lock the one there now
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh, None


def _missing(path: Path) -> list[Path]:
    """`path` and each of its parents that does not exist yet, deepest first."""
    out = []
    while not path.exists():
        out.append(path)
        path = path.parent
    return out


def _release(run_dir: Path, fh, created: list[Path]) -> None:
    """Unlock. While still locked, what taking the lock made goes again: the lock file, then the folders it
    created, as far as they are empty (a refusal before any work)."""
    try:
        (run_dir / LOCK).unlink(missing_ok=True)
        for folder in created:  # deepest first; the first one with anything in it stops the walk
            folder.rmdir()
    except OSError:
        pass
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()
