"""Localized edits (diffusion.localized_reverse, guide.mask): the mask math by hand, and what the mask
promises: an all-ones mask is the unmasked path, outside the mask the output is the factual image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfgen.diffusion import EditMask, guided_reverse, inversion_trajectory, invert, localized_reverse

ALPHAS = torch.linspace(0.99, 0.2, 50, dtype=torch.float64)
GRID = [0, 10, 20, 30, 40]


def half_x(x, t):
    """eps(x, t) = x / 2: per pixel, so a pixel the guidance never touches depends on nothing else."""
    return 0.5 * x


def top_left_classifier(x, t):
    """logits = [sum of the top-left 2x2 block, minus it]: its gradient lives in that block only."""
    s = x[:, :, :2, :2].flatten(1).sum(1)
    return torch.stack([s, -s], dim=1)


def test_region_by_hand():
    d = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    d[0, 0, 1, 1], d[0, 0, 3, 3] = 4.0, 2.0   # normalised: 1.0 at (1,1), 0.5 at (3,3)
    # dilation 3: the 3x3 block around (1,1) reads 1.0, the 2x2 corner block around (3,3) reads 0.5
    # (and (2,2) is in both, 1.0)
    high = EditMask(threshold=0.6, dilation=3, blur=1).region(d)[0, 0]
    expected_high = torch.zeros(4, 4, dtype=torch.bool)
    expected_high[:3, :3] = True
    assert torch.equal(high, expected_high)
    low = EditMask(threshold=0.4, dilation=3, blur=1).region(d)[0, 0]
    expected_low = expected_high.clone()
    expected_low[2:, 2:] = True
    assert torch.equal(low, expected_low)
    # blur 3 (mean over the in-image neighbours): at (0,0) the 2x2 corner holds 4 -> 1.0; at (3,3) the 2x2
    # corner holds 2 -> 0.5; peak at (1,1)/(0,0)/...: 4/4 = 1.0 there, 4/9 + 2/9 = 0.667 at (2,2)
    blurred = EditMask(threshold=0.0, dilation=1, blur=3)
    d2 = d.clone()
    smooth = torch.nn.functional.avg_pool2d(d2, 3, 1, 1, count_include_pad=False)
    assert smooth[0, 0, 0, 0].item() == pytest.approx(1.0)
    assert smooth[0, 0, 2, 2].item() == pytest.approx(6 / 9)
    assert smooth[0, 0, 3, 3].item() == pytest.approx(0.5)
    assert blurred.region(d).all()          # tau = 0: the all-ones mask
    # channels are summed: a departure in either channel counts
    two = torch.zeros(1, 2, 2, 2)
    two[0, 1, 0, 0] = 1.0
    assert EditMask(threshold=0.5, dilation=1, blur=1).region(two)[0, 0].tolist() == [[True, False], [False, False]]


def test_bad_mask_settings_are_refused():
    with pytest.raises(ValueError, match="odd"):
        EditMask(dilation=2)
    with pytest.raises(ValueError, match="source"):
        EditMask(source="attention")


def _factual():
    torch.manual_seed(0)
    return torch.randn(3, 1, 4, 4, dtype=torch.float64)


@pytest.mark.parametrize("source", ["x0", "gradient"])
def test_all_ones_mask_is_the_unmasked_path(source):
    x0 = _factual()
    ref = inversion_trajectory(half_x, x0, ALPHAS, GRID)
    target = torch.tensor([0, 1, 0])
    plain = guided_reverse(half_x, top_left_classifier, ref.x[-1], ALPHAS, GRID, target=target, scale=3.0)
    masked, m = localized_reverse(half_x, top_left_classifier, ref.x[-1], ref, ALPHAS, GRID,
                                  EditMask(source=source, threshold=0.0, start=0.0), target=target, scale=3.0)
    assert m.all()
    assert torch.equal(masked, plain)  # bit for bit


def test_inversion_trajectory_ends_where_invert_does():
    x0 = _factual()
    ref = inversion_trajectory(half_x, x0, ALPHAS, GRID)
    assert len(ref.x) == len(GRID) and len(ref.eps) == len(GRID) - 1 and ref.x[0] is x0
    assert torch.equal(ref.x[-1], invert(half_x, x0, ALPHAS, GRID))
    assert torch.equal(ref.eps[1], half_x(ref.x[1], None))


@pytest.mark.parametrize("source", ["x0", "gradient"])
def test_outside_the_mask_the_output_is_the_factual_image(source):
    x0 = _factual()
    ref = inversion_trajectory(half_x, x0, ALPHAS, GRID)
    target = torch.tensor([0, 1, 0])
    mask = EditMask(source=source, threshold=0.5, dilation=1, blur=1, start=0.0)
    out, m = localized_reverse(half_x, top_left_classifier, ref.x[-1], ref, ALPHAS, GRID, mask, target=target,
                               scale=3.0)
    block = torch.zeros(4, 4, dtype=torch.bool)
    block[:2, :2] = True
    # the guidance acts on the top-left block only, so that is where the edit departs from the factual image
    assert torch.equal(m[:, 0], block.expand(3, 4, 4))
    outside = ~m.expand_as(out)
    assert torch.equal(out[outside], x0[outside])     # exactly the factual image
    assert (out[~outside] - x0[~outside]).abs().min() > 1e-3   # and the edit did happen inside
    # without the mask the whole image drifts: the plain DDIM round trip is not exact
    plain = guided_reverse(half_x, top_left_classifier, ref.x[-1], ALPHAS, GRID, target=target, scale=3.0)
    assert not torch.equal(plain[outside], x0[outside])


def test_masking_starts_late_when_asked():
    x0 = _factual()
    ref = inversion_trajectory(half_x, x0, ALPHAS, GRID)
    target = torch.tensor([0, 0, 0])
    never = EditMask(threshold=0.5, dilation=1, blur=1, start=0.99)  # round(0.99 * 4) = 4: no masked step
    out, m = localized_reverse(half_x, top_left_classifier, ref.x[-1], ref, ALPHAS, GRID, never, target=target,
                               scale=3.0)
    assert m.all()
    assert torch.equal(out, guided_reverse(half_x, top_left_classifier, ref.x[-1], ALPHAS, GRID, target=target,
                                           scale=3.0))


def test_guide_stage_mask_off_is_guided_reverse_and_on_stays_inside(tmp_path):
    """On the shipped digits models: guide.mask = 'off' gives exactly what guided_reverse gives (today's
    output); with the mask, every pixel that differs from the factual image lies inside the mask."""
    from cfgen.config import load_config
    from cfgen.models.loading import load_models
    from cfgen.stages.common import config_grid
    from cfgen.stages.classifier_guide import guide_batch
    from cfgen.stages.invert import read_inverted, run_invert
    from cfgen.tensors import to_uint8
    from conftest import DIGITS, SMALL

    cfg = load_config(DIGITS, SMALL + ["data.limit=8", "guide.escalation=[]", "guide.mask='off'"])
    run_invert(cfg, tmp_path)
    samples = read_inverted(tmp_path)
    factual = np.stack([s.arrays(cfg)[0] for s in samples])
    noise = np.stack([s.arrays(cfg)[1] for s in samples])
    labels, seeds = [s.meta["label"] for s in samples], [s.meta["seed"] for s in samples]
    models = load_models(cfg)
    grid = config_grid(cfg, models.num_train_timesteps)
    classes = [str(i) for i in range(10)]
    off = guide_batch(models, cfg, classes, grid, factual, noise, labels, seeds)
    classifier, gradient = models.guidance
    direct = guided_reverse(models.eps, classifier, torch.from_numpy(noise), models.alphas_cumprod, grid,
                            target=torch.from_numpy(off.targets), scale=cfg.guide.scale, gradient=gradient)
    np.testing.assert_array_equal(off.cf, to_uint8(direct))
    assert (off.mask_fraction == 1.0).all()

    cfg.guide.mask, cfg.guide.mask_dilation, cfg.guide.mask_blur, cfg.guide.mask_threshold = "x0", 1, 1, 0.2
    on = guide_batch(models, cfg, classes, grid, factual, noise, labels, seeds)
    np.testing.assert_array_equal(on.targets, off.targets)
    np.testing.assert_array_equal(on.recon, off.recon)      # the reconstruction is never masked
    changed = (on.cf != factual).reshape(len(factual), -1).mean(1)
    assert (on.mask_fraction < 1.0).all() and (on.mask_fraction > 0.0).all()
    assert (changed <= on.mask_fraction + 1e-9).all()         # nothing changes outside the mask
    assert changed.mean() < (off.cf != factual).reshape(len(factual), -1).mean(1).mean()
