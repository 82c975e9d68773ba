"""Where a model's files are, and which of them cfgen agrees to load.

Policy, for every model kind: everything loads by local path (`local_files_only=True`,
nothing is downloaded); a component is given either as its own directory or as a
pipeline directory holding it (`unet/`, `vae/`, ...); weights are read from safetensors
(sharded `*.index.json` too); pickle weights (.bin/.pt), which can run code when loaded,
are refused unless `model.trust_checkpoint` (--trust-checkpoint). Every problem is a
one-line ModelLoadError.

    path = resolve_dir(cfg.path(cfg.model.unet), "unet", "config.json")
    safe = check_weights(path, cfg.model.trust_checkpoint)   # True: use_safetensors
"""

from __future__ import annotations

import json
from pathlib import Path

from cfgen.errors import ModelLoadError

SAFE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_WEIGHTS = ("diffusion_pytorch_model.bin", "pytorch_model.bin", "diffusion_pytorch_model.pt",
                  "diffusion_pytorch_model.bin.index.json", "pytorch_model.bin.index.json")
SHARDED_SAFE_WEIGHTS = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


def resolve_dir(path: Path, sub: str, marker: str) -> Path:
    """Accept either the component dir itself or a pipeline dir that contains `sub/`."""
    if (path / marker).is_file():
        return path
    if (path / sub / marker).is_file():
        return path / sub
    if not path.exists():
        raise ModelLoadError(f"model directory not found: {path}")
    raise ModelLoadError(f"no {marker} in {path} or {path / sub}")


def check_weights(path: Path, trust_checkpoint: bool = False) -> bool:
    """True for safetensors weights; pickle weights only with trust_checkpoint (they can run code)."""
    if any((path / n).is_file() for n in SAFE_WEIGHTS + SHARDED_SAFE_WEIGHTS):
        return True
    pickled = next((n for n in PICKLE_WEIGHTS if (path / n).is_file()), None)
    if pickled is None:
        raise ModelLoadError(f"no weights file ({' or '.join(SAFE_WEIGHTS)}) in {path}")
    if not trust_checkpoint:
        raise ModelLoadError(f"{path / pickled} is a pickle checkpoint, which can run code when loaded; "
                             "convert it to safetensors or pass --trust-checkpoint")
    return False


def read_json(path: Path, name: str = "config.json", missing_ok: bool = False) -> dict:
    """A model directory's JSON config ({} for a missing optional one)."""
    file = path / name
    if missing_ok and not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"unreadable {file}: {exc}") from None


def pipeline_root(unet: Path) -> Path:
    """The directory whose vae/, text_encoder/, tokenizer/ belong with this UNet: the pipeline directory
    holding unet/, or the parent of a directory named unet; a bare model directory is its own root."""
    if (unet / "unet").is_dir():
        return unet
    return unet.parent if unet.name == "unet" else unet


def component_dir(cfg, value: str, sub: str) -> Path:
    """A configured component directory, or `sub/` of the UNet's pipeline directory when the key is empty."""
    return cfg.path(value) if value else pipeline_root(cfg.path(cfg.model.unet)) / sub
