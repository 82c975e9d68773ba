"""What a data source is: its class names, its samples, and optionally its causal model.

A source (digits.py, shapes.py, files.py; registered in sources.py) answers

    class_names()     the class list, when no data.classes file is given
    samples(classes)  every input as a SampleRef, in a fixed order, bad ones included (with `error`)
    causal            None, or a CausalModel: the source knows how its images were generated

and nothing outside a source's own module asks which source it is: quality, report,
sweep, pack and training ask these questions instead.

    source = open_source(cfg)                        # sources.py
    refs = source.samples(load_class_names(cfg))
    if source.causal is not None:
        truth = source.causal.true_counterfactual(refs[0].origin, 2)
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

import numpy as np

if TYPE_CHECKING:
    from cfgen.config import Config


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
    stamp: str = ""
    """What changes when the input changes without changing its name (files: size and mtime), for the
    run fingerprint (runstate.py); '' for generated samples, which depend on their index alone."""
    concepts: dict[str, str] = field(default_factory=dict)
    """The sample's concept state, concept -> value, where the source knows one (shapes-text); else {}."""
    caption: str = ""
    """The sample's own caption (shapes-text: its concept graph's template); '' = pack.caption of its class."""


class CausalModel:
    """A source whose data-generating process is known, asked per sample by its manifest `origin`.

    With it a counterfactual can be checked against the TRUE one (cfgen/quality/measures.py): the same
    exogenous factors rendered under another class.
    """

    def renders(self, origin: str) -> np.ndarray:
        """(K, H, W, C) uint8: the sample's exogenous factors rendered under every class k."""
        raise NotImplementedError

    def region(self, origin: str) -> np.ndarray:
        """(H, W) bool: where the causal feature of any class can be; outside it nothing should change."""
        raise NotImplementedError

    def true_counterfactual(self, origin: str, label: int) -> np.ndarray:
        """(H, W, C) uint8: the sample had its class been `label`."""
        return self.renders(origin)[label]


class Source:
    """A labelled image dataset (see the module docstring); one instance per config."""

    name: ClassVar[str]
    records_groups: ClassVar[bool] = False
    """Whether SampleRef.group holds a nuisance group (train.classifier.balance_groups needs it)."""

    def __init__(self, cfg: "Config"):
        self.cfg = cfg

    def class_names(self) -> list[str]:
        """The class list when data.classes names no file."""
        raise NotImplementedError

    def samples(self, classes: list[str]) -> list[SampleRef]:
        raise NotImplementedError

    @property
    def causal(self) -> CausalModel | None:
        return None

    def input_root(self) -> Path | None:
        """The folder the inputs are read from, if any (a run directory must not be inside it)."""
        return None


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key(name: str) -> str:
    """A tar-key-safe id: unsafe runs become '_', plus a hash when anything changed.

    WebDataset readers split member names at the first dot, so keys must be
    dot-free; the hash keeps 'a.b' and 'a_b' from colliding.
    """
    cleaned = _UNSAFE.sub("_", name).strip("_") or "sample"
    if cleaned == name:
        return name
    return f"{cleaned}-{hashlib.sha1(name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
