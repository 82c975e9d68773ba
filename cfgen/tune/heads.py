"""Image-side learners on the frozen features (DESIGN §10): a linear head and a residual adapter.

Both score an image by f'(x) . t_c like a prompt's cosine, so every objective of
losses.py applies to them unchanged, and both start *exactly* at zero-shot, where
t_c = w_c / |w_c| with w_c the zero-shot prompt's text feature ('a photo of a <name>.'):

    linear   t_c = (w_c + delta_c) / |w_c| and a bias b_c (score f . t_c + b_c), delta_c = 0
             and b_c = 0 at step 0 (adding zero is exact, so step 0 is zero-shot bit for bit). The divisor is the *initial* norm, a
             constant: the head is a plain linear classifier started at the zero-shot
             one, free to grow a row's norm (a cosine head, renormalised every step, is
             capped by the fixed logit scale and could not fit the pairs: measured
             worst base 0.38 against 0.53 for the logistic regression of issue 24). Its
             loss carries a logistic regression's L2 term (tune.head_c, scikit-learn's C) on
             the weights, not on the bias, as scikit-learn's intercept (without the bias the
             same fit measured worst base 0.38, with it 0.56: the bias absorbs the classes'
             base rates, which the weights otherwise learn from the cue).
             The image feature is untouched; only the trained (base) classes' rows move, a
             novel class keeps its zero-shot vector.
    adapter  CLIP-Adapter's residual form on the image side, f' = normalise(f + A(f)),
             A = Linear(D, D/4) -> ReLU -> Linear(D/4, D) with the last layer at zero
             (so A(f) = 0 at step 0, and scores equal zero-shot's up to the last bit of the
             renormalised norm); the class vectors stay the zero-shot text features.
             It applies to every image, so it moves the novel classes too.

    head = LinearHead(zero_shot_text)            # (C, D) raw text features, every class
    text = head.class_features(classes=base)     # (len(base), D), normalise before cos
    f2 = adapter.image_features(f)               # (B, D), normalised
"""

from __future__ import annotations

import torch
from torch import nn

from cfgen.tune.losses import normalize


class ImageSideLearner(nn.Module):
    """Common shape of the image-side learners: `class_features` and `image_features`, as
    PromptLearner (conditional = False: the class vectors do not depend on the image)."""

    conditional = False
    kind = ""

    def __init__(self, zero_shot_text: torch.Tensor):
        super().__init__()
        text = zero_shot_text.detach().clone()
        self.register_buffer("zero_shot", text, persistent=False)
        # the same expression as losses.normalize, so zero_shot / zero_shot_norm is normalize(text) bit for bit
        self.register_buffer("zero_shot_norm", text.norm(dim=-1, keepdim=True), persistent=False)

    def class_features(self, image_features: torch.Tensor | None = None,
                       classes: torch.Tensor | None = None) -> torch.Tensor:
        """(C, D) class vectors, already in cosine units: use them as they are (no renormalising)."""
        v = self._vectors() / self.zero_shot_norm
        return v if classes is None else v[classes]

    def _vectors(self) -> torch.Tensor:
        return self.zero_shot

    def image_features(self, f: torch.Tensor) -> torch.Tensor:
        return f

    def class_bias(self, classes: torch.Tensor) -> torch.Tensor | None:
        """(C,) a per-class offset of the scores, in cosine units (None: no offset)."""
        return None

    def penalty(self, classes: torch.Tensor, scale: float) -> torch.Tensor:
        """The L2 term of the learner's loss before its weight (0: none)."""
        return self.zero_shot.new_zeros(())

    def learned_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors, for safetensors."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}


class LinearHead(ImageSideLearner):
    kind = "linear"

    def __init__(self, zero_shot_text: torch.Tensor):
        super().__init__(zero_shot_text)
        self.delta = nn.Parameter(torch.zeros_like(self.zero_shot))
        self.bias = nn.Parameter(torch.zeros(len(zero_shot_text), device=zero_shot_text.device))

    def _vectors(self) -> torch.Tensor:
        return self.zero_shot + self.delta

    def class_bias(self, classes: torch.Tensor) -> torch.Tensor:
        return self.bias[classes]

    def penalty(self, classes: torch.Tensor, scale: float) -> torch.Tensor:
        """|W|^2 of the trained classes' weights W = scale * t_c: a logistic regression's L2 term
        (fit.py weighs it 1 / (2 C n), scikit-learn's form), which shrinks W toward 0 and not toward
        zero-shot: a small-norm linear classifier averages many feature directions instead of
        leaning on the few that carry the training split's cue."""
        return (scale * self.class_features(classes=classes)).pow(2).sum()


class ResidualAdapter(ImageSideLearner):
    kind = "adapter"

    def __init__(self, zero_shot_text: torch.Tensor, reduction: int = 4, generator: torch.Generator | None = None):
        super().__init__(zero_shot_text)
        d = zero_shot_text.shape[-1]
        self.down = nn.Linear(d, d // reduction, bias=False)
        self.up = nn.Linear(d // reduction, d, bias=False)
        with torch.no_grad():
            bound = 1.0 / d ** 0.5  # nn.Linear's default range, drawn from the seeded generator
            self.down.weight.uniform_(-bound, bound, generator=generator)
            self.up.weight.zero_()
        self.to(zero_shot_text.device)

    def image_features(self, f: torch.Tensor) -> torch.Tensor:
        return normalize(f + self.up(torch.relu(self.down(f))))


IMAGE_LEARNERS = {"linear": LinearHead, "adapter": ResidualAdapter}
