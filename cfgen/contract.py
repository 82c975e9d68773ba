"""The public output contract and the run-directory layout: the one place they are written down.

A run directory holds one folder per stage; each stage writes numbered shards:

    RUN/invert/invert-<i:06d>.tar    K.png  K.noise.npy  K.json          (abduction)
    RUN/guide/guide-<i:06d>.tar      K.png  K.cf.png  K.recon.png  K.json (action + prediction)
    RUN/pairs/pairs-<i:06d>.tar      PAIR_MEMBERS, K.json = PAIR_FIELDS  (the public contract)

and, out of the readers' way in `<folder>/_state/`, each tar's `<stem>.parquet` (one ROW_SCHEMA row
per input sample, failures included) and `<stem>_stats.json` (written last: the shard is done),
with the stage's `fingerprint.json` (runstate.py). The leading underscore is what pyarrow's and
Hugging Face's folder readers skip, so a reader of RUN/pairs sees each pair once: in the tars, and
in the `manifest.parquet`, `stats.json`, `sizes.json` and dataset card `README.md` that the merge
writes beside them (stages/pack.py).
Readers of the pairs (verify, tune, evaluate, any consumer) and the stages that write them
take the names, members and fields from here. Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

CONTRACT_VERSION = 6
"""Bumped whenever a member, a K.json field, the manifest schema or the folder layout changes (2: manifest
column sha256; 3: K.json and manifest factual_id, several pairs per factual image; manifest mask_fraction;
4: per-shard parquet, done markers and fingerprint in <folder>/_state/; 5: K.json and manifest intervention and
edits, manifest caption, cf_caption and the concept checks of text interventions; 6: the image members' extension
follows pack.image_format (png, jpg, webp); K.json and manifest concept, changes_class, class_kept,
concepts_before, concepts_after and the concept checks, `flipped` only where the do() changes the class; manifest
t_inv, steps, and `origin` relative to data.root). Readers take v5 pairs too (PNG members, the v5 fields)."""
STATE = "_state"
"""The sub-folder of every stage folder that holds its bookkeeping (per-shard rows, done markers, fingerprint)."""


@dataclass(frozen=True)
class Stage:
    """Where a stage's shards live and what each of their samples holds."""

    name: str                   # the command that writes it
    folder: str                 # under the run directory
    prefix: str                 # shard files are <prefix>-<i:06d>.*
    members: tuple[str, ...]    # every sample has exactly these (the key K before the first dot)

    def dir(self, run_dir: Path) -> Path:
        return Path(run_dir) / self.folder

    def stem(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}"

    def tar(self, run_dir: Path, index: int) -> Path:
        return self.dir(run_dir) / f"{self.stem(index)}.tar"

    def state(self, run_dir: Path) -> Path:
        """`<folder>/_state`: the bookkeeping, where no folder reader counts it as data."""
        return self.dir(run_dir) / STATE

    def rows(self, run_dir: Path, index: int) -> Path:
        return self.state(run_dir) / f"{self.stem(index)}.parquet"

    def marker(self, run_dir: Path, index: int) -> Path:
        """`<stem>_stats.json`, written last: its presence means the tar and the parquet are complete."""
        return self.state(run_dir) / f"{self.stem(index)}_stats.json"

    def finished(self, run_dir: Path) -> list[int]:
        """Indices of the shards whose done marker exists, sorted."""
        out = []
        for p in self.state(run_dir).glob(f"{self.prefix}-*_stats.json"):
            num = p.name[len(self.prefix) + 1: -len("_stats.json")]
            if num.isdigit():
                out.append(int(num))
        return sorted(out)


INVERT = Stage("invert", "invert", "invert", ("json", "noise.npy", "png"))
GUIDE = Stage("guide", "guide", "guide", ("cf.png", "json", "png", "recon.png"))
PAIRS = Stage("pack", "pairs", "pairs", ("png", "txt", "cls", "cf.png", "cf.txt", "cf.cls", "json"))
"""The pair members with pack.image_format = 'png'; `pair_members` gives them for any format."""

IMAGE_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
"""pack.image_format -> the extension of the image members (K.<ext>, K.cf.<ext>). Every WebDataset and Hugging
Face reader picks an image decoder by the member's extension, so the extension is the format."""


def pair_members(image_format: str = "png") -> tuple[str, ...]:
    """The members of a pair written with `image_format`: the image members carry its extension."""
    ext = IMAGE_EXTENSIONS[image_format]
    return tuple(ext if m == "png" else f"cf.{ext}" if m == "cf.png" else m for m in PAIRS.members)


def image_keys(sample: dict) -> tuple[str, str]:
    """(factual, counterfactual) member names of a pair sample, whatever format it was written in (a v5 pair:
    png); KeyError when it has no image member of a known format."""
    for ext in IMAGE_EXTENSIONS.values():
        if ext in sample:
            return ext, f"cf.{ext}"
    raise KeyError(f"no image member ({', '.join(IMAGE_EXTENSIONS.values())})")

