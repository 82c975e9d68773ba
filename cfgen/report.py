"""`cfgen report RUN_DIR`: a self-contained HTML page on the quality of a run's pairs.

    cfgen sweep  --config pipelines/shapes.toml      # optional: the flip-rate-vs-scale curve
    cfgen report runs/shapes                         # -> runs/shapes/report/report.html

Reads RUN/pairs (manifest.parquet, stats.json, config.toml), RUN/guide (the
images, rejected pairs and s = 0 reconstructions included) and, if present,
RUN/sweep/sweep.json and RUN/tune/metrics.json (`cfgen tune`: the prompt-learning
table, base / novel / HM / worst-group and the paired differences to each
learner's baseline). Writes into RUN/report/:
    report.html        headline figures, contact sheets, plots; relative links only, no
                       scripts, no network: it opens from file://
    cards/*.png        one strip per pair: factual | counterfactual | |difference|
                       (| true counterfactual where the causal model is known)
    histograms.png     distributions of the per-pair metrics
    confusion.png      factual class -> target class (and, with an oracle, target -> oracle's class)
    flip_vs_scale.png  flip rate vs guidance scale, from the sweep
Contact sheets: one pair per (factual, target) class pair (its median-L1
example), the best and the worst pairs (where the truth is known: best = the
oracle-valid, truth-closer pairs with the smallest L1 to the true
counterfactual, worst = the largest; else best = flipped with the smallest L1,
worst = lowest p(y*)).
"""

from __future__ import annotations

import html
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from cfgen.config import Config, load_config
from cfgen.contract import GUIDE, PAIRS
from cfgen.data.images import decode_image
from cfgen.data.sources import open_source
from cfgen.errors import InputError
from cfgen.shards import read_samples

