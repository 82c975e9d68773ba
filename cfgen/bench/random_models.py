"""Random-weight models with the shapes of real ones, and an offline BPE tokenizer, for timing where
no checkpoint can be downloaded: compute depends on the shapes only; their outputs mean nothing.

    python -m cfgen.bench.random_models /tmp/clip-b32    # a CLIP ViT-B/32-shaped CLIPModel + tokenizer
    cfgen tune --config pipelines/digits.toml --bench --set tune.backend=transformers --set tune.vlm=/tmp/clip-b32
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def bpe_tokenizer(words, alphabet: str = "abcdefghijklmnopqrstuvwxyz.", **kwargs):
    """An offline CLIP BPE tokenizer whose merges spell each of `words` as one token."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[tuple[str, str]] = []
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            if (parts[0], parts[1]) not in merges:
                merges.append((parts[0], parts[1]))
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = [parts[0] + parts[1]] + parts[2:]
    return CLIPTokenizer(vocab=vocab, merges=merges, **kwargs)


def save_timing_clip(path: Path, words: tuple[str, ...] = ("a", "photo", "of", "the", "digit")) -> Path:
    """A transformers CLIPModel with openai/clip-vit-base-patch32's shapes (CLIPConfig's defaults:
    ViT-B/32 at 224 px, 12-layer 512-wide text transformer) and RANDOM weights, plus a CLIP BPE
    tokenizer over single characters with merges that make each of `words` one token.

    For timing the cache on a realistically sized image encoder where no checkpoint can be
    downloaded: compute depends on the shapes only. Its accuracies mean nothing.

        python -m cfgen.bench.random_models /tmp/clip-b32
        cfgen tune --config pipelines/digits.toml --bench --set tune.backend=transformers --set tune.vlm=/tmp/clip-b32
    """
    from transformers import CLIPConfig, CLIPModel

    tokenizer = bpe_tokenizer(words, "abcdefghijklmnopqrstuvwxyz0123456789.,'-")
    vocab = tokenizer.get_vocab()
    config = CLIPConfig(text_config={"vocab_size": len(vocab), "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1})
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


if __name__ == "__main__":
    print(save_timing_clip(Path(sys.argv[1])))
