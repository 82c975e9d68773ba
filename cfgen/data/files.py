"""Sources of image files on disk: `folder` (root/<class>/<image>) and `manifest` (CSV/parquet).

    [data]
    source = "folder"        # root = "../data/pets": class names are the sub-folder names
    source = "manifest"      # manifest = "train.csv" with path,label[,id]; paths relative to root

Every file becomes a SampleRef whose pixels are decoded later, per shard, by
images.decode_image; what is known to be bad before decoding (an unknown label,
a path escaping the root, a non-UTF-8 row) is a SampleRef with an `error`, so it
becomes a failure row instead of disappearing.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from cfgen.data.base import SampleRef, Source, safe_key
from cfgen.data.images import decode_image
from cfgen.errors import ConfigError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that surrogateescape could not decode


def _image_loader(path: Path, cfg):
    return lambda: decode_image(path, cfg.data.image_size, cfg.data.channels, cfg.data.max_image_pixels)


def _root(cfg) -> Path:
    root = cfg.path(cfg.data.root)
    if not root.is_dir():
        raise ConfigError(f"data.root is not a directory: {root}")
    return root


class FolderSource(Source):
    name = "folder"

    def class_names(self) -> list[str]:
        return sorted(p.name for p in _root(self.cfg).iterdir() if p.is_dir())

    def samples(self, classes: list[str]) -> list[SampleRef]:
        root = _root(self.cfg)
        index = {name: i for i, name in enumerate(classes)}
        refs = []
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            for path in files:
                rel = path.relative_to(root).with_suffix("").as_posix()
                label = index.get(class_dir.name, -1)
                refs.append(SampleRef(
                    id=safe_key(rel), label=label, origin=str(path), load=_image_loader(path, self.cfg),
                    error=None if label >= 0 else f"label not in class list: {class_dir.name!r}"))
        return refs


def _read_manifest_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    # Undecodable bytes survive as surrogates, so one bad row fails alone instead of the whole file.
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    return list(csv.DictReader(io.StringIO(text, newline="")))


class ManifestSource(Source):
    name = "manifest"

    def class_names(self) -> list[str]:
        raise ConfigError("data.classes: a class list file is required for source='manifest'")

    def samples(self, classes: list[str]) -> list[SampleRef]:
        cfg = self.cfg
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
