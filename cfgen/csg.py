"""Text-conditioned counterfactuals with Causal Semantic Guidance (FM-CGM §5.3, Eq. 9-12; LEDITS++).

The text path's math, beside diffusion.py's classifier path and in its notation: a_t = alpha-bar_t,
x0(x_t, e) and step(x, e, a, a') as there. eps(x, t, Y) is the UNet's noise estimate under the encoder
states Y of a caption; ∅ is the empty caption, Y the factual one. Each edit concept c (the intervened
concept and each of its descendants) brings its prompt Y_c, the positions T_c of its tokens in Y_c and
sign_c (-1 for an edit that pushes away from Y_c, LEDITS++'s reverse direction; else +1).

Base estimate (classifier-free guidance of Y against ∅; w = 1 is none and skips the ∅ row):
    e_b(x, t) = eps(x, t, ∅) + w * (eps(x, t, Y) - eps(x, t, ∅))

Abduction, up the grid 0 = t_0 < ... < t_S (diffusion.inversion_trajectory with eps = e_b):
    e^f_i = e_b(x^f_{t_i}, t_i),   x^f_{t_{i+1}} = step(x^f_{t_i}, e^f_i, a_{t_i}, a_{t_{i+1}}),   u = x^f_{t_S}

Prediction, down the same grid from x_{t_S} = u; at the step t = t_i -> t_prev = t_{i-1}:
    r_i  = e^f_{i-1} - e^f_i            with e^f_S = e_b(u, t_S), the one base estimate inversion never makes
    d_c  = sign_c * (eps(x_t, t, Y_c) - eps(x_t, t, ∅))      (Eq. 10; with reference 'base': - eps(x_t, t, Y))
    A_c  = smooth(mean_layers up(mean_heads sum_{k in T_c} softmax(q k^T / sqrt(d))[:, k]))   c's cross-attention
    M1_c = A_c >= q_lambda(A_c)                    where the UNet looks when it reads c's words
    M2_c = |d_c| >= q_lambda(|d_c|),  |.| summed over channels        where c's prompt moves the noise estimate
    M_c  = M1_c AND M2_c     (intersect, Eq. 11; else M2_c alone)
    e^   = e_b(x_t, t) + r_i + sum_c s_e * M_c * d_c                     (Eq. 9/12; the sum from step `warmup` on)
           (combine 'mean': s_e * sum_c M_c d_c / max(1, sum_c M_c), the mean of the terms covering each pixel)
    x_{t_prev} = step(x_t, e^, a_t, a_{t_prev})
    preserve:  x_{t_prev} <- where(U, x_{t_prev}, x^f_{t_prev}),   U = OR_c M_c  (empty during warm-up)
q_lambda(v) is the lambda-quantile of v over each sample's pixels, so a mask keeps about 1 - lambda of them.

Why r_i: plain DDIM evaluates the step down from t_i at x^f_{t_i} but the step up to it at x^f_{t_{i-1}},
so the round trip drifts with any real UNet. With r_i, an unedited reverse has x_t = x^f_t at every step
(by induction), e^ = e_b(x^f_{t_i}, t_i) + r_i = e^f_{i-1}, and each step undoes its inversion step up to
float rounding: the round trip is exact for any UNet and any w. It is the DDIM form of LEDITS++'s
edit-friendly inversion, whose stored noise maps z_t play the part of r_i. An edit acts through the
departure e_b(x_t) - e_b(x^f_t) and the masked d_c terms, nothing else.

Why combine 'mean': when every term's prompt is the whole edited caption Y' (text.edit_prompt
'counterfactual'), every d_c is the same d and only the masks differ; a sum would weigh d by the number
of concepts whose masks overlap at a pixel (twice s_e on a recoloured shape, s_e on a resized one), the
mean gives s_e * U * d: inside the union the sample follows Y' at one strength. Terms that hold one
prompt tensor share its UNet rows (one forward gives the estimate and every term's attention maps).

Why the factual caption as the base (FM-CGM's Eq. 12 writes Y_{C_i}, the intervened prompt): r_i is exact
only for the caption the image was inverted under, and the intervened concept gets its own mask as an edit
like each descendant; FM-CGM's implementation (the LEDITS++ pipeline with per-concept editing prompts over
the source caption) does the same. Preserve is cfgen's addition (as localized_reverse): outside U the
sample IS the factual trajectory, so regions of non-descendants come back exactly.

Use (pixel or latent: for a latent model x0 = VAE.encode(image) * scaling_factor, decode the result):

    eps = text_eps(unet, alphas_cumprod)
    ref = abduct(eps, x0, caption, alphas_cumprod, grid, params, uncond)           # Trajectory under Y
    edits = [ConceptEdit(emb_c, token_positions(tokenizer, prompt_c, phrase_c)) for ...]
    with recording_cross_attention(unet) as store:
        out = csg_reverse(eps, ref, caption, edits, alphas_cumprod, grid, params, uncond, store)
    out.x, out.masks, out.union                    # counterfactual, per-concept M_c, their union U
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence, get_args

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor

from cfgen.config import TextMaskRule
from cfgen.diffusion import EpsFn, Trajectory, ddim_step, eps_from_output, inversion_trajectory

TextEpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""eps(x_t, t, emb) -> predicted noise; t a (N,) long tensor, emb (N, L, D) encoder states of N captions."""
EditReference = Literal["uncond", "base"]
Combine = Literal["sum", "mean"]
# The choices, read off their types: text.mask_rule's Literal in config.py is the one home of the mask rules
EDIT_REFERENCES, COMBINES, MASK_RULES = get_args(EditReference), get_args(Combine), get_args(TextMaskRule)


