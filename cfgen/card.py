"""The dataset card written beside the pair shards: RUN/pairs/README.md, Hugging Face's format.

Its YAML header is what `datasets.load_dataset(RUN/pairs)` reads: the data files are the pair tars
only (the manifest and stats beside them are not rows), and the features name every member with its
type, the class indices as a ClassLabel with the run's class names and K.json as a struct of
contract.PAIR_FIELDS. Its body says how the pairs were made and what the run measured. The license
is left to the user (the factual images keep their source's). No timings: the same run writes the
same card.
"""

from __future__ import annotations

import json

from cfgen.config import Config
from cfgen.contract import PAIR_FIELDS, PAIRS

HF_DTYPES = {str: "string", int: "int64", float: "float64", bool: "bool"}


def _class_label(names: list[str]) -> list[str]:
    lines = ["    dtype:", "      class_label:", "        names:"]
    return lines + [f"          '{i}': {json.dumps(n)}" for i, n in enumerate(names)]


def card_yaml(class_names: list[str]) -> str:
    lines = ["---", "# license: set this to the license of your source images and models", "configs:",
             "- config_name: default", "  data_files:", "  - split: train", f'    path: "{PAIRS.prefix}-*.tar"',
             "dataset_info:", "  features:"]
    for member in PAIRS.members:
        lines.append(f"  - name: {member}")
        if member.endswith("png"):
            lines.append("    dtype: image")
        elif member.endswith("txt"):
            lines.append("    dtype: string")
        elif member.endswith("cls"):
            lines += _class_label(class_names)
        else:  # json
            lines.append("    struct:")
            for name, typ in PAIR_FIELDS.items():
                lines += [f"    - name: {name}", f"      dtype: {HF_DTYPES[typ]}"]
    return "\n".join(lines + ["---", ""])


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def card_text(cfg: Config, class_names: list[str], stats: dict) -> str:
    """The whole README.md."""
    g, inv, p, m = cfg.guide, cfg.invert, cfg.pack, cfg.model
    ladder = " -> ".join(f"{s:g}" for s in [g.scale, *g.escalation])
    mask = "off (the whole image)" if g.mask == "off" else (
        f"{g.mask} (threshold {g.mask_threshold:g}, dilation {g.mask_dilation}, blur {g.mask_blur}, "
        f"start {g.mask_start:g}): outside it a counterfactual is the factual image")
    figures = {k: stats[k] for k in ("count", "pairs", "failed", "rejected", "flip_rate", "mean_p_cf", "mean_l1",
                                     "mean_recon_l1", "mean_changed_fraction", "mean_mask_fraction",
                                     "oracle_flip_rate", "truth_closer_rate", "mean_outside_change", "mean_cld")
               if stats.get(k) is not None}
    for concept, r in stats.get("concepts", {}).items():  # text interventions, judged by the concept oracle
        figures[f"do({concept}): intervened / descendants / non-descendants as the graph says"] = " / ".join(
            "n/a" if r[k] is None or r[k] != r[k] else f"{r[k]:.3f}"
            for k in ("intervened_rate", "descendants_rate", "non_descendants_rate"))
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in figures.items())
    t = cfg.text
    guided = (f"| guidance scales | {ladder}, each pair keeps the first with p(y*) >= {g.confidence:g} |\n"
              f"| localized edits | {mask} |") if g.mode == "classifier" else (
        f"| interventions | do() on {', '.join(t.intervene)}, {g.target} values; graph "
        f"{'propagates' if t.propagate else 'not used'} |\n"
        f"| CSG | {'on' if t.csg else 'off'}: edit scale {t.edit_scale:g}, {t.edit_prompt} edit prompts, "
        f"{t.mask_rule} masks at {t.threshold:g}, intersect {t.intersect}, preserve {t.preserve}, warm-up {t.warmup} |")
    how = ("cfgen: DDIM inversion of each image to its noise (abduction), then the reverse DDIM path from\n"
           "that noise steered by a classifier's gradient toward the counterfactual class (action and\n"
           "prediction).") if g.mode == "classifier" else (
        "cfgen, text mode (FM-CGM): DDIM inversion of each image under its caption (abduction); do(concept =\n"
        f"value) on the caption's concepts {', '.join(t.intervene)}"
        f"{', propagated to their descendants by the concept graph' if t.propagate else ' alone (no graph)'}"
        " (action);\nthe reverse path under the edited caption"
        f"{f' with Causal Semantic Guidance (edit scale {t.edit_scale:g}, {t.mask_rule} masks at {t.threshold:g})' if t.csg else ''}"
        " (prediction). `cf.txt` is the edited caption;\n`json.edits` records the intervention and each "
        "propagated change.")
    body = f"""# {cfg.pipeline.name}: factual / counterfactual image pairs (cfgen)

Each sample is a pair: `png` (the factual image), `txt` (its caption), `cls` (its class), `cf.png`,
`cf.txt`, `cf.cls` (the counterfactual) and `json` (per-pair metadata: {", ".join(PAIR_FIELDS)}).
Classes: {", ".join(f"{i} {n}" for i, n in enumerate(class_names))}.

    from datasets import load_dataset
    pairs = load_dataset("path/to/this/folder", split="train")           # or streaming=True
    pairs.features["cf.cls"].int2str(pairs[0]["cf.cls"])                  # the class name

`manifest.parquet` beside the shards has one row per pair (and per failed input) with the quality
columns; `stats.json` the run's summary; `sizes.json` the pairs per shard (open_clip).

## How the pairs were made

{how}

| setting | value |
|---|---|
| source | {cfg.data.source} |
| diffusion model | {m.unet} ({m.kind}) |
| predictor | {m.predictor}, gradient {m.gradient} |
| inversion | {inv.steps} DDIM steps to t_inv = {inv.t_inv:g} |
| target | {g.target}{f", top {g.top_k}" if g.top_k > 1 else ""} |
{guided}
| gates | require_flip {p.require_flip}, min p(y*) {p.min_p_cf:g}, max L1 {p.max_l1:g}, max recon L1 {p.max_recon_l1:g} |

## What the run measured

| figure | value |
|---|---|
{rows}
"""
    return card_yaml(class_names) + body
