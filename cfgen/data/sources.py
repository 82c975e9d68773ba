"""Where samples come from: the built-in digits, an image folder, or a manifest.

`list_samples(cfg)` returns every input as a `SampleRef`, in a deterministic
order, *including* the ones that are already known to be bad (unknown label,
path outside the root): those carry an `error` and become failure rows in the
manifest instead of silently disappearing. Pixels are loaded later, per shard,
with `SampleRef.load`.

Sample ids become WebDataset keys, so they are made dot-free and safe
(`safe_key`); a short hash of the original name keeps them unique.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cfgen.config import Config, ConfigError
from cfgen.data.images import decode_image

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class SampleRef:
    id: str
    """Dot-free, unique key (the WebDataset key of the sample)."""
    label: int
    """Class index (-1 when the label could not be resolved)."""
    origin: str
    """Where it came from (a path, or digits:<index>), recorded in the manifest."""
    load: Callable[[], np.ndarray] | None = None
    """Returns uint8 (H, W, C) pixels; raises ImageDecodeError."""
    error: str | None = None
    """Set when the sample is known to be unusable before any decoding."""
    group: str = ""
    """A known nuisance attribute (shapes: the environment), for group-balanced classifier training."""


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that surrogateescape could not decode


def safe_key(name: str) -> str:
    """A tar-key-safe id: unsafe runs become '_', plus a hash when anything changed.

    WebDataset readers split member names at the first dot, so keys must be
    dot-free; the hash keeps 'a.b' and 'a_b' from colliding.
    """
    cleaned = _UNSAFE.sub("_", name).strip("_") or "sample"
    if cleaned == name:
        return name
    return f"{cleaned}-{hashlib.sha1(name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def load_class_names(cfg: Config) -> list[str]:
    if not cfg.data.classes:
        if cfg.data.source == "digits":
            return [str(i) for i in range(10)]
        if cfg.data.source == "shapes":
            from cfgen.data.shapes import CLASSES

            return list(CLASSES)
        if cfg.data.source == "folder":
            root = cfg.path(cfg.data.root)
            if not root.is_dir():
                raise ConfigError(f"data.root is not a directory: {root}")
            return sorted(p.name for p in root.iterdir() if p.is_dir())
        raise ConfigError("data.classes: a class list file is required for source='manifest'")
    path = cfg.path(cfg.data.classes)
    if not path.is_file():
        raise ConfigError(f"data.classes: file not found: {path}")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(set(names)) != len(names) or not names:
        raise ConfigError(f"data.classes: {path} must list unique, non-empty class names")
    return names


def _digits(cfg: Config) -> list[SampleRef]:
    from sklearn.datasets import load_digits  # ships the data inside the package

    bunch = load_digits()
    # 0..16 intensities -> 0..255, once, so the factual PNG is exactly what is inverted.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    if cfg.data.image_size != 8 or cfg.data.channels != 1:
        raise ConfigError("data: the digits source is 8x8 grayscale (image_size=8, channels=1)")
    refs = []
    for i, (img, label) in enumerate(zip(images, bunch.target)):
        refs.append(SampleRef(id=f"digits-{i:05d}", label=int(label), origin=f"digits:{i}",
                              load=(lambda a=img: a[:, :, None].copy())))
    return refs


def _shapes(cfg: Config, classes: list[str]) -> list[SampleRef]:
    from cfgen.data import shapes

    if len(classes) != len(shapes.CLASSES):
        raise ConfigError(f"data.classes: the shapes source has {len(shapes.CLASSES)} classes "
                          f"({', '.join(shapes.CLASSES)}), the class list has {len(classes)}")
    refs = []
    for i in range(cfg.data.shapes_count):
        f = shapes.factors(i, cfg.data.shapes_spurious)
        refs.append(SampleRef(id=shapes.sample_id(i), label=f.label, origin=shapes.origin(i),
                              group=shapes.ENVIRONMENTS[f.env],
                              load=(lambda f=f: shapes.render(f, f.label, cfg.data.image_size, cfg.data.channels))))
    return refs


def _image_loader(path: Path, cfg: Config):
    return lambda: decode_image(path, cfg.data.image_size, cfg.data.channels, cfg.data.max_image_pixels)


def _folder(cfg: Config, classes: list[str]) -> list[SampleRef]:
    root = cfg.path(cfg.data.root)
    if not root.is_dir():
        raise ConfigError(f"data.root is not a directory: {root}")
    index = {name: i for i, name in enumerate(classes)}
    refs = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        for path in files:
            rel = path.relative_to(root).with_suffix("").as_posix()
            label = index.get(class_dir.name, -1)
            refs.append(SampleRef(
                id=safe_key(rel), label=label, origin=str(path), load=_image_loader(path, cfg),
                error=None if label >= 0 else f"label not in class list: {class_dir.name!r}"))
    return refs


def _read_manifest_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    # Undecodable bytes survive as surrogates, so one bad row fails alone instead of the whole file.
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _manifest(cfg: Config, classes: list[str]) -> list[SampleRef]:
    path = cfg.path(cfg.data.manifest)
    if not path.is_file():
        raise ConfigError(f"data.manifest: file not found: {path}")
    rows = _read_manifest_rows(path)
    if rows and not {"path", "label"} <= set(rows[0]):
        raise ConfigError(f"data.manifest: {path} needs columns 'path' and 'label', has {sorted(rows[0])}")
    root = cfg.path(cfg.data.root) if cfg.data.root else path.parent
    index = {name: i for i, name in enumerate(classes)}
    refs, seen = [], set()
    for n, row in enumerate(rows):
        raw_path = str(row.get("path") or "")
        raw_id = str(row.get("id") or Path(raw_path).with_suffix("").as_posix() or f"row{n}")
        key = safe_key(raw_id)
        while key in seen:  # duplicate ids: keep both, disambiguate by row number
            key = f"{key}-r{n}"
        seen.add(key)
        label_text = str(row.get("label") if row.get("label") is not None else "").strip()
        error = None
        if any(_NOT_UTF8.search(str(v)) for v in row.values() if v is not None):
            refs.append(SampleRef(id=key, label=-1, origin=raw_path.encode("utf-8", "surrogateescape").decode(
                "utf-8", "replace"), error="non-UTF-8 text in the manifest row"))
            continue
        if label_text in index:
            label = index[label_text]
        elif label_text.isdigit() and int(label_text) < len(classes):
            label = int(label_text)
        else:
            label = -1
            error = "empty label" if not label_text else f"label not in class list: {label_text!r}"
        full = (root / raw_path).resolve()
        if error is None and not full.is_relative_to(root.resolve()):
            error = f"path escapes the dataset root: {raw_path}"
        refs.append(SampleRef(id=key, label=label, origin=raw_path, load=_image_loader(full, cfg), error=error))
    return refs


def split_ids(cfg: Config) -> dict[str, str]:
    """data.split read: sample id -> split name."""
    path = cfg.path(cfg.data.split)
    if not path.is_file():
        raise ConfigError(f"data.split: file not found: {path}")
    with path.open(newline="", encoding="utf-8") as fh:
        return {row["id"]: row["split"] for row in csv.DictReader(fh)}


def list_samples(cfg: Config, split: str | None = None) -> list[SampleRef]:
    """Every input sample, in a fixed order. `split` overrides data.use_split."""
    classes = load_class_names(cfg)
    if cfg.data.source == "digits":
        refs = _digits(cfg)
    elif cfg.data.source == "shapes":
        refs = _shapes(cfg, classes)
    elif cfg.data.source == "folder":
        refs = _folder(cfg, classes)
    else:
        refs = _manifest(cfg, classes)
    want = cfg.data.use_split if split is None else split
    if want:
        if not cfg.data.split:
            raise ConfigError(f"data.use_split={want!r} needs data.split (a CSV of id,split)")
        splits = split_ids(cfg)
        refs = [r for r in refs if splits.get(r.id) == want]
    if cfg.data.limit:
        refs = refs[: cfg.data.limit]
    if cfg.data.repeat > 1:
        refs = refs + [dataclasses.replace(r, id=f"{r.id}-r{k}") for k in range(1, cfg.data.repeat) for r in refs]
    return refs
