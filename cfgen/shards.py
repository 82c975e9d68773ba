"""Shard I/O: one TarWriter per shard, atomic commit, readers.

Every file is written to `<name>.tmp` and renamed into place, so a killed run
never exposes a half-written shard; the names and the done markers are the
layout of cfgen/contract.py (img2dataset's convention). Tar headers are fixed
(mtime, uid/gid, user/group names, mode), so the same inputs give
byte-identical shards. We do not use webdataset's ShardWriter: it creates an
empty first shard and numbers shards in write order (DESIGN §6).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cfgen.errors import ShardError

TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z: any fixed value makes tars reproducible


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


@contextmanager
def atomic_tar(path: Path) -> Iterator["webdataset.TarWriter"]:  # noqa: F821
    """Yield a TarWriter on `path.tmp`; rename to `path` only if the block succeeds.

    Write samples as {"__key__": key, "png": bytes, ...}: members are written
    in sorted order, contiguously per sample.
    """
    import webdataset as wds  # here, not at the top: webdataset imports torch, and readers (verify) must not

    tmp = path.with_name(path.name + ".tmp")
    fh = open(tmp, "wb")
    writer = wds.TarWriter(fh, user="cfgen", group="cfgen", mode=0o644, encoder=False, mtime=TAR_MTIME)
    try:
        yield writer
        writer.close()
        fh.close()
        _fsync_replace(tmp, path)
    except BaseException:
        try:  # close the tar stream too, or its finalizer later writes to the closed file
            writer.close()
        except Exception:
            pass
        fh.close()
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def _cleanup_on_error(tmp: Path):
    """Remove a temporary file if writing it failed (e.g. the disk filled up)."""
    try:
        yield
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with _cleanup_on_error(tmp):
        tmp.write_bytes(data)
        _fsync_replace(tmp, path)


def _json_safe(obj):
    """NaN and infinities become null: JSON has no such numbers, and a reader must be able to parse the file."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj) -> None:
    """Valid JSON (allow_nan=False: NaN is written as null), keys sorted, written atomically."""
    text = json.dumps(_json_safe(obj), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def atomic_write_rows(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with _cleanup_on_error(tmp):
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
        _fsync_replace(tmp, path)


def read_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def read_samples(path: Path) -> Iterator[dict]:
    """Samples of a tar as dicts {"__key__": key, member_suffix: bytes}, in file order.

    Members are grouped by the key before the first dot (WebDataset's rule).
    A truncated or corrupt tar raises ShardError.
    """
    if not path.is_file():
        raise ShardError(f"shard not found: {path}")
    current: dict | None = None
    try:
        with tarfile.open(path, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, suffix = info.name.partition(".")
                data = tar.extractfile(info).read()
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                current[suffix] = data
            end = tar.offset
        # Stream mode takes a missing or cut-off header for the end of the archive;
        # a complete tar has a zero end-of-archive block right after its last member.
        with path.open("rb") as fh:
            fh.seek(end)
            tail = fh.read(tarfile.BLOCKSIZE)
        if len(tail) < tarfile.BLOCKSIZE or tail.count(0) != tarfile.BLOCKSIZE:
            raise ShardError(f"corrupt or truncated shard {path.name}: no end-of-archive block at offset {end}")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardError(f"corrupt or truncated shard {path.name}: {exc}") from None
    if current is not None:
        yield current


def sample_digest(sample: dict) -> str:
    """sha256 of a sample's members (name and bytes, in name order; the key is left out): recorded in
    the manifest when the sample is written, compared when it is read back (stages, cfgen verify)."""
    h = hashlib.sha256()
    for name in sorted(k for k in sample if k != "__key__"):
        data = sample[name]
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr, order="C"), allow_pickle=False)  # ascontiguousarray turns 0-d into 1-d
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    """Load a .npy member; object arrays (which need pickle) are refused."""
    return np.load(io.BytesIO(data), allow_pickle=False)
