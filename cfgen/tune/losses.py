"""The prompt-learning objectives of DESIGN §4, on cosine similarities.

Notation: cos(a, b) of L2-normalized features, `scale` = 1 / tau (CLIP's logit
scale), y_i the factual class of image x_i, x_i^cf its counterfactual (class
y_i^cf), p_c the prompt of class c. With CoCoOp, g(p_c) is the prompt as
conditioned on the image it is compared with (so cos(x_i^cf, p_{y_i}) uses the
prompt the counterfactual image itself would be classified with).

DiCap (Eq. 6-8):
    L1 = -mean_i log softmax_c(scale * cos(f(x_i), g(p_c)))[y_i]          (CoOp's loss)
    L2 = -mean_i log [ e^{scale*s_i} / (e^{scale*s_i} + e^{scale*s_i^cf}) ],
         s_i = cos(g(p_{y_i}), f(x_i)),  s_i^cf = cos(g(p_{y_i}), f(x_i^cf))
    L  = L1 + lambda * L2        (lambda = 0 is plain CoOp / CoCoOp)

CF-VLM (alpha*L_align + beta*L_csd + gamma*L_fcd; defaults 1.0 / 0.45 / 0.55):
    L_align = (L_i2t + L_t2i) / 2, symmetric InfoNCE on the factual pairs:
              L_i2t is L1; L_t2i contrasts g(p_{y_i}) against the batch's images
              with x_i as the positive (other images of class y_i, which would be
              false negatives, are left out of the denominator)
    L_csd   = mean_i max(0, m1 - cos(x_i, p_{y_i}) + cos(x_i^cf, p_{y_i^cf}))
              (the complete counterfactual pair scores below the factual pair;
              samples whose y_i^cf has no prompt in training are left out)
    L_fcd   = mean_i max(0, m2 - cos(x_i, p_{y_i}) + cos(x_i^cf, p_{y_i}))
              (the minimally edited image scores below the factual one under the
              factual text; one counterfactual per image, so it is the hardest)

Objectives that use x_i^cf as an image of its own class y_i^cf (DESIGN §10); V is the
set of pairs whose y_i^cf is a training class (the others are left out, as in L_csd):
    augment:    L1 + lambda * L_cf,  L_cf = -mean_{i in V} log softmax_c(scale * cos(f(x_i^cf), g(p_c)))[y_i^cf]
                (counterfactual augmentation: within a class-flip pair the cue is constant and the
                label changes, so the cue stops predicting the label)
    dicap_sym:  L1 + lambda * (L2 + L2*),
                L2* = -mean_{i in V} log [ e^{scale*t_i^cf} / (e^{scale*t_i^cf} + e^{scale*t_i}) ],
                t_i^cf = cos(g(p_{y_i^cf}), f(x_i^cf)),  t_i = cos(g(p_{y_i^cf}), f(x_i))
                (DiCap's L2 and its mirror: the counterfactual's own class prefers it to the factual)

A cue-flip pair (x_i, y_i) -> (x_i^cf, y_i) keeps the class and changes the cue (DESIGN §10): augment
reads it as a second image of class y_i (L_cf with y_i^cf = y_i), and adds the invariance term over
the set Q of cue-flip pairs (y_i^cf = y_i), mu = tune.invariance:
    L_inv = mean_{i in Q} KL( softmax(scale * l(x_i)) || softmax(scale * l(x_i^cf)) ),  l the class scores
            (the learner's class scores should not move when only the cue moves)
    augment:    L1 + lambda * L_cf + mu * L_inv
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def cosine_logits(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """cos (B, C) of normalized image features (B, D) with text (C, D) or per-image text (B, C, D)."""
    if text.dim() == 2:
        return image @ text.t()
    return torch.einsum("bd,bcd->bc", image, text)


def dicap_loss(cos: torch.Tensor, y: torch.Tensor, s_pos: torch.Tensor, s_neg: torch.Tensor | None,
               scale: float, lam: float) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + lam * L2. cos (B, C); s_pos, s_neg (B,): cos of the true-class prompt with x_i and x_i^cf.

    s_neg may be None when lam == 0 (the baseline need not encode counterfactual prompts).
    """
    l1 = F.cross_entropy(scale * cos, y)
    if s_neg is None:
        if lam != 0:
            raise ValueError("dicap_loss: lam != 0 needs s_neg")
        return l1, {"l1": l1.item()}
    pair = scale * torch.stack([s_pos, s_neg], dim=1)
    l2 = F.cross_entropy(pair, torch.zeros_like(y))
    return l1 + lam * l2, {"l1": l1.item(), "l2": l2.item()}


