"""The figures of `cfgen report` (matplotlib, Agg): each function takes the manifest rows (or the sweep)
and returns a Figure, which report.py saves; tests read the axes of the returned figures.

    fig = histogram_figure(rows, gates={"p_cf": 0.5})   # one panel per metric + edit vs round trip
    fig.savefig("histograms.png")
"""

from __future__ import annotations

import math

import numpy as np

# manifest column -> (panel title, x-axis label: the quantity and its unit)
HISTOGRAMS = {
    "l1": ("edit L1", "L1 factual → counterfactual (mean |Δ| per pixel, 0–1)"),
    "l2": ("edit L2", "RMS factual → counterfactual (0–1)"),
    "recon_l1": ("round-trip L1 (s = 0)", "L1 factual → reconstruction (mean |Δ| per pixel, 0–1)"),
    "p_cf": ("p(y*)", "guiding predictor's p(target class | counterfactual)"),
    "changed_fraction": ("pixels changed", "share of pixels changed by > 0.1"),
    "mask_fraction": ("edit mask", "share of the image the mask let guidance touch"),
    "cld": ("CLD (lower is better)", "counterfactual latent divergence (log 2 … 1 + log 2)"),
    "truth_l1": ("L1 to the true counterfactual", "L1 counterfactual → truth (mean |Δ| per pixel, 0–1)"),
    "outside_change": ("change outside the causal region", "share of pixels outside it changed by > 0.1"),
}
COUNT_LABEL = "pairs"
WRITTEN, REJECTED = "#3b6ea8", "#d9534f"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def fitted_range(values: list[float]) -> tuple[float, float]:
    """The data's own min..max (a fixed 0..1 hides a distribution that lives in 0.40..0.45);
    a single value gets a small span around it so it still shows as a bar."""
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        pad = max(abs(lo) * 0.05, 1e-3)
        return lo - pad, hi + pad
    return lo, hi


