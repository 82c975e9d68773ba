"""The dataset card written beside the pair shards: RUN/pairs/README.md, in Hugging Face's format.

    write_card(run_dir)          # pack writes it; `cfgen evaluate` rewrites it with the judge's figure

Its metadata is a huggingface_hub DatasetCardData: license (pack.license), pretty_name, task_categories,
size_categories, tags, and what `datasets.load_dataset(RUN/pairs)` reads: the data files are the pair tars only
(the manifest and stats beside them are not rows) and the features name every member with its type, the
class indices as a ClassLabel with the run's class names and K.json as a struct of contract.PAIR_FIELDS. Its
body follows the Hugging Face dataset card template: the structure, how the pairs were made (every model by
its name and the sha256 of its files, which the pack stage's fingerprint recorded, never a local path), what
the run measured under names that say who measured it (the guiding predictor, the renderer oracle, the
independent judge of `cfgen evaluate`), and the limitations those figures show. No timings: the same run
writes the same card.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData

from cfgen.config import Config
from cfgen.contract import IMAGE_EXTENSIONS, NULLABLE_FIELDS, PAIR_FIELDS, PAIRS, pair_members
from cfgen.quality.judge_record import manifest_digest, result_path

HF_DTYPES = {str: "string", int: "int64", float: "float64", bool: "bool"}
COMPONENTS = {"unet", "scheduler", "vae", "text_encoder", "tokenizer", "classifier", "vlm", "predictor"}
"""Folder names that say what a model is but not which: the card names the folder above them too."""
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"))


def size_category(n: int) -> str:
    """Hugging Face's size_categories bucket of n rows."""
    return next((name for top, name in SIZE_CATEGORIES if n < top), "n>10M")


def model_name(path: str | Path) -> str:
    """A model's name without where it lies: its folder (models/digits/unet -> digits/unet)."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.name in COMPONENTS and p.parent.name else p.name


def _class_label(names: list[str]) -> dict:
    return {"class_label": {"names": {str(i): n for i, n in enumerate(names)}}}


def features(class_names: list[str], image_format: str, concepts: list[str]) -> list[dict]:
    """dataset_info.features: the members of a pair and K.json's fields, as `datasets` declares them."""
    out = []
    for member in pair_members(image_format):
        if member.endswith(IMAGE_EXTENSIONS[image_format]):
            out.append({"name": member, "dtype": "image"})
        elif member.endswith("txt"):
            out.append({"name": member, "dtype": "string"})
        elif member.endswith("cls"):
            out.append({"name": member, "dtype": _class_label(class_names)})
        else:  # json: the concept states are structs over the run's concepts ('label' on the classifier path)
            out.append({"name": member, "struct": [
                {"name": k, "struct": [{"name": c, "dtype": "string"} for c in concepts]} if t is dict
                else {"name": k, "dtype": HF_DTYPES[t]} for k, t in PAIR_FIELDS.items()]})
    return out


def card_data(cfg: Config, class_names: list[str], stats: dict, concepts: list[str]) -> DatasetCardData:
    text = cfg.guide.mode == "text"
    return DatasetCardData(
        license=cfg.pack.license,
        pretty_name=f"{cfg.pipeline.name}: factual / counterfactual image pairs",
        task_categories=["image-to-image", "image-classification"] + (["text-to-image"] if text else []),
        size_categories=[size_category(stats.get("pairs") or 0)],
        tags=["counterfactual", "image-pairs", "synthetic", "webdataset", "cfgen"]
             + (["concept-graph", "text-interventions"] if text else ["classifier-guidance"]),
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": f"{PAIRS.prefix}-*.tar"}]}],
        dataset_info={"features": features(class_names, cfg.pack.image_format, concepts)},
    )


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


