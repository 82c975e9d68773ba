"""The output contract exactly as README.md states it, written out by hand.

Tests compare the package's output with these literals (never with constants imported from
cfgen), so a member or a K.json field that the package drops or renames fails a test.
"""

from __future__ import annotations

import json

PAIR_MEMBERS = ("png", "txt", "cls", "cf.png", "cf.txt", "cf.cls", "json")
"""README, Output contract: each sample K has exactly these members (pack.image_format = "png", the default)."""

MEMBERS_BY_FORMAT = {
    "png": PAIR_MEMBERS,
    "jpeg": ("jpg", "txt", "cls", "cf.jpg", "cf.txt", "cf.cls", "json"),
    "webp": ("webp", "txt", "cls", "cf.webp", "cf.txt", "cf.cls", "json"),
}
"""README, Output contract: the image members' extension follows pack.image_format."""

PAIR_FIELDS = {
    "id": str, "label": int, "label_name": str, "cf_label": int, "cf_label_name": str,
    "target_strategy": str, "guidance_scale": float, "t_inv": float, "steps": int, "seed": int,
    "p_cf": float, "flipped": bool, "l1": float, "l2": float, "recon_l1": float, "factual_id": str,
    "intervention": str, "edits": str, "concept": str, "changes_class": bool, "class_kept": bool,
    "concepts_before": dict, "concepts_after": dict, "intervened_ok": bool, "descendants_ok": bool,
    "non_descendants_ok": bool,
}
"""README, Output contract: K.json has these keys, in this order, with these types, in every sample."""

NULLABLE = ("intervened_ok", "descendants_ok", "non_descendants_ok")
"""README, Output contract: these K.json fields may be null (the source cannot read concepts back)."""

MANIFEST_COLUMNS = ("id", "factual_id", "shard", "origin", "status", "error", "t_inv", "steps", "intervention", "edits",
                    "concept", "changes_class", "class_kept", "concepts_before", "concepts_after", "intervened_ok",
                    "descendants_ok", "non_descendants_ok", "caption", "cf_caption")
"""README: manifest.parquet has one row per pair (and per input that failed before guide) with (at least)
these columns."""

CONTRACT_VERSION = 6
"""README, Output contract: the version these literals spell out."""


def has_type(meta: dict, key: str) -> bool:
    """K.json[key] has the contract's type (or is null where the contract allows it)."""
    return type(meta[key]) is PAIR_FIELDS[key] or (meta[key] is None and key in NULLABLE)


def pair_json(meta: dict) -> bytes:
    """A K.json written as the README says a pair's is (for tests that write shards by hand); the v6 fields of a
    classifier-path pair are filled in when `meta` lacks them."""
    meta = {"concept": "label", "changes_class": True, "class_kept": False,
            "concepts_before": {"label": meta.get("label_name")}, "concepts_after": {"label": meta.get("cf_label_name")},
            "intervened_ok": None, "descendants_ok": None, "non_descendants_ok": None, **meta}
    return json.dumps({k: None if meta[k] is None and k in NULLABLE else typ(meta[k])
                       for k, typ in PAIR_FIELDS.items()}).encode()