# K.json of a pair: these keys, in this order, with these types, in every sample (HF datasets
# infers its columns from the first samples and fails on a mismatch).
PAIR_FIELDS: dict[str, type] = {
    "id": str, "label": int, "label_name": str, "cf_label": int, "cf_label_name": str,
    "target_strategy": str, "guidance_scale": float, "t_inv": float, "steps": int, "seed": int,
    "p_cf": float, "flipped": bool, "l1": float, "l2": float, "recon_l1": float, "factual_id": str,
    "intervention": str, "edits": str, "concept": str, "changes_class": bool, "class_kept": bool,
    "concepts_before": dict, "concepts_after": dict, "intervened_ok": bool, "descendants_ok": bool,
    "non_descendants_ok": bool,
}
NULLABLE_FIELDS = ("intervened_ok", "descendants_ok", "non_descendants_ok")
"""K.json fields that are null where nothing could say: the concept checks need a source that reads concepts back
from pixels (shapes-text's renderer oracle); descendants_ok is also null for a concept with no descendants."""

INVERT_FIELDS = ("id", "label", "label_name", "origin", "seed")
"""The manifest columns an invert sample's K.json carries (plus steps, t_inv and the DDIM grid)."""
GUIDE_FIELDS = ("id", "label", "label_name", "cf_label", "cf_label_name", "target_strategy", "guidance_scale",
                "seed", "p_cf", "flipped", "l1", "l2", "recon_l1", "factual_id", "intervention", "edits", "caption",
                "cf_caption", "concept", "changes_class", "class_kept", "concepts_before", "concepts_after")
"""The manifest columns a guide sample's K.json carries (plus steps and t_inv)."""


def pair_json(meta: dict) -> bytes:
    """The K.json of a pair: exactly PAIR_FIELDS, cast to their types (None kept where NULLABLE), in their order."""
    return json.dumps({k: None if meta[k] is None and k in NULLABLE_FIELDS else typ(meta[k])
                       for k, typ in PAIR_FIELDS.items()}).encode()


# One row per input sample, in every stage's parquet and in manifest.parquet.
ROW_SCHEMA = pa.schema([
    ("id", pa.string()),            # the sample key (dot-free): the input's id, or <id>_to_<y*> with several targets
    ("factual_id", pa.string()),    # the input sample (factual image) the pair belongs to
    ("shard", pa.int32()),          # shard index
    ("origin", pa.string()),        # source path relative to data.root, or digits:<i>, shapes:<i>
    ("status", pa.string()),        # ok | failed | rejected
    ("error", pa.string()),         # why, when not ok
    ("label", pa.int32()),
    ("label_name", pa.string()),
    ("cf_label", pa.int32()),
    ("cf_label_name", pa.string()),
    ("target_strategy", pa.string()),
    ("guidance_scale", pa.float64()),
    ("seed", pa.int64()),
    ("t_inv", pa.float64()),        # invert.t_inv and invert.steps the pair was made with
    ("steps", pa.int32()),
    ("p_cf", pa.float64()),
    ("flipped", pa.bool_()),        # the do() changes the class and the predictor's top class is cf_label
    ("l1", pa.float64()),
    ("l2", pa.float64()),
    ("recon_l1", pa.float64()),
    ("intervention", pa.string()),          # do(concept=value): the class's for the classifier path
    ("edits", pa.string()),                 # JSON, FM-CGM's manipulator record: the intervened and propagated changes
    ("caption", pa.string()),               # K.txt: the factual caption
    ("cf_caption", pa.string()),            # K.cf.txt: the counterfactual's (the edited caption, in text mode)
    ("concept", pa.string()),               # the intervened concept: 'label' on the classifier path
    ("changes_class", pa.bool_()),          # the do() asks for another class (cf_label != label)
    ("class_kept", pa.bool_()),             # the do() keeps the class and the predictor still gives it
    ("concepts_before", pa.map_(pa.string(), pa.string())),  # concept -> value of the factual image
    ("concepts_after", pa.map_(pa.string(), pa.string())),   # ... and as the do() (and the graph) set them
    ("mask_fraction", pa.float64()),        # share of the image a localized edit could touch (guide.mask; else null)
    # quality (cfgen/quality/measures.py), filled by pack; the truth columns only where the causal model is known
    ("changed_fraction", pa.float64()),     # share of pixels changed visibly
    ("edit_within_recon", pa.bool_()),      # l1 <= recon_l1: the edit is no larger than the s = 0 round trip's error
    ("cld", pa.float64()),                  # Counterfactual Latent Divergence (cfgen/quality/cld.py), lower is better
    ("oracle_label", pa.int32()),           # the renderer oracle's class of the counterfactual
    ("oracle_flipped", pa.bool_()),         # oracle_label == cf_label
    ("truth_l1", pa.float64()),             # L1 counterfactual -> true counterfactual
    ("truth_closer", pa.bool_()),           # closer to the true counterfactual than to the factual
    ("within_recon_bound", pa.bool_()),     # truth_l1 <= recon_l1 (DiCap Cor. 3.4)
    ("outside_change", pa.float64()),       # share of pixels outside the causal region changed
    # concept checks, where the source knows a concept graph and reads concepts back (shapes-text's oracle)
    ("intervened_ok", pa.bool_()),          # the intervened concept reads as its new value
    ("descendants_ok", pa.bool_()),         # every descendant reads as the graph says (null: it has none)
    ("non_descendants_ok", pa.bool_()),     # every non-descendant reads as in the factual state
    ("sha256", pa.string()),                # shards.sample_digest of the sample as written to this stage's tar
])
STATUSES = ("ok", "failed", "rejected")


def make_row(**values) -> dict:
    """A manifest row: every ROW_SCHEMA column, None unless given; unknown columns are a bug."""
    row = {name: None for name in ROW_SCHEMA.names}
    unknown = set(values) - set(row)
    if unknown:
        raise KeyError(f"not manifest columns: {sorted(unknown)}")
    row.update(values)
    return row