def histogram_figure(rows: list[dict], gates: dict[str, float] | None = None):
    """One histogram per metric the run has (written and rejected pairs stacked), x fitted to the data,
    each pack gate drawn where it falls inside the data; plus a scatter of edit L1 against the s = 0
    round-trip L1, where pairs on or below the diagonal changed no more than reconstruction noise."""
    plt = _plt()
    gates = gates or {}
    guided = [r for r in rows if r.get("l1") is not None]
    cols = [c for c in HISTOGRAMS if _finite(r.get(c) for r in guided)]
    panels = len(cols) + 1
    ncols = 4
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(14, 3.3 * nrows), squeeze=False)
    axes = axes.ravel()
    for ax, col in zip(axes, cols):
        ok = _finite(r.get(col) for r in guided if r["status"] == "ok")
        rej = _finite(r.get(col) for r in guided if r["status"] == "rejected")
        lo, hi = fitted_range(ok + rej)
        bins = np.linspace(lo, hi, min(30, max(8, len(ok + rej) // 3)) + 1)
        data, colors, labels = [ok], [WRITTEN], ["written"]
        if rej:
            data, colors, labels = [ok, rej], [WRITTEN, REJECTED], ["written", "rejected"]
        ax.hist(data, bins=bins, stacked=True, color=colors, label=labels)
        gate = gates.get(col)
        gate_shown = gate is not None and math.isfinite(gate) and lo <= gate <= hi
        if gate_shown:
            ax.axvline(gate, color="black", linestyle="--", linewidth=1, label="pack gate")
        title, xlabel = HISTOGRAMS[col]
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(COUNT_LABEL, fontsize=8)
        ax.set_xlim(lo, hi)
        _ticks(ax)
        if len(labels) > 1 or gate_shown:
            ax.legend(fontsize=7)
    _edit_vs_recon(axes[len(cols)], guided)
    for ax in axes[panels:]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _edit_vs_recon(ax, guided: list[dict]) -> None:
    pts = [(r["recon_l1"], r["l1"], r["status"]) for r in guided
           if r.get("recon_l1") is not None and math.isfinite(r["recon_l1"]) and math.isfinite(r["l1"])]
    for status, color in (("ok", WRITTEN), ("rejected", REJECTED)):
        xy = [(x, y) for x, y, s in pts if s == status]
        if xy:
            ax.scatter(*zip(*xy), s=10, color=color, alpha=0.7, label="written" if status == "ok" else "rejected")
    top = max([max(x, y) for x, y, _ in pts], default=1.0) * 1.05 or 1.0
    ax.plot([0, top], [0, top], color="black", linestyle="--", linewidth=1, label="edit = round trip")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_title("edit vs round-trip error", fontsize=10)
    ax.set_xlabel("round-trip L1 at s = 0 (0–1)", fontsize=8)
    ax.set_ylabel("edit L1 factual → counterfactual (0–1)", fontsize=8)
    _ticks(ax)
    ax.legend(fontsize=7)


def _ticks(ax) -> None:
    """At most 5 small ticks an axis: 4 panels a row leave no room for 0.0000 0.0025 0.0050 ..."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(5, integer=ax.get_ylabel() == COUNT_LABEL))
    ax.tick_params(labelsize=8)


def confusion_figure(rows: list[dict], classes: list[str], has_truth: bool):
    """factual class -> target class counts (and, with an oracle, target -> oracle's class)."""
    plt = _plt()
    k = len(classes)
    guided = [r for r in rows if r["cf_label"] is not None]
    mats = [("factual class -> target class (pairs)", "factual class", "target class",
             [(r["label"], r["cf_label"]) for r in guided])]
    if has_truth:
        mats.append(("target class -> oracle's class (pairs)", "target class", "oracle's class",
                     [(r["cf_label"], r["oracle_label"]) for r in guided if r["oracle_label"] is not None]))
    side = max(4.0, 0.45 * k + 2)
    fig, axes = plt.subplots(1, len(mats), figsize=(side * len(mats), side))
    for ax, (title, ylab, xlab, pairs) in zip(np.atleast_1d(axes), mats):
        m = np.zeros((k, k), dtype=int)
        for a, b in pairs:
            m[a, b] += 1
        ax.imshow(m, cmap="Blues")
        for i in range(k):
            for j in range(k):
                if m[i, j]:
                    ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if m[i, j] > m.max() / 2 else "black")
        ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), classes, fontsize=8)
        ax.set_xlabel(xlab)
        ax.set_ylabel(ylab)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def sweep_figure(sweep: dict):
    """Flip rate (predictor, oracle) and mean L1 against the guidance scale, from RUN/sweep/sweep.json."""
    plt = _plt()
    first = sweep["rows"][0].get("mask", "off") if sweep["rows"] else "off"  # one curve set: the first mask variant
    rows = [r for r in sweep["rows"] if r["scale"] != "escalation" and r.get("mask", "off") == first]
    s = [r["scale"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(s, [r["flip_rate"] for r in rows], "o-", label="flip rate (guiding predictor)")
    ax.plot(s, [r["oracle_flip_rate"] for r in rows], "s-", label="flip rate (independent oracle)")
    if rows and rows[0].get("truth_closer_rate") is not None:
        ax.plot(s, [r["truth_closer_rate"] for r in rows], "^-", label="closer to the true counterfactual")
    ax.set_xscale("symlog", base=2, linthresh=1)
    ax.set_xlabel(f"guidance scale s (no escalation; mask {first})")
    ax.set_ylabel("share of pairs")
    ax.set_ylim(0, 1.02)
    ax2 = ax.twinx()
    ax2.plot(s, [r["mean_l1"] for r in rows], "k--", label="mean L1 (right axis)")
    ax2.set_ylabel("mean L1 factual -> counterfactual (0-1)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="lower right")
    ax.set_title(f"{sweep['pipeline']}: {sweep['samples']} samples, t_inv={sweep['t_inv']}", fontsize=10)
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    fig.savefig(path, dpi=90)
    _plt().close(fig)
