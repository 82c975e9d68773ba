"""The stages' progress bar: it moves with the UNet's work inside a batch (never past the batch's last sample
before the batch is done) and prints its 100% line once."""

from __future__ import annotations

import io

import pytest
import torch
from tqdm import tqdm

from cfgen.stages import common
from cfgen.stages.common import UnetProgress, advance


class Rows(torch.nn.Module):
    def forward(self, x):
        return x


@pytest.fixture
def bar():
    out = io.StringIO()
    b = tqdm(total=300, file=out, mininterval=0, miniters=1, ascii=True)
    common._Progress.bar, common._Progress.carry = b, 0.0
    yield b, out
    common._Progress.bar = None


def test_the_bar_follows_unet_work_inside_a_batch(bar):
    b, _ = bar
    net = Rows()
    progress = UnetProgress(net, first_guess=10)  # 10 evaluations a sample until measured
    progress.start(256)
    ticks = []
    for _ in range(10):  # a pass of 10 steps over 64 rows: 64 samples' worth at 10 evaluations each
        before = b.n
        net(torch.zeros(64, 1))
        ticks.append(b.n - before)
    assert b.n == 64 and max(ticks) <= 64
    for _ in range(100):  # far more work than guessed: held at the batch's last sample
        net(torch.zeros(64, 1))
    assert b.n == 255
    progress.done()
    assert b.n == 256
    # the next batch uses what the first measured: 110 steps x 64 rows over 256 samples = 27.5 a sample
    progress.start(44)
    for _ in range(11):
        net(torch.zeros(11, 1))
    assert b.n == 256 + int(11 * 11 / 27.5)
    progress.close()
    net(torch.zeros(64, 1))  # the hook is gone
    assert b.n == 256 + int(11 * 11 / 27.5)


def test_the_hundred_percent_line_prints_once(bar):
    b, out = bar
    advance(298.5)
    advance(1)        # 299.5 of 300 shows as 99.8%: tqdm would round it to "100%"
    advance(0.5)
    b.close()
    assert out.getvalue().count("100%") == 1 and "300/300" in out.getvalue()
