"""Pipeline configuration: one dataclass per TOML section, CLI overrides, validation.

Precedence is CLI (`--set section.key=value`) > TOML file > the defaults below.
Relative paths in a TOML file are resolved against the directory of that file,
so `pipelines/digits.toml` can say `unet = "../models/digits/unet"` and work
from any working directory. The resolved config is written next to every
stage's output (`config.toml`), so a run can be reproduced from its output.

    cfg = load_config("pipelines/digits.toml", overrides=["guide.scale=6"])
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tomli_w

from cfgen.errors import ConfigError

# Choice fields are typed with these Literals; `_coerce` checks a value against the type,
# so the allowed values are written once, here. Dispatch sites end in an explicit error.
GradientKind = Literal["noisy", "unet", "x0"]
MaskSource = Literal["x0", "gradient"]
GuideMask = Literal["off", MaskSource]
GuideMode = Literal["classifier", "text"]
TextMaskRule = Literal["quantile", "relative"]
TextEditPrompt = Literal["concept", "counterfactual"]
ImageFormat = Literal["png", "jpeg", "webp"]
"""How guidance takes grad log p(y*): cfgen/diffusion.py's GRADIENTS."""
Gradient = Literal["auto", GradientKind]
Dtype = Literal["auto", "fp32", "bf16", "fp16"]
ModelKind = Literal["auto", "pixel", "latent"]
Predictor = Literal["noise_aware", "hf_classifier", "clip_zero_shot"]
TuneBackend = Literal["embedded", "transformers"]
Learner = Literal["coop", "coop_csc", "cocoop", "linear", "adapter"]
Objective = Literal["dicap", "cfvlm", "augment", "dicap_sym"]
SelectMode = Literal["validation", "fixed"]
TextEncoderName = Literal["", "minilm"]
CfSource = Literal["generated", "true", "nearest"]
"""Which image plays x^cf in the counterfactual objectives (cfgen/tune/cfsources.py)."""
PairKind = Literal["class", "cue", "both"]
"""Which pairs a counterfactual row learns from (cfgen/tune/cueflips.py): class flips, cue flips, or both."""


@dataclass(frozen=True)
class Role:
    """What a config field is to a run directory (cfgen/runstate.py): the stage whose fingerprint holds its
    value, or why no fingerprint does. Every field of a stage-feeding section says it where it is declared,
    as its type's metadata (`seed: Annotated[int, INVERT] = 0`); runstate.STAGE_KEYS and PATH_FIELDS are
    read off these, so a new key cannot be forgotten in a list kept elsewhere (a stale resume), and
    tests/test_config_roles.py fails on a field that has none."""

    name: str
    stage: str | None = None
    """'invert' | 'guide' | 'pack': the value is part of that stage's fingerprint (and of every later one)."""
    path: bool = False
    """A file or directory: written back absolute (to_dict); what it points at is digested, not the string."""


INVERT = Role("invert", stage="invert")
GUIDE = Role("guide", stage="guide")
PACK = Role("pack", stage="pack")
PATH = Role("path", path=True)
RUNTIME = Role("runtime")
"""How the work runs, not what it makes: device, threads, batch sizes, the failure policy."""
CARD = Role("card")
"""Read by the dataset card alone, which every pack rewrites."""
LATER = Role("later command")
"""The default of every field under [train] and [tune]: read by `cfgen train` / `cfgen tune`, never by
invert, guide or pack (their paths still say PATH)."""
LATER_SECTIONS = ("train", "tune")


@dataclass
class PipelineConfig:
    name: Annotated[str, RUNTIME] = "digits"
    """Pipeline name; the default run directory is runs/<name>."""
    seed: Annotated[int, INVERT] = 0
    """Global seed; each sample's seed is derived from it and the sample id."""
    max_failure_fraction: Annotated[float, RUNTIME] = 0.25
    """A stage exits 1 with a summary when more than this share of its inputs failed."""
    fail_fast: Annotated[bool, RUNTIME] = False
    """Stop at the first failed sample (the shard holding it is not committed); CLI --fail-fast."""
    threads: Annotated[int, RUNTIME] = 0
    """CPU threads for torch (0 = the cores this process may use / LOCAL_WORLD_SIZE); --threads and
    OMP_NUM_THREADS win over it (cfgen/threads.py). Not part of a run's fingerprint: outputs do not depend on it."""


