"""Which device and precision the networks run on (model.device, model.dtype).

    device = pick_device("auto")      # cuda:<LOCAL_RANK> when a GPU is there, else cpu
    dtype = pick_dtype("auto", device)  # bf16 autocast on GPU, fp32 on CPU
    use_gpu_math(device)              # TF32 for fp32 work on a GPU
    synchronize(device)               # before reading a clock
"""

from __future__ import annotations

import os

import torch

from cfgen.errors import ConfigError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str) -> torch.device:
    """model.device as a torch.device; a GPU that is not there is a one-line config error, before any work.

    'auto' and a plain 'cuda' mean this rank's GPU (LOCAL_RANK under accelerate launch / torchrun). A GPU
    is also made this process's current device: code that uses "the current device" rather than a
    tensor's (cuBLAS handles, inductor autotuning, nccl) would otherwise run every rank on GPU 0.
    """
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda" if name == "auto" else name)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"model.device={name!r} but no CUDA GPU is available here (use 'auto' or 'cpu')")
    if device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.index >= count:
        raise ConfigError(f"model.device={name!r} means {device} here, but this machine has {count} GPU(s)")
    torch.cuda.set_device(device)
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def use_gpu_math(device: torch.device) -> None:
    """On a GPU, let fp32 matmuls and convolutions run on TF32 tensor cores (model.dtype = fp32 runs;
    bf16 ones are unaffected). cudnn.benchmark stays off: it may pick another algorithm per run, and
    shards are promised to be the same from run to run on the same device type."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
