"""Named sections of the guide compute, for `cfgen bench`'s profile (and any torch.profiler trace).

    with section(UNET):
        e = eps(x_t, t)

A section is a torch.profiler.record_function label: free when no profiler runs (a few
microseconds a call, against milliseconds of network), and visible by name in a trace. `cfgen
bench` runs one guide batch under the profiler and adds up each label's time (bench.profile_guide).
The labelled sections do not nest inside each other except inside GUIDED_PASS, which holds UNET,
PREDICTOR and MASK; its remainder is the DDIM update and the per-step bookkeeping.
"""

from __future__ import annotations

from torch.profiler import record_function as section  # noqa: F401  (the one way sections are marked)

UNET = "cfgen.unet"                    # eps(x_t, t): a UNet forward, no gradient
PREDICTOR = "cfgen.predictor"          # the guidance gradient: predictor forward + backward (through the
                                       # UNet too with model.gradient = 'unet')
MASK = "cfgen.mask"                    # localized edits: departure map, region, fall back to the factual path
GUIDED_PASS = "cfgen.guided_pass"      # one guided reverse over the grid (holds the three above)
ESCALATION = "cfgen.escalation"        # per round: pick the rows, decode, round to uint8, score the stored
                                       # images, keep or escalate each sample
TOP_STEP = "cfgen.top_step"            # the first reverse step at u (UNet + predictor), shared by the
                                       # reconstruction and every scale a pair tries
RECON = "cfgen.recon"                  # the s = 0 reconstruction (its remaining steps)
TRAJECTORY = "cfgen.trajectory"        # the factual inversion trajectory (localized edits)
TARGETS = "cfgen.targets"              # y*: the predictor on the factual images
