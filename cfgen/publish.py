"""Publish a run's pairs as a Hugging Face dataset: RUN/pairs as it is, its card as the dataset's README.md.

    cfgen publish runs/digits --repo you/digits-pairs [--private]   # huggingface_hub upload_folder
    cfgen publish runs/digits --to /data/digits-pairs               # the same files, copied to a folder
    cfgen publish runs/digits --dry-run                             # list what would be sent

What is sent (PUBLISHED): the pair tars, README.md (the dataset card, cfgen/card.py), manifest.parquet,
stats.json and sizes.json: a folder `datasets.load_dataset` and webdataset read as they read RUN/pairs.
What stays: config.toml (the resolved config holds this machine's absolute paths) and _state/ (resume
bookkeeping). Before anything is sent: the card loads with huggingface_hub's DatasetCard.load, `datasets`
parses its configs and features (when installed), and no file sent names a local path of the run (its
folder, data.root, a model directory). upload_folder then has the Hub validate the card's YAML before
it hashes a file (network: the one step offline tests cannot take).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cfgen.contract import PAIRS
from cfgen.errors import InputError, UserError

PUBLISHED = (f"{PAIRS.prefix}-*.tar", "README.md", "manifest.parquet", "stats.json", "sizes.json")
"""upload_folder's allow_patterns: the files of RUN/pairs a dataset repository gets."""
TEXT_FILES = ("README.md", "stats.json", "sizes.json")


def published_files(run_dir: Path) -> list[str]:
    """The files of RUN/pairs that upload_folder sends, relative names, sorted (huggingface_hub's own filter)."""
    from huggingface_hub.utils import filter_repo_objects

    folder = PAIRS.dir(run_dir)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return list(filter_repo_objects(names, allow_patterns=list(PUBLISHED)))


def local_paths(run_dir: Path) -> list[str]:
    """Absolute paths of this machine that a published file must not name: the run directory and every path
    the run's config resolved (data.root, the manifest, the class list, each model directory)."""
    from cfgen.config import PATH_FIELDS, load_config

    out = {str(Path(run_dir).resolve())}
    config = PAIRS.dir(run_dir) / "config.toml"
    if config.is_file():
        cfg = load_config(config)
        for section, key in PATH_FIELDS:
            value = getattr(getattr(cfg, section), key)
            if value:
                out.add(str(cfg.path(value)))
    return sorted(p for p in out if len(Path(p).parts) > 2)  # not '/' or '/work': every path starts so


def _named_paths(folder: Path, forbidden: list[str]) -> list[tuple[str, str]]:
    """(file, local path) for each published text and manifest string that names a forbidden path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    found = []
    for name in TEXT_FILES:
        text = (folder / name).read_text(encoding="utf-8", errors="replace")
        found += [(name, p) for p in forbidden if p in text]
    table = pq.read_table(folder / "manifest.parquet")
    for column in table.column_names:
        if pa.types.is_string(table.schema.field(column).type):
            values = [v for v in table.column(column).to_pylist() if v]
            found += [(f"manifest.parquet column {column}", p) for p in forbidden if any(p in v for v in values)]
    return found


def check(run_dir: Path):
    """The DatasetCard of RUN/pairs once everything that can be checked offline is: the files exist, the card
    loads and parses as `datasets` reads it, no published file names a local path. One-line errors (exit 2)."""
    from huggingface_hub import DatasetCard

    folder = PAIRS.dir(run_dir)
    missing = [n for n in ("README.md", "manifest.parquet", "stats.json", "sizes.json") if not (folder / n).is_file()]
    if missing or not list(folder.glob(f"{PAIRS.prefix}-*.tar")):
        raise InputError(f"publish: {folder} lacks {', '.join(missing) or 'pair shards'}; run `cfgen pack` first")
    try:
        card = DatasetCard.load(folder / "README.md")
    except ValueError as exc:
        raise InputError(f"publish: {folder / 'README.md'} is not a dataset card: {exc}") from None
    try:
        from datasets.info import DatasetInfosDict
        from datasets.utils.metadata import MetadataConfigs
    except ImportError:  # datasets is a dev extra: the Hub still validates the YAML on upload
        pass
    else:
        try:
            MetadataConfigs.from_dataset_card_data(card.data)
            DatasetInfosDict.from_dataset_card_data(card.data)
        except (ValueError, TypeError, KeyError) as exc:
            raise InputError(f"publish: the card's configs or features do not parse: {exc}") from None
    named = _named_paths(folder, local_paths(run_dir))
    if named:
        where, path = named[0]
        raise UserError(f"publish: {where} names a local path ({path}); re-run `cfgen pack` with this cfgen "
                        "(manifest origins are relative to data.root) or edit it out")
    return card


def copy_to(run_dir: Path, dest: Path) -> list[str]:
    """Copy the published files to `dest` (a new or empty folder): the dataset as the Hub would hold it."""
    check(run_dir)
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise UserError(f"publish: {dest} is not empty")
    names = published_files(run_dir)
    for name in names:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PAIRS.dir(run_dir) / name, dest / name)
    return names


def upload(run_dir: Path, repo_id: str, private: bool = False, api=None):
    """Create the dataset repository if needed and upload the published files in one upload_folder call
    (the Hub validates the card's YAML first). `api`: an HfApi (default: a new one, the saved token)."""
    from huggingface_hub import HfApi

    check(run_dir)
    api = api or HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=PAIRS.dir(run_dir),
                             allow_patterns=list(PUBLISHED), commit_message="cfgen publish: pairs and dataset card")