ZOOM = 6            # card pixels per image pixel (nearest neighbour)
SHEET_SIZE = 8      # pairs in the best / worst sheets
HIST_COLUMNS = ("l1", "l2", "recon_l1", "p_cf", "changed_fraction", "mask_fraction", "cld", "truth_l1",
                "outside_change")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def diff_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| as an RGB heat map (max over channels; 0 black .. 1 white, 'inferno')."""
    from matplotlib import colormaps

    d = np.abs(a.astype(np.float64) - b.astype(np.float64)).max(axis=2) / 255.0
    return (colormaps["inferno"](d)[:, :, :3] * 255).round().astype(np.uint8)


def card(panels: list[np.ndarray]) -> Image.Image:
    """Panels (H, W, 1|3 uint8) side by side with one white column between them, zoomed ZOOM times."""
    rgb = [np.repeat(p, 3, axis=2) if p.shape[2] == 1 else p for p in panels]
    gap = np.full((rgb[0].shape[0], 1, 3), 255, dtype=np.uint8)
    row = [rgb[0]]
    for p in rgb[1:]:
        row += [gap, p]
    img = Image.fromarray(np.concatenate(row, axis=1))
    return img.resize((img.width * ZOOM, img.height * ZOOM), Image.Resampling.NEAREST)


def _load(run_dir: Path) -> tuple[Config, list[dict], dict]:
    pairs = PAIRS.dir(run_dir)
    for need in ("manifest.parquet", "stats.json", "config.toml"):
        if not (pairs / need).is_file():
            raise InputError(f"report: {pairs / need} not found; run `cfgen run` (or pack) first")
    if not GUIDE.dir(run_dir).is_dir():
        raise InputError(f"report: {GUIDE.dir(run_dir)} not found; the report reads the guide shards")
    cfg = load_config(pairs / "config.toml")
    rows = pq.read_table(pairs / "manifest.parquet").to_pylist()
    stats = json.loads((pairs / "stats.json").read_text())
    return cfg, rows, stats


def _images(cfg: Config, run_dir: Path, wanted: list[dict]) -> dict[str, dict]:
    """factual / cf / recon (and the true counterfactual, where the causal model is known) arrays for the
    wanted rows, read from RUN/guide."""
    by_shard = defaultdict(set)
    for r in wanted:
        by_shard[r["shard"]].add(r["id"])
    size, ch = cfg.data.image_size, cfg.data.channels
    out = {}
    for shard, ids in by_shard.items():
        for s in read_samples(GUIDE.tar(run_dir, shard)):
            if s["__key__"] in ids:
                out[s["__key__"]] = {k: decode_image(s[m], size, ch)
                                     for k, m in (("factual", "png"), ("cf", "cf.png"), ("recon", "recon.png"))}
    causal = open_source(cfg).causal
    if causal is not None:
        for r in wanted:
            if r["id"] in out:
                out[r["id"]]["truth"] = causal.true_counterfactual(r["origin"], r["cf_label"])
    return out


def _fmt(v, spec=".3f") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, spec) if isinstance(v, float) else str(v)


def select(rows: list[dict], has_truth: bool) -> dict[str, list[dict]]:
    """The pairs of each contact sheet."""
    guided = [r for r in rows if r["cf_label"] is not None and r["l1"] is not None]
    ok = [r for r in guided if r["status"] == "ok"] or guided
    per_pair = defaultdict(list)
    for r in ok:
        per_pair[(r["label"], r["cf_label"])].append(r)
    class_pairs = []
    for key in sorted(per_pair):
        group = sorted(per_pair[key], key=lambda r: (r["l1"], r["id"]))
        class_pairs.append(group[len(group) // 2])  # the median-L1 example: typical, not cherry-picked
    if has_truth:
        # best among the valid ones (oracle flipped, closer to the truth): a small truth_l1 alone
        # also rewards counterfactuals that hardly changed a factual already close to its truth
        valid = [r for r in guided if r["oracle_flipped"] and r["truth_closer"]]
        best = sorted(valid, key=lambda r: (r["truth_l1"], r["id"]))[:SHEET_SIZE]
        worst = sorted(guided, key=lambda r: (-r["truth_l1"], r["id"]))[:SHEET_SIZE]
    else:
        flipped = sorted((r for r in guided if r["flipped"]), key=lambda r: (r["l1"], r["id"]))
        best = flipped[:SHEET_SIZE]
        worst = sorted(guided, key=lambda r: (r["p_cf"], r["id"]))[:SHEET_SIZE]
    return {"class_pairs": class_pairs, "best": best, "worst": worst}


def _histograms(rows: list[dict], path: Path) -> list[str]:
    plt = _plt()
    guided = [r for r in rows if r["l1"] is not None]
    cols = [c for c in HIST_COLUMNS if any(r.get(c) is not None for r in guided)]
    fig, axes = plt.subplots(1 + (len(cols) - 1) // 4, 4, figsize=(14, 3.2 * (1 + (len(cols) - 1) // 4)))
    axes = np.atleast_1d(axes).ravel()
    for ax, col in zip(axes, cols):
        ok = [r[col] for r in guided if r["status"] == "ok" and r.get(col) is not None]
        rej = [r[col] for r in guided if r["status"] == "rejected" and r.get(col) is not None]
        ax.hist([ok, rej] if rej else [ok], bins=30, stacked=True, color=["#3b6ea8", "#d9534f"][:2 if rej else 1],
                label=["written", "rejected"][:2 if rej else 1])
        ax.set_title(col)
        if rej:
            ax.legend(fontsize=8)
    for ax in axes[len(cols):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return cols


def _confusion(rows: list[dict], classes: list[str], has_truth: bool, path: Path) -> None:
    plt = _plt()
    k = len(classes)
    guided = [r for r in rows if r["cf_label"] is not None]
    mats = [("factual class -> target class", "factual", "target",
             [(r["label"], r["cf_label"]) for r in guided])]
    if has_truth:
        mats.append(("target class -> oracle's class", "target", "oracle",
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
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _sweep_plot(sweep: dict, path: Path) -> None:
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
    ax.set_ylabel("rate")
    ax.set_ylim(0, 1.02)
    ax2 = ax.twinx()
    ax2.plot(s, [r["mean_l1"] for r in rows], "k--", label="mean L1 (right axis)")
    ax2.set_ylabel("mean L1 factual -> counterfactual")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="lower right")
    ax.set_title(f"{sweep['pipeline']}: {sweep['samples']} samples, t_inv={sweep['t_inv']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1300px; }
h1 { margin-bottom: 4px; } h2 { margin-top: 32px; border-bottom: 1px solid #ddd; }
table.stats td, table.stats th { padding: 3px 12px; border-bottom: 1px solid #eee; text-align: left; }
.sheet { display: flex; flex-wrap: wrap; gap: 14px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px; font-size: 12px; background: #fafafa; }
.card img { display: block; image-rendering: pixelated; margin-bottom: 4px; }
.card .rej { color: #c9302c; font-weight: bold; }
.legend { color: #555; font-size: 13px; }
img.plot { max-width: 100%; }
"""


