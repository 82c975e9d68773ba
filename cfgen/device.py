"""Which device and precision the networks run on (model.device, model.dtype).

    device = pick_device("auto")      # cuda:<LOCAL_RANK> when a GPU is there, else cpu
    dtype = pick_dtype("auto", device)  # bf16 autocast on GPU, fp32 on CPU
"""

from __future__ import annotations

import os

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():  # one GPU per process under accelerate launch / torchrun
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]
