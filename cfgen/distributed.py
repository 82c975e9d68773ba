"""Which process does which shard.

`accelerate launch` (and torchrun) start one process per GPU and set RANK and
WORLD_SIZE; shard i belongs to rank i mod world_size, so results never depend
on the number of processes and each rank writes only its own shards.
"""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def my_shards(indices: list[int]) -> list[int]:
    r, w = rank(), world_size()
    return [i for i in indices if i % w == r]
