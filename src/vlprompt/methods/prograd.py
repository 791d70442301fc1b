"""ProGrad (Zhu, Niu, Han, Wu, Zhang, ICCV 2023): CoOp whose cross-entropy gradient is projected so that it never
conflicts with the "general knowledge" direction, the gradient of the KL divergence to zero-shot CLIP's prediction.

Per training step (official ``Dassl.ProGrad.pytorch`` ``prograd_backward_and_update``), for every learned tensor:

- ``g`` = gradient of the batch-mean cross-entropy, ``g_kl`` = gradient of the batch-mean
  ``KL(softmax(zs / T) || softmax(logits / T)) * T^2`` (zs: zero-shot logits of the same images with the teacher
  template, computed from the cached image features and text features encoded once);
- if ``g . g_kl < 0``: ``g <- g - lambda (g . u) u`` with ``u = g_kl / |g_kl|``; otherwise ``g`` is used as is;
- the optimiser steps on ``g`` (the KL gradient itself is never added).

The training loop asks the method for the KL term (:meth:`ProGrad.guide_loss`) and hands both gradients to
:meth:`ProGrad.align_gradients` (see "Method contract" in docs/architecture.md). The official code writes the KL as
the soft cross-entropy ``-sum p_zs log softmax(logits / T)``, which differs from the KL by the teacher's entropy, a
constant: the gradients are the same.

Initialisation (official CTX_INIT=True): the last m of the M = 16 context vectors are the word embeddings of the
teacher template's words before the class name (e.g. "a photo of a"), the first M - m are zeros.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vlprompt.backbone.model import CLIP
from vlprompt.backbone.tokenizer import ClipTokenizer, get_tokenizer
from vlprompt.errors import ConfigError
from vlprompt.methods.base import cosine_logits, logit_scale_of
from vlprompt.methods.configs import ProGradConfig
from vlprompt.methods.coop import CoOp
from vlprompt.methods.kgcoop import handcrafted_features
from vlprompt.methods.prompt_layout import INIT_STD, context_phrase, phrase_embeddings
from vlprompt.methods.templates import DEFAULT_TEMPLATE, PLACEHOLDER

__all__ = ["ProGrad", "ProGradConfig", "build_prograd", "project_conflicting", "template_phrase"]


def template_phrase(template: str) -> str:
    """The words before the class name of a template of the form ``"<words> {}."`` (else ``""``)."""
    head, _, tail = template.partition(PLACEHOLDER)
    return head.strip() if tail.strip() in ("", ".") else ""


def project_conflicting(grad: Tensor, guide: Tensor, lam: float) -> Tensor:
    """ProGrad's rule for one tensor: ``grad - lam (grad . u) u`` (u = guide / |guide|) when ``grad . guide < 0``,
    else ``grad`` itself (also when either is zero). Computed in fp32; the result has ``grad``'s dtype."""
    g, h = grad.float().flatten(), guide.float().flatten()
    dot = torch.dot(g, h)
    norm = torch.linalg.vector_norm(h)
    if not bool(dot < 0) or not bool(norm > 0):
        return grad
    unit = h / norm
    return (g - lam * torch.dot(g, unit) * unit).view_as(grad).to(grad.dtype)


class ProGrad(CoOp):
    """CoOp prompt learner trained with ProGrad's aligned gradient; learned state: ``ctx`` only."""

    method_name = "prograd"

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: ProGradConfig | None = None, *,
                 tokenizer: ClipTokenizer | None = None, ctx: Tensor | None = None) -> None:
        config = config or ProGradConfig()
        if not isinstance(config, ProGradConfig):
            raise ConfigError(f"ProGrad needs a ProGradConfig, got {type(config).__name__}")
        tokenizer = tokenizer or get_tokenizer()
        template = config.template or DEFAULT_TEMPLATE
        width = clip.config.transformer_width
        names = list(classnames)
        shape = (len(names), config.n_ctx, width) if config.csc else (config.n_ctx, width)
        if ctx is None:
            ctx = _initial_context(clip, config, template, shape, tokenizer)
        # the layout of M placeholder slots: the context is ours, CoOp must not derive M from a phrase
        super().__init__(clip, names, _layout_config(config), tokenizer=tokenizer, ctx=ctx)
        self.config = config
        self.teacher = handcrafted_features(clip, self.classnames, template, self._tokenizer)

    def _apply_frozen(self, fn: Callable[[Tensor], Tensor]) -> None:
        super()._apply_frozen(fn)
        self.teacher = fn(self.teacher).float()

    def zero_shot_logits(self, image_features: Tensor) -> Tensor:
        """Zero-shot CLIP's logits [B, K] with the teacher template (fp32, no gradient)."""
        with torch.no_grad():
            return cosine_logits(image_features.to(self.teacher.device), self.teacher, logit_scale_of(self.clip))

    def guide_loss(self, image_features: Tensor, logits: Tensor) -> Tensor:
        """Sum over the batch of ``KL(softmax(zs / T) || softmax(logits / T)) * T^2`` (fp32)."""
        temperature = self.config.temperature
        with torch.autocast(device_type=logits.device.type, enabled=False):
            teacher = F.log_softmax(self.zero_shot_logits(image_features) / temperature, dim=-1)
            student = F.log_softmax(logits.float() / temperature, dim=-1)
            kl = F.kl_div(student, teacher, log_target=True, reduction="sum")
        return kl * temperature**2

    def align_gradients(self, grads: list[Tensor], guides: list[Tensor]) -> list[Tensor]:
        """ProGrad's projection (:func:`project_conflicting`) of each cross-entropy gradient against its KL gradient."""
        lam = self.config.prograd_lambda
        return [project_conflicting(g, h, lam) for g, h in zip(grads, guides, strict=True)]

    def with_classnames(self, classnames: Sequence[str]) -> ProGrad:
        """The learned unified context on another class list (CSC contexts cannot move: ConfigError)."""
        if self.config.csc and list(classnames) != self.classnames:
            raise ConfigError("a class-specific (CSC) ProGrad context belongs to the classes it was trained on; train "
                              "with a unified context (csc=False) for other class lists")
        return ProGrad(self.clip, classnames, self.config, tokenizer=self._tokenizer, ctx=self.ctx.detach())


def _layout_config(config: ProGradConfig) -> ProGradConfig:
    return dataclasses.replace(config, ctx_init="")


def _initial_context(clip: CLIP, config: ProGradConfig, template: str, shape: tuple[int, ...],
                     tokenizer: ClipTokenizer) -> Tensor:
    """Zeros with the phrase's word embeddings in the last slots (official CTX_INIT=True), or N(0, 0.02^2)."""
    phrase = config.ctx_init.replace("_", " ").strip() or template_phrase(template)
    if not phrase:
        return torch.empty(shape, device=clip.device).normal_(0.0, INIT_STD)
    phrase, count = context_phrase(phrase, config.n_ctx, tokenizer)
    if count > config.n_ctx:
        raise ConfigError(f"the initial phrase {phrase!r} has {count} tokens, more than the {config.n_ctx} context "
                          "vectors: raise n_ctx or give a shorter ctx_init")
    ctx = torch.zeros(shape[-2:], device=clip.device)
    ctx[config.n_ctx - count :] = phrase_embeddings(clip, phrase, count, tokenizer)
    return ctx.expand(shape).clone()


def build_prograd(clip: CLIP, classnames: Sequence[str], config: ProGradConfig | None = None) -> ProGrad:
    """Registry builder of :class:`ProGrad`."""
    return ProGrad(clip, classnames, config)
