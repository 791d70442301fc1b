"""PromptSRC (Khattak et al., ICCV 2023): IVLP's deep prompts, self-regulated towards the frozen CLIP.

Defaults: the official ``configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml`` (base-to-novel): 4 text + 4
vision tokens from "a photo of a", depth 9 in both towers, loss weights 25 (text) and 10 (image), Gaussian prompt
aggregation with mean 15 and sigma 1 over the 20 epochs. The prompts are IVLP's (:class:`~vlprompt.methods.ivlp.
IndependentPrompts`). Training adds to the cross-entropy (``trainers/promptsrc.py``):

- ``text_loss_weight * L1(normalised prompted class text features, normalised frozen ones)``, the frozen ones being
  the mean over the 60 ImageNet templates of the frozen text tower's (un-normalised) features ("textual diversity");
- ``image_loss_weight * L1(normalised prompted image features, normalised frozen image features of the same
  augmented images)``;
- ``logit_loss_weight * sum KL(p_frozen || p_prompted) / (B * K)`` with p = softmax of the logits (temperature 1),
  the frozen logits being CLIP's scale times frozen image features against the frozen text targets;

L1 is the mean over all entries. Gaussian prompt aggregation (GPA): after epoch e (1-based) of E the aggregate gains
``w_e * parameters`` with ``w_e`` the normal density N(e; gpa_mean, gpa_std^2) normalised over 1..E; after the last
epoch the parameters become the aggregate. The aggregate is a buffer of the method, so checkpoints (and resume)
carry it. With the three weights at 0 and ``gpa`` off, PromptSRC takes IVLP's steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vlprompt.backbone.model import CLIP
from vlprompt.backbone.tokenizer import ClipTokenizer
from vlprompt.errors import ConfigError
from vlprompt.methods.recipe import RecipeContext
from vlprompt.methods.base import TrainOutput, cosine_logits, logit_scale_of
from vlprompt.methods.configs import PromptSRCConfig
from vlprompt.methods.deep_prompt import DeepPromptLearner, DeepPrompts, gaussian_epoch_weights
from vlprompt.methods.ivlp import IndependentPrompts
from vlprompt.methods.templates import template_set

__all__ = ["PromptSRC", "PromptSRCConfig", "build_promptsrc", "frozen_text_targets", "self_regulation"]

TEXT_TARGET_CHUNK = 1024
"""Prompts per frozen text-tower call when computing the text targets."""


@torch.no_grad()
def frozen_text_targets(clip: CLIP, classnames: Sequence[str], templates: Sequence[str],
                        tokenizer: ClipTokenizer) -> Tensor:
    """Normalised [K, D] (fp32): per class, the mean over ``templates`` of the frozen text features (not normalised)."""
    total = None
    with torch.autocast(device_type=clip.device.type, enabled=False):
        for template in templates:
            ids = tokenizer([template.replace("{}", name) for name in classnames], context_length=clip.context_length)
            ids = ids.to(clip.device)
            parts = []
            for start in range(0, ids.shape[0], TEXT_TARGET_CHUNK):
                chunk = ids[start:start + TEXT_TARGET_CHUNK]
                eot = chunk.argmax(dim=-1)
                parts.append(clip.encode_text_embeddings(clip.token_embedding(chunk[:, : int(eot.max()) + 1]),
                                                         eot).float())
            features = torch.cat(parts)
            total = features if total is None else total + features
    assert total is not None
    return F.normalize(total / len(templates), dim=-1)


def self_regulation(logits: Tensor, text: Tensor, image: Tensor, frozen_logits: Tensor, frozen_text: Tensor,
                    frozen_image: Tensor, *, text_weight: float, image_weight: float, logit_weight: float) -> Tensor:
    """PromptSRC's three terms (fp32), a mean over the batch: weighted L1 of the normalised text features [K, D] and
    image features [B, D] to the frozen (normalised) ones, and the KL of the prompted logits [B, K] from the
    frozen ones, summed and divided by B * K."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        text_term = F.l1_loss(F.normalize(text.float(), dim=-1), frozen_text.float())
        image_term = F.l1_loss(F.normalize(image.float(), dim=-1), frozen_image.float())
        kl = F.kl_div(F.log_softmax(logits.float(), dim=1), F.log_softmax(frozen_logits.float(), dim=1),
                      reduction="sum", log_target=True) / logits.numel()
        return text_weight * text_term + image_weight * image_term + logit_weight * kl


