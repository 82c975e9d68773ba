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
import os
import re
from pathlib import Path

from cfgen.data.base import SampleRef, Source, safe_key
from cfgen.data.images import decode_image
from cfgen.errors import ConfigError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that surrogateescape could not decode


def _image_loader(path: Path, cfg, name: str):
    """Decodes `path` later; its errors call it `name` (the origin, relative to data.root: no local path in
    the manifest)."""
    return lambda: decode_image(path, cfg.data.image_size, cfg.data.channels, cfg.data.max_image_pixels, name=name)


def printable(name: str) -> str:
    """A file name as text every writer takes: bytes that are not UTF-8 (kept by Python as surrogates)
    become backslash escapes, so a manifest can record them and the row can be traced back."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def stamp(path: Path) -> str:
    """Size and mtime of a file: what tells a changed input from the same one (runstate.py)."""
    try:
        st = path.stat()
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _root(cfg) -> Path:
    root = cfg.path(cfg.data.root)
    if not root.is_dir():
        raise ConfigError(f"data.root is not a directory: {root}")
    return root


class FolderSource(Source):
    """root/<class>/<file>: every regular file under the root gets a row; images are decoded later,
    everything else (other extensions, files outside a class folder, links leaving the root,
    linked folders, which are not followed) is a failed row that says why."""

    name = "folder"

    def class_names(self) -> list[str]:
        return sorted(printable(p.name) for p in _root(self.cfg).iterdir() if p.is_dir() and not p.is_symlink())

    def input_root(self) -> Path:
        return _root(self.cfg)

    def samples(self, classes: list[str]) -> list[SampleRef]:
        root = _root(self.cfg)
        real_root = root.resolve()
        index = {name: i for i, name in enumerate(classes)}
        in_classes, outside = [], []  # (path, label, error)
        for top, dirs, files in os.walk(root):  # followlinks=False: a linked folder is reported, not entered
            here = Path(top)
            linked = [d for d in dirs if (here / d).is_symlink()]
            dirs[:] = [d for d in dirs if d not in linked]
            outside += [(here / d, -1, "symbolic link to a folder (not followed)") for d in linked]
            if here == root:
                outside += [(root / f, -1, "file directly under data.root, not in a class folder") for f in files]
                continue
            class_name = printable(here.relative_to(root).parts[0])
            label = index.get(class_name, -1)
            for f in files:
                path = here / f
                if path.suffix.lower() not in IMAGE_EXTENSIONS:
                    outside.append((path, -1, f"not an image file (extension {printable(path.suffix) or 'none'!r})"))
                elif not path.resolve().is_relative_to(real_root):
                    outside.append((path, -1, "path escapes the dataset root (symbolic link)"))
                else:
                    in_classes.append((path, label, None if label >= 0 else f"label not in class list: {class_name!r}"))
        refs, seen = [], set()
        # images in class-folder then path order (their ids drop the extension); everything else after them
        listed = [(p, y, e, True) for p, y, e in sorted(in_classes)] + [(p, y, e, False) for p, y, e in sorted(outside)]
        for path, label, error, image in listed:
            rel = path.relative_to(root)
            key = safe_key(rel.with_suffix("").as_posix() if image else rel.as_posix())
            if key in seen:  # a.png beside a.jpg: the second keeps its extension in the id
                key = safe_key(rel.as_posix())
            seen.add(key)
            # relative to data.root: the manifest names the file the same on any machine, and no local path leaks
            origin = printable(rel.as_posix())
            refs.append(SampleRef(id=key, label=label, origin=origin,
                                  load=_image_loader(path, self.cfg, origin), error=error, stamp=stamp(path)))
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
            refs.append(SampleRef(id=key, label=label, origin=raw_path, load=_image_loader(full, cfg, raw_path), error=error,
                                  stamp=stamp(full)))
        return refs
