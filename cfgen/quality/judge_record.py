"""Where `cfgen evaluate` leaves its figures, and which pairs they were measured on.

Its own module because two sides read it: `cfgen evaluate` writes judge.json and then the dataset card,
and the card (cfgen/card.py) and the report quote judge.json only while it still describes the pairs
as they are (a re-pack makes it stale). With these helpers in evaluate.py, card.py imported evaluate
back: a circle.
"""

from __future__ import annotations

from pathlib import Path

from cfgen.contract import PAIRS
from cfgen.shards import file_digest


def result_path(run_dir: Path) -> Path:
    """Where `cfgen evaluate` leaves its figures: outside pairs/, which readers open as a dataset."""
    return Path(run_dir) / "evaluate" / "judge.json"


def manifest_digest(run_dir: Path) -> str | None:
    """sha256 of RUN/pairs/manifest.parquet: a re-pack changes it, so a reader can tell stale figures."""
    manifest = PAIRS.dir(run_dir) / "manifest.parquet"
    return file_digest(manifest) if manifest.is_file() else None
