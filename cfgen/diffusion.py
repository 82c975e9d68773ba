"""THE math of cfgen (DESIGN.md §2): DDIM inversion and guided reverse DDIM, eta = 0.

Notation: a_t = alpha-bar_t (the scheduler's `alphas_cumprod`), eps(x, t) the
UNet's noise prediction, p(y | x_t, t) the noise-aware classifier.

    x0(x_t, e)        = (x_t - sqrt(1 - a_t) * e) / sqrt(a_t)
    step(x, e, a, a') = sqrt(a') * x0(x, e) + sqrt(1 - a') * e

Abduction (inversion), up the grid 0 = t_0 < t_1 < ... < t_S = T_inv:
    x_{t_{i+1}} = step(x_{t_i}, eps(x_{t_i}, t_i), a_{t_i}, a_{t_{i+1}})
Action + prediction (guided reverse), down the *same* grid from u = x_{T_inv}:
    e  = eps(x_t, t);  g = grad_x log p(y* | x_t, t)
    e^ = e - s * sqrt(1 - a_t) * g
    x_{t_prev} = step(x_t, e^, a_t, a_{t_prev})
With s = 0 the reverse is the plain DDIM reconstruction (DiCap Cor. 3.3/3.4).

A clean predictor p(y | x0) (no noise awareness: an ImageNet classifier, CLIP
zero-shot) is evaluated on the x0-estimate, decoded to pixels D(.) for latent
models (D = identity for pixel models):
    'unet':  g = grad_{x_t} log p(y* | D(x0(x_t, eps(x_t, t))))   (backprop through the UNet)
    'x0':    g = grad_{x0} log p(y* | D(x0)) / sqrt(a_t)            (FastDiME: e held constant,
             so d x0 / d x_t = 1 / sqrt(a_t); no UNet backward)
A network trained to predict v or x0 instead of eps is turned into e first
(`eps_from_output`), so everything above sees a noise estimate.

Training draws x_t from the forward process (`q_sample`):
    x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * n,   n ~ N(0, I)

Localized edits (`localized_reverse`, FastDiME's self-optimised mask in DDIM form): keep
the factual image's own inversion trajectory x^f_{t_0..t_S} (x^f_{t_0} = x0, the image itself)
with its noise estimates e^f_i = eps(x^f_{t_i}, t_i), and, from the step `start` of the reverse
on, after each guided step from t = t_i
    d   = sum_c |x0(x_t, e^) - x0(x^f_t, e^f_i)|   where the counterfactual departs from the factual
          image, both read at the same noise level (so the x0-estimates' blur cancels; at t_S, where
          x_t = u, the factual one is x0(u, e)), or sum_c |g|; smoothed by a k_b x k_b mean
    m   = maxpool_{k_d}(d / max d) > tau        per sample: relative threshold, dilated
    x_{t_prev} <- where(m, x_{t_prev}, x^f_{t_prev})
so outside the last mask the sample IS the factual trajectory and comes back exactly.

No clipping or thresholding anywhere: the round trip must be exact up to the
ODE discretisation. Walking one grid up and then down avoids the off-by-one
between the loops (diffusers PR #3436).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from cfgen.config import GradientKind, MaskSource
from cfgen.sections import MASK, PREDICTOR, UNET, section

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""eps(x_t, t) -> predicted noise; t is a (B,) long tensor."""
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""classifier(x_t, t) -> logits (B, num_classes)."""
X0LogitsFn = Callable[[torch.Tensor], torch.Tensor]
"""clean predictor(x0) -> logits (B, num_classes), x0 an x0-estimate in model space."""
GRADIENTS: tuple[str, ...] = typing.get_args(GradientKind)
"""How guided_reverse takes g: from a noise-aware classifier(x_t, t), or from a clean predictor(x0)
through the UNet ('unet') or with e held constant ('x0')."""
MASK_SOURCES: tuple[str, ...] = typing.get_args(MaskSource)
"""Where localized_reverse reads the departure map from: the x0-estimates ('x0') or the gradient."""


def timestep_grid(num_train_timesteps: int, steps: int, t_inv: float) -> list[int]:
    """Integer timesteps 0 = t_0 < ... < t_S = T_inv, evenly spaced.

    T_inv = round(t_inv * T) capped at T - 1 (the last index the schedule has).
    """
    t_end = min(round(t_inv * num_train_timesteps), num_train_timesteps - 1)
    if steps > t_end:
        raise ValueError(f"invert.steps={steps} exceeds the {t_end} timesteps up to t_inv={t_inv}")
    grid = [round(i * t_end / steps) for i in range(steps + 1)]
    return grid


def x0_estimate(x_t: torch.Tensor, eps: torch.Tensor, a_t: float) -> torch.Tensor:
    return (x_t - (1.0 - a_t) ** 0.5 * eps) / a_t ** 0.5


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, a_from: float, a_to: float) -> torch.Tensor:
    """Move x from noise level a_from to a_to along the deterministic DDIM path."""
    return a_to ** 0.5 * x0_estimate(x_t, eps, a_from) + (1.0 - a_to) ** 0.5 * eps


def q_sample(x0: torch.Tensor, noise: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """The forward process: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; a_t broadcastable, e.g. (B, 1, 1, 1)."""
    return a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise


def eps_from_output(out: torch.Tensor, x_t: torch.Tensor, a_t, prediction_type: str) -> torch.Tensor:
    """The noise estimate e from a network's output, for diffusers' three prediction types.

    epsilon: out = e;  v_prediction: out = sqrt(a) e - sqrt(1-a) x0  =>  e = sqrt(a) out + sqrt(1-a) x_t;
    sample:  out = x0  =>  e = (x_t - sqrt(a) x0) / sqrt(1-a).   `a_t` is a float or broadcastable tensor.
    """
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return a_t ** 0.5 * out + (1.0 - a_t) ** 0.5 * x_t
    if prediction_type == "sample":
        return (x_t - a_t ** 0.5 * out) / (1.0 - a_t) ** 0.5
    raise ValueError(f"unknown prediction_type {prediction_type!r} (epsilon, v_prediction or sample)")


def _t(batch: int, t: int, device) -> torch.Tensor:
    return torch.full((batch,), t, dtype=torch.long, device=device)


@dataclass
class Trajectory:
    """The factual image's inversion path: x[i] = x^f_{t_i} (x[0] = x0, x[S] = u) and eps[i] = e^f_i, i < S."""
    x: list[torch.Tensor]
    eps: list[torch.Tensor]

    def select(self, idx: torch.Tensor) -> "Trajectory":
        """The rows `idx` of every entry (a batch's pairs: the same image may appear several times)."""
        return Trajectory([x[idx] for x in self.x], [e[idx] for e in self.eps])