@dataclass
class DataConfig:
    source: Annotated[str, INVERT] = "digits"
    """'digits' (scikit-learn's handwritten digits), 'shapes' (synthetic, known causal model: cfgen/data/shapes.py),
    'shapes-text' (shapes captioned over a concept graph: cfgen/data/shapes_text.py),
    'folder' (root/<class>/<image>, any format PIL decodes) or 'manifest' (CSV/parquet of path,label): a name in cfgen/data/sources.py SOURCES
    (checked there, by check_source, before any work)."""
    root: Annotated[str, PATH] = ""
    """Dataset root: the image folder, or the directory that manifest paths are relative to."""
    manifest: Annotated[str, PATH] = ""
    """CSV or parquet file with columns path,label (and optionally id) for source='manifest'."""
    classes: Annotated[str, PATH] = ""
    """Text file with one class name per line; line i is class index i. Empty: sorted folder names / labels."""
    split: Annotated[str, PATH] = ""
    """Optional CSV of id,split; with `use_split` set, only those ids are used."""
    use_split: Annotated[str, INVERT] = ""
    """Which split to process ('' = every sample)."""
    image_size: Annotated[int, INVERT] = 8
    """Side of the square images the models work on (pixels)."""
    channels: Annotated[int, INVERT] = 1
    """1 for grayscale, 3 for RGB."""
    shard_size: Annotated[int, INVERT] = 512
    """Samples per shard: the unit of work, retry and resumption."""
    limit: Annotated[int, INVERT] = 0
    """Process only the first N samples (0 = all); handy for smoke runs."""
    only_classes: Annotated[list[str], INVERT] = field(default_factory=list)
    """Process only the samples of these classes (names from the class list); [] = every class.
    `make benchmark` makes pairs for the base classes alone: tune draws its shots from those only."""
    class_limit: Annotated[int, INVERT] = 0
    """Process at most the first N samples of each class (0 = no limit), applied before `limit`:
    a class-balanced pool of shots whatever the split's class frequencies."""
    repeat: Annotated[int, INVERT] = 1
    """Process the sample list this many times over (ids get -r<k>); for scale and memory tests."""
    max_image_pixels: Annotated[int, INVERT] = 89_478_485
    """Images with more pixels than this are refused as decompression bombs (PIL's default)."""
    shapes_count: Annotated[int, INVERT] = 3000
    """source='shapes' and 'shapes-text': how many images the renderer draws (indices 0..N-1; every fifth is test)."""
    shapes_spurious: Annotated[float, INVERT] = 0.9
    """source='shapes': in the train split, the probability that the class follows the environment
    (the background cue); the test split draws the class independently of it."""
    shapes_classes: Annotated[int, INVERT] = 3
    """source='shapes' and 'shapes-text': K, the number of classes (the first K of circle, square, triangle,
    diamond, cross, ring, star, saltire) and of environments (background tints); 3 is the original dataset."""
    shapes_scale: Annotated[float, INVERT] = 1.0
    """source='shapes': object size, as a multiple of the original (radius 0.24-0.29 of the image side)."""


@dataclass
class ModelConfig:
    unet: Annotated[str, PATH] = "../models/digits/unet"
    """Directory of a diffusers UNet2DModel (or a pipeline directory with unet/)."""
    scheduler: Annotated[str, PATH] = "../models/digits/scheduler"
    """Directory of a diffusers scheduler config; its alphas define the DDIM grid."""
    classifier: Annotated[str, PATH] = "../models/digits/classifier"
    """Directory of the noise-aware classifier p(y | x_t, t) (cfgen train classifier)."""
    device: Annotated[str, RUNTIME] = "auto"
    """'auto' (cuda:<LOCAL_RANK> if available, else cpu), 'cpu' or 'cuda[:N]'."""
    dtype: Annotated[Dtype, INVERT] = "auto"
    """Autocast dtype of the networks: 'auto' (bf16 on GPU, fp32 on CPU), 'fp32' or 'bf16'.
    The DDIM update itself always runs in fp32. 'fp16' is refused: the guidance gradient is taken
    without loss scaling, and per-pixel gradients below fp16's range (6e-8) flush to zero, so guidance
    would silently weaken; bf16 has fp32's range at the same memory."""
    compile: Annotated[bool, RUNTIME] = False
    """torch.compile the UNet and the classifier (pays off on long GPU runs)."""
    trust_checkpoint: Annotated[bool, RUNTIME] = False
    """Allow pickle weights (.bin/.pt), which can run code when loaded; CLI --trust-checkpoint."""
    kind: Annotated[ModelKind, INVERT] = "auto"
    """'pixel' (the UNet denoises images), 'latent' (invert and guide VAE latents) or 'auto': latent when
    model.vae is set or the UNet's pipeline directory has vae/ (docs/models.md)."""
    vae: Annotated[str, PATH] = ""
    """Directory of a diffusers AutoencoderKL (latent models); '' = vae/ beside the UNet in its pipeline directory."""
    text_encoder: Annotated[str, PATH] = ""
    """Text encoder of a UNet2DConditionModel (transformers, e.g. CLIPTextModel); '' = text_encoder/ beside the UNet."""
    tokenizer: Annotated[str, PATH] = ""
    """Tokenizer directory of that text encoder; '' = tokenizer/ beside the UNet."""
    prompt: Annotated[str, INVERT] = ""
    """Caption a conditional UNet is conditioned on, the same for every sample ('' = the empty prompt)."""
    predictor: Annotated[Predictor, GUIDE] = "noise_aware"
    """'noise_aware' (model.classifier, p(y | x_t, t)), or a clean classifier on the x0-estimate in
    model.predictor_path: 'hf_classifier' (transformers image classifier) or 'clip_zero_shot' (CLIPModel)."""
    predictor_path: Annotated[str, PATH] = ""
    """Directory of the clean predictor (hf_classifier, clip_zero_shot), loaded with local_files_only."""
    clip_prompts: Annotated[list[str], GUIDE] = field(default_factory=lambda: ["a photo of a {label_name}."])
    """clip_zero_shot: prompt templates; a class's text feature is the mean of its normalized template features."""
    gradient: Annotated[Gradient, GUIDE] = "auto"
    """How guidance takes grad log p(y*) (cfgen/diffusion.py): 'noisy' = at x_t from the noise-aware
    p(y*|x_t, t); on the x0-estimate instead: 'unet' = grad_x_t log p(y*|D(x0(x_t, eps))) through the UNet
    (and VAE decoder), 'x0' = FastDiME-style, eps held constant: grad_x0 log p(y*|D(x0)) / sqrt(a_t), no
    UNet backward. A noise-aware classifier is read at t = 0 for 'unet' and 'x0'.
    'auto' = 'noisy' for noise_aware, 'unet' for clean predictors."""
    gradient_checkpointing: Annotated[bool, RUNTIME] = False
    """Recompute activations during the guidance backward (UNet, VAE decoder, predictor): less memory, more compute."""