FIGURES = (  # stats.json key -> what it is, named by who measured it ({predictor}: figures())
    ("count", "input samples"),
    ("pairs", "pairs written"),
    ("failed", "inputs that failed before a pair existed (manifest.parquet says why)"),
    ("rejected", "pairs rejected by a pack gate (not in the shards)"),
    ("flip_rate", "flip rate by {predictor}, over the pairs whose do() changes the class"),
    ("class_kept_rate", "class kept by {predictor}, over the do()s that keep the class"),
    ("mean_p_cf", "mean probability of the target class by {predictor}"),
    ("oracle_flip_rate", "flip rate by the renderer oracle (the known causal model)"),
    ("truth_closer_rate", "share closer to the true counterfactual than to the factual image"),
    ("mean_truth_l1", "mean L1 to the true counterfactual"),
    ("mean_l1", "mean L1 factual -> counterfactual (0-1 intensity)"),
    ("mean_recon_l1", "mean L1 of the unguided round trip (s = 0): the model's own error"),
    ("edit_within_recon_rate", "share of edits no larger than their round trip's error"),
    ("mean_changed_fraction", "mean share of pixels changed by more than 0.1"),
    ("mean_mask_fraction", "mean share of the image the edit could touch"),
    ("mean_outside_change", "mean share of pixels changed outside the causal region"),
    ("mean_cld", "mean counterfactual latent divergence (lower: closer to the real images)"),
)


def judge_figures(judge: dict | None) -> list[tuple[str, str]]:
    """The independent judge's rows (`cfgen evaluate`), or how to get them."""
    if judge is None:
        return [("flip rate by an independent judge", "not measured: run `cfgen evaluate RUN`, which rewrites this card")]
    fitted = (f"fitted on {judge['judge_fit_images']} source images, held-out accuracy "
              f"{_fmt(judge.get('judge_heldout_accuracy'))}" if "judge_fit_images" in judge else
              f"{judge.get('judge_cv_folds')}-fold accuracy {_fmt(judge.get('judge_cv_accuracy'))} on the factual images")
    rows = [(f"flip rate by an independent judge ({judge.get('judge', 'cfgen evaluate')}, {fitted})",
             _fmt(judge.get("oracle_flip_rate")))]
    if judge.get("judge_class_kept_rate") is not None:  # text mode: do()s that keep the class
        rows.append(("class kept by the independent judge, over the do()s that keep the class",
                     _fmt(judge["judge_class_kept_rate"])))
    if judge.get("l1_over_nearest") is not None:
        rows.append(("edit L1 / L1 to the nearest real image of the target class (judge)", _fmt(judge["l1_over_nearest"])))
    return rows


def predictor_name(cfg: Config) -> str:
    """Who gives p_cf and `flipped`: the classifier that steered the edit, or (text mode) one that only reads it."""
    return "the guiding predictor" if cfg.guide.mode == "classifier" else "the run's classifier"


def figures(cfg: Config, stats: dict, judge: dict | None) -> list[tuple[str, str]]:
    rows = []
    for key, name in FIGURES:
        value = stats.get(key)
        if value is not None and value == value:  # NaN (nothing to measure) is null in stats.json: left out alike
            rows.append((name.format(predictor=predictor_name(cfg)), _fmt(value)))
        if key == "mean_p_cf":  # the independent judge beside the predictor it checks
            rows += judge_figures(judge)
    for concept, r in stats.get("concepts", {}).items():  # judged by the source's concept oracle
        which = "every do()" if concept == "all" else f"do({concept})"
        rows.append((f"{which}: intervened / descendants / non-descendants as the graph says (renderer oracle)",
                     " / ".join(_fmt(r[k]) for k in ("intervened_rate", "descendants_rate", "non_descendants_rate"))))
    return rows


