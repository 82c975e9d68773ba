"""What every stage shares: the shard loop, and reading a previous stage's shards.

A stage is a function `process(index) -> rows` that writes one output tar
(through `shards.atomic_tar`) and returns one manifest row per input sample. The
loop here skips finished shards, commits the per-shard parquet and then the done
marker (contract.Stage.marker), and shows progress.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from cfgen import distributed
from cfgen.config import Config
from cfgen.contract import ROW_SCHEMA, Stage
from cfgen.diffusion import timestep_grid
from cfgen.errors import ConfigError, FailFast, InputError, ShardError
from cfgen.shards import atomic_write_json, atomic_write_rows, file_digest, read_rows, read_samples


def config_grid(cfg: Config, num_train_timesteps: int) -> list[int]:
    """The DDIM grid of this config; a grid the schedule cannot hold is a config error."""
    try:
        return timestep_grid(num_train_timesteps, cfg.invert.steps, cfg.invert.t_inv)
    except ValueError as exc:
        raise ConfigError(f"invert.steps: {exc}") from None


def finished_inputs(stage: Stage, run_dir: Path) -> list[int]:
    """The finished shards of the stage a later stage reads; none is an error naming the command to run."""
    indices = stage.finished(run_dir)
    if not indices:
        raise InputError(f"no finished {stage.name} shards in {stage.dir(run_dir)}; run `cfgen {stage.name}` first")
    for i in indices:  # an altered tar is caught per sample (its rows' checksums); altered rows only here
        why = rows_changed(stage, run_dir, i)
        if why:
            raise InputError(f"{stage.name} shard {i} was changed after it was finished ({why}); "
                             f"re-run `cfgen {stage.name}` to redo it")
    return indices


def samples_until_error(path: Path, broken: list[str]):
    """The samples of an input shard up to the point where it is corrupt or truncated.

    The error message lands in `broken`; the samples before it are processed as usual.
    """
    try:
        yield from read_samples(path)
    except ShardError as exc:
        broken.append(str(exc))


def mark_unread(rows: list[dict], seen: set[str], broken: list[str]) -> None:
    """Rows still 'ok' whose sample never came out of the input shard become failures."""
    why = f"lost in a corrupt input shard: {broken[0]}" if broken else "missing from the input shard"
    for row in rows:
        if row["status"] == "ok" and row["id"] not in seen:
            row.update(status="failed", error=why, sha256=None)


def stage_rows(stage: Stage, run_dir: Path) -> list[dict]:
    """Every manifest row of a stage's finished shards, in shard order."""
    return [r for i in stage.finished(run_dir) for r in read_rows(stage.rows(run_dir, i))]


def failure_summary(stage: Stage, run_dir: Path) -> dict:
    """Inputs, failures and failure reasons over a stage's finished shards."""
    rows = stage_rows(stage, run_dir)
    failed = [r for r in rows if r["status"] == "failed"]
    return {"count": len(rows), "failed": len(failed),
            "errors": dict(Counter(error_reason(r["error"]) for r in failed))}


def error_reason(error: str | None) -> str:
    """The part of an error message before the first ':' (paths and details dropped), for counting."""
    return (error or "").split(":")[0].strip() or "unknown"


def damage(stage: Stage, run_dir: Path, index: int) -> str | None:
    """Why a finished shard cannot be trusted (its tar or parquet missing, or the bytes of either not those
    its marker recorded), or None."""
    tar, rows = stage.tar(run_dir, index), stage.rows(run_dir, index)
    if not tar.is_file() or not rows.is_file():
        return f"{(tar if not tar.is_file() else rows).name} is missing"
    marker = _marker(stage, run_dir, index)
    if marker is None:
        return f"{stage.marker(run_dir, index).name} is unreadable"
    if marker.get("sha256") != file_digest(tar):
        return f"{tar.name} differs from the checksum its marker recorded"
    return rows_changed(stage, run_dir, index)


def rows_changed(stage: Stage, run_dir: Path, index: int) -> str | None:
    """Why a finished shard's parquet is not the one its marker recorded, or None. A row has no checksum of
    its own (a sample's checksum is in it); a marker from before `rows_sha256` vouches for the tar alone."""
    marker, rows = _marker(stage, run_dir, index), stage.rows(run_dir, index)
    if marker is None:
        return f"{stage.marker(run_dir, index).name} is unreadable"
    if "rows_sha256" in marker and (not rows.is_file() or marker["rows_sha256"] != file_digest(rows)):
        return f"{rows.name} differs from the checksum its marker recorded"
    return None