@dataclass
class InvertConfig:
    steps: Annotated[int, INVERT] = 25
    """DDIM steps between t=0 and t_inv (the same grid is walked back by guide)."""
    t_inv: Annotated[float, INVERT] = 0.6
    """Fraction of the schedule to invert to (0 < t_inv <= 1); shallower keeps more of the image."""
    batch_size: Annotated[int, RUNTIME] = 256
    """Samples per forward pass (formed inside a shard; results do not depend on it)."""


@dataclass
class GuideConfig:
    mode: Annotated[GuideMode, INVERT] = "classifier"
    """'classifier': toward another class along a classifier's gradient; 'text': do(concept = value) on the
    sample's caption through a concept graph, regenerated by a text-conditioned UNet ([text], cfgen/csg.py)."""
    target: Annotated[str, GUIDE] = "closest"
    """'closest' (predictor's top non-factual class), 'random', 'all' (one pair per other class),
    or a class index / name."""
    top_k: Annotated[int, GUIDE] = 1
    """With target = 'closest': a pair toward each of the K classes the predictor ranks highest after
    the factual one (pair keys then read <id>_to_<class index>)."""
    scale: Annotated[float, GUIDE] = 2.0
    """Guidance scale s in e^ = e - s*sqrt(1-a_t)*grad log p(y*|x_t,t)."""
    escalation: Annotated[list[float], GUIDE] = field(default_factory=lambda: [4.0, 8.0, 16.0])
    """Larger scales retried, in order, for samples not yet flipped with confidence."""
    confidence: Annotated[float, GUIDE] = 0.99
    """A sample counts as done at a scale once the predictor gives y* at least this probability
    on the counterfactual (and ranks it first); below it, the next escalation scale is tried."""
    batch_size: Annotated[int, RUNTIME] = 256
    """Samples per guided pass."""
    mask: Annotated[GuideMask, GUIDE] = "off"
    """Localized edits (diffusion.localized_reverse): 'x0' confines the edit to where the x0-estimate
    departs from the factual image, 'gradient' to where the guidance gradient is large; outside, the
    sample follows the factual image's inversion trajectory and comes back exactly. 'off': the whole image."""
    mask_threshold: Annotated[float, GUIDE] = 0.15
    """tau: a pixel is in the mask when its (smoothed, dilated) departure is >= tau x the sample's largest."""
    mask_dilation: Annotated[int, GUIDE] = 3
    """Odd max-pool kernel (model-space pixels) that grows the mask around what departed."""
    mask_blur: Annotated[int, GUIDE] = 3
    """Odd mean-pool kernel that smooths the departure map before the threshold (1 = none)."""
    mask_start: Annotated[float, GUIDE] = 0.5
    """Share of the reverse steps run unmasked before masking starts (early x0-estimates are blurry)."""


@dataclass
class TextConfig:
    """guide.mode = 'text': interventions on the concepts of each sample's caption (FM-CGM, cfgen/csg.py)."""
    graph: Annotated[str, PATH] = ""
    """Concept graph JSON (FM-CGM's extractor format plus cfgen's domains, mechanisms and caption template,
    cfgen/concepts.py); '' = the source's own graph (shapes-text)."""
    intervene: Annotated[list[str], GUIDE] = field(default_factory=lambda: ["shape"])
    """Concepts to intervene on; each gives one pair per other value of its domain (guide.target = 'all')
    or per sample one value drawn from its seed (guide.target = 'random'). Pairs are keyed <id>_do_<concept>_<value>."""
    propagate: Annotated[bool, GUIDE] = True
    """do() changes the intervened concept's descendants as the graph's mechanisms say; False edits the
    intervened concept's words alone (the 'text without the graph' baseline)."""
    csg: Annotated[bool, GUIDE] = True
    """Causal Semantic Guidance: one masked edit term per changed concept, the rest of the image kept on the
    factual trajectory; False regenerates under the edited caption, unmasked (edit-friendly DDIM)."""
    edit_scale: Annotated[float, GUIDE] = 2.0
    """s_e: weight of each masked edit term s_e * M_c * (eps(Y_c) - eps(Y))."""
    edit_prompt: Annotated[TextEditPrompt, GUIDE] = "concept"
    """Y_c of each changed concept's term: 'concept' = the factual caption with c alone changed (FM-CGM's
    per-concept terms, summed); 'counterfactual' = the whole edited caption Y' for every term (one direction,
    each concept's own masks, the terms averaged where masks overlap): a model trained on captions that obey
    the graph has never seen 'a red square', and its estimate under one is not an edit it learnt."""
    threshold: Annotated[float, GUIDE] = 0.5
    """lambda: each concept's masks (its cross-attention and its edit term) keep the top 1 - lambda of the
    pixels ('quantile') or the pixels at >= lambda x the largest value ('relative')."""
    mask_rule: Annotated[TextMaskRule, GUIDE] = "quantile"
    """'quantile' (LEDITS++, FM-CGM: a fixed share of the image per concept) or 'relative' (the share follows
    the concept: a background edit gets the whole background)."""
    warmup: Annotated[int, GUIDE] = 0
    """Reverse steps run without edit guidance first (the layout at high noise)."""
    intersect: Annotated[bool, GUIDE] = True
    """M_c = cross-attention mask AND noise-estimate mask (FM-CGM); False: the noise-estimate mask alone."""
    preserve: Annotated[bool, GUIDE] = True
    """Outside the union of the masks the sample follows the factual trajectory, so what no edit touches
    comes back exactly (cfgen's addition to CSG); False: the masks weight the edit terms only."""


