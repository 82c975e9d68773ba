"""Tests for cfgen.shards: atomic tar commit, reproducible tars, readers, npy helpers, markers."""

from __future__ import annotations

import gc
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pytest

from cfgen.errors import ShardError
from cfgen.shards import atomic_tar, atomic_write_json, atomic_write_rows, npy_bytes, npy_load, read_rows, read_samples



def _samples():
    return [
        {"__key__": "k1", "png": b"\x89PNG-one", "cf.png": b"counterfactual-one", "json": b'{"label": 1}'},
        {"__key__": "k2", "png": b"\x89PNG-two", "cf.png": b"counterfactual-two", "json": b'{"label": 2}'},
        {"__key__": "k3", "png": bytes(range(256)) * 8, "txt": b"a photo of the digit three."},
    ]


def _write(path, samples):
    with atomic_tar(path) as writer:
        for s in samples:
            writer.write(s)
    return path


def test_atomic_tar_success_leaves_only_final(tmp_path):
    path = tmp_path / "cf-000000.tar"
    _write(path, _samples())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cf-000000.tar"]
    with tarfile.open(path) as tar:
        names = tar.getnames()
        infos = tar.getmembers()
    assert names == ["k1.cf.png", "k1.json", "k1.png", "k2.cf.png", "k2.json", "k2.png", "k3.png", "k3.txt"]
    # Fixed headers: reproducible metadata.
    assert {i.mtime for i in infos} == {946684800}
    assert {i.mode for i in infos} == {0o644}
    assert {(i.uname, i.gname) for i in infos} == {("cfgen", "cfgen")}


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_atomic_tar_failure_leaves_nothing(tmp_path):
    path = tmp_path / "cf-000001.tar"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_tar(path) as writer:
            writer.write(_samples()[0])
            raise RuntimeError("boom")
    del writer
    gc.collect()  # the abandoned tar stream must not write to its closed file when finalized
    assert not path.exists()
    assert not (tmp_path / "cf-000001.tar.tmp").exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_tar_failure_keeps_previous_good_tar(tmp_path):
    path = tmp_path / "cf-000002.tar"
    _write(path, _samples())
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with atomic_tar(path) as writer:
            writer.write(_samples()[1])
            raise KeyboardInterrupt
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cf-000002.tar"]


def test_atomic_tar_bad_sample_value_leaves_nothing(tmp_path):
    path = tmp_path / "cf-000003.tar"
    with pytest.raises(ValueError):
        with atomic_tar(path) as writer:
            writer.write({"__key__": "k", "png": 123})  # encoder=False: bytes only
    assert list(tmp_path.iterdir()) == []


def test_tars_are_byte_identical(tmp_path):
    a = _write(tmp_path / "a.tar", _samples())
    b = _write(tmp_path / "b.tar", _samples())
    assert a.read_bytes() == b.read_bytes()
    # Member order inside a sample does not depend on dict order.
    reordered = [dict(reversed(list(s.items()))) for s in _samples()]
    c = _write(tmp_path / "c.tar", reordered)
    assert c.read_bytes() == a.read_bytes()
    # Different content gives a different tar.
    changed = _samples()
    changed[0]["png"] = b"\x89PNG-ONE"
    d = _write(tmp_path / "d.tar", changed)
    assert d.read_bytes() != a.read_bytes()


def test_read_samples_groups_by_key(tmp_path):
    path = _write(tmp_path / "s.tar", _samples())
    got = list(read_samples(path))
    assert [s["__key__"] for s in got] == ["k1", "k2", "k3"]
    assert got[0] == {"__key__": "k1", "png": b"\x89PNG-one", "cf.png": b"counterfactual-one",
                      "json": b'{"label": 1}'}
    assert set(got[1]) == {"__key__", "png", "cf.png", "json"}
    assert got[1]["cf.png"] == b"counterfactual-two"
    assert got[2] == {"__key__": "k3", "png": bytes(range(256)) * 8, "txt": b"a photo of the digit three."}


def test_read_samples_splits_at_first_dot(tmp_path):
    # Hand-built tar (not via TarWriter) to control member names and order.
    path = tmp_path / "h.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("k1.cf.png", b"A"), ("k1.png", b"B"), ("k2.a.b.c", b"C"), ("k1.json", b"D")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
    got = list(read_samples(path))
    # Grouping is by consecutive key, in file order; directories are skipped.
    assert got == [
        {"__key__": "k1", "cf.png": b"A", "png": b"B"},
        {"__key__": "k2", "a.b.c": b"C"},
        {"__key__": "k1", "json": b"D"},
    ]