class PromptSRC(DeepPromptLearner):
    """PromptSRC over K classes: in training mode ``self(images)`` returns :class:`TrainOutput` (logits and the
    self-regulation term); in eval mode the logits."""

    method_name = "promptsrc"

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: PromptSRCConfig | None = None, *,
                 tokenizer: ClipTokenizer | None = None) -> None:
        config = config or PromptSRCConfig()
        if not isinstance(config, PromptSRCConfig):
            raise ConfigError(f"PromptSRC needs a PromptSRCConfig, got {type(config).__name__}")
        # fields left to the recipe (None) and not filled from a run's setting (RunConfig, api.build_method): few-shot's
        config = config.for_recipe(RecipeContext())
        super().__init__(clip, classnames, config, n_ctx=config.n_ctx_text, ctx_init=config.ctx_init,
                         tokenizer=tokenizer)
        self.deep = IndependentPrompts.of(clip, config, "PromptSRC")
        for index, param in enumerate(self.parameters()):  # the running aggregate of each learned tensor
            self.register_buffer(f"gpa_{index}", torch.zeros_like(param))
        self._targets: Tensor | None = None  # frozen text targets, computed on the first training step

    def _apply_frozen(self, fn: Callable[[Tensor], Tensor]) -> None:
        super()._apply_frozen(fn)
        if self._targets is not None:
            self._targets = fn(self._targets)

    def prompts(self) -> DeepPrompts:
        return self.deep.prompts()

    def text_targets(self) -> Tensor:
        """The frozen text targets [K, D] (normalised, fp32), computed once."""
        if self._targets is None:
            templates = template_set(self.config.text_templates)
            self._targets = frozen_text_targets(self.clip, self.classnames, templates, self._tokenizer)
        return self._targets

    def forward(self, images: Tensor) -> Tensor | TrainOutput:
        prompts = self.prompts()
        text = self.text_features(prompts)
        images = images.to(text.device)
        image = self.image_features(images, prompts)
        scale = logit_scale_of(self.clip)
        logits = cosine_logits(image, text, scale)
        if not self.training:
            return logits
        targets = self.text_targets()
        with torch.no_grad():
            frozen_image = F.normalize(self.clip.encode_image(images).float(), dim=-1)
            frozen_logits = cosine_logits(frozen_image, targets, scale)
        config = self.config
        regularizer = self_regulation(logits, text, image, frozen_logits, targets, frozen_image,
                                      text_weight=config.text_loss_weight, image_weight=config.image_loss_weight,
                                      logit_weight=config.logit_loss_weight)
        return TrainOutput(logits, regularizer)

    def _aggregates(self) -> list[tuple[Tensor, Tensor]]:
        """(learned tensor, its running aggregate) pairs, in ``parameters()`` order."""
        return [(param, getattr(self, f"gpa_{index}")) for index, param in enumerate(self.parameters())]

    @torch.no_grad()
    def finish_epoch(self, epoch: int, epochs: int) -> None:
        """Gaussian prompt aggregation after (0-based) ``epoch`` of ``epochs``; the last one installs the aggregate."""
        if not self.config.gpa:
            return
        weight = gaussian_epoch_weights(epochs, self.config.gpa_mean, self.config.gpa_std)[epoch]
        pairs = self._aggregates()
        for param, total in pairs:
            total.copy_(total + weight * param)
        if epoch + 1 == epochs:
            for param, total in pairs:
                param.copy_(total)


def build_promptsrc(clip: CLIP, classnames: Sequence[str], config: PromptSRCConfig | None = None) -> PromptSRC:
    """Registry builder of :class:`PromptSRC`."""
    return PromptSRC(clip, classnames, config)