@dataclass(frozen=True, kw_only=True)
class CSGParams:
    """Causal Semantic Guidance settings (module docstring). The settings a pipeline sets ([text] of its
    TOML) have no default here: their defaults are config.TextConfig's, and a run's CSGParams is built from
    its config (stages/text_guide.py, csg_params). FM-CGM ran s_e = 8, lambda = 0.7 ('quantile'), 10 warm-up
    steps of 100, intersect on."""
    edit_scale: float               # s_e: weight of each masked edit term s_e * M_c * d_c
    threshold: float                # lambda: the masks' level (mask_rule says how it is read)
    warmup: int                     # reverse steps at the start without edit guidance: at high noise the
                                    # layout is still being decided and the masks are least reliable
    intersect: bool                 # M_c = M1_c AND M2_c (needs the attention store); False: M2_c alone
    preserve: bool                  # outside the union of the masks the sample is the factual trajectory
    mask_rule: TextMaskRule         # 'quantile': keep the top 1 - lambda of the pixels (LEDITS++, a fixed
                                    # area); 'relative': keep v >= lambda * max v (an area that follows the
                                    # concept: a background edit gets the background, a shape edit the shape)
    guidance_scale: float = 1.0     # w: classifier-free guidance of the factual caption against ∅; 1 = none
    attn_factors: tuple[int, ...] = ()  # M1 from cross-attention maps of side x's side / f, f in these;
                                        # () = every cross-attention layer (LEDITS++ on SD: (4,), 16x16 of 64x64)
    edit_reference: EditReference = "uncond"  # d_c = eps(Y_c) - eps(∅) ('uncond', Eq. 10) or - eps(Y) ('base')
    combine: Combine = "sum"        # 'sum' of the masked terms (Eq. 12); 'mean': at each pixel the mean of the
                                    # terms whose mask covers it, for terms that share one direction d (edit
                                    # prompt Y' for every concept), whose sum would scale the edit by the
                                    # number of masks that overlap there

    def __post_init__(self):
        if not (math.isfinite(self.edit_scale) and self.edit_scale >= 0):
            raise ValueError(f"edit_scale must be finite and >= 0 (reverse an edit instead), got {self.edit_scale}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold (lambda) must be in [0, 1], got {self.threshold}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(f"guidance_scale (w) must be finite and >= 0, got {self.guidance_scale}")
        if any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in self.attn_factors):
            raise ValueError(f"attn_factors must be ints >= 1, got {self.attn_factors!r}")
        if self.mask_rule not in MASK_RULES:
            raise ValueError(f"mask_rule must be one of {MASK_RULES}, got {self.mask_rule!r}")
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {self.combine!r}")
        if self.edit_reference not in EDIT_REFERENCES:
            raise ValueError(f"edit_reference must be one of {EDIT_REFERENCES}, got {self.edit_reference!r}")


@dataclass(frozen=True)
class ConceptEdit:
    """One edit concept c: the prompt Y_c and where c's words sit in it."""
    emb: torch.Tensor                   # (1 or B, L, D) encoder states of Y_c, the same L as the caption's
    tokens: Sequence[int] | torch.Tensor  # c's token positions in Y_c (token_positions), or a (B, L) bool mask
    reverse: bool = False               # push away from Y_c (sign_c = -1), e.g. to remove an old value