@torch.no_grad()
def invert(eps_fn: EpsFn, x0: torch.Tensor, alphas_cumprod: torch.Tensor, grid: list[int]) -> torch.Tensor:
    """Abduction: the clean image x0 (at t_0) -> its exogenous noise u (at t_S)."""
    return inversion_trajectory(eps_fn, x0, alphas_cumprod, grid).x[-1]


@torch.no_grad()
def inversion_trajectory(eps_fn: EpsFn, x0: torch.Tensor, alphas_cumprod: torch.Tensor, grid: list[int],
                         steps: int | None = None) -> Trajectory:
    """invert, keeping every x^f_{t_i} and e^f_i: the path localized_reverse falls back to and compares with.
    `steps`: only the first ones (x[0..steps], eps[0..steps-1]); localized_reverse reads no further than
    `reference_steps` says, so the rest would be UNet evaluations spent for nothing."""
    a = alphas_cumprod.tolist()
    path, noise = [x0], []
    last = len(grid) - 1 if steps is None else steps
    for t_cur, t_next in zip(grid[:last], grid[1:last + 1]):
        x = path[-1]
        noise.append(eps_fn(x, _t(x.shape[0], t_cur, x.device)))
        path.append(ddim_step(x, noise[-1], a[t_cur], a[t_next]))
    return Trajectory(path, noise)


