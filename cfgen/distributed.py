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


def _group():
    """torch.distributed, joined to the group the launcher set up (gloo / nccl)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState(timeout=BARRIER_TIMEOUT)  # joins the group the launcher set up (gloo / nccl)
    if not dist.is_initialized():  # launched by something accelerate does not recognise (plain torchrun)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=BARRIER_TIMEOUT)
    return dist


def _local_device():
    """This rank's own GPU: nccl collectives run on a device, and GPU 0 is not every rank's."""
    import torch

    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def barrier() -> None:
    """Wait for every process (no-op when running alone).

    torch.distributed's own barrier, not accelerate's `wait_for_everyone`: on a machine without a
    GPU, `accelerate launch --multi_gpu` leaves PartialState at DistributedType.NO (one process, as
    it sees it) although the gloo group is up, and `wait_for_everyone` then returns at once --
    rank 0 merged before the other ranks had written their shards.
    """
    if world_size() == 1:
        return
    dist = _group()
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[_local_device().index])
    else:
        dist.barrier()


def from_main(value):
    """Rank 0's `value` (any picklable object) on every rank; a collective, so every rank must call it.
    Running alone: `value` itself."""
    if world_size() == 1:
        return value
    dist = _group()
    box = [value]
    dist.broadcast_object_list(box, src=0, device=_local_device() if dist.get_backend() == "nccl" else None)
    return box[0]
