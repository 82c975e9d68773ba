"""cfgen's hand-written DDIM step and inversion step against diffusers' own schedulers.

cfgen keeps its own step (one grid walked up and down, per-sample scales, an exact round trip),
so it must be diffusers' step wherever the conventions agree; where they differ, the assertions
below say how.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from cfgen.diffusion import ddim_step, eps_from_output, timestep_grid

T, STEPS = 1000, 25
SCHEDULE = dict(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                clip_sample=False, set_alpha_to_one=False, steps_offset=0)


def _tensors(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64), torch.randn(2, 3, 8, 8, generator=gen,
                                                                                   dtype=torch.float64)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_reverse_step_is_ddim_schedulers_step_at_eta_0(prediction_type):
    sched = DDIMScheduler(**SCHEDULE, prediction_type=prediction_type)
    sched.set_timesteps(STEPS)
    a = sched.alphas_cumprod.to(torch.float64)
    stride = T // STEPS
    checked = 0
    for t in sched.timesteps.tolist():
        x, out = _tensors(t)
        prev = t - stride
        if prev < 0:
            continue  # the last step: see test_the_conventions_that_differ
        ref = sched.step(out, t, x, eta=0.0).prev_sample
        eps = eps_from_output(out, x, float(a[t]), prediction_type)
        ours = ddim_step(x, eps, float(a[t]), float(a[prev]))
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        checked += 1
    assert checked == STEPS - 1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_inversion_step_is_ddim_inverse_schedulers_step(prediction_type):
    inv = DDIMInverseScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085,
                               beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=0,
                               prediction_type=prediction_type)
    inv.set_timesteps(STEPS)
    a = inv.alphas_cumprod.to(torch.float64)
    stride = T // STEPS
    checked = 0
    for t_next in inv.timesteps.tolist():
        t_cur = t_next - stride
        if t_cur < 0:
            continue
        x, out = _tensors(t_next)  # x at t_cur, the network's output there
        ref = inv.step(out, t_next, x).prev_sample  # diffusers names the *higher* noise level prev_timestep
        eps = eps_from_output(out, x, float(a[t_cur]), prediction_type)
        ours = ddim_step(x, eps, float(a[t_cur]), float(a[t_next]))
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        checked += 1
    assert checked >= STEPS - 2


def test_the_conventions_that_differ():
    sched = DDIMScheduler(**SCHEDULE)
    sched.set_timesteps(STEPS)
    diffusers_grid = sorted(sched.timesteps.tolist())  # 'leading' spacing: multiples of T // STEPS
    ours = timestep_grid(T, STEPS, 1.0)
    # cfgen spaces its grid by rounding i * T_inv / S up to T_inv = T - 1; diffusers steps by T // S
    assert diffusers_grid == list(range(0, 1000, 40)) and len(ours) == STEPS + 1 and ours[-1] == 999
    assert ours[:3] == [0, 40, 80] and ours[-2] == 959 != diffusers_grid[-1] == 960
    # diffusers' last reverse step lands on final_alpha_cumprod (alphas_cumprod[0] here, 1.0 with
    # set_alpha_to_one); cfgen's reverse ends at t_0 = 0, the noise level its inversion started from,
    # whose alpha_0 < 1: the image itself sits there, so the round trip closes exactly on it
    assert float(sched.final_alpha_cumprod) == float(sched.alphas_cumprod[0]) < 1.0
    assert DDIMScheduler(**{**SCHEDULE, "set_alpha_to_one": True}).final_alpha_cumprod == 1.0
    x, eps = _tensors(0)
    a = sched.alphas_cumprod.to(torch.float64)
    ref = sched.step(eps, 0, x, eta=0.0).prev_sample  # prev = -40: diffusers steps to final_alpha_cumprod
    torch.testing.assert_close(ddim_step(x, eps, float(a[0]), float(a[0])), ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(ref, x)  # with set_alpha_to_one=False that extra step from t = 0 is the identity...
    to_one = DDIMScheduler(**{**SCHEDULE, "set_alpha_to_one": True})
    to_one.set_timesteps(STEPS)
    assert not torch.allclose(to_one.step(eps, 0, x, eta=0.0).prev_sample, x)  # ...with True it denoises past t_0
