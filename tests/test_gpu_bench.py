"""The GPU benchmark's code path on the CPU (`python -m cfgen.bench.gpu --tiny`), the FLOP counter
against hand counts, the peak table by device name, and torch.compile against eager."""

from __future__ import annotations

import pytest
import torch

from cfgen.bench.guide import FlopCount, bf16_peak


def test_flop_count_by_hand_forward_and_input_gradient():
    """Linear 4 -> 3 on 2 rows: 2*2*4*3 = 48 FLOPs forward; the input gradient is another (2x3)@(3x4) = 48.
    torch.autograd.grad (what guidance calls) must be countable: torch's FlopCounterMode refuses it."""
    lin = torch.nn.Linear(4, 3).requires_grad_(False)
    x = torch.randn(2, 4, requires_grad=True)
    with FlopCount() as fwd:
        lin(x)
    assert fwd.total == 48
    with FlopCount() as both:
        (g,) = torch.autograd.grad(lin(x).sum(), x)
    assert both.total == 96 and g.shape == x.shape


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L40S", 362.0), ("NVIDIA A10", 125.0), ("NVIDIA A10G", None), ("NVIDIA L4", 121.0),
    ("Tesla V100-SXM2-16GB", None)])
def test_peak_by_exact_model_name(name, peak):
    """PCIe / NVL H100s are not the SXM part; an A10G is not an A10; an unknown GPU gets no MFU."""
    assert bf16_peak(name) == peak


def test_tiny_gpu_bench_runs_both_recipes_on_the_cpu(capsys):
    from cfgen.bench.gpu import STEPS, main

    rows = main(["--tiny"])
    assert [(r["recipe"], r["batch"]) for r in rows] == [("adm256", 2), ("sd15", 2)]
    for r in rows:
        assert r["guided_step_s"] > 0 and r["plain_step_s"] > 0 and r["guided_tflops"] > 0
        assert r["pairs_per_s"] == pytest.approx(2 / (STEPS * (r["guided_step_s"] + r["plain_step_s"])))
        assert r["bf16_mfu"] is None and "peak_gib" not in r         # a CPU: no peak, no GPU memory
        # bf16 autocast moves the guided update by about 1% (relative L2) and keeps its direction
        assert r["bf16_vs_fp32_cosine"] > 0.999 and r["bf16_vs_fp32_rel_l2"] < 0.05
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("device cpu, bf16 autocast") and out[-1].startswith("{")


def test_compiled_unet_matches_eager():
    """model.compile = true: torch.compile (inductor, the C compiler here) gives eager's noise estimate."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=8).eval().requires_grad_(False)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        eager = unet(x, t).sample
        compiled = torch.compile(unet)(x, t).sample
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
