"""Causal Semantic Guidance (cfgen/csg.py) on a tiny random UNet2DConditionModel: the recorder changes
nothing, the same-caption round trip is exact, masks are M1 AND M2 computed by hand, and with preserve on
the image outside the masks comes back bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel

from cfgen.csg import (ConceptEdit, CSGParams, abduct, attention_map, base_eps, csg_reverse, quantile_mask,
                       recording_cross_attention, smooth, text_eps, token_positions)
from cfgen.diffusion import ddim_step, guided_reverse, timestep_grid

B, C, SIDE, TOKENS, WIDTH = 2, 4, 8, 7, 32
ALPHAS = DDIMScheduler().alphas_cumprod.double()  # diffusers' default schedule: 1000 steps, linear betas


# FM-CGM's settings (s_e = 8, lambda = 0.7 as a quantile, intersect, preserve); CSGParams has no defaults of
# its own for what a pipeline's [text] sets, so every test says which settings it runs
FMCGM = {"edit_scale": 8.0, "threshold": 0.7, "warmup": 0, "intersect": True, "preserve": True, "mask_rule": "quantile"}


def fmcgm(**changes) -> CSGParams:
    return CSGParams(**{**FMCGM, **changes})


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=SIDE, in_channels=C, out_channels=C, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, attention_head_dim=8, norm_num_groups=8).double().eval()


def _randn(*shape, seed):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


X0 = _randn(B, C, SIDE, SIDE, seed=1)          # the "image" (a latent: 4 channels)
Y, EMPTY = _randn(1, TOKENS, WIDTH, seed=2), _randn(1, TOKENS, WIDTH, seed=3)   # factual caption, ∅
EDIT_A, EDIT_B = _randn(B, TOKENS, WIDTH, seed=4), _randn(1, TOKENS, WIDTH, seed=5)  # two concepts' prompts


def test_recorder_is_the_default_processor_and_records_distributions(unet):
    t = torch.full((B,), 500)
    plain = unet(X0, t, encoder_hidden_states=Y.expand(B, -1, -1)).sample
    default = type(next(iter(unet.attn_processors.values())))
    with recording_cross_attention(unet) as store:
        store.start()
        recorded = unet(X0, t, encoder_hidden_states=Y.expand(B, -1, -1)).sample
    torch.testing.assert_close(recorded, plain, rtol=1e-10, atol=1e-12)
    assert all(type(p) is default for p in unet.attn_processors.values())  # restored on exit
    # one map per cross-attention layer: down 8x8, down 4x4, mid 4x4, up 4x4 (x2), up 8x8 (x2)
    assert [m.shape for m in store.maps] == [(B, L, TOKENS) for L in (64, 16, 16, 16, 16, 64, 64)]
    for m in store.maps:
        torch.testing.assert_close(m.sum(dim=-1), torch.ones(m.shape[:2], dtype=m.dtype))
    assert attention_map(store.maps, [1, 2], (SIDE, SIDE)).shape == (B, 1, SIDE, SIDE)


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_same_caption_round_trip_is_exact(unet, w):
    eps = text_eps(unet, ALPHAS)
    grid = timestep_grid(1000, 4, 0.6)
    params = fmcgm(guidance_scale=w, preserve=False)
    ref = abduct(eps, X0, Y, ALPHAS, grid, params, EMPTY)
    back = csg_reverse(eps, ref, Y, [], ALPHAS, grid, params, EMPTY).x
    assert torch.allclose(back, X0, atol=1e-12)  # test_diffusion's s = 0 round-trip tolerance
    # plain DDIM down the same grid drifts: the residuals r_i are what makes it exact
    plain = guided_reverse(base_eps(eps, Y, EMPTY, w), None, ref.x[-1], ALPHAS, grid)
    assert (plain - X0).abs().max() > 1e-3


def test_no_edit_is_the_plain_reconstruction(unet):
    eps = text_eps(unet, ALPHAS)
    grid = timestep_grid(1000, 3, 0.6)
    off = fmcgm(preserve=False)
    ref = abduct(eps, X0, Y, ALPHAS, grid, off)
    with recording_cross_attention(unet) as store:  # one attention processor for all three (SDPA rounds apart)
        plain = csg_reverse(eps, ref, Y, [], ALPHAS, grid, off).x
        zero = csg_reverse(eps, ref, Y, [ConceptEdit(EDIT_A, [1])], ALPHAS, grid,
                           fmcgm(edit_scale=0.0, preserve=False), EMPTY, store)
        kept = csg_reverse(eps, ref, Y, [ConceptEdit(EDIT_A, [1])], ALPHAS, grid,
                           fmcgm(edit_scale=0.0), EMPTY, store)
    assert torch.equal(zero.x, plain) and not zero.union.any()
    assert torch.equal(kept.x, X0)  # preserve with no mask: the factual trajectory itself


def test_one_step_masks_are_m1_and_m2_by_hand(unet):
    eps = text_eps(unet, ALPHAS)
    grid, lam, s = [0, 600], 0.5, 2.0
    a_t, a_0 = ALPHAS[600].item(), ALPHAS[0].item()
    params = fmcgm(edit_scale=s, threshold=lam, warmup=0)
    ref = abduct(eps, X0, Y, ALPHAS, grid, params)
    u, t = ref.x[-1], torch.full((B,), 600)
    with recording_cross_attention(unet) as store:
        out = csg_reverse(eps, ref, Y, [ConceptEdit(EDIT_A, [2, 3])], ALPHAS, grid, params, EMPTY, store)
        store.start()
        e_c = unet(u, t, encoder_hidden_states=EDIT_A).sample
        maps = store.maps
    e_u = unet(u, t, encoder_hidden_states=EMPTY.expand(B, -1, -1)).sample
    d = e_c - e_u
    # M2: |d| summed over channels, at or above its per-sample median (lambda = 0.5)
    v2 = d.abs().sum(dim=1, keepdim=True)
    m2 = v2 >= torch.quantile(v2.flatten(1), lam, dim=1).view(B, 1, 1, 1)
    # M1: tokens 2 and 3 summed, each layer upsampled to 8x8, layers averaged, smoothed, median-thresholded
    ups = [F.interpolate(m[:, :, [2, 3]].sum(-1).view(B, 1, *(2 * [int(m.shape[1] ** 0.5)])), size=(SIDE, SIDE),
                         mode="bilinear", align_corners=False) for m in maps]
    v1 = smooth(torch.stack(ups).mean(0))
    m1 = v1 >= torch.quantile(v1.flatten(1), lam, dim=1).view(B, 1, 1, 1)
    assert torch.equal(out.masks[:, :1], m1 & m2) and torch.equal(out.union, m1 & m2)
    assert (m1 & m2).sum() < min(m1.sum(), m2.sum())  # a real intersection, not one mask
    # the step itself: e^ = e^f_0 + s M d inside (r at the top makes e_b + r = e^f_0), x0 outside (preserve)
    inside = ddim_step(u, ref.eps[0] + s * (m1 & m2) * d, a_t, a_0)
    torch.testing.assert_close(out.x, torch.where(m1 & m2, inside, X0), rtol=0, atol=1e-12)
    assert torch.equal(out.x[~(m1 & m2).expand_as(out.x)], X0[~(m1 & m2).expand_as(X0)])


@pytest.mark.parametrize("combine", ["sum", "mean"])
def test_terms_sharing_one_prompt_sum_or_average_where_masks_overlap(unet, combine):
    # edit_prompt 'counterfactual': every term is Y' (here EDIT_A) with its own concept's tokens, so each d_c
    # is the same d; 'sum' weighs d by how many masks cover a pixel, 'mean' by 1 wherever any does
    eps = text_eps(unet, ALPHAS)
    grid, s = [0, 600], 2.0
    a_t, a_0 = ALPHAS[600].item(), ALPHAS[0].item()
    params = fmcgm(edit_scale=s, threshold=0.4, combine=combine)
    ref = abduct(eps, X0, Y, ALPHAS, grid, params)
    u, t = ref.x[-1], torch.full((B,), 600)
    with recording_cross_attention(unet) as store:
        out = csg_reverse(eps, ref, Y, [ConceptEdit(EDIT_A, [1, 2]), ConceptEdit(EDIT_A, [4, 5])], ALPHAS, grid,
                          params, EMPTY, store)
    d = unet(u, t, encoder_hidden_states=EDIT_A).sample - unet(u, t, encoder_hidden_states=EMPTY.expand(B, -1, -1)).sample
    m_a, m_b = out.masks[:, :1], out.masks[:, 1:]
    both, either = m_a & m_b, m_a | m_b
    assert both.any() and (either & ~both).any()  # overlap and not: the two rules differ here
    weight = either.double() if combine == "mean" else m_a.double() + m_b.double()
    inside = ddim_step(u, ref.eps[0] + s * weight * d, a_t, a_0)
    torch.testing.assert_close(out.x, torch.where(either, inside, X0), rtol=0, atol=1e-12)


def test_terms_with_one_prompt_tensor_run_it_once(unet):
    # the same result whether two terms hold one tensor or two equal copies, with a third fewer UNet rows
    base = text_eps(unet, ALPHAS)
    rows = []

    def eps(x, t, emb):
        rows.append(x.shape[0])
        return base(x, t, emb)

    grid = timestep_grid(1000, 3, 0.6)
    params = fmcgm(edit_scale=2.0, threshold=0.4, combine="mean")
    ref = abduct(base, X0, Y, ALPHAS, grid, params)
    results = {}
    for name, second in [("shared", EDIT_A), ("copies", EDIT_A.clone())]:
        rows.clear()
        with recording_cross_attention(unet) as store:
            out = csg_reverse(eps, ref, Y, [ConceptEdit(EDIT_A, [1, 2]), ConceptEdit(second, [4, 5])], ALPHAS, grid,
                              params, EMPTY, store)
        results[name] = (out, sum(rows))
    (shared, n_shared), (copies, n_copies) = results["shared"], results["copies"]
    assert (n_shared, n_copies) == (3 * 3 * B, 3 * 4 * B)  # per step: ∅, Y, then Y' once or twice
    assert torch.equal(shared.masks, copies.masks)
    torch.testing.assert_close(shared.x, copies.x, rtol=0, atol=1e-10)


def test_preserve_keeps_the_outside_and_the_edit_changes_the_inside(unet):
    eps = text_eps(unet, ALPHAS)
    grid = timestep_grid(1000, 4, 0.6)
    params = fmcgm(edit_scale=4.0, threshold=0.6, warmup=1, attn_factors=(1,))
    ref = abduct(eps, X0, Y, ALPHAS, grid, params)
    edits = [ConceptEdit(EDIT_A, [1, 2]), ConceptEdit(EDIT_B, [4], reverse=True)]
    with recording_cross_attention(unet) as store:
        out = csg_reverse(eps, ref, Y, edits, ALPHAS, grid, params, EMPTY, store)
    assert [m.shape[1] for m in store.maps] == [64, 64, 64]  # attn_factors (1,): the three 8x8 layers only
    assert out.masks.shape == (B, 2, SIDE, SIDE) and out.union.shape == (B, 1, SIDE, SIDE)
    assert torch.equal(out.union[:, 0], out.masks.any(dim=1))
    outside = ~out.union.expand_as(out.x)
    assert 0 < outside.sum() < outside.numel()
    assert torch.equal(out.x[outside], X0[outside])                  # non-descendant regions: bit for bit
    assert (out.x - X0)[~outside].abs().max() > 1e-2                 # the edit acted inside the masks


def test_noise_mask_keeps_one_minus_lambda_of_the_pixels(unet):
    v = _randn(3, 1, 16, 16, seed=6).abs()
    for lam in (0.0, 0.3, 0.7, 0.9):
        share = quantile_mask(v, lam).flatten(1).double().mean(1)
        assert torch.allclose(share, torch.full_like(share, 1 - lam), atol=1 / 256)
    # M2 alone (intersect off) inside the reverse: each sample's mask keeps ~30 % of the 64 pixels
    eps = text_eps(unet, ALPHAS)
    grid = timestep_grid(1000, 3, 0.6)
    params = fmcgm(edit_scale=1.0, threshold=0.7, intersect=False)
    ref = abduct(eps, X0, Y, ALPHAS, grid, params)
    out = csg_reverse(eps, ref, Y, [ConceptEdit(EDIT_A, [1])], ALPHAS, grid, params, EMPTY)
    share = out.masks.flatten(1).double().mean(1)
    assert torch.allclose(share, torch.full_like(share, 0.3), atol=1 / 64)


def test_relative_mask_follows_the_concepts_spread(unet):
    """'relative' keeps v >= lambda * max v: a concept spread over 3/4 of the image (a background) keeps
    3/4 of it, one on 1/16 (an object) keeps 1/16, where a quantile would keep the same share of both."""
    from cfgen.csg import relative_mask

    wide = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    wide[..., 2:, :] = 1.0
    small = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    small[..., :2, :2] = 2.0
    v = torch.cat([wide, small]) + 0.01  # a floor below lambda * max: not kept
    share = relative_mask(v, 0.2).flatten(1).double().mean(1)
    assert share.tolist() == [0.75, 4 / 64]
    assert torch.equal(relative_mask(v, 0.0), torch.ones_like(v, dtype=torch.bool))
    # inside the reverse, the rule is the one CSGParams names
    eps = text_eps(unet, ALPHAS)
    grid = timestep_grid(1000, 3, 0.6)
    params = fmcgm(edit_scale=1.0, threshold=0.3, intersect=False, mask_rule="relative")
    ref = abduct(eps, X0, Y, ALPHAS, grid, params)
    out = csg_reverse(eps, ref, Y, [ConceptEdit(EDIT_A, [1])], ALPHAS, grid, params, EMPTY)
    assert out.masks.any() and not out.masks.all()
    with pytest.raises(ValueError, match="mask_rule"):
        fmcgm(mask_rule="otsu")
    with pytest.raises(ValueError, match="combine"):
        fmcgm(combine="max")


def test_a_setting_the_config_holds_has_its_default_and_choices_there_alone():
    """One home per fact: CSGParams takes what [text] sets with no default of its own (TextConfig's are
    the defaults), and its mask rules are text.mask_rule's Literal."""
    import dataclasses

    from cfgen.config import TextConfig, choices
    from cfgen.csg import MASK_RULES

    ours = {f.name: f for f in dataclasses.fields(CSGParams)}
    shared = ours.keys() & {f.name for f in dataclasses.fields(TextConfig)}
    assert shared == {"edit_scale", "threshold", "warmup", "intersect", "preserve", "mask_rule"}
    assert all(ours[n].default is dataclasses.MISSING for n in shared)
    assert MASK_RULES == choices(TextConfig, "mask_rule")
    with pytest.raises(TypeError):
        CSGParams()


