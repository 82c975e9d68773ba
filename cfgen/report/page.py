"""`cfgen report RUN_DIR`: a self-contained HTML page on the quality of a run's pairs.

    cfgen evaluate runs/shapes                       # optional: the independent judge (RUN/evaluate/judge.json)
    cfgen sweep  --config pipelines/shapes.toml      # optional: the flip-rate-vs-scale curve
    cfgen report runs/shapes                         # -> runs/shapes/report/report.html

Reads RUN/pairs (manifest.parquet, stats.json, config.toml), RUN/guide (the images, rejected pairs and
s = 0 reconstructions included) and, if present, RUN/evaluate/judge.json, RUN/sweep/sweep.json and
RUN/tune/metrics.json (`cfgen tune`'s table). Writes into RUN/report/ (replacing an old one):
    report.html        relative links only, no scripts, no network: it opens from file://
    cards/             one image per card panel; images above THUMB_PX a side stored as a downscaled JPEG
    histograms.png     the per-pair metrics (written vs rejected) and edit L1 against round-trip L1
    confusion.png      factual class -> target class (and, with an oracle, target -> oracle's class)
    flip_vs_scale.png  flip rate vs guidance scale, from the sweep
The page, top to bottom: warnings; the figures (the independent judge's flip rate beside the guiding
predictor's), the judge, time per stage, pairs not written by reason, pairs per scale; per-class
counts; histograms; contact sheets; rejected pairs; failed inputs; sweep; confusion; tune.
Each card: factual | s = 0 reconstruction | counterfactual | |difference| (| true counterfactual where
the causal model is known), every panel DISPLAY_PX wide whatever the resolution. Contact sheets: one
pair per (factual, target) class pair (its median-L1 example), the best and the worst pairs (where the
truth is known: best = the oracle-valid, truth-closer pairs with the smallest L1 to the true
counterfactual, worst = the largest; else best = flipped with the smallest L1, worst = lowest p(y*)).

This module reads the run and computes; report_plots draws the figures and report_html formats.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from cfgen.report import html as H
from cfgen.report import plots as report_plots
from cfgen.config import Config, load_config
from cfgen.contract import GUIDE, PAIRS
from cfgen.data.images import decode_image
from cfgen.data.sources import open_source
from cfgen.errors import InputError
from cfgen.quality.measures import EDIT_WITHIN_RECON_WARN_RATE
from cfgen.shards import read_samples

SHEET_SIZE = 8          # pairs in the best / worst sheets
CLASS_PAIR_CARDS = 60   # at most this many class-pair cards (1,000 classes would give thousands)
REJECTED_CARDS = 16     # rejected pairs shown with their images; the rest are listed
THUMB_PX = 2 * H.DISPLAY_PX
"""Larger images are stored downscaled to this side (twice the display size: sharp on HiDPI screens), so a
512 px run's report stays small; smaller ones keep their own PNG bytes, pixel for pixel."""