def _selected_log_prob(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum_i log softmax(logits_i)[target_i]; half-precision logits are upcast for the softmax."""
    logp = F.log_softmax(logits.float() if logits.element_size() < 4 else logits, dim=-1)
    return logp.gather(1, target[:, None]).sum()


def log_prob_grad(classifier: LogitsFn, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """grad_{x_t} log p(target | x_t, t), per sample.

    Summing the per-sample log-probs gives each sample's own gradient because
    the classifier treats samples independently (GroupNorm, eval mode).
    """
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(_selected_log_prob(classifier(x, t), target), x)
    return grad


def clean_log_prob_grad(eps_fn: EpsFn, classifier: X0LogitsFn, x_t: torch.Tensor, t: torch.Tensor, a_t: float,
                        target: torch.Tensor, through_unet: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(e, g) for a clean predictor on the x0-estimate: e = eps(x_t, t) and, per sample,

        through_unet:  g = grad_{x_t} log p(target | x0(x_t, e(x_t)))     one UNet forward + backward
        otherwise:     g = grad_{x0} log p(target | x0) / sqrt(a_t)       e constant (FastDiME)

    The UNet runs once either way: its e (detached) is the one the DDIM step uses.
    """
    with torch.enable_grad():
        if through_unet:
            x = x_t.detach().requires_grad_(True)
            e = eps_fn(x, t)
            (g,) = torch.autograd.grad(_selected_log_prob(classifier(x0_estimate(x, e, a_t)), target), x)
        else:
            with torch.no_grad():
                e = eps_fn(x_t, t)
            x0 = x0_estimate(x_t, e, a_t).detach().requires_grad_(True)
            (g0,) = torch.autograd.grad(_selected_log_prob(classifier(x0), target), x0)
            g = g0 / a_t ** 0.5
    return e.detach(), g


def _guided_eps(eps_fn: EpsFn, classifier, x: torch.Tensor, t: torch.Tensor, a_t: float, target, s: torch.Tensor,
                guided: bool, gradient: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(e^, g, e) at one step of the reverse: e^ = e - s * sqrt(1 - a_t) * g; g is None when not guided."""
    if guided and gradient != "noisy":
        with section(PREDICTOR):  # the UNet forward is inside: its output is what the gradient goes through
            eps, g = clean_log_prob_grad(eps_fn, classifier, x, t, a_t, target, through_unet=gradient == "unet")
        return eps - s * (1.0 - a_t) ** 0.5 * g, g, eps
    with section(UNET):
        eps = eps_fn(x, t)
    if not guided:
        return eps, None, eps
    with section(PREDICTOR):
        g = log_prob_grad(classifier, x, t, target)
    return eps - s * (1.0 - a_t) ** 0.5 * g, g, eps


@dataclass
class TopStep:
    """e = eps(u, t_S) and g = grad log p(y* | ...) at the top of the grid, where every reverse from u starts.
    They depend on u and y* alone, not on the scale: escalation computes them once per pair instead of once
    per scale tried, and the s = 0 reconstruction reuses e (`top_step`)."""
    eps: torch.Tensor
    grad: torch.Tensor | None  # None: no predictor (the reconstruction)

    def select(self, idx: torch.Tensor) -> "TopStep":
        return TopStep(self.eps[idx], None if self.grad is None else self.grad[idx])

    def guided(self, s: torch.Tensor, a_t: float, guided: bool) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                        torch.Tensor]:
        """(e^, g, e) as _guided_eps gives them at the top step, from the stored e and g."""
        if not guided or self.grad is None:
            return self.eps, None, self.eps
        return self.eps - s * (1.0 - a_t) ** 0.5 * self.grad, self.grad, self.eps


@torch.no_grad()
def top_step(eps_fn: EpsFn, classifier: LogitsFn | X0LogitsFn | None, u: torch.Tensor, alphas_cumprod: torch.Tensor,
             grid: list[int], target: torch.Tensor | None = None, gradient: str = "noisy") -> TopStep:
    """The first reverse step's e and g for each row of u (module docstring: e, g at t = t_S)."""
    t = grid[-1]
    one = torch.ones((), dtype=u.dtype, device=u.device)
    _, g, eps = _guided_eps(eps_fn, classifier, u, _t(u.shape[0], t, u.device), alphas_cumprod.tolist()[t], target,
                            one, classifier is not None, gradient)
    return TopStep(eps, g)


def _reverse_setup(classifier, u: torch.Tensor, scale, gradient: str) -> tuple[torch.Tensor, bool]:
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    s = torch.as_tensor(scale, dtype=u.dtype, device=u.device).reshape(-1, *([1] * (u.dim() - 1)))
    return s, classifier is not None and bool((s != 0).any())


@torch.no_grad()
def guided_reverse(eps_fn: EpsFn, classifier: LogitsFn | X0LogitsFn | None, u: torch.Tensor,
                   alphas_cumprod: torch.Tensor, grid: list[int], target: torch.Tensor | None = None,
                   scale: torch.Tensor | float = 0.0, gradient: str = "noisy", top: TopStep | None = None) -> torch.Tensor:
    """Prediction: from the noise u (at t_S) down the grid to t_0, steered toward `target`.

    `scale` is s, a float or a (B,) tensor (per-sample scales, for escalation).
    With s = 0 (or no classifier) this is the unguided DDIM reconstruction.
    `gradient` (GRADIENTS): 'noisy' for a noise-aware classifier(x_t, t); 'unet' or 'x0'
    for a clean classifier(x0) on the x0-estimate (clean_log_prob_grad).
    `top`: the first step's e and g, already computed (top_step); else computed here.
    """
    s, guided = _reverse_setup(classifier, u, scale, gradient)
    a = alphas_cumprod.tolist()
    x = u
    for k, (t_cur, t_prev) in enumerate(zip(grid[:0:-1], grid[-2::-1])):
        if k == 0 and top is not None:
            eps, _, _ = top.guided(s, a[t_cur], guided)
        else:
            eps, _, _ = _guided_eps(eps_fn, classifier, x, _t(x.shape[0], t_cur, x.device), a[t_cur], target, s,
                                    guided, gradient)
        x = ddim_step(x, eps, a[t_cur], a[t_prev])
    return x


@dataclass(frozen=True)
class EditMask:
    """How localized_reverse finds the region an edit may touch (module docstring: d, m)."""
    source: str = "x0"       # MASK_SOURCES: |x0(x_t, e^) - x0^f| or |g|
    threshold: float = 0.15  # tau, relative to each sample's largest departure
    dilation: int = 3        # k_d, odd: max-pool kernel that grows the mask
    blur: int = 3            # k_b, odd: mean-pool kernel that smooths d first (1 = none)
    start: float = 0.5       # share of the reverse steps run unmasked first (early x0-estimates are blurry)

    def __post_init__(self):
        if self.source not in MASK_SOURCES:
            raise ValueError(f"mask source must be one of {MASK_SOURCES}, got {self.source!r}")
        if self.dilation < 1 or self.dilation % 2 == 0 or self.blur < 1 or self.blur % 2 == 0:
            raise ValueError(f"mask dilation and blur must be odd and >= 1, got {self.dilation}, {self.blur}")

    def region(self, departure: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) departure magnitudes -> (B, 1, H, W) bool mask of where the edit may act."""
        d = departure.abs().sum(dim=1, keepdim=True)
        if self.blur > 1:
            d = F.avg_pool2d(d, self.blur, stride=1, padding=self.blur // 2, count_include_pad=False)
        peak = d.flatten(1).amax(dim=1).clamp_min(torch.finfo(d.dtype).tiny).view(-1, 1, 1, 1)
        d = d / peak
        if self.dilation > 1:
            d = F.max_pool2d(d, self.dilation, stride=1, padding=self.dilation // 2)
        return d >= self.threshold  # >=: tau = 0 is the all-ones mask


def reference_steps(steps: int, mask: EditMask) -> int:
    """How many inversion steps of the factual trajectory localized_reverse reads: the masked steps k >=
    round(start * steps) read x[i - 1] and, below the top, x[i] and eps[i], i = steps - k; so x[0..n] and
    eps[0..n] with n = steps - round(start * steps), i.e. n + 1 steps (all of them when masking from the top)."""
    return min(steps, steps - round(mask.start * steps) + 1)


@torch.no_grad()
def localized_reverse(eps_fn: EpsFn, classifier: LogitsFn | X0LogitsFn | None, u: torch.Tensor,
                      reference: Trajectory, alphas_cumprod: torch.Tensor, grid: list[int], mask: EditMask,
                      target: torch.Tensor | None = None, scale: torch.Tensor | float = 0.0,
                      gradient: str = "noisy", top: TopStep | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """guided_reverse confined to a region found during sampling; returns (x, the last mask (B, 1, H, W)).

    `reference` is the factual trajectory from inversion_trajectory; the reverse starts from the stored
    noise u, as guided_reverse does. Before the first masked step, and where the mask is on, the step is
    guided_reverse's; elsewhere the sample is set to x^f_{t_prev}, so outside the last mask the output is
    x^f_{t_0} = x0 exactly. `top` as guided_reverse's.
    """
    s, guided = _reverse_setup(classifier, u, scale, gradient)
    a = alphas_cumprod.tolist()
    x = u
    steps = len(grid) - 1
    first_masked = round(mask.start * steps)
    m = torch.ones((x.shape[0], 1, *x.shape[2:]), dtype=torch.bool, device=x.device)
    for k, (t_cur, t_prev) in enumerate(zip(grid[:0:-1], grid[-2::-1])):
        i = steps - k  # reference index of t_cur
        if k == 0 and top is not None:
            eps_hat, g, eps = top.guided(s, a[t_cur], guided)
        else:
            eps_hat, g, eps = _guided_eps(eps_fn, classifier, x, _t(x.shape[0], t_cur, x.device), a[t_cur], target,
                                          s, guided, gradient)
        x_prev = ddim_step(x, eps_hat, a[t_cur], a[t_prev])
        if k >= first_masked:
            with section(MASK):
                if mask.source == "gradient":
                    departure = g if g is not None else torch.zeros_like(x)
                else:
                    factual = x0_estimate(x, eps, a[t_cur]) if i == steps else \
                        x0_estimate(reference.x[i], reference.eps[i], a[t_cur])
                    departure = x0_estimate(x, eps_hat, a[t_cur]) - factual
                m = mask.region(departure)
                x_prev = torch.where(m, x_prev, reference.x[i - 1])
        x = x_prev
    return x, m