def limitations(cfg: Config, stats: dict, judge: dict | None) -> list[str]:
    """What the figures do not promise, from what this run measured."""
    steered = cfg.guide.mode == "classifier"
    out = [("The flip rate by the guiding predictor is its own verdict on images it steered: it is optimistic. "
            if steered else "The run's classifier did not steer the edits, but it was trained on the same source "
            "as the diffusion model. ")
           + ("The independent judge's figure above is the one to quote." if judge else
              "No independent judge has measured these pairs (`cfgen evaluate RUN` adds its figure here).")]
    flip, judged = stats.get("flip_rate"), (judge or {}).get("oracle_flip_rate")
    if flip is not None and judged is not None and flip == flip and flip - judged > 0.05:
        accuracy = judge.get("judge_heldout_accuracy", judge.get("judge_cv_accuracy"))
        oracle = stats.get("oracle_flip_rate")
        out.append(f"The independent judge disagrees with {predictor_name(cfg)}: {judged:.3f} flipped for the judge "
                   f"against {flip:.3f}. Either the pairs {predictor_name(cfg)} accepts are not all counterfactuals of the "
                   f"target class, or the judge is wrong: its own accuracy on real images is {_fmt(accuracy)}"
                   + (f", and the renderer oracle, which knows the causal model, gives {oracle:.3f}." if oracle is not None
                      else "."))
    within, recon, edit = stats.get("edit_within_recon_rate"), stats.get("mean_recon_l1"), stats.get("mean_l1")
    if recon is not None and edit is not None:
        out.append(f"Round-trip error beside edit size: the unguided round trip moves the image by {recon:.4f} (mean "
                   f"L1), the edits by {edit:.4f}; {within or 0:.0%} of the edits are no larger than their own round trip's "
                   "error and may be reconstruction noise rather than an edit.")
    if cfg.pack.image_format != "png":
        out.append(f"The images are stored as {cfg.pack.image_format.upper()} at quality {cfg.pack.image_quality}: "
                   "every figure here was measured on the lossless images before compression, and a consumer "
                   "re-scoring the stored images sees them with the codec's loss.")
    if stats.get("rejected") or stats.get("failed"):
        out.append("Rejected and failed samples are not in the shards: the rates are over the written pairs only "
                   "(manifest.parquet has a row for every input).")
    if cfg.guide.mode == "text":
        out.append("do()s that keep the class (e.g. the environment or the size) are not flips: `flipped` is false for "
                   "them and `class_kept` says whether the predictor still gives the class. The concept checks "
                   "(`intervened_ok`, ...) are a renderer oracle's reading and are null where the source has none.")
    out.append("The counterfactuals are generated by the diffusion model named above: they inherit what it learnt "
               "from its training images, and they are synthetic images, not photographs of real scenes.")
    return out


def models_table(cfg: Config, digests: dict[str, str]) -> list[tuple[str, str]]:
    """(role, name and content hash) of every model the pairs depend on, from the pack stage's fingerprint."""
    from cfgen.models.weights import component_dir, pipeline_root

    m = cfg.model
    roles = {"model.unet": "diffusion model" + ("" if m.kind == "auto" else f" ({m.kind})"), "model.scheduler": "noise schedule",
             "model.vae": "VAE (latent space)", "model.text_encoder": "text encoder", "model.tokenizer": "tokenizer",
             "text.graph": "concept graph",
             "model.classifier": "guiding classifier (noise-aware)" if cfg.guide.mode == "classifier"
             else "predictor (gives p(y*); does not steer the edit)",
             "model.predictor_path": f"guiding predictor ({m.predictor})"}
    paths = {"model.unet": m.unet, "model.scheduler": m.scheduler, "model.vae": component_dir(cfg, m.vae, "vae"),
             "model.text_encoder": component_dir(cfg, m.text_encoder, "text_encoder"),
             "model.tokenizer": component_dir(cfg, m.tokenizer, "tokenizer"), "text.graph": cfg.text.graph,
             "model.classifier": m.classifier, "model.predictor_path": m.predictor_path}
    out = [(roles[k], f"{model_name(paths[k])} (sha256 {digests[k][:16]})") for k in roles  # in roles' order
           if digests.get(k, "absent") != "absent"]
    named = pipeline_root(cfg.path(m.unet)) / "text_encoder.json"  # cfgen's own text encoder, a package
    if named.is_file():
        info = json.loads(named.read_text())
        out.append(("text encoder", f"{info.get('text_encoder')} (the frozen {info.get('package')} "
                                    f"{info.get('version')})"))
    return out


