"""Which process does which shard, and the one barrier before the merge.

`accelerate launch --num_processes N -m cfgen ...` (or torchrun) starts one
process per GPU and sets RANK, WORLD_SIZE and LOCAL_RANK. Shard i belongs to
rank i mod world_size, so results never depend on the number of processes
and each rank writes only its own shards. Nothing but a barrier crosses
processes: after it, rank 0 merges the small per-shard parquet/stats files.

    accelerate launch --num_processes 8 -m cfgen run --config pipelines/x.toml
    accelerate launch --num_machines 2 --machine_rank $R --main_process_ip $HOST \\
        --main_process_port 29500 --num_processes 16 -m cfgen run --config pipelines/x.toml
"""

from __future__ import annotations

import os
from datetime import timedelta

# Shards can take long on one rank while others wait at the barrier: be patient.
BARRIER_TIMEOUT = timedelta(hours=12)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def my_shards(indices: list[int]) -> list[int]:
    r, w = rank(), world_size()
    return [i for i in indices if i % w == r]


def barrier() -> None:
    """Wait for every process (no-op when running alone)."""
    if world_size() == 1:
        return
    from accelerate import PartialState

    # gloo on CPU, nccl on GPU: accelerate picks the backend from the launch environment.
    PartialState(timeout=BARRIER_TIMEOUT).wait_for_everyone()
