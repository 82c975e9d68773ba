"""HTML of `cfgen report`: the style sheet, tables, warning boxes, pair cards and the page's sections, built
from the manifest rows and the figures report.py has read and computed (nothing here reads or writes a file).
Every cell is escaped text: nested figures arrive as rows of their own small table, never as a JSON dump.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

LIST_MAX = 200          # rows of the rejected / failed lists; the manifest has them all
MATRIX_MAX_CLASSES = 20  # per-class counts as a factual x target matrix up to this many classes
STAGE_ORDER = ("invert", "guide", "pack")  # stats.json's keys are sorted; the page follows the run
DISPLAY_PX = 96
"""Every card image is shown this many CSS pixels a side, whatever the run's resolution: 8 px digits are
blown up (pixelated), 512 px images shrunk, so a card has one size and several fit in a row."""

CSS = f"""
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1340px; }}
h1 {{ margin-bottom: 4px; }} h2 {{ margin-top: 32px; border-bottom: 1px solid #ddd; }}
h3 {{ margin: 0 0 6px; font-size: 15px; }}
table.stats {{ border-collapse: collapse; font-size: 13px; }}
table.stats td, table.stats th {{ padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left;
  vertical-align: top; }}
table.stats td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
table.stats td.zero {{ color: #bbb; }}
table.stats tr.total td {{ border-top: 2px solid #ccc; font-weight: bold; }}
table.stats td.note {{ color: #666; }}
.row {{ display: flex; flex-wrap: wrap; gap: 28px; align-items: flex-start; }}
.box {{ min-width: 220px; margin-bottom: 18px; }}
.warn {{ background: #fff4e5; border: 1px solid #f0ad4e; border-left: 6px solid #e67e22; border-radius: 4px;
  padding: 10px 14px; margin: 12px 0; }}
.sheet {{ display: flex; flex-wrap: wrap; gap: 12px; margin-bottom: 14px; }}
.card {{ border: 1px solid #ddd; border-radius: 6px; padding: 6px; font-size: 12px; background: #fafafa;
  box-sizing: border-box; }}
.card .panels {{ display: flex; gap: 4px; margin-bottom: 4px; }}
.card figure {{ margin: 0; width: {DISPLAY_PX}px; }}
.card img {{ display: block; width: {DISPLAY_PX}px; height: {DISPLAY_PX}px; object-fit: contain;
  background: #fff; }}
.card img.px {{ image-rendering: pixelated; }}
.card figcaption {{ font-size: 10px; color: #555; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }}
.card .meta {{ line-height: 1.4; overflow-wrap: anywhere; }}
.card .classes {{ font-weight: 600; }}
.card .rej {{ color: #c9302c; font-weight: bold; }}
.card .noise {{ color: #e67e22; font-weight: bold; }}
.legend {{ color: #555; font-size: 13px; }}
img.plot {{ max-width: 100%; }}
"""


def fmt(v, spec: str = ".3f") -> str:
    """A figure as text: floats by `spec`, None and NaN as 'n/a', booleans as yes / no."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, spec) if isinstance(v, float) else str(v)


def esc(text) -> str:
    return html.escape(str(text))


def table(head: list[str] | None, rows: list[list], total: list | None = None, numeric_from: int = 1) -> str:
    """A small table of text cells; columns from `numeric_from` on are right-aligned and a cell "0" or ""
    greyed (a sparse count matrix reads at a glance). Cells are str or (text, css class)."""
    def cell(i: int, c) -> str:
        text, cls = c if isinstance(c, tuple) else (c, "")
        if i >= numeric_from and not cls:
            cls = "num zero" if text in ("0", "") else "num"
        return f"<td class='{cls}'>{esc(text)}</td>" if cls else f"<td>{esc(text)}</td>"

    out = ["<table class='stats'>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(cell(i, c) for i, c in enumerate(r)) + "</tr>")
    if total:
        out.append("<tr class='total'>" + "".join(cell(i, c) for i, c in enumerate(total)) + "</tr>")
    out.append("</table>")
    return "".join(out)


def figures_table(rows: list[tuple[str, str, str]]) -> str:
    """(figure, value, what it means) rows."""
    return table(["figure", "value", "what it means"], [[a, (b, "num"), (c, "note")] for a, b, c in rows])


def box(title: str, body: str) -> str:
    return f"<div class='box'><h3>{esc(title)}</h3>{body}</div>"


def warning(text: str) -> str:
    return f"<div class='warn'><b>Warning:</b> {esc(text)}</div>"


def legend(text: str) -> str:
    return f"<p class='legend'>{esc(text)}</p>"


def card(pair_id: str, classes: str, panels: list[dict], lines: list[str], flags: list[tuple[str, str]]) -> str:
    """One pair: `panels` ({src, caption, pixelated}) side by side at DISPLAY_PX each, then the id, the
    classes ("3 → 8"), text lines and flags ((css class, text): rejected, noise-sized edit)."""
    figs = "".join(
        f"<figure><img src='{esc(p['src'])}' class='{'px' if p['pixelated'] else 'smooth'}' width='{DISPLAY_PX}' "
        f"height='{DISPLAY_PX}' alt='{esc(p['caption'])}' title='{esc(p['caption'])}'>"
        f"<figcaption>{esc(p['caption'])}</figcaption></figure>" for p in panels)
    width = len(panels) * (DISPLAY_PX + 4) + 8
    meta = [f"<b>{esc(pair_id)}</b>", f"<span class='classes'>{esc(classes)}</span>"] + [esc(line) for line in lines]
    meta += [f"<span class='{cls}'>{esc(text)}</span>" for cls, text in flags]
    return (f"<div class='card' style='width:{width}px'><div class='panels'>{figs}</div>"
            f"<div class='meta'>{'<br>'.join(meta)}</div></div>")


# ----------------------------------------------------------------------------- sections of the page

def class_table(counts: list[dict], classes: list[str]) -> str:
    matrix = len(classes) <= MATRIX_MAX_CLASSES
    head = ["factual class", "written", "rejected", "failed", "flip rate", "mean p(y*)"]
    head += [f"→ {c}" for c in classes] if matrix else ["most common targets (written pairs)"]
    body = []
    for c in counts:
        row = [c["class"], str(c["written"]), str(c["rejected"]), str(c["failed"]), fmt(c["flip_rate"]),
               fmt(c["mean_p_cf"])]
        if matrix:
            row += [str(c["targets"].get(j, 0)) for j in range(len(classes))]
        else:
            row.append((", ".join(f"{classes[j]} {n}" for j, n in c["targets"].most_common(5)), "note"))
        body.append(row)
    written = sum(c["written"] for c in counts)
    # over all written pairs: the per-class figures weighted by their counts (stats.json's flip_rate, mean_p_cf);
    # the flip rate by the pairs that could flip (their do() changes the class)
    flips = sum(c["flips"] for c in counts)
    pooled = {"flip_rate": sum(c["flip_rate"] * c["flips"] for c in counts if c["flips"]) / flips if flips else None,
              "mean_p_cf": sum(c["mean_p_cf"] * c["written"] for c in counts if c["written"]) / written
              if written else None}
    total = ["all", str(written), str(sum(c["rejected"] for c in counts)), str(sum(c["failed"] for c in counts)),
             fmt(pooled["flip_rate"]), fmt(pooled["mean_p_cf"])]
    if matrix:
        total += [str(sum(c["targets"].get(j, 0) for c in counts)) for j in range(len(classes))]
    return table(head, body, total if matrix else total + [""])


def intervention_table(counts: list[dict]) -> str:
    head = ["do() on", "pairs", "changes the class", "flip rate (predictor)", "class kept (predictor)",
            "intervened (oracle)", "descendants (oracle)", "non-descendants (oracle)"]
    body = [[c["concept"], str(c["pairs"]), fmt(c["changes_class"], ".0%") if c["changes_class"] is not None else "n/a",
             fmt(c["flip_rate"]), fmt(c["class_kept_rate"]), fmt(c["intervened_ok"]), fmt(c["descendants_ok"]),
             fmt(c["non_descendants_ok"])] for c in counts]
    return table(head, body)


def _verdict(r: dict) -> str:
    """What the guiding predictor says of a pair: a flip for a do() that changes the class, else the class kept."""
    if r.get("changes_class") is False:
        return f"class kept {fmt(r.get('class_kept'))} (no flip asked)"
    return f"flipped {fmt(r['flipped'])}"


def pair_card(r: dict, panels: list[dict], classes: list[str], has_truth: bool) -> str:
    lines = [f"p(y*) {fmt(r['p_cf'])} · {_verdict(r)} · s {fmt(r['guidance_scale'], 'g')}",
             f"L1 {fmt(r['l1'], '.4f')} · round trip {fmt(r['recon_l1'], '.4f')} · CLD {fmt(r.get('cld'))}"]
    if r.get("intervention") and r.get("concept") not in (None, "label"):  # text mode: the do() and the oracle's checks
        checks = " · ".join(f"{name} {fmt(r.get(k))}" for name, k in (
            ("intervened", "intervened_ok"), ("descendants", "descendants_ok"), ("others kept", "non_descendants_ok"))
            if r.get(k) is not None)
        lines.append(r["intervention"] + (f" · oracle: {checks}" if checks else ""))
    if has_truth:  # a text pair that keeps the class has no oracle class, only its truth
        oracle = f" · oracle: {classes[r['oracle_label']]}" if r["oracle_label"] is not None else ""
        lines.append(f"vs truth L1 {fmt(r['truth_l1'], '.4f')}{oracle}")
    flags = []
    if r.get("edit_within_recon"):
        flags.append(("noise", "edit ≤ round-trip error"))
    if r["status"] != "ok":
        flags.append(("rej", f"{r['status']}: {r['error'] or ''}"))
    return card(r["id"], f"{classes[r['label']]} → {classes[r['cf_label']]}", panels, lines, flags)


def rejected_list(rows: list[dict], classes: list[str]) -> str:
    rej = sorted((r for r in rows if r["status"] == "rejected"), key=lambda r: r["id"])
    if not rej:
        return legend("No pair was rejected by the pack gates.")
    body = [[r["id"], f"{classes[r['label']]} → {classes[r['cf_label']]}", (r["error"] or "", "note"),
             fmt(r["p_cf"]), fmt(r["l1"], ".4f"), fmt(r["recon_l1"], ".4f")] for r in rej[:LIST_MAX]]
    more = (legend(f"… and {len(rej) - LIST_MAX} more: manifest.parquet rows with status 'rejected'.")
            if len(rej) > LIST_MAX else "")
    return table(["id", "factual → target", "reason", "p(y*)", "L1", "round-trip L1"], body, numeric_from=3) + more


def failed_list(rows: list[dict]) -> str:
    failed = sorted((r for r in rows if r["status"] == "failed"), key=lambda r: r["id"])
    if not failed:
        return legend("No input failed.")
    body = [[r["id"], r["origin"] or "", (r["error"] or "", "note")] for r in failed[:LIST_MAX]]
    more = (legend(f"… and {len(failed) - LIST_MAX} more: manifest.parquet rows with status 'failed'.")
            if len(failed) > LIST_MAX else "")
    return table(["id", "origin", "error"], body, numeric_from=3) + more


def judge_box(judge: dict | None, run_dir: Path) -> str:
    if judge is None:
        body = legend(f"not measured, run `cfgen evaluate {run_dir}`")
    else:
        body = table(None, [
            ["judge", (str(judge.get("judge", "")), "note")],
            ["pairs judged", str(judge.get("pairs"))],
            ["data source images it was fitted on", str(judge.get("judge_fit_images"))],
            [f"held-out accuracy (on {judge.get('judge_heldout_images')} other source images)",
             fmt(judge.get("judge_heldout_accuracy"))],
            ["flip rate by the judge", fmt(judge.get("oracle_flip_rate"))],
            ["mean L1 factual → counterfactual", fmt(judge.get("mean_l1"), ".4f")],
            ["mean L1 factual → nearest real target image", fmt(judge.get("mean_nearest_target_l1"), ".4f")],
            ["ratio (below 1: smaller than a swap)", fmt(judge.get("l1_over_nearest"))]])
        if judge["stale"]:
            body = warning(f"measured before the pairs were last packed; run `cfgen evaluate {run_dir}` again.") + body
    return box("Independent judge (cfgen evaluate)", body)


def timing_box(stats: dict) -> str:
    seconds = stats.get("seconds") or {}
    if not seconds:
        return box("Time per stage", legend("not recorded"))
    total = sum(seconds.values())
    order = sorted(seconds, key=lambda k: (STAGE_ORDER.index(k) if k in STAGE_ORDER else len(STAGE_ORDER), k))
    body = [[stage, f"{seconds[stage]:.1f}", f"{seconds[stage] / total:.0%}" if total else ""] for stage in order]
    rate = f"{stats['pairs'] / total:.2f} pairs/s" if total else ""
    return box("Time per stage", table(["stage", "seconds", "share"], body, total=["total", f"{total:.1f}", rate]))


def counts_boxes(reasons: list[tuple[str, str, int]], scales: list[tuple[float, int, float]]) -> str:
    """Pairs not written by (status, reason); written pairs per guidance scale with their flip rate."""
    reasons_html = (table(["status", "reason", "count"], [[s, r, str(n)] for s, r, n in reasons], numeric_from=2)
                    if reasons else legend("every input became a pair"))
    scales_html = table(["scale s", "pairs", "flip rate"], [[f"{s:g}", str(n), fmt(f)] for s, n, f in scales])
    return box("Not written, by reason", reasons_html) + box("Written pairs per guidance scale", scales_html)


def sweep_table(sweep: dict) -> str:
    head = ["mask", "scale", "flip (predictor)", "flip (oracle)", "mean L1", "changed", "mask share",
            "error vs truth", "closer to truth", "outside change", "mean CLD"]
    body = []
    for r in sweep["rows"]:
        scale = "+".join(f"{s:g}" for s in r["ladder"]) if r["scale"] == "escalation" else f"{r['scale']:g}"
        body.append([r.get("mask", "off"), scale, fmt(r["flip_rate"]), fmt(r["oracle_flip_rate"]),
                     fmt(r["mean_l1"], ".4f"), fmt(r["mean_changed_fraction"]), fmt(r.get("mean_mask_fraction")),
                     fmt(r["mean_truth_l1"], ".4f"), fmt(r["truth_closer_rate"]), fmt(r["mean_outside_change"]),
                     fmt(r.get("mean_cld"))])
    return table(head, body, numeric_from=2)


def _ci(d: dict | None) -> str:
    if d is None:
        return ""
    if d.get("low") is None:
        return f"{d['mean']:+.3f}"
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def tune_section(metrics: dict) -> str:
    """The `cfgen tune` table (RUN/tune/metrics.json) as HTML, the same columns as the printed one."""
    from cfgen.tune.protocol import TABLE_COLUMNS, format_captured, table_cells

    p = metrics["protocol"]
    where = f"the '{p['eval_split']}' split" if p["eval_split"] else "every sample that is not a shot"
    sel = p.get("selection") or {"mode": "fixed", "rule": p.get("hyperparameters", {}).get("selection", "")}
    how = (f"lr / epochs / lambda chosen per seed and row on held-out pairs of the shot pool: {sel['criterion']}"
           if sel["mode"] == "validation" else f"hyper-parameters {sel.get('rule', '')}")
    text = (f"Evaluation on {where} of the data source: {p['eval_images']} images, {len(p['cells'])} (group, class) "
            f"cells; base classes {p['base']}, novel {p['novel']}; {p['shots']} shots per base class from "
            f"{p['shot_pool']} pairs outside it; mean ± std over seeds {p['seeds']}. Worst base / novel: the worst "
            f"(group, class) cell of the base / novel classes. Δ: paired difference to the learner's baseline "
            f"(no pairs, same seed, shots, init and batch order), mean [95% t interval]; {how}.")
    head = ["method"] + [h for _, h in TABLE_COLUMNS] + ["s/seed"]
    body = []
    for r in (metrics["rows"][k] for k in metrics["order"]):
        cells = [r["label"]] + table_cells(r) + [f"{r['seconds']['mean']:.1f}"]
        body.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    captured = format_captured(metrics)
    text2 = legend(" ".join(line.strip() for line in captured)) if captured else ""
    return ("<h2>Tuning on the pairs (cfgen tune)</h2>" + legend(text) + "<table class='stats'><tr>"
            + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" + "".join(body) + "</table>" + text2)