@dataclass
class CSGResult:
    x: torch.Tensor      # (B, C, H, W) the counterfactual x_{t_0}
    masks: torch.Tensor  # (B, n_edits, H, W) bool: each concept's M_c at the last step
    union: torch.Tensor  # (B, 1, H, W) bool: U = OR_c M_c; with preserve, x equals x0 outside it


# --- the noise estimate -------------------------------------------------------------------------------

def text_eps(unet: torch.nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> TextEpsFn:
    """eps(x_t, t, emb) for a UNet2DConditionModel, whatever it was trained to predict (eps_from_output)."""
    def eps(x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        out = unet(x_t, t, encoder_hidden_states=emb).sample
        if out.shape[1] == 2 * x_t.shape[1]:  # learned variance: the first half is the noise
            out = out[:, : x_t.shape[1]]
        if prediction_type != "epsilon":
            a_t = alphas_cumprod.to(out.device)[t].to(out.dtype).view(-1, 1, 1, 1)
            out = eps_from_output(out, x_t, a_t, prediction_type)
        return out
    return eps


def _rows(emb: torch.Tensor, batch: int) -> torch.Tensor:
    """(1 or B, L, D) -> (B, L, D): one caption may serve the whole batch."""
    if emb.dim() != 3 or emb.shape[0] not in (1, batch):
        raise ValueError(f"encoder states must be (1 or {batch}, L, D), got {tuple(emb.shape)}")
    return emb.expand(batch, -1, -1)


def _eps_rows(eps: TextEpsFn, x: torch.Tensor, t: int, embs: list[torch.Tensor]) -> list[torch.Tensor]:
    """eps(x, t, Y_k) for every Y_k in one UNet call, the prompts stacked along the batch: one pass over
    the weights instead of one per prompt, and the recorded maps come out in the same row blocks."""
    lengths = {e.shape[1:] for e in embs}
    if len(lengths) > 1:
        raise ValueError(f"all prompts must be encoded to the same (L, D), got {sorted(lengths)}; pad to max_length")
    B = x.shape[0]
    out = eps(x.repeat(len(embs), *([1] * (x.dim() - 1))),
              torch.full((B * len(embs),), t, dtype=torch.long, device=x.device),
              torch.cat([_rows(e, B) for e in embs]))
    return list(out.split(B))


def base_eps(eps: TextEpsFn, caption: torch.Tensor, uncond: torch.Tensor | None, w: float) -> EpsFn:
    """e_b(x, t) as an eps(x, t) for diffusion.py: the caption's estimate, with CFG against ∅ when w != 1."""
    if w != 1 and uncond is None:
        raise ValueError(f"guidance_scale w = {w} needs the empty caption's encoder states (uncond)")

    def e_b(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if w == 1:
            return _eps_rows(eps, x, int(t[0]), [caption])[0]
        e_u, e_y = _eps_rows(eps, x, int(t[0]), [uncond, caption])
        return e_u + w * (e_y - e_u)
    return e_b


# --- abduction ----------------------------------------------------------------------------------------

@torch.no_grad()
def abduct(eps: TextEpsFn, x0: torch.Tensor, caption: torch.Tensor, alphas_cumprod: torch.Tensor,
           grid: list[int], params: CSGParams, uncond: torch.Tensor | None = None) -> Trajectory:
    """Exact DDIM inversion of x0 under the factual caption: the path x^f and estimates e^f the reverse retraces.

    Pass csg_reverse the same caption, uncond and params.guidance_scale: r_i is exact for this e_b only.
    """
    return inversion_trajectory(base_eps(eps, caption, uncond, params.guidance_scale), x0, alphas_cumprod, grid)


# --- cross-attention maps -----------------------------------------------------------------------------

class CrossAttentionStore:
    """The cross-attention probabilities of the last recorded UNet forward, averaged over heads.

    maps[k] is (N, L_k, T): for each of the forward's N rows, each of the L_k = h * w query pixels of the
    k-th recorded layer, a distribution over the T tokens of the caption (rows sum to 1).
    """

    def __init__(self):
        self.maps: list[torch.Tensor] = []
        self.active = False                                 # record only when a step needs M1
        self.keep: Callable[[int], bool] = lambda length: True  # which query lengths L_k to keep

    def start(self, keep: Callable[[int], bool] | None = None):
        """Record the next forward (and drop what the last one left)."""
        self.maps, self.active = [], True
        self.keep = keep or (lambda length: True)

    def stop(self):
        self.active = False

    def add(self, probs: torch.Tensor, heads: int):
        if self.active and self.keep(probs.shape[1]):
            # (N * heads, L, T), rows of one sample adjacent (Attention.head_to_batch_dim) -> mean over heads
            self.maps.append(probs.unflatten(0, (-1, heads)).mean(dim=1))


class CrossAttentionRecorder(AttnProcessor):
    """diffusers' AttnProcessor (explicit softmax, so the probabilities exist) that also hands each
    cross-attention call's probabilities to a CrossAttentionStore. Its output is the default processor's."""

    def __init__(self, store: CrossAttentionStore):
        self.store = store

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if encoder_hidden_states is None:  # self-attention: nothing to attribute to words
            return super().__call__(attn, hidden_states, None, attention_mask, temb, *args, **kwargs)
        # AttnProcessor.__call__ with the probabilities kept; the layers of a UNet's transformer blocks
        # get (N, L, C) hidden states, a spatial (N, C, h, w) input is flattened as there.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            n, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(n, channel, height * width).transpose(1, 2)
        n, length, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, length, n)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), key, attention_mask)
        self.store.add(probs.detach(), attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear projection, dropout
        if spatial:
            hidden_states = hidden_states.transpose(-1, -2).reshape(n, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def recording_cross_attention(unet: torch.nn.Module) -> Iterator[CrossAttentionStore]:
    """Set a CrossAttentionRecorder on every cross-attention layer of `unet` (unet.set_attn_processor);
    the other layers keep their processors, and every layer gets its old one back on exit."""
    saved = unet.attn_processors
    cross = {f"{name}.processor" for name, m in unet.named_modules()
             if isinstance(m, Attention) and m.is_cross_attention}
    if not cross:
        raise ValueError("the UNet has no cross-attention layers: a text-conditioned UNet2DConditionModel is needed")
    store = CrossAttentionStore()
    unet.set_attn_processor({name: CrossAttentionRecorder(store) if name in cross else proc
                             for name, proc in saved.items()})
    try:
        yield store
    finally:
        unet.set_attn_processor(dict(saved))  # set_attn_processor pops from the dict it is given


def _map_side(length: int, size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer's L = h * w query pixels, the aspect of x's (H, W): h = H / f, w = W / f."""
    H, W = size
    f = math.sqrt(H * W / length)
    h, w = round(H / f), round(W / f)
    if h * w != length:
        raise ValueError(f"cannot lay {length} attention queries out on the aspect of {H}x{W}")
    return h, w


def layer_lengths(size: tuple[int, int], factors: tuple[int, ...]) -> Callable[[int], bool]:
    """Which query lengths L belong to maps of side x's side / f, f in `factors` (() = all). The UNet's
    stride-2 downsamplers round up, hence the ceiling."""
    if not factors:
        return lambda length: True
    wanted = {-(-size[0] // f) * -(-size[1] // f) for f in factors}
    return lambda length: length in wanted


_GAUSS = torch.exp(-((torch.arange(3, dtype=torch.float64) - 1) / (2 * 0.5)) ** 2)


def smooth(m: torch.Tensor) -> torch.Tensor:
    """LEDITS++'s smoothing of the attention map: a 3x3 Gaussian (its sigma 0.5), reflected at the border.
    Why: the map is coarse and speckled; smoothing first makes the thresholded mask a region, not dots."""
    k = _GAUSS.to(m.device, m.dtype)
    k = (k[:, None] * k[None, :]) / (k.sum() ** 2)
    pad = "reflect" if min(m.shape[-2:]) > 1 else "replicate"
    return F.conv2d(F.pad(m, (1, 1, 1, 1), mode=pad), k.view(1, 1, 3, 3))


def _token_weights(tokens: Sequence[int] | torch.Tensor, batch: int, length: int, device) -> torch.Tensor:
    """(B, T) 0/1 weights of c's tokens from positions (all samples alike) or a (1 or B, T) mask."""
    if isinstance(tokens, torch.Tensor) and tokens.dtype == torch.bool:
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2 or tokens.shape[0] not in (1, batch) or tokens.shape[1] != length:
            raise ValueError(f"token mask must be ({batch} or 1, {length}), got {tuple(tokens.shape)}")
        weights = tokens.to(device).expand(batch, -1)
    else:
        positions = [int(p) for p in tokens]
        if not positions or min(positions) < 0 or max(positions) >= length:
            raise ValueError(f"token positions must be non-empty and within the {length} tokens, got {positions}")
        weights = torch.zeros(batch, length, dtype=torch.bool, device=device)
        weights[:, positions] = True
    if not weights.any(dim=1).all():
        raise ValueError("every sample needs at least one token of its concept")
    return weights


def attention_map(maps: Sequence[torch.Tensor], tokens: Sequence[int] | torch.Tensor, size: tuple[int, int],
                  rows: slice = slice(None)) -> torch.Tensor:
    """A_c (module docstring): the recorded maps' `rows` (one prompt's B samples) -> (B, 1, H, W).

    Per layer the probabilities of c's tokens are summed (LEDITS++: the phrase's words together), laid out
    at the layer's resolution and upsampled bilinearly to x's (H, W), where layers of different resolutions
    can be averaged (bilinear, so a coarse layer does not turn the map into blocks); then smoothed.
    """
    if not maps:
        raise ValueError("no cross-attention maps were recorded (is the recorder installed? do attn_factors match "
                         "a layer's resolution?)")
    total = None
    for probs in maps:
        p = probs[rows]
        w = _token_weights(tokens, p.shape[0], p.shape[-1], p.device).to(p.dtype)
        a = torch.einsum("blt,bt->bl", p, w).unflatten(1, _map_side(p.shape[1], size))[:, None]
        a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
        total = a if total is None else total + a
    return smooth(total / len(maps))


def relative_mask(v: torch.Tensor, lam: float) -> torch.Tensor:
    """(B, 1, H, W) values -> v >= lambda x each sample's largest: the share kept follows how the concept
    spreads (cfgen's rule, as its classifier path's EditMask), where the quantile fixes it."""
    peak = v.flatten(1).amax(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
    return v >= lam * peak.view(-1, *([1] * (v.dim() - 1)))


def quantile_mask(v: torch.Tensor, lam: float) -> torch.Tensor:
    """(B, 1, H, W) values -> v >= their lambda-quantile over each sample's pixels: about 1 - lambda of them.
    Why a quantile, not a fixed level: the scale of |d_c| and of attention varies with t, prompt and model;
    the quantile fixes the share of the image an edit may touch (LEDITS++'s lambda)."""
    flat = v.flatten(1)
    q = torch.quantile(flat.float() if flat.element_size() < 4 else flat, lam, dim=1).to(v.dtype)
    return v >= q.view(-1, *([1] * (v.dim() - 1)))


# --- prediction ---------------------------------------------------------------------------------------

@torch.no_grad()
def csg_reverse(eps: TextEpsFn, reference: Trajectory, caption: torch.Tensor, edits: Sequence[ConceptEdit],
                alphas_cumprod: torch.Tensor, grid: list[int], params: CSGParams,
                uncond: torch.Tensor | None = None, store: CrossAttentionStore | None = None) -> CSGResult:
    """Prediction with CSG from u = reference.x[-1] down `grid` (module docstring); returns CSGResult.

    `reference` is abduct's trajectory under the same caption, uncond and params.guidance_scale. `store`
    (from recording_cross_attention on the UNet that `eps` runs) is needed for M1 when params.intersect.
    With no edits or s_e = 0 this is the exact reconstruction: x == x0 up to float rounding (and exactly,
    with preserve on, since U is then empty).
    """
    x = reference.x[-1]
    B = x.shape[0]
    size = tuple(x.shape[-2:])
    a = alphas_cumprod.tolist()
    w, lam = params.guidance_scale, params.threshold
    editing = len(edits) > 0 and params.edit_scale != 0
    if editing and params.intersect and store is None:
        raise ValueError("intersect masks need the cross-attention store (recording_cross_attention)")
    # ∅ is needed for CFG and as the uncond reference of d_c (Eq. 10).
    if uncond is None and (w != 1 or (editing and params.edit_reference == "uncond")):
        raise ValueError("the empty caption's encoder states (uncond) are needed for w != 1 or for "
                         "edit_reference 'uncond'")
    keep = layer_lengths(size, params.attn_factors)
    region = quantile_mask if params.mask_rule == "quantile" else relative_mask
    masks = torch.zeros((B, len(edits), *size), dtype=torch.bool, device=x.device)
    # Terms that share one prompt tensor (edit_prompt 'counterfactual': Y' for every changed concept) share
    # its UNet rows: one forward gives the estimate and the cross-attention maps of all their tokens.
    prompts = list({id(e.emb): e.emb for e in edits}.values())
    slot = [next(j for j, p in enumerate(prompts) if p is e.emb) for e in edits]  # edit c's row block
    steps = len(grid) - 1
    for k, (t_cur, t_prev) in enumerate(zip(grid[:0:-1], grid[-2::-1])):
        i = steps - k  # reference index of t_cur
        active = editing and k >= params.warmup
        need_uncond = w != 1 or (active and params.edit_reference == "uncond")
        embs = ([uncond] if need_uncond else []) + [caption] + (prompts if active else [])
        if store is not None and active and params.intersect:
            store.start(keep)  # this step's forward: M1 reads the edit rows' maps
        out = _eps_rows(eps, x, t_cur, embs)
        e_u = out.pop(0) if need_uncond else None
        e_y = out.pop(0)
        e_base = e_y if w == 1 else e_u + w * (e_y - e_u)
        # r_i = e^f_{i-1} - e^f_i; at the top (x = u, the factual point itself) e^f_S is this very e_base.
        r = reference.eps[i - 1] - (e_base if i == steps else reference.eps[i])
        e_hat = e_base + r
        masks = torch.zeros_like(masks)
        if active:
            # 'uncond' (LEDITS++, FM-CGM Eq. 10): Y_c is a short concept phrase ("red", "wet road"), so what it
            # adds over nothing is that concept alone. 'base': Y_c is the full edited caption, and the difference
            # to the factual caption holds only what changed (the old value's removal included).
            e_ref = e_u if params.edit_reference == "uncond" else e_y
            first = 1 + int(need_uncond)  # row block of the first edit in the UNet call
            total, count = torch.zeros_like(e_hat), torch.zeros_like(e_hat[:, :1])
            for c, edit in enumerate(edits):
                e_c = out[slot[c]]
                d = (e_ref - e_c) if edit.reverse else (e_c - e_ref)
                # M2 per concept from its own |d_c| (LEDITS++; FM-CGM's M^2 is one mask, read off per concept
                # here so that each descendant's edit is confined to where its own prompt acts).
                m = region(d.abs().sum(dim=1, keepdim=True), lam)
                if params.intersect:
                    rows = slice((first + slot[c]) * B, (first + slot[c] + 1) * B)
                    m = m & region(attention_map(store.maps, edit.tokens, size, rows), lam)
                masks[:, c] = m[:, 0]
                total, count = total + m.to(d.dtype) * d, count + m.to(d.dtype)
            if params.combine == "mean":
                total = total / count.clamp(min=1)
            e_hat = e_hat + params.edit_scale * total
        if store is not None:
            store.stop()
        x_prev = ddim_step(x, e_hat, a[t_cur], a[t_prev])
        if params.preserve:
            # Outside U the sample is set to the factual trajectory, so non-descendant regions (and, during
            # warm-up, the whole image) follow x^f exactly and x^f_{t_0} = x0 comes back bit for bit.
            x_prev = torch.where(masks.any(dim=1, keepdim=True), x_prev, reference.x[i - 1])
        x = x_prev
    return CSGResult(x, masks, masks.any(dim=1, keepdim=True))


# --- token positions ----------------------------------------------------------------------------------

def token_positions(tokenizer, caption: str, phrase: str) -> list[int]:
    """Positions of `phrase`'s tokens in `caption` tokenized as its encoder states are (special tokens
    counted, truncated at the tokenizer's max length), for ConceptEdit.tokens. Any HF tokenizer: a fast
    one maps the phrase's characters (first whole-word, case-insensitive match) to tokens by its offsets;
    a slow one looks for the phrase's own token ids in the caption's."""
    match = re.search(r"(?<!\w)" + re.escape(phrase.strip()) + r"(?!\w)", caption, flags=re.IGNORECASE)
    if not phrase.strip() or match is None:
        raise ValueError(f"phrase {phrase!r} is not a word sequence of caption {caption!r}")
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(caption, truncation=True, return_offsets_mapping=True)
        start, end = match.span()
        found = [k for k, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < end and e > start]
    else:
        ids = tokenizer(caption, truncation=True)["input_ids"]
        sub = tokenizer(match.group(0), add_special_tokens=False)["input_ids"]
        at = next((k for k in range(len(ids) - len(sub) + 1) if ids[k:k + len(sub)] == sub), None)
        found = [] if at is None or not sub else list(range(at, at + len(sub)))
    if not found:
        raise ValueError(f"phrase {phrase!r} has no tokens in caption {caption!r} (cut off at the max length?)")
    return found
