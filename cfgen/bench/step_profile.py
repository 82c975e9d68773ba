"""Where the guide compute's time goes: one guide batch under torch.profiler, added up by section.

    from cfgen.bench.step_profile import profile_guide, format_profile
    print(format_profile(profile_guide(models, cfg, classes, grid, factual, noise, labels, seeds)))

The sections are the labels of cfgen/sections.py. Top level (they do not overlap): choosing y*,
the s = 0 reconstruction, the factual trajectory, the guided passes and the escalation
bookkeeping between them; inside the guided passes: UNet forwards, the predictor's forward and
backward, the mask, and the remainder (the DDIM update, slicing, Python). `cfgen bench` prints it.
Times are the profiler's (CPU time; on a GPU the kernels' device time): the profiler's own
overhead, a few microseconds per op, is in them, so read them as shares, not as throughput.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch

from cfgen.config import Config
from cfgen.device import synchronize
from cfgen.models.runtime import Models
from cfgen.sections import ESCALATION, GUIDED_PASS, MASK, PREDICTOR, RECON, TARGETS, TOP_STEP, TRAJECTORY, UNET

TOP = (TARGETS, TOP_STEP, RECON, TRAJECTORY, GUIDED_PASS, ESCALATION)
INNER = (UNET, PREDICTOR, MASK)
LABELS = {TARGETS: "choose y* (predictor on the factual images)",
          TOP_STEP: "first step at u, shared by every scale (UNet + predictor)", RECON: "s = 0 reconstruction (UNet)",
          TRAJECTORY: "factual trajectory (UNet)", GUIDED_PASS: "guided passes", UNET: "UNet forward",
          PREDICTOR: "predictor forward + backward", MASK: "mask (departure, region, fall back)",
          "guided_rest": "DDIM update and the rest", ESCALATION: "escalation bookkeeping (decode, uint8, score, keep)",
          "other": "outside every section"}


def _seconds(event, cuda: bool) -> float:
    us = event.device_time_total if cuda and event.device_time_total > 0 else event.cpu_time_total
    return us / 1e6


def _top_section(event) -> str | None:
    parent = event.cpu_parent
    while parent is not None and parent.name not in TOP:
        parent = parent.cpu_parent
    return None if parent is None else parent.name


def section_seconds(events, cuda: bool = False) -> dict[str, float]:
    """Seconds per section of a profiler's events: the TOP ones as they are, the INNER ones only where they
    ran inside a guided pass (the reconstruction runs the UNet too, and is counted as itself)."""
    out: dict[str, float] = defaultdict(float)
    for event in events:
        if event.name in TOP:
            out[event.name] += _seconds(event, cuda)
        elif event.name in INNER and _top_section(event) == GUIDED_PASS:
            out[event.name] += _seconds(event, cuda)
    out["guided_rest"] = max(0.0, out[GUIDED_PASS] - sum(out[k] for k in INNER))
    return dict(out)


def profile_guide(models: Models, cfg: Config, classes, grid, factual: np.ndarray, noise: np.ndarray,
                  labels: list[int], seeds: list[int]) -> dict:
    """One guide_batch on the given samples (one batch: the caller slices) under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    from cfgen.stages.classifier_guide import guide_batch

    cuda = models.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        guide_batch(models, cfg, classes, grid, factual, noise, labels, seeds)
        synchronize(models.device)
        wall = time.perf_counter() - start  # before the profiler's exit, which reads its events
    seconds = section_seconds(prof.events(), cuda)
    seconds["other"] = max(0.0, wall - sum(seconds.get(k, 0.0) for k in TOP))
    return {"samples": len(labels), "wall_s": wall, "seconds": seconds}


def format_profile(p: dict) -> list[str]:
    s, wall = p["seconds"], p["wall_s"]

    def line(key: str, indent: str = "  ") -> str:
        v = s.get(key, 0.0)
        return f"{indent}{LABELS[key]:{62 - len(indent)}s} {v:7.2f} s {v / wall:6.1%}"

    lines = [f"where a guide batch's time goes ({p['samples']} samples, {wall:.2f} s under torch.profiler):"]
    for key in TOP:
        lines.append(line(key))
        if key == GUIDED_PASS:
            lines += [line(k, "      ") for k in (*INNER, "guided_rest")]
    lines.append(line("other"))
    return lines
