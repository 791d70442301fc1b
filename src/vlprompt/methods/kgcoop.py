"""KgCoOp (Yao, Zhang, Xu, CVPR 2023): CoOp plus a knowledge-guided term that keeps every class's learned text feature
close to the feature of its hand-crafted prompt.

Training loss (official ``trainers/kgcoop.py``): ``CE(logits, y) + lambda * (1 - mean_k cos(t_k, c_k))``, where t_k is
the normalised text feature of class k's learned prompt and c_k the normalised feature of its hand-crafted prompt
(``config.template``, computed once at construction and frozen). The paper writes the term as the squared Euclidean
distance of the normalised features, 2 (1 - cos); the official code (and this module) uses 1 - cos with the weight
lambda = 8. Everything else is CoOp's (:mod:`vlprompt.methods.coop`): with lambda = 0 KgCoOp is CoOp.

The term is exposed as :meth:`KgCoOp.regularizer` (read by the training loop after each forward, see "Method
contract" in docs/architecture.md); it uses the text features of the last training forward, so it costs no extra
text encoding. The hand-crafted features are not part of the saved state: they are recomputed from the backbone.
TCP (:mod:`vlprompt.methods.tcp`) trains with the same term: :func:`guided_forward` and :func:`guided_regularizer`
are the forward and regularizer of both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlprompt.backbone.model import CLIP
from vlprompt.backbone.tokenizer import ClipTokenizer
from vlprompt.errors import ConfigError
from vlprompt.methods.base import cosine_logits, logit_scale_of
from vlprompt.methods.configs import KgCoOpConfig
from vlprompt.methods.coop import CoOp
from vlprompt.methods.templates import DEFAULT_TEMPLATE, fill

__all__ = ["KgCoOp", "KgCoOpConfig", "build_kgcoop", "guided_forward", "guided_regularizer", "handcrafted_features",
           "knowledge_term"]


@torch.no_grad()
def handcrafted_features(clip: CLIP, classnames: Sequence[str], template: str, tokenizer: ClipTokenizer) -> Tensor:
    """Normalised fp32 text features [K, D] of the hand-crafted prompts ``template`` filled with each class name."""
    ids = tokenizer([fill(template, name) for name in classnames], context_length=clip.context_length)
    return F.normalize(clip.encode_text(ids.to(clip.device)).float(), dim=-1)


def knowledge_term(text_features: Tensor, handcrafted: Tensor) -> Tensor:
    """``1 - mean_k cos(text_k, handcrafted_k)`` in fp32 (text features need not be normalised)."""
    with torch.autocast(device_type=text_features.device.type, enabled=False):
        cos = F.cosine_similarity(text_features.float(), handcrafted.to(text_features.device), dim=-1, eps=1e-7)
        return 1.0 - cos.mean()


def guided_forward(method: Any, image_features: Tensor) -> Tensor:
    """Cosine logits of ``method.text_features()``; in training mode those text features are kept (as
    ``method._last_text``) for :func:`guided_regularizer`, so the term costs no second text encoding."""
    text = method.text_features()
    method._last_text = text if method.training else None
    return cosine_logits(image_features.to(text.device), text, logit_scale_of(method.clip))


def guided_regularizer(method: Any) -> Tensor:
    """``config.kg_weight * (1 - mean_k cos(t_k, c_k))`` of the text features of ``method``'s last training forward
    against its hand-crafted features ``method.handcrafted``."""
    if method._last_text is None:
        raise RuntimeError(f"{type(method).__name__}.regularizer() needs a forward pass in training mode first")
    text, method._last_text = method._last_text, None
    return method.config.kg_weight * knowledge_term(text, method.handcrafted)


class KgCoOp(CoOp):
    """CoOp with KgCoOp's knowledge-guided loss term; learned state: ``ctx`` only (as CoOp)."""

    method_name = "kgcoop"

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: KgCoOpConfig | None = None, *,
                 tokenizer: ClipTokenizer | None = None, ctx: Tensor | None = None) -> None:
        config = config or KgCoOpConfig()
        if not isinstance(config, KgCoOpConfig):
            raise ConfigError(f"KgCoOp needs a KgCoOpConfig, got {type(config).__name__}")
        super().__init__(clip, classnames, config, tokenizer=tokenizer, ctx=ctx)
        self.handcrafted = handcrafted_features(clip, self.classnames, config.template or DEFAULT_TEMPLATE,
                                                self._tokenizer)
        self._last_text: Tensor | None = None

    def _apply_frozen(self, fn: Callable[[Tensor], Tensor]) -> None:
        super()._apply_frozen(fn)
        self.handcrafted = fn(self.handcrafted).float()

    def forward(self, image_features: Tensor) -> Tensor:
        return guided_forward(self, image_features)

    def regularizer(self) -> Tensor:
        """``kg_weight * (1 - mean_k cos(t_k, c_k))`` of the text features of the last training forward."""
        return guided_regularizer(self)

    def with_classnames(self, classnames: Sequence[str]) -> KgCoOp:
        """The learned unified context on another class list (CSC contexts cannot move: ConfigError)."""
        if self.config.csc and list(classnames) != self.classnames:
            raise ConfigError("a class-specific (CSC) KgCoOp context belongs to the classes it was trained on; train "
                              "with a unified context (csc=False) for other class lists")
        return KgCoOp(self.clip, classnames, self.config, tokenizer=self._tokenizer, ctx=self.ctx.detach())


def build_kgcoop(clip: CLIP, classnames: Sequence[str], config: KgCoOpConfig | None = None) -> KgCoOp:
    """Registry builder of :class:`KgCoOp`."""
    return KgCoOp(clip, classnames, config)
