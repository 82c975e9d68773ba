"""The output contract exactly as README.md states it, written out by hand.

Tests compare the package's output with these literals (never with constants imported from
cfgen), so a member or a K.json field that the package drops or renames fails a test.
"""

from __future__ import annotations

import json

PAIR_MEMBERS = ("png", "txt", "cls", "cf.png", "cf.txt", "cf.cls", "json")
"""README, Output contract: each sample K has exactly these members."""

PAIR_FIELDS = {
    "id": str, "label": int, "label_name": str, "cf_label": int, "cf_label_name": str,
    "target_strategy": str, "guidance_scale": float, "t_inv": float, "steps": int, "seed": int,
    "p_cf": float, "flipped": bool, "l1": float, "l2": float, "recon_l1": float, "factual_id": str,
    "intervention": str, "edits": str,
}
"""README, Output contract: K.json has these keys, in this order, with these types, in every sample."""

MANIFEST_COLUMNS = ("id", "factual_id", "shard", "origin", "status", "error", "intervention", "edits", "caption",
                    "cf_caption")
"""README: manifest.parquet has one row per pair (and per input that failed before guide) with (at least)
these columns."""


def pair_json(meta: dict) -> bytes:
    """A K.json written as the README says a pair's is (for tests that write shards by hand)."""
    return json.dumps({k: typ(meta[k]) for k, typ in PAIR_FIELDS.items()}).encode()
