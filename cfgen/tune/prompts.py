"""Prompt learners: CoOp (shared context) and CoCoOp (context shifted by the image).

The prompt of class c is `[BOS] [ctx_1 .. ctx_n] <name of c> . [EOS]` in the
frozen text encoder's token-embedding space (the class token at the end, as
CoOp's default). The context starts from the token embeddings of a phrase
("a photo of a": then the prompt is exactly that caption) or from
N(0, 0.02) (CoOp's random init). CoCoOp adds a meta-net
`Linear(d, d/16) -> ReLU -> Linear(d/16, ctx_dim)` of the image feature whose
output is added to every context vector, so each image gets its own prompts.
Only `ctx` (and the meta-net) are parameters; the VLM is frozen.

    learner = PromptLearner(vlm, ["zero", "one"], n_ctx=4, ctx_init="a photo of a")
    text = learner.class_features()                 # CoOp: (C, D)
    text = learner.class_features(image_features)   # CoCoOp: (B, C, D)
"""

from __future__ import annotations

import torch
from torch import nn

from cfgen.config import ConfigError
from cfgen.tune.backends import VLM


class PromptLearner(nn.Module):
    def __init__(self, vlm: VLM, class_names: list[str], n_ctx: int = 4, ctx_init: str = "a photo of a",
                 conditional: bool = False, generator: torch.Generator | None = None, class_specific: bool = False):
        """`class_specific` (CoOp's CSC): one context per class, each started from the same init, so a class's
        prompt can move on its own; classes never trained (novel ones) keep the init."""
        super().__init__()
        if class_specific and conditional:
            raise ConfigError("a class-specific context (coop_csc) has no CoCoOp variant")
        object.__setattr__(self, "vlm", vlm)  # frozen, and not part of this module's parameters
        self.class_names = list(class_names)
        device = vlm.device
        if ctx_init:
            ids = vlm.phrase_ids(ctx_init)
            if len(ids) != n_ctx:
                raise ConfigError(f"tune.ctx_init {ctx_init!r} is {len(ids)} tokens for this text encoder "
                                  f"but tune.n_ctx = {n_ctx}; make them agree")
            with torch.no_grad():
                ctx = vlm.token_embeddings(torch.tensor(ids, device=device)).clone()
        else:
            ctx = torch.empty(n_ctx, vlm.ctx_dim, device=device).normal_(0.0, 0.02, generator=generator)
        self.class_specific = class_specific
        if class_specific:
            if ctx_init:
                ctx = ctx[None].repeat(len(self.class_names), 1, 1)
            else:
                ctx = torch.empty(len(self.class_names), n_ctx, vlm.ctx_dim, device=device).normal_(
                    0.0, 0.02, generator=generator)
        self.ctx = nn.Parameter(ctx)
        self.tokens = vlm.prompt_tokens(self.class_names, n_ctx)
        with torch.no_grad():  # frozen embeddings of [BOS] and of '<name> . [EOS] pad..'
            emb = vlm.token_embeddings(self.tokens.ids.to(device))
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", emb[:, 1 + n_ctx:].clone(), persistent=False)
        self.conditional = conditional
        self.meta_net = None
        if conditional:
            d = vlm.embed_dim
            self.meta_net = nn.Sequential(nn.Linear(d, d // 16), nn.ReLU(inplace=True), nn.Linear(d // 16, vlm.ctx_dim))
            if generator is not None:  # seeded init, independent of the global RNG
                for layer in (self.meta_net[0], self.meta_net[2]):
                    bound = 1.0 / layer.in_features ** 0.5
                    with torch.no_grad():
                        layer.weight.uniform_(-bound, bound, generator=generator)
                        layer.bias.uniform_(-bound, bound, generator=generator)
            self.meta_net.to(device)

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[-2]

    def _ctx_for(self, classes: torch.Tensor) -> torch.Tensor:
        """(P, n_ctx, dim): the context of each prompt of `classes` (shared, or the class's own)."""
        if self.class_specific:
            return self.ctx[classes]
        return self.ctx[None].expand(classes.shape[0], -1, -1)

    def _encode(self, ctx: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Text features for prompts `classes` (P,) with context ctx (P, n_ctx, dim)."""
        return encode_prompts([self], [(ctx, classes)])[0]

    def _shifted(self, image_features: torch.Tensor) -> torch.Tensor:
        """CoCoOp's per-image context (B, n_ctx, dim): ctx + meta_net(normalized image feature)."""
        f = image_features / image_features.norm(dim=-1, keepdim=True)
        return self.ctx[None] + self.meta_net(f)[:, None, :]

    def class_prompts(self, image_features: torch.Tensor | None = None,
                      classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ctx (P, n_ctx, dim), classes (P,)) of the prompts `class_features` encodes: the C classes
        (CoOp, P = C), or every class for every image, image-major (CoCoOp, P = B * C)."""
        if classes is None:
            classes = torch.arange(len(self.class_names))
        classes = classes.to(self.prefix.device)
        c = classes.shape[0]
        if not self.conditional:
            return self._ctx_for(classes), classes
        ctx = self._shifted(image_features)  # (B, n, dim)
        b = ctx.shape[0]
        return ctx[:, None].expand(b, c, -1, -1).reshape(b * c, self.n_ctx, -1), classes.repeat(b)

    def paired_prompts(self, image_features: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ctx, classes) of the prompt of classes[i] as image i sees it (CoCoOp: conditioned on image i)."""
        classes = classes.to(self.prefix.device)
        if not self.conditional:
            return self._ctx_for(classes), classes
        return self._shifted(image_features), classes

    def class_features(self, image_features: torch.Tensor | None = None,
                       classes: torch.Tensor | None = None) -> torch.Tensor:
        """Text features of every class in `classes` (default all): (C, D) for CoOp, (B, C, D) for CoCoOp."""
        ctx, cls = self.class_prompts(image_features, classes)
        feats = self._encode(ctx, cls)
        if not self.conditional:
            return feats
        c = len(self.class_names) if classes is None else classes.shape[0]
        return feats.view(-1, c, feats.shape[-1])

    def paired_features(self, image_features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(B, D): the prompt of classes[i] as image i sees it (CoCoOp conditions it on image i)."""
        classes = classes.to(self.prefix.device)
        if not self.conditional:  # one prompt per distinct class, gathered
            uniq, inverse = classes.unique(return_inverse=True)
            return self._encode(self._ctx_for(uniq), uniq)[inverse]
        return self._encode(*self.paired_prompts(image_features, classes))

    def image_features(self, f: torch.Tensor) -> torch.Tensor:
        """A prompt leaves the image feature as it is (the image-side learners of heads.py do not)."""
        return f

    def prompt_state(self) -> dict[str, torch.Tensor]:
        """The learned tensors (ctx, and the meta-net's weights for CoCoOp), for safetensors."""
        state = {"ctx": self.ctx.detach().cpu().contiguous()}
        if self.meta_net is not None:
            state.update({f"meta_net.{k}": v.detach().cpu().contiguous() for k, v in self.meta_net.state_dict().items()})
        return state


def encode_prompts(learners: list[PromptLearner], requests: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Text features of several prompt batches in ONE pass of the frozen text encoder.

    requests: (ctx (P, n_ctx, dim), classes (P,)) pairs, e.g. from `class_prompts` /
    `paired_prompts` of learners that share the VLM and class names (every row of a
    learner trained in lockstep). Returns the (P, D) features of each request, in order.
    Many tiny encoder calls cost mostly per-call overhead on a CPU; one call of all of
    them does not, and each learner's gradients still come from its own prompts only.
    """
    first = learners[0]
    cls = torch.cat([c.to(first.prefix.device) for _, c in requests])
    embeds = torch.cat([torch.cat([first.prefix[c], ctx, first.suffix[c]], dim=1)
                        for (ctx, _), c in zip(requests, cls.split([len(c) for _, c in requests]))])
    feats = first.vlm.encode_prompt_embeds(embeds, first.tokens.select(cls.cpu()))
    return list(feats.split([len(c) for _, c in requests]))