def test_smoothing_is_ledits_gaussian():
    from diffusers.pipelines.ledits_pp.pipeline_leditspp_stable_diffusion import LeditsGaussianSmoothing

    m = _randn(2, 1, 6, 6, seed=7)
    theirs = LeditsGaussianSmoothing(m.device)(F.pad(m, (1, 1, 1, 1), mode="reflect"))
    torch.testing.assert_close(smooth(m), theirs, rtol=1e-6, atol=1e-7)  # their kernel is float32


def test_bad_settings_are_refused(unet):
    for bad in ({"edit_scale": -1.0}, {"threshold": 1.5}, {"warmup": -1}, {"warmup": 1.5},
                {"guidance_scale": float("nan")}, {"attn_factors": (0,)}, {"edit_reference": "caption"}):
        with pytest.raises(ValueError):
            fmcgm(**bad)
    eps = text_eps(unet, ALPHAS)
    ref = abduct(eps, X0, Y, ALPHAS, [0, 600], fmcgm())
    with pytest.raises(ValueError, match="store"):
        csg_reverse(eps, ref, Y, [ConceptEdit(EDIT_A, [1])], ALPHAS, [0, 600], fmcgm(), EMPTY)
    with pytest.raises(ValueError, match="uncond"):
        abduct(eps, X0, Y, ALPHAS, [0, 600], fmcgm(guidance_scale=2.0))
    with recording_cross_attention(unet) as store, pytest.raises(ValueError, match="token positions"):
        csg_reverse(eps, ref, Y, [ConceptEdit(EDIT_A, [TOKENS])], ALPHAS, [0, 600], fmcgm(), EMPTY, store)


class _Slow:
    """A tokenizer without offset mappings, as transformers' Python ones: token_positions' other path."""
    is_fast = False

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text, **kwargs):
        return self.tokenizer(text, **kwargs)


def test_token_positions_fast_and_slow_tokenizers():
    from transformers import BertTokenizerFast

    from cfgen.bench.random_models import bpe_tokenizer

    words = ["a", "red", "blue", "square", "on", "wet", "grass", "road"]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    bert = BertTokenizerFast(vocab={w: k for k, w in enumerate(specials + words + ["##s"])})  # MiniLM's kind
    clip = bpe_tokenizer(words)                                                              # CLIP BPE
    caption = "a red square on wet grass"
    for tok in (bert, clip, _Slow(bert), _Slow(clip)):  # [CLS] / <|startoftext|> is position 0
        assert token_positions(tok, caption, "red") == [2]
        assert token_positions(tok, caption, "wet grass") == [5, 6]
        assert token_positions(tok, caption, "Square") == [3]
        with pytest.raises(ValueError, match="not a word sequence"):
            token_positions(tok, caption, "blue")
    # whole words only: WordPiece reads "reds" as red ##s (positions 1, 2), which is not the concept "red"
    assert token_positions(bert, "reds and a red road", "red") == [5]