def diff_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| as an RGB heat map (max over channels; 0 black .. 1 white, 'inferno')."""
    from matplotlib import colormaps

    d = np.abs(a.astype(np.float64) - b.astype(np.float64)).max(axis=2) / 255.0
    return (colormaps["inferno"](d)[:, :, :3] * 255).round().astype(np.uint8)


def thumbnail(arr: np.ndarray) -> tuple[Image.Image, bool]:
    """The image to store for a card panel, and whether the browser must enlarge it (then pixelated, so
    an 8 px digit shows its pixels instead of a blur)."""
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    if max(img.size) > THUMB_PX:
        img.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
    return img, max(img.size) < H.DISPLAY_PX


def _save_panel(arr: np.ndarray, folder: Path, stem: str) -> tuple[str, bool]:
    img, pixelated = thumbnail(arr)
    if img.size[0] < arr.shape[1]:  # downscaled: already not the original pixels, so JPEG's loss is moot
        name = f"{stem}.jpg"
        img.convert("RGB").save(folder / name, quality=85)
    else:
        name = f"{stem}.png"
        img.save(folder / name)
    return name, pixelated


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
        if not GUIDE.tar(run_dir, shard).is_file():
            continue
        for s in read_samples(GUIDE.tar(run_dir, shard)):
            if s["__key__"] in ids:
                out[s["__key__"]] = {k: decode_image(s[m], size, ch)
                                     for k, m in (("factual", "png"), ("cf", "cf.png"), ("recon", "recon.png"))}
    causal = open_source(cfg).causal
    if causal is not None:
        for r in wanted:
            if r["id"] not in out:
                continue
            concept = r.get("concept")
            if concept not in (None, "label") and hasattr(causal, "intervene"):  # a text do(): its own truth
                out[r["id"]]["truth"] = causal.intervene(r["origin"], concept, dict(r["concepts_after"])[concept])[0]
            else:
                out[r["id"]]["truth"] = causal.true_counterfactual(r["origin"], r["cf_label"])
    return out


def select(rows: list[dict], has_truth: bool) -> dict[str, list[dict]]:
    """The pairs of each contact sheet."""
    guided = [r for r in rows if r["cf_label"] is not None and r["l1"] is not None]
    ok = [r for r in guided if r["status"] == "ok"] or guided
    per_pair = defaultdict(list)
    for r in ok:  # text mode: per intervened concept too (do(environment) and do(size) keep the class pair)
        per_pair[(r["label"], r["cf_label"], r.get("concept") or "")].append(r)
    class_pairs = []
    for key in sorted(per_pair):
        group = sorted(per_pair[key], key=lambda r: (r["l1"], r["id"]))
        class_pairs.append(group[len(group) // 2])  # the median-L1 example: typical, not cherry-picked
    if has_truth:
        # best among the valid ones (oracle flipped, or every concept check passed, and closer to the truth): a
        # small truth_l1 alone also rewards counterfactuals that hardly changed a factual already close to its truth
        valid = [r for r in guided if (r["oracle_flipped"] or concept_ok(r)) and r["truth_closer"]]
        best = sorted(valid, key=lambda r: (r["truth_l1"], r["id"]))[:SHEET_SIZE]
        worst = sorted(guided, key=lambda r: (-r["truth_l1"], r["id"]))[:SHEET_SIZE]
    else:
        flipped = sorted((r for r in guided if r["flipped"] or r.get("class_kept")), key=lambda r: (r["l1"], r["id"]))
        best = flipped[:SHEET_SIZE]
        worst = sorted(guided, key=lambda r: (r["p_cf"], r["id"]))[:SHEET_SIZE]
    rejected = sorted((r for r in guided if r["status"] == "rejected"), key=lambda r: r["id"])[:REJECTED_CARDS]
    return {"class_pairs": class_pairs[:CLASS_PAIR_CARDS], "best": best, "worst": worst, "rejected": rejected}


def concept_ok(r: dict) -> bool:
    """Every concept check of a text pair passed (a null check has nothing to fail)."""
    checks = [r.get(k) for k in ("intervened_ok", "descendants_ok", "non_descendants_ok")]
    return checks[0] is not None and all(c is not False for c in checks)


def changes_class(r: dict) -> bool:
    """The pair's do() asks for another class: only those can flip (text mode's do(environment) keeps it)."""
    return r.get("changes_class") is not False


# ----------------------------------------------------------------------------- figures, computed

def judge_result(run_dir: Path) -> dict | None:
    """`cfgen evaluate`'s figures (RUN/evaluate/judge.json), with "stale": true when the pairs were packed
    again since; None when the judge has not been run."""
    from cfgen.quality.judge_record import manifest_digest, result_path

    path = result_path(run_dir)
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    result["stale"] = result.get("manifest_sha256") != manifest_digest(run_dir)
    return result


def headline(stats: dict, judge: dict | None, run_dir: Path, text: bool = False) -> list[tuple[str, str, str]]:
    """(figure, value, meaning) rows: counts, then validity, then size of the edit, then minimality. `text`: the
    pairs were made in text mode, where the classifier only reads them."""
    n = stats["count"]
    share = (lambda k: f"{stats[k]} ({stats[k] / n:.0%})") if n else (lambda k: str(stats[k]))
    rows = [("inputs", str(n), "samples read from the data source"),
            ("pairs written", share("pairs"), "in the pair shards; the figures below are over these"),
            ("rejected", share("rejected"), "guided, but failed a pack gate (listed below)"),
            ("failed", share("failed"), "an error before a pair existed (listed below)"),
            ("flip rate, guiding predictor", H.fmt(stats.get("flip_rate")),
             "share whose counterfactual the guiding predictor puts in the target class"
             + (f", over the {stats['class_changing_pairs']} pairs whose do() changes the class"
                if "class_changing_pairs" in stats else ""))]
    if "class_kept_rate" in stats:  # text mode: a do() that keeps the class is no flip
        rows.append(("class kept, guiding predictor", H.fmt(stats["class_kept_rate"]),
                     f"share of the {stats['class_keeping_pairs']} pairs whose do() keeps the class (environment, "
                     "size, ...) that the guiding predictor still puts in their class"))
    if text:  # the classifier reads the pairs; the text edit steered them
        rows = [(a.replace("guiding predictor", "classifier"), b, c.replace("guiding predictor", "classifier (it "
                 "did not steer the edit)")) for a, b, c in rows]
    rows.append(("mean p(y*)", H.fmt(stats.get("mean_p_cf")),
                 "guiding predictor's probability of the target class on the counterfactual"))
    if judge is None:
        rows.append(("flip rate, independent judge", "not measured", f"run `cfgen evaluate {run_dir}`"))
    else:
        note = (f"an SVM fitted on {judge.get('judge_fit_images')} of the data source's images (held-out accuracy "
                f"{H.fmt(judge.get('judge_heldout_accuracy'))}), not the guiding predictor")
        if judge["stale"]:
            note += f"; STALE: measured before the last pack, run `cfgen evaluate {run_dir}` again"
        rows.append(("flip rate, independent judge", H.fmt(judge.get("oracle_flip_rate")), note))
        if "judge_class_kept_rate" in judge:
            rows.append(("class kept, independent judge", H.fmt(judge["judge_class_kept_rate"]),
                         "over the pairs whose do() keeps the class"))
    if "oracle_flip_rate" in stats:  # the source knows its causal model
        rows += [("flip rate, renderer oracle", H.fmt(stats["oracle_flip_rate"]),
                  "share the causal model's renderer reads as the target class"
                  + (", over the pairs whose do() changes the class" if "class_changing_pairs" in stats else "")),
                 ("closer to the true counterfactual", H.fmt(stats["truth_closer_rate"]),
                  "L1 to the truth below L1 to the factual image"),
                 ("mean L1 to the true counterfactual", H.fmt(stats["mean_truth_l1"], ".4f"), "0–1 intensity"),
                 ("within the round-trip bound", H.fmt(stats["within_recon_bound_rate"]),
                  "L1 to the truth ≤ round-trip L1 (DiCap Cor. 3.4, per pair)"),
                 ("mean change outside the causal region", H.fmt(stats["mean_outside_change"]),
                  "share of pixels there changed by > 0.1")]
    rows += [("mean edit L1", H.fmt(stats.get("mean_l1"), ".4f"), "factual → counterfactual, mean |Δ| per pixel, 0–1"),
             ("mean round-trip L1 (s = 0)", H.fmt(stats.get("mean_recon_l1"), ".4f"),
              "factual → its unguided reconstruction: the model's own noise floor"),
             ("edits within the round-trip error", H.fmt(stats.get("edit_within_recon_rate")),
              "share with edit L1 ≤ round-trip L1: maybe noise, not an edit"),
             ("mean edit L2", H.fmt(stats.get("mean_l2"), ".4f"), "root-mean-square difference, 0–1"),
             ("mean pixels changed", H.fmt(stats.get("mean_changed_fraction")), "share changed by > 0.1")]
    if "mean_mask_fraction" in stats:
        rows.append(("mean edit mask", H.fmt(stats["mean_mask_fraction"]), "share of the image guidance could touch"))
    rows.append(("mean CLD", H.fmt(stats.get("mean_cld")), "counterfactual latent divergence, lower is better"))
    return rows


def warnings(stats: dict) -> list[str]:
    within = stats.get("edit_within_recon_rate")
    out = []
    if not stats.get("pairs"):
        out.append("no pair was written: every input failed or was rejected (see the lists below).")
    elif within is not None and within > EDIT_WITHIN_RECON_WARN_RATE:  # the end-of-run summary's threshold
        out.append(f"{within:.0%} of the written pairs changed the image no more than the s = 0 round trip does "
                   f"(edit L1 ≤ round-trip L1; warned above {EDIT_WITHIN_RECON_WARN_RATE:.0%}): they may be "
                   "reconstruction noise, not edits. See 'edit vs round-trip error' under the histograms.")
    return out


def class_counts(rows: list[dict], classes: list[str]) -> list[dict]:
    """Per factual class (those with any row; inputs that failed before they had a class under "(no label)"):
    written / rejected / failed counts, the written pairs per target class, their flip rate and mean p(y*)."""
    out = []
    groups = [(name, [r for r in rows if r["label"] == c]) for c, name in enumerate(classes)]
    # inputs that failed before they had a class (a folder source writes -1 for a file it could not place)
    groups.append(("(no label)", [r for r in rows if r["label"] not in range(len(classes))]))
    for name, mine in groups:
        if not mine:
            continue
        ok = [r for r in mine if r["status"] == "ok"]
        flips = [r["flipped"] for r in ok if changes_class(r)]  # a do() that keeps the class cannot flip
        out.append({"class": name, "written": len(ok),
                    "rejected": sum(r["status"] == "rejected" for r in mine),
                    "failed": sum(r["status"] == "failed" for r in mine),
                    "targets": Counter(r["cf_label"] for r in ok),
                    "flips": len(flips), "flip_rate": float(np.mean(flips)) if flips else None,
                    "mean_p_cf": float(np.mean([r["p_cf"] for r in ok])) if ok else None})
    return out


def not_written(rows: list[dict]) -> list[tuple[str, str, int]]:
    """(status, reason, count): failures by the error's reason, rejections by gate (a pair failing two
    gates counts under each, as stats.json's rejected_by_gate)."""
    from cfgen.stages.common import error_reason

    counts = Counter()
    for r in rows:
        if r["status"] == "failed":
            counts[("failed", error_reason(r["error"]))] += 1
        elif r["status"] == "rejected":
            for gate in (r["error"] or "").split("; "):
                counts[("rejected", error_reason(gate))] += 1
    return [(s, reason, n) for (s, reason), n in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1], kv[0][1]))]