def _creation(cfg: Config) -> tuple[str, str]:
    """The card's "how the pairs were made": a paragraph, and the guide stage's rows of its settings table."""
    g, t = cfg.guide, cfg.text
    ladder = " -> ".join(f"{s:g}" for s in [g.scale, *g.escalation])
    mask = "off (the whole image)" if g.mask == "off" else (
        f"{g.mask} (threshold {g.mask_threshold:g}, dilation {g.mask_dilation}, blur {g.mask_blur}, "
        f"start {g.mask_start:g}): outside it a counterfactual is the factual image")
    guided = (f"| guidance scales | {ladder}, each pair keeps the first with p(y*) >= {g.confidence:g} |\n"
              f"| localized edits | {mask} |") if g.mode == "classifier" else (
        f"| interventions | do() on {', '.join(t.intervene)}, {g.target} values; graph "
        f"{'propagates' if t.propagate else 'not used'} |\n"
        f"| CSG | {'on' if t.csg else 'off'}: edit scale {t.edit_scale:g}, {t.edit_prompt} edit prompts, "
        f"{t.mask_rule} masks at {t.threshold:g}, intersect {t.intersect}, preserve {t.preserve}, warm-up {t.warmup} |")
    how = ("DDIM inversion of each image to its noise (abduction), then the reverse DDIM path from that noise\n"
           "steered by a classifier's gradient toward the counterfactual class (action and prediction).") \
        if g.mode == "classifier" else (
        "Text mode (FM-CGM): DDIM inversion of each image under its caption (abduction); do(concept = value) on\n"
        f"the caption's concepts {', '.join(t.intervene)}"
        f"{', propagated to their descendants by the concept graph' if t.propagate else ' alone (no graph)'}"
        " (action);\nthe reverse path under the edited caption"
        f"{f' with Causal Semantic Guidance (edit scale {t.edit_scale:g}, {t.mask_rule} masks at {t.threshold:g})' if t.csg else ''}"
        " (prediction).")
    return how, guided


def _structure(mode: str, ext: str, image_desc: str) -> str:
    """The card's "Dataset Structure": the members of a pair, how to read them, what `json` holds."""
    return f"""## Dataset Structure

Each sample is a pair, one WebDataset sample in the `{PAIRS.prefix}-*.tar` shards:

| member | content |
|---|---|
| `{ext}` | the factual image ({image_desc}) |
| `txt` | its caption |
| `cls` | its class index |
| `cf.{ext}` | the counterfactual image ({image_desc}) |
| `cf.txt` | its caption{" (the edited caption)" if mode == "text" else ""} |
| `cf.cls` | its class index |
| `json` | per-pair metadata: {", ".join(PAIR_FIELDS)} |

    import json
    from datasets import load_dataset
    pairs = load_dataset("path/to/this/folder", split="train")           # or streaming=True, or the Hub repo id
    pair = pairs[0]
    pair["{ext}"], pair["cf.{ext}"], pair["json"]["intervention"]
    pairs.features["cf.cls"].int2str(pair["cf.cls"])                     # the class name
    json.loads(pair["json"]["edits"])["propagated_changes"]              # edits is a JSON string (see below)

In `json`: `intervention` is the do() that made the pair and `concept` its concept (`label` on the classifier
path); `concepts_before` / `concepts_after` the concept states (on the classifier path, the class name);
`changes_class` whether the do() asks for another class; `flipped` whether it does and the guiding predictor's
top class on the counterfactual is the target, `class_kept` whether it does not and the predictor still gives
the class; `{"`, `".join(NULLABLE_FIELDS)}` what the source's oracle reads back (null where the source has none);
`p_cf` the predictor's probability of `cf.cls`; `l1`, `l2`, `recon_l1` the edit's and the unguided round trip's
size. `edits` records the do() as FM-CGM's concept manipulator does (target concept, original and new value,
propagated changes with their reasons, final states), kept a JSON string so that every sample has the same
schema (the propagated changes are an empty list on many pairs): `json.loads(pair["json"]["edits"])`.

`manifest.parquet` beside the shards has one row per pair (and per failed input), `origin` relative to the
source's root; `stats.json` the run's summary; `sizes.json` the pairs per shard (open_clip).

"""