@dataclass
class PackConfig:
    caption: Annotated[str, PACK] = "a photo of the digit {label_name}."
    """Caption template for K.txt / K.cf.txt; {label_name} is the class name."""
    require_flip: Annotated[bool, PACK] = False
    """Keep pairs whose counterfactual did not flip the predictor out of the shards."""
    min_p_cf: Annotated[float, PACK] = 0.0
    """Gate: reject pairs whose predictor probability of the target is below this (0 keeps all)."""
    max_l1: Annotated[float, PACK] = 1.0
    """Gate: reject pairs whose L1 factual -> counterfactual is above this (1.0, the maximum, keeps all)."""
    max_recon_l1: Annotated[float, PACK] = 1.0
    """Gate: reject pairs whose s = 0 reconstruction L1 is above this (1.0 keeps all)."""
    image_format: Annotated[ImageFormat, PACK] = "png"
    """Image members of the pairs: 'png' (lossless: the pixels the metrics were measured on), 'jpeg' or 'webp'
    (lossy, at image_quality; smaller for large images). The members are K.png / K.jpg / K.webp (and K.cf.*)."""
    image_quality: Annotated[int, PACK] = 95
    """jpeg and webp: the encoder's quality, 1-100 (ignored for png)."""
    license: Annotated[str, CARD] = "unknown"
    """The dataset card's license: a Hugging Face license id (apache-2.0, cc-by-4.0, other, ...). The pairs
    derive from the source images and the models, so their licenses bound it; only the card changes with it."""


@dataclass
class TrainDiffusionConfig:
    steps: int = 4000
    batch_size: int = 128
    lr: float = 2e-4
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    text_encoder: TextEncoderName = ""
    """'' = an unconditional UNet2DModel; 'minilm' = a UNet2DConditionModel attending to the frozen MiniLM's
    token states of each sample's caption (cfgen/models/text.py)."""
    caption_dropout: float = 0.1
    """With a text encoder: share of training captions replaced by '' (classifier-free guidance's '' branch)."""


@dataclass
class TrainClassifierConfig:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    test_fraction: float = 0.2
    """Held-out share (stratified, seeded) on which accuracy is reported."""
    balance_groups: bool = False
    """Draw training batches uniformly over (group, class) cells (group-balanced ERM), so a nuisance
    that predicts the class in the train split (shapes: the background's environment) does not pay."""


@dataclass
class TrainVlmConfig:
    steps: int = 400
    """Optimizer steps of locked-text (LiT) training of the embedded VLM's image tower."""
    batch_size: int = 256
    """Images per step."""
    lr: float = 2e-3
    """AdamW learning rate (cosine schedule)."""
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    """Conv channels of the image tower; its output dimension is the text tower's (384 for MiniLM)."""


@dataclass
class TrainConfig:
    diffusion: TrainDiffusionConfig = field(default_factory=TrainDiffusionConfig)
    classifier: TrainClassifierConfig = field(default_factory=TrainClassifierConfig)
    vlm: TrainVlmConfig = field(default_factory=TrainVlmConfig)


@dataclass
class SelectConfig:
    """How each row's lr / epochs / lambda are chosen (cfgen/tune/select.py), never on tune.eval_split."""

    mode: SelectMode = "validation"
    """'validation': per seed and row, the grid point with the best criterion on the shot pool's held-out
    pairs (factual and counterfactual accuracy); 'fixed': tune.lr / epochs / lam (image learners:
    tune.image_lr / image_epochs) as given, nothing chosen."""
    lr: list[float] = field(default_factory=lambda: [0.002, 0.02, 0.2])
    """Learning rates tried for the prompt learners (SGD, momentum 0.9)."""
    epochs: list[int] = field(default_factory=lambda: [10, 25, 50])
    """Epoch budgets of CoOp / CoOp-CSC: checkpoints of one run, cosine over the largest."""
    cocoop_epochs: list[int] = field(default_factory=lambda: [2, 5, 10])
    """Epoch budgets of CoCoOp."""
    lam: list[float] = field(default_factory=lambda: [1.0])
    """lambda values tried for the prompt learners (objectives of the form L1 + lambda * ...)."""
    image_lr: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2])
    """Learning rates tried for the image-side learners (Adam)."""
    image_epochs: list[int] = field(default_factory=lambda: [10, 25, 50, 100, 200])
    """Epoch budgets of the image-side learners."""
    image_lam: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    """lambda values tried for the image-side learners."""
    project_k: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8, 16])
    """How many cue directions the projection rows may remove (cfgen/tune/project.py); 0 = zero-shot."""