def cfvlm_loss(cos: torch.Tensor, y: torch.Tensor, image: torch.Tensor, text_true: torch.Tensor,
               s_cf_cf: torch.Tensor, s_cf_true: torch.Tensor, cf_valid: torch.Tensor, scale: float,
               alpha: float = 1.0, beta: float = 0.45, gamma: float = 0.55,
               margin_csd: float = 0.2, margin_fcd: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha*L_align + beta*L_csd + gamma*L_fcd.

    cos (B, C) factual images vs class prompts; image (B, D) and text_true (B, D)
    normalized features of x_i and of p_{y_i}; s_cf_cf (B,) cos(x_i^cf, p_{y_i^cf});
    s_cf_true (B,) cos(x_i^cf, p_{y_i}); cf_valid (B,) bool: y_i^cf has a prompt.
    """
    i2t = F.cross_entropy(scale * cos, y)
    sim = scale * text_true @ image.t()  # row i: the prompt of y_i against every image j
    same = y[:, None] == y[None, :]
    eye = torch.eye(len(y), dtype=torch.bool, device=y.device)
    t2i = F.cross_entropy(sim.masked_fill(same & ~eye, float("-inf")), torch.arange(len(y), device=y.device))
    align = 0.5 * (i2t + t2i)
    s_true = cos.gather(1, y[:, None]).squeeze(1)
    hinge_csd = F.relu(margin_csd - s_true + s_cf_cf)
    csd = hinge_csd[cf_valid].mean() if bool(cf_valid.any()) else cos.new_zeros(())
    fcd = F.relu(margin_fcd - s_true + s_cf_true).mean()
    loss = alpha * align + beta * csd + gamma * fcd
    return loss, {"align": align.item(), "csd": csd.item(), "fcd": fcd.item()}


def _valid_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the valid entries; 0 (still in the graph) when there are none."""
    return values[valid].mean() if bool(valid.any()) else values.sum() * 0.0


def invariance_loss(cos: torch.Tensor, cos_cf: torch.Tensor, scale: float) -> torch.Tensor:
    """(B,) KL(softmax(scale * cos) || softmax(scale * cos_cf)) per pair: how far the class scores move."""
    log_p, log_q = F.log_softmax(scale * cos, dim=1), F.log_softmax(scale * cos_cf, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def augment_loss(cos: torch.Tensor, y: torch.Tensor, cos_cf: torch.Tensor, y_cf: torch.Tensor,
                 cf_valid: torch.Tensor, scale: float, lam: float,
                 invariance: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + lam * L_cf (+ invariance * L_inv over the cue flips, y_cf == y). cos (B, C) factual images vs
    class vectors, cos_cf (B, C) the counterfactual images vs the class vectors as they see them; y_cf (B,)
    positions (any value where not cf_valid)."""
    l1 = F.cross_entropy(scale * cos, y)
    ce_cf = F.cross_entropy(scale * cos_cf, y_cf.clamp(min=0), reduction="none")
    l_cf = _valid_mean(ce_cf, cf_valid)
    loss, parts = l1 + lam * l_cf, {"l1": l1.item(), "l_cf": l_cf.item()}
    cue = cf_valid & (y_cf == y)
    if invariance and bool(cue.any()):
        l_inv = _valid_mean(invariance_loss(cos, cos_cf, scale), cue)
        loss, parts["l_inv"] = loss + invariance * l_inv, l_inv.item()
    return loss, parts


def dicap_sym_loss(cos: torch.Tensor, y: torch.Tensor, cos_cf: torch.Tensor, y_cf: torch.Tensor,
                   cf_valid: torch.Tensor, scale: float, lam: float) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + lam * (L2 + L2*); cos, cos_cf, y_cf, cf_valid as `augment_loss`."""
    l1 = F.cross_entropy(scale * cos, y)
    rows = torch.arange(len(y), device=y.device)
    yc = y_cf.clamp(min=0)
    l2 = F.cross_entropy(scale * torch.stack([cos[rows, y], cos_cf[rows, y]], dim=1), torch.zeros_like(y))
    mirror = F.cross_entropy(scale * torch.stack([cos_cf[rows, yc], cos[rows, yc]], dim=1), torch.zeros_like(y),
                             reduction="none")
    l2_star = _valid_mean(mirror, cf_valid)
    return l1 + lam * (l2 + l2_star), {"l1": l1.item(), "l2": l2.item(), "l2_star": l2_star.item()}