def _card_html(r: dict, img: str, classes: list[str], has_truth: bool) -> str:
    lines = [f"<b>{html.escape(r['id'])}</b>",
             f"{html.escape(classes[r['label']])} &rarr; {html.escape(classes[r['cf_label']])}",
             f"p(y*) {_fmt(r['p_cf'])} &middot; L1 {_fmt(r['l1'], '.4f')} &middot; s {_fmt(r['guidance_scale'], 'g')}",
             f"CLD {_fmt(r.get('cld'))}"]
    if has_truth:
        oracle = classes[r["oracle_label"]] if r["oracle_label"] is not None else "n/a"
        lines.append(f"vs truth L1 {_fmt(r['truth_l1'], '.4f')} &middot; oracle: {html.escape(oracle)}")
    if r["status"] != "ok":
        lines.append(f"<span class='rej'>{html.escape(r['status'])}: {html.escape(r['error'] or '')}</span>")
    return f"<div class='card'><img src='{img}' alt='{html.escape(r['id'])}'>" + "<br>".join(lines) + "</div>"


def _stats_table(stats: dict) -> str:
    keys = ("count", "pairs", "failed", "rejected", "errors", "rejected_by_gate", "flip_rate", "oracle_flip_rate",
            "truth_closer_rate", "within_recon_bound_rate", "mean_truth_l1", "mean_outside_change", "mean_l1",
            "mean_l2", "mean_recon_l1", "edit_within_recon_rate", "mean_cld", "mean_p_cf", "mean_changed_fraction",
            "per_scale")
    out = []
    for k in keys:
        if k in stats:
            v = stats[k]
            text = json.dumps(v) if isinstance(v, dict) else _fmt(v, ".4f")
            out.append(f"<tr><th>{k}</th><td>{html.escape(text)}</td></tr>")
    return "<table class='stats'>" + "".join(out) + "</table>"


def _sweep_table(sweep: dict) -> str:
    head = ("mask", "scale", "flip (predictor)", "flip (oracle)", "mean L1", "changed", "mask share",
            "error vs truth", "closer to truth", "outside change", "mean CLD")
    body = []
    for r in sweep["rows"]:
        scale = "+".join(f"{s:g}" for s in r["ladder"]) if r["scale"] == "escalation" else f"{r['scale']:g}"
        cells = [r.get("mask", "off"), scale, _fmt(r["flip_rate"]), _fmt(r["oracle_flip_rate"]),
                 _fmt(r["mean_l1"], ".4f"), _fmt(r["mean_changed_fraction"]), _fmt(r.get("mean_mask_fraction")),
                 _fmt(r["mean_truth_l1"], ".4f"), _fmt(r["truth_closer_rate"]), _fmt(r["mean_outside_change"]),
                 _fmt(r.get("mean_cld"))]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return ("<table class='stats'><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(body)
            + "</table>")