def scale_counts(rows: list[dict]) -> list[tuple[float, int, float]]:
    """(guidance scale, written pairs, their flip rate): how far up the escalation ladder pairs went."""
    by = defaultdict(list)
    for r in rows:
        if r["status"] == "ok" and r["guidance_scale"] is not None:
            by[r["guidance_scale"]].append(r["flipped"] if changes_class(r) else None)
    return [(s, len(v), float(np.mean(f)) if (f := [x for x in v if x is not None]) else float("nan"))
            for s, v in sorted(by.items())]


def intervention_counts(rows: list[dict]) -> list[dict]:
    """Per intervened concept (text mode): written pairs, whether the do() changes the class, the guiding
    predictor's verdict (flip rate, or class kept) and the concept oracle's checks, where there is one."""
    def share(values) -> float | None:
        values = [bool(v) for v in values if v is not None]
        return float(np.mean(values)) if values else None

    by = defaultdict(list)
    for r in rows:
        if r["status"] == "ok" and r.get("concept") is not None:
            by[r["concept"]].append(r)
    return [{"concept": c, "pairs": len(mine), "changes_class": share(changes_class(r) for r in mine),
             "flip_rate": share(r["flipped"] for r in mine if changes_class(r)),
             "class_kept_rate": share(r["class_kept"] for r in mine if not changes_class(r)),
             **{k: share(r.get(k) for r in mine) for k in ("intervened_ok", "descendants_ok", "non_descendants_ok")}}
            for c, mine in sorted(by.items())]


