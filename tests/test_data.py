"""Tests for cfgen.data: safe decoding, PNG encoding, sample keys and sample sources."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cfgen.config import load_config
from cfgen.data.images import ImageDecodeError, decode_image, encode_png
from cfgen.data.base import safe_key
from cfgen.data.sources import list_samples, load_class_names

REPO = Path(__file__).resolve().parents[1]
DIGITS_TOML = REPO / "pipelines" / "digits.toml"


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _noise_png(size: int = 64, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return _png(Image.fromarray(arr, "RGB"))


# ---------------------------------------------------------------- decode_image: good inputs

def test_decode_normal_png_gray_and_rgb():
    arr = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    data = _png(Image.fromarray(arr, "L"))
    out = decode_image(data, 8, 1)
    assert out.dtype == np.uint8
    assert out.shape == (8, 8, 1)
    np.testing.assert_array_equal(out[:, :, 0], arr)

    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[..., 2] = 50
    out3 = decode_image(_png(Image.fromarray(rgb, "RGB")), 8, 3)
    assert out3.shape == (8, 8, 3)
    np.testing.assert_array_equal(out3, rgb)
    # The same RGB image as grayscale: L = R*299/1000 + G*587/1000 + B*114/1000.
    gray = decode_image(_png(Image.fromarray(rgb, "RGB")), 8, 1)
    assert gray.shape == (8, 8, 1)
    assert abs(int(gray[0, 0, 0]) - round(200 * 0.299 + 50 * 0.114)) <= 1


def test_decode_from_path(tmp_path):
    arr = np.full((8, 8), 77, dtype=np.uint8)
    p = tmp_path / "img.png"
    p.write_bytes(_png(Image.fromarray(arr, "L")))
    np.testing.assert_array_equal(decode_image(p, 8, 1)[:, :, 0], arr)
    np.testing.assert_array_equal(decode_image(str(p), 8, 1)[:, :, 0], arr)


def test_decode_resizes_and_center_crops():
    # 12 wide x 4 tall: left and right thirds black, the centre square white.
    arr = np.zeros((4, 12), dtype=np.uint8)
    arr[:, 4:8] = 255
    out = decode_image(_png(Image.fromarray(arr, "L")), 4, 1)
    assert out.shape == (4, 4, 1)
    assert (out == 255).all()  # only the centre square survives the crop
    big = decode_image(_png(Image.fromarray(arr, "L")), 16, 1)
    assert big.shape == (16, 16, 1)
    assert (big == 255).all()


def test_decode_rgba_composited_on_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)          # fully transparent black
    rgba[0, 0] = (255, 0, 0, 255)                        # opaque red
    rgba[0, 1] = (0, 0, 0, 128)                          # half-transparent black
    out = decode_image(_png(Image.fromarray(rgba, "RGBA")), 4, 3)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[3, 3]) == (255, 255, 255)           # transparent -> white, not black
    assert all(abs(int(v) - 127) <= 1 for v in out[0, 1])  # 50% black over white
    gray = decode_image(_png(Image.fromarray(rgba, "RGBA")), 4, 1)
    assert gray[3, 3, 0] == 255


def test_decode_la_composited_on_white():
    la = Image.new("LA", (4, 4), (0, 0))
    out = decode_image(_png(la), 4, 1)
    assert (out == 255).all()


def test_decode_palette():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    img.putpixel((1, 1), 1)
    out = decode_image(_png(img), 4, 3)
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[1, 1]) == (200, 100, 50)


def test_decode_palette_with_transparency_is_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 50, 60, 70] + [0] * (256 * 3 - 6))
    img.putpixel((2, 2), 1)
    img.info["transparency"] = 0
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)
    out = decode_image(buf.getvalue(), 4, 3)
    assert tuple(out[0, 0]) == (255, 255, 255)   # transparent palette entry -> white
    assert tuple(out[2, 2]) == (50, 60, 70)


def test_decode_cmyk_jpeg():
    img = Image.new("CMYK", (8, 8), (255, 0, 0, 0))  # pure cyan
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "CMYK"
    out = decode_image(buf.getvalue(), 8, 3)
    assert out.shape == (8, 8, 3)
    r, g, b = (int(v) for v in out[4, 4])
    assert r <= 10 and g >= 245 and b >= 245


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_decode_16bit_gray_is_scaled_not_clipped(fmt):
    arr = np.array([[65535, 32768], [0, 1000]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    out = decode_image(buf.getvalue(), 2, 1)[:, :, 0]
    assert out[0, 0] == 255
    assert out[0, 1] == 128         # 32768/65535*255 = 127.5 -> 128 (clipping would give 255)
    assert out[1, 0] == 0
    assert out[1, 1] == 4           # 1000/65535*255 = 3.9 (clipping would give 255)


def test_decode_1bit():
    img = Image.new("1", (4, 4), 0)
    img.putpixel((0, 0), 1)
    img.putpixel((3, 2), 1)
    out = decode_image(_png(img), 4, 1)[:, :, 0]
    expected = np.zeros((4, 4), dtype=np.uint8)
    expected[0, 0] = 255
    expected[2, 3] = 255
    np.testing.assert_array_equal(out, expected)


def _exif_jpeg(arr: np.ndarray, orientation: int | None) -> bytes:
    img = Image.fromarray(arr, "L")
    buf = io.BytesIO()
    if orientation is None:
        img.save(buf, format="JPEG", quality=100)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(buf, format="JPEG", quality=100, exif=exif.tobytes())
    return buf.getvalue()


def _left_bright() -> np.ndarray:
    # 16 wide x 8 tall, left half bright; 8-pixel-aligned so JPEG keeps the edge sharp.
    arr = np.full((8, 16), 20, dtype=np.uint8)
    arr[:, :8] = 235
    return arr


def test_decode_exif_without_rotation_reference():
    out = decode_image(_exif_jpeg(_left_bright(), None), 8, 1)[:, :, 0].astype(int)
    # Centre crop of columns 4..11: left half bright, right half dark.
    assert out[:, :4].mean() > 200 and out[:, 4:].mean() < 60
    out1 = decode_image(_exif_jpeg(_left_bright(), 1), 8, 1)[:, :, 0].astype(int)
    assert out1[:, :4].mean() > 200 and out1[:, 4:].mean() < 60


def test_decode_exif_orientation_6_rotates_clockwise():
    out = decode_image(_exif_jpeg(_left_bright(), 6), 8, 1)[:, :, 0].astype(int)
    # Displayed 8 wide x 16 tall, the bright left side is now on top; crop keeps rows 4..11.
    assert out[:4, :].mean() > 200
    assert out[4:, :].mean() < 60
    # Columns are now uniform (the vertical edge became horizontal).
    assert abs(out[:, 0].mean() - out[:, 7].mean()) < 20


def test_decode_exif_orientation_8_rotates_counterclockwise():
    out = decode_image(_exif_jpeg(_left_bright(), 8), 8, 1)[:, :, 0].astype(int)
    assert out[4:, :].mean() > 200
    assert out[:4, :].mean() < 60


def test_decode_1x1_image():
    img = Image.new("L", (1, 1), 123)
    out = decode_image(_png(img), 8, 1)
    assert out.shape == (8, 8, 1)
    assert (out == 123).all()
    rgb = decode_image(_png(Image.new("RGB", (1, 1), (1, 2, 3))), 4, 3)
    assert rgb.shape == (4, 4, 3)
    assert (rgb == np.array([1, 2, 3], dtype=np.uint8)).all()


def test_decode_is_c_contiguous():
    out = decode_image(_png(Image.new("L", (8, 8), 5)), 8, 1)
    assert out.flags["C_CONTIGUOUS"]


# ---------------------------------------------------------------- decode_image: refusals

def test_decompression_bomb_refused():
    data = _png(Image.new("L", (20, 20), 0))
    with pytest.raises(ImageDecodeError, match="too large") as info:
        decode_image(data, 8, 1, max_pixels=100)
    assert "20x20" in str(info.value)
    # The same image at the limit is fine.
    assert decode_image(data, 8, 1, max_pixels=400).shape == (8, 8, 1)


def test_decode_errors_are_value_errors():
    assert issubclass(ImageDecodeError, ValueError)


def test_corrupt_png_data():
    data = bytearray(_noise_png())
    idat = data.index(b"IDAT")
    for i in range(idat + 40, idat + 240):       # scramble compressed pixel data (CRC now wrong)
        data[i] ^= 0x5A
    with pytest.raises(ImageDecodeError) as info:
        decode_image(bytes(data), 8, 3)
    assert str(info.value).startswith("corrupt image")


def test_truncated_png():
    data = _noise_png()
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data[: len(data) // 2], 8, 3)
    assert str(info.value).startswith("corrupt image")


def test_empty_bytes_and_zero_byte_file(tmp_path):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(b"", 8, 1)
    assert str(info.value) == "empty file"
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageDecodeError) as info:
        decode_image(p, 8, 1)
    assert str(info.value) == "empty file"


def test_missing_file(tmp_path):
    p = tmp_path / "nope.png"
    with pytest.raises(ImageDecodeError) as info:
        decode_image(p, 8, 1)
    assert str(info.value).startswith("missing file")
    assert "nope.png" in str(info.value)


def test_directory_is_not_a_file(tmp_path):
    d = tmp_path / "dir.png"
    d.mkdir()
    with pytest.raises(ImageDecodeError) as info:
        decode_image(d, 8, 1)
    assert str(info.value).startswith("not a file")


def test_text_file_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n")
    with pytest.raises(ImageDecodeError) as info:
        decode_image(p, 8, 1)
    assert str(info.value).startswith("not an image")


def test_random_bytes_not_an_image():
    with pytest.raises(ImageDecodeError) as info:
        decode_image(b"\x00\x01garbage" * 10, 8, 1)
    assert str(info.value).startswith("not an image")


# ---------------------------------------------------------------- encode_png

@pytest.mark.parametrize("channels", [1, 3])
def test_encode_png_round_trip(channels):
    arr = np.random.default_rng(channels).integers(0, 256, (8, 8, channels), dtype=np.uint8)
    data = encode_png(arr)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    back = decode_image(data, 8, channels)
    assert back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_encode_png_extremes_round_trip():
    arr = np.zeros((4, 4, 1), dtype=np.uint8)
    arr[::2, ::2] = 255
    np.testing.assert_array_equal(decode_image(encode_png(arr), 4, 1), arr)


def test_encode_png_is_deterministic():
    arr = np.random.default_rng(7).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert encode_png(arr) == encode_png(arr.copy())
    gray = arr[:, :, :1].copy()
    assert encode_png(gray) == encode_png(gray.copy())
    assert encode_png(gray) != encode_png(arr)


# ---------------------------------------------------------------- safe_key

@pytest.mark.parametrize("name", ["digits-00000", "abc", "A_b-9", "x"])
def test_safe_key_keeps_clean_names(name):
    assert safe_key(name) == name


@pytest.mark.parametrize("name", ["a.b", "img.001.png", "dir/sub/file", "with space", "..", "", "ü.jpg", "a/b c.d"])
def test_safe_key_is_safe(name):
    key = safe_key(name)
    assert "." not in key
    assert re.fullmatch(r"[A-Za-z0-9_-]+", key), key
    assert key == safe_key(name)  # stable


def test_safe_key_distinguishes_similar_names():
    assert safe_key("a.b") != safe_key("a_b")
    assert safe_key("a_b") == "a_b"
    assert safe_key("a/b") != safe_key("a.b")
    assert safe_key("a.b").startswith("a_b-")
    assert safe_key("dir/sub/file").startswith("dir_sub_file-")
    assert safe_key("with space").startswith("with_space-")


# ---------------------------------------------------------------- list_samples: digits

@pytest.fixture(scope="module")
def digits_refs():
    return list_samples(load_config(DIGITS_TOML))


def test_digits_samples(digits_refs):
    refs = digits_refs
    assert len(refs) == 1797
    assert refs[0].id == "digits-00000"
    assert refs[1].id == "digits-00001"
    assert refs[-1].id == "digits-01796"
    assert refs[0].origin == "digits:0"
    assert len({r.id for r in refs}) == 1797
    assert {r.label for r in refs} == set(range(10))
    assert all(r.error is None for r in refs)
    assert refs[0].label == 0  # sklearn's first digit is a 0
    img = refs[0].load()
    assert img.dtype == np.uint8
    assert img.shape == (8, 8, 1)
    # 0..16 intensities rescaled to 0..255: every value is round(k * 255/16).
    allowed = {int(np.rint(k * 255.0 / 16.0)) for k in range(17)}
    assert set(np.unique(img).tolist()) <= allowed
    assert img.max() > 200 and img.min() == 0
    # load() returns a fresh copy each time: mutating one does not change the next.
    before = refs[0].load().copy()
    img[:] = 99
    np.testing.assert_array_equal(refs[0].load(), before)


def test_digits_class_names():
    cfg = load_config(DIGITS_TOML)
    assert load_class_names(cfg) == ["zero", "one", "two", "three", "four",
                                     "five", "six", "seven", "eight", "nine"]
    assert load_class_names(load_config(None)) == [str(i) for i in range(10)]


def test_digits_test_split():
    refs = list_samples(load_config(DIGITS_TOML, ["data.use_split=test"]))
    assert len(refs) == 360
    with open(REPO / "manifests" / "digits" / "split.csv", newline="") as fh:
        expected = [row["id"] for row in csv.DictReader(fh) if row["split"] == "test"]
    assert [r.id for r in refs] == expected
    train = list_samples(load_config(DIGITS_TOML), split="train")
    assert len(train) == 1437
    assert not {r.id for r in train} & {r.id for r in refs}


def test_digits_limit():
    refs = list_samples(load_config(DIGITS_TOML, ["data.limit=5"]))
    assert [r.id for r in refs] == [f"digits-{i:05d}" for i in range(5)]


def test_use_split_without_split_file_is_config_error():
    from cfgen.config import ConfigError

    with pytest.raises(ConfigError, match="data.split"):
        list_samples(load_config(None, ["data.use_split=test"]))


# ---------------------------------------------------------------- list_samples: folder

def _write_gray(path: Path, value: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), value).save(path)


@pytest.fixture()
def folder_dataset(tmp_path):
    root = tmp_path / "images"
    _write_gray(root / "cat" / "c1.png", 10)
    _write_gray(root / "cat" / "c2.png", 20)
    _write_gray(root / "dog" / "d1.png", 30, size=16)
    _write_gray(root / "dog" / "sub" / "d2.jpg", 40)
    _write_gray(root / "zebra" / "z1.png", 50)     # not in the class list
    (root / "cat" / "readme.txt").write_text("ignored")
    classes = tmp_path / "classes.txt"
    classes.write_text("dog\ncat\n")               # dog = 0, cat = 1
    return root, classes


def _folder_cfg(root, classes, *extra):
    return load_config(None, ["data.source=folder", f"data.root={root}", f"data.classes={classes}",
                              "data.image_size=8", "data.channels=1", *extra])


def test_folder_source(folder_dataset):
    root, classes = folder_dataset
    refs = list_samples(_folder_cfg(root, classes))
    by_origin = {r.origin: r for r in refs}  # relative to data.root: the manifest names no local path
    assert sorted(by_origin) == ["cat/c1.png", "cat/c2.png", "cat/readme.txt", "dog/d1.png", "dog/sub/d2.jpg",
                                 "zebra/z1.png"]
    # Deterministic order: class dirs sorted, files sorted inside each; files that are no image last.
    assert [Path(r.origin).name for r in refs] == ["c1.png", "c2.png", "d1.png", "d2.jpg", "z1.png", "readme.txt"]
    readme = by_origin["cat/readme.txt"]
    assert readme.label == -1 and readme.error == "not an image file (extension '.txt')"
    assert by_origin["cat/c1.png"].label == 1
    assert by_origin["dog/d1.png"].label == 0
    assert by_origin["dog/sub/d2.jpg"].label == 0
    for name in ["cat/c1.png", "cat/c2.png", "dog/d1.png", "dog/sub/d2.jpg"]:
        assert by_origin[name].error is None
    zebra = by_origin["zebra/z1.png"]
    assert zebra.label == -1
    assert zebra.error.startswith("label not in class list")
    assert "zebra" in zebra.error
    # Keys are safe and unique.
    ids = [r.id for r in refs]
    assert len(set(ids)) == len(ids)
    assert all("." not in i and "/" not in i for i in ids)
    assert by_origin["cat/c1.png"].id == safe_key("cat/c1")
    # Pixels load lazily, at the configured size.
    img = by_origin["cat/c2.png"].load()
    assert img.shape == (8, 8, 1) and (img == 20).all()
    assert (by_origin["dog/d1.png"].load() == 30).all()  # 16x16 resized to 8x8


def test_folder_source_classes_from_dirs(folder_dataset):
    root, _ = folder_dataset
    cfg = load_config(None, ["data.source=folder", f"data.root={root}"])
    assert load_class_names(cfg) == ["cat", "dog", "zebra"]
    refs = list_samples(cfg)
    assert [r.label for r in refs] == [0, 0, 1, 1, 2, -1]  # the last: cat/readme.txt, not an image
    assert [r.error is None for r in refs] == [True] * 5 + [False]


def test_folder_source_missing_root(tmp_path):
    from cfgen.config import ConfigError

    classes = tmp_path / "c.txt"
    classes.write_text("a\nb\n")
    with pytest.raises(ConfigError, match="data.root"):
        list_samples(_folder_cfg(tmp_path / "nope", classes))


def test_duplicate_class_names_rejected(tmp_path):
    from cfgen.config import ConfigError

    classes = tmp_path / "c.txt"
    classes.write_text("a\nb\na\n")
    (tmp_path / "root").mkdir()
    with pytest.raises(ConfigError, match="data.classes"):
        list_samples(_folder_cfg(tmp_path / "root", classes))


# ---------------------------------------------------------------- list_samples: manifest

@pytest.fixture()
def manifest_dataset(tmp_path):
    root = tmp_path / "data"
    _write_gray(root / "a.png", 11)
    _write_gray(root / "b.png", 22)
    _write_gray(tmp_path / "outside.png", 33)
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    manifest = tmp_path / "list.csv"
    rows = [
        ("a.png", "cat", "first"),        # 0 ok
        ("b.png", "1", ""),               # 1 ok, numeric label, id from path
        ("a.png", "horse", "unknown"),    # 2 unknown label
        ("b.png", "", "nolabel"),         # 3 empty label
        ("../outside.png", "dog", "esc"),  # 4 escapes the root
        ("a.png", "dog", "dup"),          # 5 duplicate id ...
        ("b.png", "cat", "dup"),          # 6 ... kept, distinct key
        ("missing.png", "cat", "gone"),   # 7 ok at listing time, fails on load
    ]
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "id"])
        w.writerows(rows)
    return root, classes, manifest


def _manifest_cfg(root, classes, manifest):
    return load_config(None, ["data.source=manifest", f"data.root={root}", f"data.classes={classes}",
                              f"data.manifest={manifest}", "data.image_size=8", "data.channels=1"])


def test_manifest_source(manifest_dataset):
    refs = list_samples(_manifest_cfg(*manifest_dataset))
    assert len(refs) == 8  # every row is kept, failures included
    assert [r.origin for r in refs] == ["a.png", "b.png", "a.png", "b.png", "../outside.png",
                                        "a.png", "b.png", "missing.png"]
    first, from_path, unknown, empty, escape, dup1, dup2, gone = refs

    assert (first.id, first.label, first.error) == ("first", 0, None)
    assert (from_path.id, from_path.label, from_path.error) == ("b", 1, None)
    assert (first.load() == 11).all() and first.load().shape == (8, 8, 1)
    assert (from_path.load() == 22).all()

    assert unknown.label == -1
    assert unknown.error.startswith("label not in class list")
    assert "horse" in unknown.error

    assert empty.label == -1
    assert empty.error == "empty label"

    assert escape.error is not None
    assert escape.error.startswith("path escapes the dataset root")
    assert "../outside.png" in escape.error

    assert dup1.error is None and dup2.error is None
    assert dup1.id == "dup"
    assert dup2.id != dup1.id
    assert dup2.id.startswith("dup")
    assert (dup1.label, dup2.label) == (1, 0)

    assert gone.error is None
    with pytest.raises(ImageDecodeError, match="missing file"):
        gone.load()

    ids = [r.id for r in refs]
    assert len(set(ids)) == len(ids)
    assert all("." not in i for i in ids)


def test_manifest_duplicate_ids_never_collide(tmp_path):
    # The disambiguated key of a duplicate must not collide with an id used verbatim elsewhere.
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,id\nx.png,cat,a\nx.png,cat,a-r2\nx.png,cat,a\nx.png,cat,a\n")
    refs = list_samples(_manifest_cfg(tmp_path, classes, manifest))
    ids = [r.id for r in refs]
    assert len(ids) == 4
    assert len(set(ids)) == 4, ids
    assert ids[0] == "a" and ids[1] == "a-r2"
    assert ids[2].startswith("a-r2") and ids[3].startswith("a-r3")


def test_manifest_root_defaults_to_manifest_dir(manifest_dataset, tmp_path):
    root, classes, _ = manifest_dataset
    manifest = root / "m.csv"
    manifest.write_text("path,label\na.png,dog\n")
    cfg = load_config(None, ["data.source=manifest", f"data.classes={classes}", f"data.manifest={manifest}"])
    (ref,) = list_samples(cfg)
    assert (ref.id, ref.label, ref.error) == ("a", 1, None)
    assert (ref.load() == 11).all()


def test_manifest_missing_columns(tmp_path):
    from cfgen.config import ConfigError

    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,class\nx.png,cat\n")
    with pytest.raises(ConfigError, match="'path' and 'label'"):
        list_samples(_manifest_cfg(tmp_path, classes, manifest))