def _ci(d: dict | None) -> str:
    if d is None:
        return ""
    if d.get("low") is None:
        return f"{d['mean']:+.3f}"
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def tune_section(metrics: dict) -> str:
    """The `cfgen tune` table (RUN/tune/metrics.json) as HTML."""
    from cfgen.tune.protocol import METRICS

    p = metrics["protocol"]
    where = f"the '{p['eval_split']}' split" if p["eval_split"] else "every sample that is not a shot"
    hp = p.get("hyperparameters", {})
    legend = (f"Evaluation on {where} of the data source: {p['eval_images']} images, {len(p['cells'])} (group, class) "
              f"cells; base classes {p['base']}, novel {p['novel']}; {p['shots']} shots per base class from "
              f"{p['shot_pool']} pairs outside it; mean ± std over seeds {p['seeds']}. Δ: paired difference to the "
              f"learner's baseline (lambda = 0, same seed, shots, init and batch order), mean [95% t interval]. "
              f"Hyper-parameters {hp.get('selection', '')}: lam {hp.get('lam')}, epochs {hp.get('epochs')} "
              f"(CoCoOp {hp.get('cocoop_epochs')}), lr {hp.get('lr')}.")
    head = ["method", "base", "novel", "HM", "worst-group", "Δ worst-group", "Δ HM", "s/seed"]
    body = []
    for r in (metrics["rows"][k] for k in metrics["order"]):
        delta = r.get("delta") or {}
        cells = [r["label"]] + [f"{r[k]['mean']:.3f} ± {r[k]['std']:.3f}" for k in METRICS]
        cells += [_ci(delta.get("worst_group")), _ci(delta.get("hm")), f"{r['seconds']['mean']:.1f}"]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return ("<h2>Prompt tuning (cfgen tune)</h2>"
            f"<p class='legend'>{html.escape(legend)}</p><table class='stats'><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(body) + "</table>")


def write_report(run_dir: Path) -> Path:
    """Write RUN/report/ (replacing an old one); returns the path of report.html."""
    from cfgen.data.sources import load_class_names

    run_dir = Path(run_dir)
    cfg, rows, stats = _load(run_dir)
    classes = load_class_names(cfg)
    has_truth = any(r.get("truth_l1") is not None for r in rows)
    out = run_dir / "report"
    if out.exists():
        shutil.rmtree(out)
    (out / "cards").mkdir(parents=True)

    sheets = select(rows, has_truth)
    wanted = {r["id"]: r for sheet in sheets.values() for r in sheet}
    images = _images(cfg, run_dir, list(wanted.values()))
    card_files = {}
    for i, (rid, r) in enumerate(sorted(wanted.items())):
        im = images[rid]
        panels = [im["factual"], im["cf"], diff_image(im["factual"], im["cf"])]
        if has_truth:
            panels.append(im["truth"])
        name = f"cards/card-{i:04d}.png"
        card(panels).save(out / name)
        card_files[rid] = name

    _histograms(rows, out / "histograms.png")
    _confusion(rows, classes, has_truth, out / "confusion.png")
    sweep_path = run_dir / "sweep" / "sweep.json"
    sweep = json.loads(sweep_path.read_text()) if sweep_path.is_file() else None
    if sweep:
        _sweep_plot(sweep, out / "flip_vs_scale.png")

    panels = "factual | counterfactual | |difference|" + (" | true counterfactual" if has_truth else "")
    if has_truth:
        best_by = "valid for the oracle and closer to the truth, smallest L1 to the true counterfactual"
        worst_by = "largest L1 to the true counterfactual"
    else:
        best_by, worst_by = "flipped pairs with the smallest L1", "the lowest p(y*)"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>cfgen report: {html.escape(cfg.pipeline.name)}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>cfgen report: {html.escape(cfg.pipeline.name)}</h1>",
             f"<p class='legend'>{html.escape(str(run_dir.resolve()))} &middot; source <b>{html.escape(cfg.data.source)}</b>"
             f" &middot; t_inv {cfg.invert.t_inv}, {cfg.invert.steps} steps, target '{html.escape(cfg.guide.target)}',"
             f" scales {html.escape(str([cfg.guide.scale, *cfg.guide.escalation]))}, confidence {cfg.guide.confidence}"
             f" &middot; gates: p(y*) &ge; {cfg.pack.min_p_cf}, L1 &le; {cfg.pack.max_l1},"
             f" recon L1 &le; {cfg.pack.max_recon_l1}</p>",
             "<h2>Figures</h2>", _stats_table(stats)]
    tune_metrics = run_dir / "tune" / "metrics.json"
    if tune_metrics.is_file():
        parts.append(tune_section(json.loads(tune_metrics.read_text())))
    for key, title in (("class_pairs", "One pair per class pair (the median-L1 example)"),
                       ("best", f"Best {SHEET_SIZE}: {best_by}"), ("worst", f"Worst {SHEET_SIZE}: {worst_by}")):
        parts.append(f"<h2>{html.escape(title)}</h2><p class='legend'>Each card: {html.escape(panels)}"
                     " (difference: max over channels, black 0 .. yellow 1).</p><div class='sheet'>")
        parts += [_card_html(r, card_files[r["id"]], classes, has_truth) for r in sheets[key]]
        parts.append("</div>")
    parts.append("<h2>Flip rate vs guidance scale</h2>")
    if sweep:
        parts += ["<img class='plot' src='flip_vs_scale.png' alt='flip rate vs scale'>", _sweep_table(sweep)]
    else:
        parts.append("<p class='legend'>No sweep yet: run <code>cfgen sweep --config CONFIG --out RUN</code>"
                     " and then the report again.</p>")
    parts += ["<h2>Metric histograms</h2><img class='plot' src='histograms.png' alt='histograms'>",
              "<h2>Confusion</h2><img class='plot' src='confusion.png' alt='confusion'>", "</body></html>"]
    page = out / "report.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page
