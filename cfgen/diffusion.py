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

No clipping or thresholding anywhere: the round trip must be exact up to the
ODE discretisation. Walking one grid up and then down avoids the off-by-one
between the loops (diffusers PR #3436).
"""

from __future__ import annotations

import typing
from typing import Callable

import torch
import torch.nn.functional as F

from cfgen.config import GradientKind

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""eps(x_t, t) -> predicted noise; t is a (B,) long tensor."""
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""classifier(x_t, t) -> logits (B, num_classes)."""
X0LogitsFn = Callable[[torch.Tensor], torch.Tensor]
"""clean predictor(x0) -> logits (B, num_classes), x0 an x0-estimate in model space."""
GRADIENTS: tuple[str, ...] = typing.get_args(GradientKind)
"""How guided_reverse takes g: from a noise-aware classifier(x_t, t), or from a clean predictor(x0)
through the UNet ('unet') or with e held constant ('x0')."""


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


@torch.no_grad()
def invert(eps_fn: EpsFn, x0: torch.Tensor, alphas_cumprod: torch.Tensor, grid: list[int]) -> torch.Tensor:
    """Abduction: the clean image x0 (at t_0) -> its exogenous noise u (at t_S)."""
    a = alphas_cumprod.tolist()
    x = x0
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        eps = eps_fn(x, _t(x.shape[0], t_cur, x.device))
        x = ddim_step(x, eps, a[t_cur], a[t_next])
    return x


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


@torch.no_grad()
def guided_reverse(eps_fn: EpsFn, classifier: LogitsFn | X0LogitsFn | None, u: torch.Tensor,
                   alphas_cumprod: torch.Tensor, grid: list[int], target: torch.Tensor | None = None,
                   scale: torch.Tensor | float = 0.0, gradient: str = "noisy") -> torch.Tensor:
    """Prediction: from the noise u (at t_S) down the grid to t_0, steered toward `target`.

    `scale` is s, a float or a (B,) tensor (per-sample scales, for escalation).
    With s = 0 (or no classifier) this is the unguided DDIM reconstruction.
    `gradient` (GRADIENTS): 'noisy' for a noise-aware classifier(x_t, t); 'unet' or 'x0'
    for a clean classifier(x0) on the x0-estimate (clean_log_prob_grad).
    """
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    a = alphas_cumprod.tolist()
    s = torch.as_tensor(scale, dtype=u.dtype, device=u.device).reshape(-1, *([1] * (u.dim() - 1)))
    guided = classifier is not None and bool((s != 0).any())
    x = u
    for t_cur, t_prev in zip(grid[:0:-1], grid[-2::-1]):
        t = _t(x.shape[0], t_cur, x.device)
        if guided and gradient != "noisy":
            eps, g = clean_log_prob_grad(eps_fn, classifier, x, t, a[t_cur], target, through_unet=gradient == "unet")
            eps = eps - s * (1.0 - a[t_cur]) ** 0.5 * g
        else:
            eps = eps_fn(x, t)
            if guided:
                eps = eps - s * (1.0 - a[t_cur]) ** 0.5 * log_prob_grad(classifier, x, t, target)
        x = ddim_step(x, eps, a[t_cur], a[t_prev])
    return x