def card_text(cfg: Config, class_names: list[str], stats: dict, judge: dict | None = None,
              digests: dict[str, str] | None = None, concepts: list[str] | None = None) -> str:
    """The whole README.md."""
    concepts = concepts or ["label"]
    g, inv, p = cfg.guide, cfg.invert, cfg.pack
    ext = IMAGE_EXTENSIONS[p.image_format]
    image_desc = ("lossless PNG" if p.image_format == "png" else f"{p.image_format.upper()}, quality {p.image_quality}")
    how, guided = _creation(cfg)
    models = "\n".join(f"| {role} | {name} |" for role, name in models_table(cfg, digests or {}))
    rows = "\n".join(f"| {k} | {v} |" for k, v in figures(cfg, stats, judge))
    bullets = "\n".join(f"- {line}" for line in limitations(cfg, stats, judge))
    body = f"""# {cfg.pipeline.name}: factual / counterfactual image pairs

Pairs of images made by cfgen: the same image (background, style, pose) before and after
an intervention on what it shows, {"its class changed by the smallest edit a classifier accepts" if g.mode == "classifier" else "do(concept = value) on its caption's concepts"}.
{stats.get("pairs", 0)} pairs over {len(class_names)} classes: {", ".join(f"{i} {n}" for i, n in enumerate(class_names))}.

{_structure(g.mode, ext, image_desc)}## Dataset Creation

{how}

| setting | value |
|---|---|
| source | {cfg.data.source}, {cfg.data.image_size} px, {cfg.data.channels} channel(s) |
{models}
| inversion | {inv.steps} DDIM steps to t_inv = {inv.t_inv:g} |
| target | {g.target}{f", top {g.top_k}" if g.top_k > 1 else ""} |
{guided}
| gates | require_flip {p.require_flip}, min p(y*) {p.min_p_cf:g}, max L1 {p.max_l1:g}, max recon L1 {p.max_recon_l1:g} |
| image format | {image_desc} |

Models are named by their folder and the sha256 of their files (the pack stage's fingerprint).

## What the run measured

| figure | value |
|---|---|
{rows}

## Bias, Risks, and Limitations

{bullets}

## License

`{p.license}`{" (not set: `pack.license` in the pipeline file sets it)" if p.license == "unknown" else ""}. The pairs
derive from the source images and from the models above: their licenses bound what this one can be.
"""
    return str(DatasetCard(f"---\n{card_data(cfg, class_names, stats, concepts).to_yaml()}\n---\n\n{body}"))


def current_judge(run_dir: Path) -> dict | None:
    """judge.json of `cfgen evaluate` when it was measured on the pairs as they are (not before a re-pack)."""
    path = result_path(run_dir)
    if not path.is_file():
        return None
    judge = json.loads(path.read_text())
    return judge if judge.get("manifest_sha256") == manifest_digest(run_dir) else None


def _concepts(run_dir: Path) -> list[str]:
    """The concept names of the run's pairs (manifest concepts_before of a written pair), 'label' if none."""
    import pyarrow.parquet as pq

    path = PAIRS.dir(run_dir) / "manifest.parquet"
    if not path.is_file() or "concepts_before" not in pq.read_schema(path).names:
        return ["label"]
    table = pq.read_table(path, columns=["status", "concepts_before"]).to_pylist()
    return next(([k for k, _ in r["concepts_before"]] for r in table
                 if r["status"] == "ok" and r["concepts_before"]), ["label"])


def write_card(run_dir: Path, cfg: Config | None = None, stats: dict | None = None) -> Path | None:
    """(Re)write RUN/pairs/README.md from the run: its config, stats, fingerprint and judge. Pairs of an older
    contract keep the card they were packed with (this one would declare fields they lack): None."""
    from cfgen.config import load_config
    from cfgen.contract import CONTRACT_VERSION
    from cfgen.data.sources import load_class_names
    from cfgen.runstate import FINGERPRINT
    from cfgen.shards import atomic_write_bytes

    run_dir = Path(run_dir)
    folder = PAIRS.dir(run_dir)
    fingerprint = PAIRS.state(run_dir) / FINGERPRINT
    made = json.loads(fingerprint.read_text()) if fingerprint.is_file() else {}
    if made.get("contract", CONTRACT_VERSION) != CONTRACT_VERSION:
        return None
    digests = made.get("models", {})
    cfg = cfg or load_config(folder / "config.toml")
    stats = stats if stats is not None else json.loads((folder / "stats.json").read_text())
    text = card_text(cfg, load_class_names(cfg), stats, current_judge(run_dir), digests, _concepts(run_dir))
    atomic_write_bytes(folder / "README.md", text.encode())
    return folder / "README.md"