def _write_cards(out: Path, cfg: Config, run_dir: Path, wanted: list[dict], classes: list[str],
                 has_truth: bool) -> dict[str, str]:
    """Each wanted pair's card HTML, its panel images written under out/cards/."""
    images = _images(cfg, run_dir, wanted)
    cards = {}
    for i, r in enumerate(sorted(wanted, key=lambda r: r["id"])):
        im = images.get(r["id"])
        if im is None:
            continue  # not in the guide shards (a damaged shard): listed, not drawn
        panels = [("factual", im["factual"], "factual"), ("recon", im["recon"], "round trip s = 0"),
                  ("cf", im["cf"], "counterfactual"), ("diff", diff_image(im["factual"], im["cf"]), "|difference|")]
        if has_truth:
            panels.append(("truth", im["truth"], "true counterfactual"))
        html_panels = []
        for key, arr, caption in panels:
            name, pixelated = _save_panel(arr, out / "cards", f"{i:04d}-{key}")
            html_panels.append({"src": f"cards/{name}", "caption": caption, "pixelated": pixelated})
        cards[r["id"]] = H.pair_card(r, html_panels, classes, has_truth)
    return cards


# ----------------------------------------------------------------------------- the page

def _sheets(rows: list[dict], stats: dict, sheets: dict, cards: dict, classes: list[str], has_truth: bool,
            text: bool) -> list[str]:
    """The page's image sheets: one pair per class pair, the best, the worst, then the rejected and failed."""
    parts: list[str] = []
    panel_legend = ("Each card: factual | s = 0 round trip (the model's reconstruction without guidance) | "
                    "counterfactual | |counterfactual − factual| (max over channels, black 0 .. yellow 1)"
                    + (" | true counterfactual" if has_truth else "") + f"; every image shown {H.DISPLAY_PX} px.")
    if has_truth:
        best_by = "valid for the oracle and closer to the truth, smallest L1 to the true counterfactual"
        worst_by = "largest L1 to the true counterfactual"
    else:
        best_by, worst_by = "flipped pairs with the smallest L1", "the lowest p(y*)"
    n_class_pairs = len({(r["label"], r["cf_label"], r.get("concept") or "") for r in rows
                         if r["cf_label"] is not None and r["l1"] is not None and r["status"] == "ok"})
    capped = f" (the first {CLASS_PAIR_CARDS} of {n_class_pairs})" if n_class_pairs > CLASS_PAIR_CARDS else ""
    per = "class pair and intervened concept" if text else "class pair"
    for key, title in (("class_pairs", f"One pair per {per} (the median-L1 example){capped}"),
                       ("best", f"Best {SHEET_SIZE}: {best_by}"), ("worst", f"Worst {SHEET_SIZE}: {worst_by}")):
        parts += [f"<h2>{H.esc(title)}</h2>", H.legend(panel_legend), "<div class='sheet'>"]
        parts += [cards[r["id"]] for r in sheets[key] if r["id"] in cards]
        parts.append("</div>")

    parts += [f"<h2>Rejected pairs ({stats['rejected']})</h2>",
              H.legend("Guided, but not written: they failed a pack gate (pack.min_p_cf, max_l1, max_recon_l1, "
                       f"require_flip). The first {REJECTED_CARDS} with their images, then all of them listed.")]
    if sheets["rejected"]:
        parts += ["<div class='sheet'>"] + [cards[r["id"]] for r in sheets["rejected"] if r["id"] in cards] + ["</div>"]
    parts += [H.rejected_list(rows, classes), f"<h2>Failed inputs ({stats['failed']})</h2>", H.failed_list(rows)]
    return parts