@dataclass
class TuneConfig:
    pairs: Annotated[str, PATH] = ""
    """Pair shards to learn from: a path, glob or brace list (pairs-{000000..000003}.tar); '' = RUN_DIR/pairs/pairs-*.tar."""
    cue_pairs: Annotated[str, PATH] = ""
    """Cue-flip pair shards (same class, another cue: a text run's do(environment) pairs of the same pool
    images, pipelines/shapes6-text.toml), matched to the shots by factual id; '' = none (kinds = ["class"])."""
    kinds: list[PairKind] = field(default_factory=lambda: ["class"])
    """Which pairs each counterfactual row learns from: 'class' (tune.pairs), 'cue' (tune.cue_pairs, each
    x^cf labelled y, with the invariance term), 'both' (each shot with its class flip and its cue flip).
    'cue' and 'both' rows exist for objective 'augment' only: DiCap's and CF-VLM's terms push x^cf away
    from its factual class, which is wrong for a pair that keeps it. Row keys: 'linear+augment[true:cue]'."""
    invariance: float = 1.0
    """mu of augment's invariance term on cue flips: mean KL(softmax(l(x)) || softmax(l(x^cf))) (losses.py)."""
    project: list[CfSource] = field(default_factory=list)
    """Training-free rows 'zero_shot+project[<source>:cue]': the cue subspace from the shots' cue-flip pairs
    of each source, projected out of every image feature, zero-shot prompts (cfgen/tune/project.py)."""
    backend: TuneBackend = "embedded"
    """'embedded' (frozen MiniLM text tower + the image tower in `vlm`) or 'transformers' (a CLIPModel directory in `vlm`)."""
    vlm: Annotated[str, PATH] = ""
    """Directory of the frozen VLM: the embedded image tower (cfgen train vlm) or a transformers CLIP checkpoint.
    "" = runs/<pipeline.name>/models/vlm under the working directory, where `cfgen train vlm` writes."""
    learners: list[Learner] = field(default_factory=lambda: ["coop"])
    """Learners, each a baseline row (lambda = 0) and a row per objective and cf source: prompts
    'coop' (one shared context), 'coop_csc' (CoOp with a context per class), 'cocoop' (the context
    shifted by a meta-net of the image feature); image side 'linear' (class vectors started at the
    zero-shot text features) and 'adapter' (a residual adapter on the image features)."""
    n_ctx: int = 4
    """Number of learned context vectors in front of the class name."""
    ctx_init: str = "a photo of a"
    """Phrase whose token embeddings start the context (n_ctx tokens long), also the zero-shot prompt; '' = N(0, 0.02)."""
    objectives: list[Objective] = field(default_factory=lambda: ["dicap"])
    """Counterfactual objectives: 'dicap' (L1 + lam*L2), 'cfvlm' (alpha*L_align + beta*L_csd + gamma*L_fcd),
    'augment' (each x^cf a labelled image of y*: L1 + lam*CE(x^cf, y*)), 'dicap_sym' (L1 + lam*(L2 + its
    mirror)); every learner's baseline is L1 alone (lambda = 0), with the same shots, init and batch order."""
    cf_sources: list[CfSource] = field(default_factory=lambda: ["generated"])
    """What plays the counterfactual x^cf of a shot (x, y*): 'generated' (the pair's own cf image),
    'true' (the source's causal model renders x under y*; shapes), 'nearest' (the real image of class
    y* nearest to x in the frozen VLM's feature space, from the samples outside eval_split)."""
    rows: list[str] = field(default_factory=list)
    """Train only these rows, each 'learner+objective[cf source]' of the lists above (e.g.
    'cocoop+dicap[generated]') or 'learner+*' (all of that learner's); every listed learner still gets
    its baseline. [] = every combination."""
    lam: float = 1.0
    """lambda of DiCap's L = L1 + lambda*L2 (L2: factual vs counterfactual image, true-class prompt as anchor)."""
    alpha: float = 1.0
    """CF-VLM weight of L_align (symmetric InfoNCE on the factual pairs)."""
    beta: float = 0.45
    """CF-VLM weight of L_csd (factual pair vs complete counterfactual pair, hinge)."""
    gamma: float = 0.55
    """CF-VLM weight of L_fcd (factual vs counterfactual image under the factual text, hinge)."""
    margin_csd: float = 0.2
    """Cosine margin m1 of L_csd."""
    margin_fcd: float = 0.2
    """Cosine margin m2 of L_fcd."""
    temperature: float = 0.0
    """tau of the losses (logits = cos / tau); 0 = the VLM's own, 1 / its logit scale."""
    shots: int = 16
    """Training pairs per base class (K shots), drawn per seed."""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """One training run per seed and method; figures are mean and std over them."""
    epochs: int = 50
    """Passes over the K-shot training set (fixed in advance, never chosen on the eval split)."""
    cocoop_epochs: int = 0
    """Epochs of the CoCoOp runs (its per-image prompts cost B x C text encodes a step); 0 = `epochs`."""
    batch_size: int = 32
    """Pairs per optimizer step."""
    lr: float = 0.002
    """SGD learning rate of the prompt learners (momentum 0.9, cosine decay), as CoOp (select.mode='fixed')."""
    image_lr: float = 0.001
    """Adam learning rate of the image-side learners (select.mode='fixed')."""
    image_epochs: int = 50
    """Epochs of the image-side learners (select.mode='fixed')."""
    workers: int = 0
    """Processes the seeds are trained in, one thread each (CPU only); 0 = one per usable core, at most one
    per seed. The figures do not depend on it."""
    head_c: float = 1.0
    """Inverse L2 strength of the linear head, as scikit-learn's LogisticRegression C (its default, 1.0):
    the loss adds |W|^2 / (2 C n), W the trained classes' logit-scale vectors, n the shots; 0 = no L2."""
    select: SelectConfig = field(default_factory=SelectConfig)
    """How lr / epochs / lambda are chosen: on held-out pairs of the shot pool, or fixed."""
    eval_split: str = ""
    """Evaluate on the source's samples that data.split marks with this split (the whole split: data.limit,
    use_split, only_classes and class_limit do not apply), shots from the pairs outside it;
    '' = every source sample that is not a shot of the seed."""
    cache: bool = True
    """Cache the frozen image features under RUN_DIR/tune/cache/, keyed by shard file and model."""
    encode_batch_size: int = 256
    """Images per forward pass of the frozen image encoder."""