def _marker(stage: Stage, run_dir: Path, index: int) -> dict | None:
    try:
        marker = json.loads(stage.marker(run_dir, index).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


class _Progress:
    """The live bar of the running stage, counted in samples: `advance` is called from inside a shard's
    batch loop, which `run_shards` does not see (a side channel, so `process` keeps its one argument)."""
    bar: tqdm | None = None
    carry: float = 0.0  # a fraction of a sample counted but not shown yet (the bar shows whole samples)


def advance(samples: float) -> None:
    """Count `samples` more input samples done in the current shard (a no-op outside run_shards); fractions
    add up until they make a whole sample. Reaching the total does not print: the bar's close() prints the
    100% line, so it appears once."""
    bar = _Progress.bar
    if bar is None:
        return
    _Progress.carry += samples
    whole = min(int(_Progress.carry), bar.total - bar.n)
    _Progress.carry -= whole
    _show(bar, whole)


def _show(bar: tqdm, whole: int) -> None:
    """Add `whole` samples to the bar. A count that reads as 100% (the total, or tqdm's rounding of 99.5% and
    up) is set without a display: close() prints the 100% line, so it is printed once."""
    if whole <= 0:
        return
    if (bar.n + whole) * 200 >= bar.total * 199:
        bar.n = min(bar.n + whole, bar.total)
    else:
        bar.update(whole)


class UnetProgress:
    """Moves the bar during a batch, not once at its end (a batch of 256 on a CPU takes minutes): each UNet
    forward on b rows counts b / E samples, E the UNet evaluations per sample this stage has measured on its
    finished batches (before the first: `first_guess`, a lower bound, so the bar never lags and then jumps),
    never past the batch's last sample until `done` settles it. So it ticks every few samples whatever the
    batch size, and the ETA follows the work, escalation rounds included.

        progress = UnetProgress(models.unet, first_guess=steps)
        progress.start(len(batch)); ...compute...; progress.done()     # per batch
        progress.close()
    """

    def __init__(self, unet: torch.nn.Module, first_guess: float):
        self.guess = max(first_guess, 1e-9)
        self.evals = self.samples = 0
        self.batch = self.batch_evals = 0
        self.shown = 0.0
        self.handle = unet.register_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        self.batch_evals += int(args[0].shape[0])
        per_sample = self.evals / self.samples if self.samples else self.guess
        target = min(self.batch - 1, self.batch_evals / per_sample)
        if target > self.shown:
            advance(target - self.shown)
            self.shown = target

    def start(self, samples: int) -> None:
        self.batch, self.batch_evals, self.shown = samples, 0, 0.0

    def done(self) -> None:
        advance(self.batch - self.shown)
        self.evals += self.batch_evals
        self.samples += self.batch
        self.batch = 0

    def close(self) -> None:
        self.handle.remove()


def upstream_rows(stage: Stage, run_dir: Path) -> Callable[[int], int]:
    """Shard i's sample count as the stage before wrote it (its parquet's row count, no data read)."""
    import pyarrow.parquet as pq

    return lambda i: pq.ParquetFile(stage.rows(run_dir, i)).metadata.num_rows


def run_shards(stage: Stage, cfg: Config, run_dir: Path, indices: list[int],
               process: Callable[[int], list[dict]], sizes: Callable[[int], int] | None = None) -> list[int]:
    """Run `process` on this rank's unfinished shards; returns the indices it processed.

    The caller has claimed the stage folder (runstate.claim: same fingerprint, or --overwrite emptied
    it). A finished shard whose files were damaged since is said so and redone. `sizes(i)` is shard i's
    number of input samples: the bar (rank 0's) then counts samples, with rate and ETA, as `process`
    calls `advance`; at the end each rank gives one line of counts, samples/s and time.
    """
    from cfgen.threads import announce

    announce()  # the command's thread policy, now that its checks have passed
    out_dir = stage.dir(run_dir)
    stage.state(run_dir).mkdir(parents=True, exist_ok=True)
    mine = distributed.my_shards(indices)
    for i in mine:
        if stage.marker(run_dir, i).is_file() and (why := damage(stage, run_dir, i)):
            tqdm.write(f"{stage.name}: shard {i} is damaged ({why}); redoing it", file=sys.stderr)
            stage.marker(run_dir, i).unlink()
    todo = [i for i in mine if not stage.marker(run_dir, i).is_file()]
    for i in todo:  # leftovers of a killed run: never read, removed before the shard is redone
        for p in [*out_dir.glob(f"{stage.stem(i)}*.tmp"), *stage.state(run_dir).glob(f"{stage.stem(i)}*.tmp")]:
            p.unlink(missing_ok=True)
    skipped = len(mine) - len(todo)
    if skipped:
        tqdm.write(f"{stage.name}: {skipped} shard(s) already done, skipping", file=sys.stderr)
    desc = stage.name if distributed.world_size() == 1 else f"{stage.name} [rank {distributed.rank()}]"
    if distributed.world_size() > 1 and not mine:
        tqdm.write(f"{desc}: none of the {len(indices)} shard(s) is this rank's; waiting for the others",
                   file=sys.stderr)
    expected = {i: sizes(i) for i in todo} if sizes is not None else {i: 1 for i in todo}
    bar = tqdm(total=sum(expected.values()), desc=desc, unit="sample" if sizes is not None else "shard",
               disable=not todo or not distributed.is_main(), dynamic_ncols=True, smoothing=0.1)
    _Progress.carry = 0.0
    totals = {"ok": 0, "failed": 0, "rejected": 0}
    began = time.perf_counter()
    _Progress.bar = bar if sizes is not None else None
    try:
        for i in todo:
            before = bar.n
            start = time.perf_counter()
            _one_shard(stage, cfg, run_dir, i, process, start, totals)
            _Progress.carry = 0.0  # the shard's count is settled in whole samples:
            _show(bar, max(0, expected[i] - (bar.n - before)))  # those its batches did not count
    finally:
        _Progress.bar = None
        bar.close()
    if todo:  # every rank says what it did (the bar is rank 0's only)
        seconds = time.perf_counter() - began
        n = sum(expected.values()) if sizes is not None else sum(totals.values())
        tqdm.write(f"{desc}: {n} input samples in {len(todo)} shard(s) -> {totals['ok']} ok, {totals['failed']} failed"
                   + (f", {totals['rejected']} rejected" if totals["rejected"] else "")
                   + f"; {n / max(seconds, 1e-9):.1f} samples/s, {seconds:.0f} s", file=sys.stderr)
    _finish(stage, run_dir, indices, out_dir)
    return todo


def _one_shard(stage: Stage, cfg: Config, run_dir: Path, i: int, process: Callable[[int], list[dict]],
               start: float, totals: dict) -> None:
    """process(i), then its rows and, last, its marker."""
    rows = process(i)
    if cfg.pipeline.fail_fast:
        bad = next((r for r in rows if r["status"] == "failed"), None)
        if bad is not None:
            raise FailFast(f"{stage.name} shard {i}: sample {bad['id']} ({bad['origin']}): {bad['error']}")
    atomic_write_rows(stage.rows(run_dir, i), rows, ROW_SCHEMA)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "rejected")}
    # The marker is written last: its presence means the tar and parquet are complete.
    atomic_write_json(stage.marker(run_dir, i), {
        "shard": i, "count": len(rows), **counts, "seconds": time.perf_counter() - start,
        "sha256": file_digest(stage.tar(run_dir, i)), "rows_sha256": file_digest(stage.rows(run_dir, i))})
    for k, v in counts.items():
        totals[k] += v


def _finish(stage: Stage, run_dir: Path, indices: list[int], out_dir: Path) -> None:
    # Every rank waits here, a rank with no shard of its own included (more ranks than shards): the next
    # stage reads every rank's shards. Then rank 0 must see them all -- it will not, on several machines
    # whose run directories are not one shared filesystem; say so rather than merge a part.
    distributed.barrier()
    if distributed.is_main():
        missing = sorted(set(indices) - set(stage.finished(run_dir)))
        if missing:
            raise ShardError(f"{stage.name}: after every rank finished, {len(missing)} of {len(indices)} shard(s) "
                             f"are missing from {out_dir} (first: {stage.stem(missing[0])}); with several "
                             "machines the run directory must be one shared filesystem")