def write_report(run_dir: Path) -> Path:
    """Write RUN/report/ (replacing an old one); returns the path of report.html."""
    from cfgen.data.sources import load_class_names

    run_dir = Path(run_dir)
    cfg, rows, stats = _load(run_dir)
    classes = load_class_names(cfg)
    has_truth = any(r.get("truth_l1") is not None for r in rows)
    judge = judge_result(run_dir)
    out = run_dir / "report"
    if out.exists():
        shutil.rmtree(out)
    (out / "cards").mkdir(parents=True)

    sheets = select(rows, has_truth)
    wanted = {r["id"]: r for sheet in sheets.values() for r in sheet}
    cards = _write_cards(out, cfg, run_dir, list(wanted.values()), classes, has_truth)

    gates = {"p_cf": cfg.pack.min_p_cf, "l1": cfg.pack.max_l1, "recon_l1": cfg.pack.max_recon_l1}
    report_plots.save(report_plots.histogram_figure(rows, gates), out / "histograms.png")
    report_plots.save(report_plots.confusion_figure(rows, classes, has_truth), out / "confusion.png")
    sweep_path = run_dir / "sweep" / "sweep.json"
    sweep = json.loads(sweep_path.read_text()) if sweep_path.is_file() else None
    if sweep:
        report_plots.save(report_plots.sweep_figure(sweep), out / "flip_vs_scale.png")

    name = H.esc(cfg.pipeline.name)
    text = cfg.guide.mode == "text"
    how = (f"text mode: do() on {', '.join(cfg.text.intervene)}, graph {'on' if cfg.text.propagate else 'off'}, "
           f"CSG {'on' if cfg.text.csg else 'off'}, edit scale {cfg.text.edit_scale:g}" if text else
           f"target '{cfg.guide.target}', scales "
           f"{' → '.join(f'{s:g}' for s in [cfg.guide.scale, *cfg.guide.escalation])}, confidence "
           f"{cfg.guide.confidence}")
    parts = [(f"<!doctype html><html><head><meta charset='utf-8'><title>cfgen report: {name}</title>"
              f"<style>{H.CSS}</style></head><body>"), f"<h1>cfgen report: {name}</h1>",
             H.legend(f"{run_dir.resolve()} · source {cfg.data.source}, {cfg.data.image_size} px · t_inv "
                      f"{cfg.invert.t_inv}, {cfg.invert.steps} steps, {how} · gates: p(y*) ≥ {cfg.pack.min_p_cf}, "
                      f"L1 ≤ {cfg.pack.max_l1}, round-trip L1 ≤ {cfg.pack.max_recon_l1} · images "
                      f"{cfg.pack.image_format}")]
    parts += [H.warning(w) for w in warnings(stats)]
    parts += ["<h2>Figures</h2><div class='row'>",
              H.box("The written pairs", H.figures_table(headline(stats, judge, run_dir, text))),
              "<div>", H.judge_box(judge, run_dir), H.timing_box(stats),
              H.counts_boxes(not_written(rows), scale_counts(rows)), "</div></div>"]
    interventions = intervention_counts(rows)
    if text and interventions:
        parts += ["<h2>Per intervention</h2>",
                  H.legend("Rows: the intervened concept. A do() that keeps the class (environment, size, ...) is no "
                           "flip: the classifier's verdict on it is whether the class is kept. Intervened / "
                           "descendants / non-descendants: the share the renderer oracle reads as the concept graph "
                           "says (n/a: no oracle, or no such concept)."),
                  H.intervention_table(interventions)]
    parts += ["<h2>Per class</h2>",
              H.legend("Rows: the factual class. Counts of inputs by outcome; flip rate (over the pairs whose do() "
                       "changes the class) and mean p(y*) over the written pairs; then the written pairs per target "
                       "class."),
              H.class_table(class_counts(rows, classes), classes)]
    parts += ["<h2>Metric histograms</h2>",
              H.legend("Blue: written pairs, red: rejected; dashed: a pack gate inside the data's range. Last "
                       "panel: a pair on or below the diagonal changed the image no more than the unguided "
                       "round trip does."),
              "<img class='plot' src='histograms.png' alt='histograms'>"]

    parts += _sheets(rows, stats, sheets, cards, classes, has_truth, text)
    parts.append("<h2>Flip rate vs guidance scale</h2>")
    if sweep:
        parts += ["<img class='plot' src='flip_vs_scale.png' alt='flip rate vs scale'>", H.sweep_table(sweep)]
    else:
        parts.append(H.legend("No sweep yet: run `cfgen sweep --config CONFIG --out RUN` and then the report again."))
    parts.append("<h2>Confusion</h2><img class='plot' src='confusion.png' alt='confusion'>")
    tune_metrics = run_dir / "tune" / "metrics.json"
    if tune_metrics.is_file():
        parts.append(H.tune_section(json.loads(tune_metrics.read_text())))
    parts.append("</body></html>")
    page = out / "report.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page