@dataclass
class Config:
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    invert: InvertConfig = field(default_factory=InvertConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    text: TextConfig = field(default_factory=TextConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    base_dir: Path = field(default=Path("."), repr=False)
    """Directory relative paths are resolved against (the TOML file's directory)."""

    def path(self, value: str) -> Path:
        """Resolve a path from the config against the config file's directory."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    def vlm_dir(self) -> Path:
        """tune.vlm, or where `cfgen train vlm` writes by default when it is unset."""
        return self.path(self.tune.vlm) if self.tune.vlm else Path("runs") / self.pipeline.name / "models" / "vlm"


def field_roles() -> dict[tuple[str, str], Role | None]:
    """Every config field, (section, key) -> its Role: the one in its type's metadata, else its section's
    default (LATER under [train] and [tune]), else None (a defect: tests/test_config_roles.py). A key of
    a nested table is (section, "table.key")."""
    roles: dict[tuple[str, str], Role | None] = {}
    for section, cls in typing.get_type_hints(Config).items():
        if dataclasses.is_dataclass(cls):
            _collect_roles(cls, section, "", LATER if section in LATER_SECTIONS else None, roles)
    return roles


def _collect_roles(cls, section: str, prefix: str, default: Role | None, roles: dict) -> None:
    for key, hint in typing.get_type_hints(cls, include_extras=True).items():
        if dataclasses.is_dataclass(hint):
            _collect_roles(hint, section, f"{prefix}{key}.", default, roles)
            continue
        marks = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Role)]
        roles[(section, prefix + key)] = marks[0] if marks else default


def stage_keys() -> dict[str, list[tuple[str, str]]]:
    """Per stage, the (section, key) whose values determine its output, in declaration order."""
    keys: dict[str, list[tuple[str, str]]] = {"invert": [], "guide": [], "pack": []}
    for key, role in field_roles().items():
        if role is not None and role.stage:
            keys[role.stage].append(key)
    return keys


PATH_FIELDS = frozenset(k for k, r in field_roles().items() if r is not None and r.path)
"""Fields that hold paths: written back absolute so a resolved config is portable."""


def _coerce(value, typ, key: str):
    """Check/convert one TOML or CLI value to the dataclass field's type."""
    origin = typing.get_origin(typ)
    if origin is Literal:
        choices = typing.get_args(typ)
        if value in choices and isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected {_one_of(choices)}, got {value!r}")
    if origin is list:
        (item_t,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_t, f"{key}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {typ}")


def _one_of(choices) -> str:
    quoted = [repr(c) for c in choices]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def choices(cls, name: str) -> tuple:
    """The allowed values of a Literal-typed config field (cls a section dataclass)."""
    return typing.get_args(typing.get_type_hints(cls)[name])


_ONE_ITEM_ALIASES = {"tune.learner": "learners", "tune.objective": "objectives"}
"""Replaced single-value keys, read as a one-item list of their successor (the config.toml of older runs)."""


def _fill(obj, table: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj) if f.name != "base_dir"}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if full in _ONE_ITEM_ALIASES:
            key, full, value = _ONE_ITEM_ALIASES[full], f"{prefix}{_ONE_ITEM_ALIASES[full]}", [value]
        if key not in names:
            raise ConfigError(f"unknown config key '{full}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a table")
            _fill(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    try:  # TOML literal: numbers, booleans, lists, quoted strings
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string
    return parts, value


def _nest(parts: list[str], value) -> dict:
    out: dict = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        out = {p: out}
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file, then `section.key=value` overrides; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        cfg.base_dir = path.resolve().parent
        _fill(cfg, table, "")
    for text in overrides or []:
        parts, value = _parse_override(text)
        _fill(cfg, _nest(parts, value), "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Type and range checks that must fail before any work starts. Also run on a Config edited after
    loading (api.load_config), so every field is checked against its type again first."""
    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    _check_types(cfg, "")
    # data.source against the registry: where a config meets a source (data/sources.check_source, run by
    # api.load_config before any work), so that this module needs nothing of the data package
    need(cfg.model.dtype != "fp16", "model.dtype='fp16' is refused: guidance gradients are not loss-scaled and "
                                    "underflow in fp16; use 'bf16' (fp32's range, same memory) or 'fp32'")
    need(cfg.data.shapes_count > 0, "data.shapes_count must be > 0")
    need(0.0 <= cfg.data.shapes_spurious <= 1.0, f"data.shapes_spurious must be in [0, 1], got {cfg.data.shapes_spurious}")
    need(2 <= cfg.data.shapes_classes <= 8, f"data.shapes_classes must be in 2..8, got {cfg.data.shapes_classes}")
    need(0.3 <= cfg.data.shapes_scale <= 1.0, f"data.shapes_scale must be in [0.3, 1], got {cfg.data.shapes_scale}")
    check_template(cfg.pack.caption, "pack.caption")
    need(0.0 <= cfg.pack.min_p_cf <= 1.0, f"pack.min_p_cf must be in [0, 1], got {cfg.pack.min_p_cf}")
    need(cfg.pack.max_l1 >= 0.0, f"pack.max_l1 must be >= 0, got {cfg.pack.max_l1}")
    need(cfg.pack.max_recon_l1 >= 0.0, f"pack.max_recon_l1 must be >= 0, got {cfg.pack.max_recon_l1}")
    need(1 <= cfg.pack.image_quality <= 100, f"pack.image_quality must be in 1..100, got {cfg.pack.image_quality}")
    need(cfg.pack.image_format != "webp" or cfg.data.channels == 3,
         "pack.image_format = 'webp' stores colour only: a data.channels = 1 run would read back with 3 channels; "
         "use 'png' or 'jpeg'")
    need(re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", cfg.pack.license) is not None,
         f"pack.license: expected a Hugging Face license id such as 'apache-2.0' or 'other', got {cfg.pack.license!r}")
    need(cfg.data.image_size > 0, "data.image_size must be > 0")
    need(cfg.data.channels in (1, 3), "data.channels must be 1 or 3")
    need(cfg.data.shard_size > 0, "data.shard_size must be > 0")
    need(cfg.data.limit >= 0, "data.limit must be >= 0")
    need(cfg.data.class_limit >= 0, "data.class_limit must be >= 0")
    need(cfg.data.repeat >= 1, "data.repeat must be >= 1")
    need(cfg.data.max_image_pixels >= 1, f"data.max_image_pixels must be >= 1, got {cfg.data.max_image_pixels}")
    # the models' own images are held in batches of invert.batch_size: one larger than the decompression-bomb
    # limit would be an allocation of tens of GB, not an image
    need(cfg.data.image_size ** 2 <= cfg.data.max_image_pixels,
         f"data.image_size={cfg.data.image_size} makes {cfg.data.image_size ** 2:,}-pixel images, more than "
         f"data.max_image_pixels={cfg.data.max_image_pixels:,}")
    need(0.0 <= cfg.pipeline.max_failure_fraction <= 1.0, "pipeline.max_failure_fraction must be in [0, 1]")
    need(cfg.pipeline.threads >= 0, f"pipeline.threads must be >= 0 (0 = the default), got {cfg.pipeline.threads}")
    need(cfg.invert.steps > 0, "invert.steps must be > 0")
    need(0.0 < cfg.invert.t_inv <= 1.0, f"invert.t_inv must be in (0, 1], got {cfg.invert.t_inv}")
    need(cfg.invert.batch_size > 0, "invert.batch_size must be > 0")
    need(cfg.guide.batch_size > 0, "guide.batch_size must be > 0")
    need(cfg.guide.mode == "classifier" or cfg.guide.target in ("all", "random"),
         f"guide.mode = 'text' takes guide.target = 'all' or 'random' (values of text.intervene's concepts), "
         f"got {cfg.guide.target!r}")
    need(cfg.text.edit_scale >= 0 and math.isfinite(cfg.text.edit_scale),
         f"text.edit_scale must be a finite number >= 0, got {cfg.text.edit_scale}")
    need(0.0 <= cfg.text.threshold <= 1.0, f"text.threshold must be in [0, 1], got {cfg.text.threshold}")
    need(cfg.text.warmup >= 0, f"text.warmup must be >= 0, got {cfg.text.warmup}")
    need(cfg.guide.mode == "classifier" or bool(cfg.text.intervene), "text.intervene names no concept")
    need(len(set(cfg.text.intervene)) == len(cfg.text.intervene),
         f"text.intervene: a concept is listed twice ({cfg.text.intervene}); each gives its own pairs once")
    need(cfg.guide.top_k >= 1, f"guide.top_k must be >= 1, got {cfg.guide.top_k}")
    need(cfg.guide.top_k == 1 or cfg.guide.target == "closest",
         f"guide.top_k = {cfg.guide.top_k} needs guide.target = 'closest' (got {cfg.guide.target!r}); "
         "'all' makes one pair per other class")
    need(0.0 <= cfg.guide.mask_threshold <= 1.0, f"guide.mask_threshold must be in [0, 1], got {cfg.guide.mask_threshold}")
    need(0.0 <= cfg.guide.mask_start < 1.0, f"guide.mask_start must be in [0, 1), got {cfg.guide.mask_start}")
    for key in ("mask_dilation", "mask_blur"):
        value = getattr(cfg.guide, key)
        need(value >= 1 and value % 2 == 1, f"guide.{key} must be an odd number >= 1, got {value}")
    need(0.0 <= cfg.guide.confidence < 1.0, f"guide.confidence must be in [0, 1), got {cfg.guide.confidence}")
    need(cfg.guide.scale >= 0 and math.isfinite(cfg.guide.scale),
         f"guide.scale must be a finite number >= 0, got {cfg.guide.scale}")
    need(all(s >= 0 and math.isfinite(s) for s in cfg.guide.escalation),
         "guide.escalation: scales must be finite and >= 0")
    for section in ("diffusion", "classifier", "vlm"):
        t = getattr(cfg.train, section)
        need(t.steps > 0 and t.batch_size > 0 and t.lr > 0,
             f"train.{section}: steps, batch_size and lr must be > 0")
    need(0.0 < cfg.train.classifier.test_fraction < 1.0, "train.classifier.test_fraction must be in (0, 1)")
    need(0.0 <= cfg.train.diffusion.caption_dropout < 1.0,
         f"train.diffusion.caption_dropout must be in [0, 1), got {cfg.train.diffusion.caption_dropout}")
    _validate_model(cfg, need)
    _validate_tune(cfg, need)


def _check_types(obj, prefix: str) -> None:
    """Every field of `obj` (a Config or a section) coerced to its type again, in place: a Config edited in
    Python after loading gets the checks a TOML value gets (a Literal's choices, numbers, lists)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name == "base_dir":
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_types(value, f"{prefix}{f.name}.")
        else:
            setattr(obj, f.name, _coerce(value, hints[f.name], f"{prefix}{f.name}"))


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_template(template: str, key: str) -> None:
    """A caption template may hold `{label_name}` (and `{{`/`}}` for braces) and nothing else: no other
    field, attribute or index access, conversion or format spec; checked before any work starts."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{key}: {template!r} is not a valid template: {exc}") from None
    for _, field_name, spec, conversion in parts:
        if field_name is not None and (field_name != "label_name" or spec or conversion):
            shown = "{" + field_name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ConfigError(f"{key}: {template!r} uses {shown}; the only field allowed is {{label_name}}")


def guidance_gradient(m: "ModelConfig") -> str:
    """model.gradient with 'auto' resolved: 'noisy' for a noise-aware classifier, 'unet' for clean ones."""
    if m.gradient != "auto":
        return m.gradient
    return "noisy" if m.predictor == "noise_aware" else "unet"


def _validate_model(cfg: Config, need) -> None:
    m = cfg.model
    need(m.predictor == "noise_aware" or bool(m.predictor_path),
         f"model.predictor={m.predictor!r} needs model.predictor_path (the model's directory)")
    need(m.gradient != "noisy" or m.predictor == "noise_aware",
         f"model.gradient='noisy' needs a noise-aware classifier; model.predictor={m.predictor!r} is clean "
         "(use 'unet' or 'x0')")
    need(not (m.kind == "pixel" and m.vae), "model.vae is set but model.kind='pixel'")
    need(len(m.clip_prompts) >= 1 and all("{label_name}" in p for p in m.clip_prompts),
         "model.clip_prompts: give one or more templates, each containing {label_name}")
    for i, template in enumerate(m.clip_prompts):
        check_template(template, f"model.clip_prompts[{i}]")
    need(_DEVICE.fullmatch(m.device) is not None,
         f"model.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {m.device!r}")


def _validate_tune(cfg: Config, need) -> None:
    t = cfg.tune
    need(t.n_ctx >= 1, "tune.n_ctx must be >= 1")
    need(t.shots >= 1, "tune.shots must be >= 1")
    need(len(t.seeds) >= 1 and len(set(t.seeds)) == len(t.seeds), "tune.seeds: give one or more distinct seeds")
    need(t.epochs >= 1 and t.batch_size >= 1 and t.encode_batch_size >= 1,
         "tune.epochs, tune.batch_size and tune.encode_batch_size must be >= 1")
    for key in ("lr", "lam", "alpha", "beta", "gamma", "margin_csd", "margin_fcd", "temperature"):
        v = getattr(t, key)
        need(math.isfinite(v) and v >= 0, f"tune.{key} must be a finite number >= 0, got {v}")
    need(t.lr > 0, "tune.lr must be > 0")
    need(not t.eval_split or bool(cfg.data.split), f"tune.eval_split={t.eval_split!r} needs data.split (a CSV of id,split)")
    need(t.cocoop_epochs >= 0, "tune.cocoop_epochs must be >= 0")
    need(t.workers >= 0, f"tune.workers must be >= 0, got {t.workers}")
    need(math.isfinite(t.head_c) and t.head_c >= 0, f"tune.head_c must be a finite number >= 0, got {t.head_c}")
    need(math.isfinite(t.image_lr) and t.image_lr > 0 and t.image_epochs >= 1,
         "tune.image_lr must be > 0 and tune.image_epochs >= 1")
    s = t.select
    for key in ("lr", "epochs", "cocoop_epochs", "lam", "image_lr", "image_epochs", "image_lam"):
        v = getattr(s, key)
        need(len(v) >= 1 and len(set(v)) == len(v) and all(math.isfinite(x) and x >= 0 for x in v),
             f"tune.select.{key}: give one or more distinct finite numbers >= 0, got {v}")
    need(all(x > 0 for x in s.lr + s.image_lr + s.epochs + s.cocoop_epochs + s.image_epochs),
         "tune.select: learning rates and epochs must be > 0")
    for key in ("learners", "objectives", "cf_sources"):
        v = getattr(t, key)
        need(len(v) >= 1 and len(set(v)) == len(v), f"tune.{key}: give one or more distinct values, got {v}")
    combos = [f"{lr}+{o}[{c}]" for lr in t.learners for o in t.objectives for c in t.cf_sources]
    combos += [f"{lr}+augment[{c}:{k}]" for lr in t.learners for c in t.cf_sources for k in t.kinds
               if k != "class" and "augment" in t.objectives]
    need(len(t.kinds) >= 1 and len(set(t.kinds)) == len(t.kinds), f"tune.kinds: give one or more distinct kinds, got {t.kinds}")
    need(bool(t.cue_pairs) or (set(t.kinds) <= {"class"} and not t.project),
         "tune.kinds 'cue' / 'both' and tune.project need tune.cue_pairs (the cue-flip pair shards)")
    need(math.isfinite(t.invariance) and t.invariance >= 0, f"tune.invariance must be a finite number >= 0, got {t.invariance}")
    need(all(k >= 0 for k in t.select.project_k) and len(t.select.project_k) >= 1,
         f"tune.select.project_k: give one or more numbers of directions >= 0, got {t.select.project_k}")
    for row in t.rows:
        need(row in combos or row in [f"{lr}+*" for lr in t.learners], f"tune.rows: {row!r} is not one of tune.learners x tune.objectives x tune.cf_sources "
                            f"({', '.join(combos)})")
    need(len(set(t.rows)) == len(t.rows), "tune.rows: a row is listed twice")
    need("nearest" not in t.cf_sources or bool(t.eval_split),
         "tune.cf_sources 'nearest' needs tune.eval_split: the nearest real image is drawn from the samples "
         "outside the evaluation split")


def to_dict(cfg: Config) -> dict:
    """The resolved config as a TOML-ready dict, paths made absolute."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name == "base_dir":
            continue
        out[f.name] = dataclasses.asdict(getattr(cfg, f.name))
    for section, key in PATH_FIELDS:
        if out[section][key]:
            out[section][key] = str(cfg.path(out[section][key]))
    return out


def write_resolved(cfg: Config, directory: Path) -> Path:
    """Write config.toml next to a stage's output; it loads back with load_config."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "config.toml"
    tmp = target.with_suffix(".toml.tmp")
    tmp.write_text(tomli_w.dumps(to_dict(cfg)), encoding="utf-8")
    tmp.replace(target)
    return target