def test_read_samples_empty_tar(tmp_path):
    path = _write(tmp_path / "e.tar", [])
    assert list(read_samples(path)) == []


def test_read_samples_missing(tmp_path):
    with pytest.raises(ShardError, match="not found"):
        list(read_samples(tmp_path / "nope.tar"))


def test_read_samples_truncated_mid_data(tmp_path):
    path = _write(tmp_path / "t.tar", _samples())
    data = path.read_bytes()
    # Find k3.png's data (2048 bytes) and cut in its middle: not on a 512-byte boundary.
    with tarfile.open(path) as tar:
        info = tar.getmember("k3.png")
    cut = info.offset_data + 700
    assert cut % 512 != 0 and cut < info.offset_data + info.size
    bad = tmp_path / "t-cut.tar"
    bad.write_bytes(data[:cut])
    with pytest.raises(ShardError, match="truncated"):
        list(read_samples(bad))


def test_read_samples_truncated_inside_header(tmp_path):
    path = _write(tmp_path / "t.tar", _samples())
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        info = tar.getmember("k2.png")
    bad = tmp_path / "t-cut.tar"
    bad.write_bytes(data[: info.offset + 100])  # mid-way through a 512-byte header
    with pytest.raises(ShardError):
        list(read_samples(bad))


@pytest.mark.parametrize("where", ["before_header", "after_last_member"])
def test_read_samples_truncated_at_block_boundary(tmp_path, where):
    # tarfile's stream mode alone reads these as a shorter, valid archive.
    path = _write(tmp_path / "t.tar", _samples())
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        k2 = tar.getmember("k2.cf.png")
        last = tar.getmember("k3.txt")
    cut = k2.offset if where == "before_header" else last.offset_data + 512
    assert cut % 512 == 0
    bad = tmp_path / "t-cut.tar"
    bad.write_bytes(data[:cut])
    with pytest.raises(ShardError, match="truncated"):
        list(read_samples(bad))


def test_read_samples_accepts_minimal_tar(tmp_path):
    # A tar with exactly one zero block after the last member (no record padding) is complete.
    path = _write(tmp_path / "t.tar", _samples()[:1])
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + 512  # every member of k1 is < 512 bytes
    trimmed = tmp_path / "t-min.tar"
    trimmed.write_bytes(path.read_bytes()[: end + 512])
    assert [s["__key__"] for s in read_samples(trimmed)] == ["k1"]


def test_read_samples_garbage(tmp_path):
    bad = tmp_path / "g.tar"
    bad.write_bytes(b"this is definitely not a tar archive" * 40)
    with pytest.raises(ShardError):
        list(read_samples(bad))


@pytest.mark.parametrize("arr", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array([[1, -2], [3, 4]], dtype=np.int64),
    np.zeros((2, 8, 8, 1), dtype=np.uint8),
    np.array(3.5, dtype=np.float64),  # 0-d
    np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
])
def test_npy_round_trip(arr):
    data = npy_bytes(arr)
    assert data[:6] == b"\x93NUMPY"
    back = npy_load(data)
    assert back.dtype == arr.dtype
    assert back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_npy_bytes_non_contiguous_and_deterministic():
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    view = base[:, ::2]
    assert not view.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(npy_load(npy_bytes(view)), view)
    assert npy_bytes(base) == npy_bytes(base.copy())


def test_npy_bytes_refuses_object_array():
    with pytest.raises(ValueError):
        npy_bytes(np.array([1, "a"], dtype=object))


def test_npy_load_refuses_object_array():
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}, "a"], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        npy_load(buf.getvalue())


def test_atomic_write_json_marker(tmp_path):
    (tmp_path / "_state").mkdir()
    atomic_write_json(tmp_path / "_state" / "inv-000002_stats.json", {"b": 1, "a": [1, 2]})
    text = (tmp_path / "_state" / "inv-000002_stats.json").read_text()
    assert json.loads(text) == {"a": [1, 2], "b": 1}
    assert text.index('"a"') < text.index('"b"')  # sorted keys
    assert sorted(p.name for p in (tmp_path / "_state").iterdir()) == ["inv-000002_stats.json"]


def test_atomic_write_rows_round_trip(tmp_path):
    schema = pa.schema([("id", pa.string()), ("label", pa.int64()), ("error", pa.string())])
    rows = [{"id": "a", "label": 1, "error": None}, {"id": "b", "label": -1, "error": "empty label"}]
    path = tmp_path / "cf-000000.parquet"
    atomic_write_rows(path, rows, schema)
    assert read_rows(path) == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cf-000000.parquet"]
