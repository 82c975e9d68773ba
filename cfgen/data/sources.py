"""The source registry, and the sample list every stage and trainer reads.

    SOURCES["shapes"]              -> ShapesSource (data.source names one of these)
    check_source(cfg)              -> a ConfigError when the config asks what its source cannot give
    open_source(cfg)               -> the configured Source (base.py: class names, samples, causal model)
    list_samples(cfg, split=None)  -> every input SampleRef, filtered by split, classes, class/total limit, repeated
    load_class_names(cfg)          -> data.classes, else the source's own list

`list_samples` returns every input in a deterministic order, *including* the
ones already known to be bad (unknown label, path outside the root): those
carry an `error` and become failure rows in the manifest instead of silently
disappearing. Pixels are loaded later, per shard, with `SampleRef.load`.
Adding a source is a new module with a `Source` subclass and one entry below.
"""

from __future__ import annotations

import csv
import dataclasses

from cfgen.config import Config
from cfgen.data.base import SampleRef, Source
from cfgen.data.digits import DigitsSource
from cfgen.data.files import FolderSource, ManifestSource
from cfgen.data.shapes import ShapesSource
from cfgen.data.shapes_captioned import ShapesCaptionedSource
from cfgen.data.shapes_text import ShapesTextSource
from cfgen.errors import ConfigError

SOURCES: dict[str, type[Source]] = {s.name: s for s in (DigitsSource, ShapesSource, ShapesCaptionedSource,
                                                        ShapesTextSource, FolderSource, ManifestSource)}


def check_source(cfg: Config) -> None:
    """What the config asks of its source, checked before any work (api.load_config): the source is one
    of the registry's, and it records groups when the classifier is to be balanced over them."""
    if cfg.data.source not in SOURCES:
        raise ConfigError(f"data.source: unknown source {cfg.data.source!r} (known: {', '.join(SOURCES)})")
    if cfg.train.classifier.balance_groups and not SOURCES[cfg.data.source].records_groups:
        raise ConfigError(f"train.classifier.balance_groups needs a source that records groups; "
                          f"{cfg.data.source!r} does not")


def open_source(cfg: Config) -> Source:
    check_source(cfg)
    return SOURCES[cfg.data.source](cfg)


def load_class_names(cfg: Config) -> list[str]:
    if not cfg.data.classes:
        return open_source(cfg).class_names()
    path = cfg.path(cfg.data.classes)
    if not path.is_file():
        raise ConfigError(f"data.classes: file not found: {path}")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(set(names)) != len(names) or not names:
        raise ConfigError(f"data.classes: {path} must list unique, non-empty class names")
    if len(names) < 2:
        raise ConfigError(f"data.classes: {path} lists {len(names)} class; a counterfactual changes the class, "
                          "so at least two are needed")
    return names


def split_ids(cfg: Config) -> dict[str, str]:
    """data.split read: sample id -> split name."""
    path = cfg.path(cfg.data.split)
    if not path.is_file():
        raise ConfigError(f"data.split: file not found: {path}")
    with path.open(newline="", encoding="utf-8") as fh:
        return {row["id"]: row["split"] for row in csv.DictReader(fh)}


def list_samples(cfg: Config, split: str | None = None) -> list[SampleRef]:
    """Every input sample, in a fixed order. `split` overrides data.use_split.

    Then data.only_classes, data.class_limit (the first N of each class), data.limit and data.repeat.
    """
    classes = load_class_names(cfg)
    refs = open_source(cfg).samples(classes)
    want = cfg.data.use_split if split is None else split
    if want:
        if not cfg.data.split:
            raise ConfigError(f"data.use_split={want!r} needs data.split (a CSV of id,split)")
        splits = split_ids(cfg)
        refs = [r for r in refs if splits.get(r.id) == want]
    if cfg.data.only_classes:
        unknown = [c for c in cfg.data.only_classes if c not in classes]
        if unknown:
            raise ConfigError(f"data.only_classes: {unknown[0]!r} is not a class (classes: {', '.join(classes)})")
        keep = {classes.index(c) for c in cfg.data.only_classes}
        refs = [r for r in refs if r.label in keep]
    if cfg.data.class_limit:
        seen: dict[int, int] = {}
        kept = []
        for r in refs:
            seen[r.label] = seen.get(r.label, 0) + 1
            if seen[r.label] <= cfg.data.class_limit:
                kept.append(r)
        refs = kept
    if cfg.data.limit:
        refs = refs[: cfg.data.limit]
    if cfg.data.repeat > 1:
        refs = refs + [dataclasses.replace(r, id=f"{r.id}-r{k}") for k in range(1, cfg.data.repeat) for r in refs]
    _check_unique(refs, cfg)
    return refs


def _check_unique(refs: list[SampleRef], cfg: Config) -> None:
    """Ids are tar keys and manifest rows: two samples with one id would overwrite each other in a shard."""
    seen: set[str] = set()
    for r in refs:
        if r.id in seen:
            why = (f" (data.repeat={cfg.data.repeat} names the k-th copy of a sample <id>-r<k>, and an input "
                   "already has that id)" if cfg.data.repeat > 1 else "")
            raise ConfigError(f"data: two input samples have the id {r.id!r}{why}; ids must be unique")
        seen.add(r.id)
