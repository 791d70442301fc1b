"""Zero-shot CLIP (one hand-crafted template) and prompt ensembling (mean of normalised features over templates).

Nothing is learned: the text features of every class are computed once (:meth:`TemplateClassifier.text_features`)
and image features are scored by ``exp(logit_scale) * cos(image, text)`` as in CLIP and the reference.
Ensembling follows the reference: each template's class features are L2-normalised, averaged over templates, and the
mean is normalised again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vlprompt.backbone.extension import TowerExtension
from vlprompt.backbone.fast_text import encode_trimmed
from vlprompt.backbone.model import CLIP
from vlprompt.backbone.tokenizer import ClipTokenizer, get_tokenizer
from vlprompt.methods.base import CosineClassifier, FrozenClipMethod, cosine_logits, logit_scale_of
from vlprompt.methods.configs import EnsembleConfig, ZeroShotConfig
from vlprompt.methods.templates import DEFAULT_TEMPLATE, check_templates, fill, template_set

__all__ = [
    "Ensemble", "EnsembleConfig", "TemplateClassifier", "ZeroShot", "ZeroShotConfig", "build_ensemble",
    "build_zeroshot", "class_text_features", "encode_prompts", "encode_token_ids", "ensemble_templates",
    "tokenize_prompts",
]

PROMPT_BATCH = 1024
"""Prompts encoded per text-tower call when building a classifier (bounds memory for 80 templates x 1000 classes)."""


def tokenize_prompts(texts: Sequence[str], context_length: int, tokenizer: ClipTokenizer | None = None) -> Tensor:
    """Token ids [N, L] of prompts, cut after the longest one's EOT (exact: later positions are never read).

    A prompt longer than the context raises :class:`~vlprompt.errors.ConfigError`.
    """
    ids = (tokenizer or get_tokenizer())(list(texts), context_length=context_length)
    return ids[:, : int(ids.argmax(dim=-1).max()) + 1].clone()


@torch.no_grad()
def encode_token_ids(clip: CLIP, ids: Tensor, batch_size: int = PROMPT_BATCH, *, normalize: bool = True,
                     extension: TowerExtension | None = None) -> Tensor:
    """L2-normalised (``normalize``, else raw) fp32 text features [N, D] of token ids [N, L], on the CLIP's device
    (batches trimmed); ``extension``: the text tower's (CLIP-LoRA's low-rank updates)."""
    chunks = []
    for start in range(0, ids.shape[0], batch_size):
        chunk = ids[start : start + batch_size].to(clip.device)
        chunks.append(encode_trimmed(clip, clip.token_embedding(chunk), chunk.argmax(dim=-1), extension).float())
    features = torch.cat(chunks)
    return F.normalize(features, dim=-1) if normalize else features


@torch.no_grad()
def class_text_features(clip: CLIP, classnames: Sequence[str], templates: Sequence[str], *,
                        tokenizer: ClipTokenizer | None = None, raw: bool = False,
                        extension: TowerExtension | None = None) -> Tensor:
    """The zero-shot classifier's class features [K, D] (fp32, CLIP's device) from ``templates``: each template's
    normalised features averaged and normalised again (:class:`TemplateClassifier`'s; one template = zero-shot
    CLIP's), or with ``raw`` the mean of the unnormalised features (CLAP's prototypes). ``extension``: the text
    tower's (CLIP-LoRA's classifier is zero-shot CLIP's through its adapted tower)."""
    templates = check_templates(templates)
    texts = [fill(template, name) for template in templates for name in classnames]
    ids = tokenize_prompts(texts, clip.context_length, tokenizer)
    features = encode_token_ids(clip, ids, normalize=not raw, extension=extension)
    features = features.view(len(templates), len(classnames), -1).mean(dim=0)
    return features if raw else F.normalize(features, dim=-1)


def encode_prompts(clip: CLIP, texts: Sequence[str], tokenizer: ClipTokenizer | None = None,
                   batch_size: int = PROMPT_BATCH) -> Tensor:
    """L2-normalised fp32 text features [N, D] of prompts, on the CLIP's device."""
    return encode_token_ids(clip, tokenize_prompts(texts, clip.context_length, tokenizer), batch_size)


def ensemble_templates(config: EnsembleConfig) -> tuple[str, ...]:
    """The templates an ensemble uses: the user's own, else the named set plus the dataset's template (if set)."""
    if config.templates:
        return check_templates(config.templates)
    templates = template_set(config.template_set)
    if config.template:
        templates = (*templates, config.template)
    return check_templates(templates)


class TemplateClassifier(FrozenClipMethod):
    """Classify by the (mean, normalised) text features of one or more templates filled with each class name."""

    method_name = "template"

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: ZeroShotConfig | EnsembleConfig,
                 templates: Sequence[str], *, tokenizer: ClipTokenizer | None = None) -> None:
        super().__init__(clip, classnames, config)
        self.templates: tuple[str, ...] = check_templates(templates)
        self._tokenizer = tokenizer
        texts = [prompt for per_template in self.prompts() for prompt in per_template]
        self._token_ids = tokenize_prompts(texts, clip.context_length, tokenizer)  # CPU; errors surface here
        self._cache: Tensor | None = None

    def prompts(self) -> list[list[str]]:
        """The prompts, one list of classes per template."""
        return [[fill(template, name) for name in self.classnames] for template in self.templates]

    @torch.no_grad()
    def text_features(self) -> Tensor:
        """Normalised class text features [K, D] (fp32): each template's normalised features, averaged, normalised."""
        features = encode_token_ids(self.clip, self._token_ids)
        features = features.view(len(self.templates), self.num_classes, -1).mean(dim=0)
        return F.normalize(features, dim=-1)

    def _features(self) -> Tensor:
        if self._cache is None or self._cache.device != self.clip.device:
            self._cache = self.text_features()
        return self._cache

    def _apply_frozen(self, fn: Callable[[Tensor], Tensor]) -> None:
        self._cache = None  # recomputed on the new device / dtype

    def forward(self, image_features: Tensor) -> Tensor:
        """Logits [B, K] (fp32) of image features [B, D]; text features are computed on first use and kept."""
        features = self._features()
        return cosine_logits(image_features.to(features.device), features, logit_scale_of(self.clip))

    def classifier(self) -> CosineClassifier:
        return CosineClassifier(self.text_features(), logit_scale_of(self.clip))

    def with_classnames(self, classnames: Sequence[str]) -> TemplateClassifier:
        return type(self)(self.clip, classnames, self.config, tokenizer=self._tokenizer)  # type: ignore[call-arg]


class ZeroShot(TemplateClassifier):
    """Zero-shot CLIP with one template (the dataset's hand-crafted one by default)."""

    method_name = "zeroshot"

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: ZeroShotConfig | None = None, *,
                 tokenizer: ClipTokenizer | None = None) -> None:
        config = config or ZeroShotConfig()
        super().__init__(clip, classnames, config, [config.template or DEFAULT_TEMPLATE], tokenizer=tokenizer)


class Ensemble(TemplateClassifier):
    """Prompt ensembling over a template set (see :func:`ensemble_templates`)."""

    method_name = "ensemble"

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: EnsembleConfig | None = None, *,
                 tokenizer: ClipTokenizer | None = None) -> None:
        config = config or EnsembleConfig()
        super().__init__(clip, classnames, config, ensemble_templates(config), tokenizer=tokenizer)


def build_zeroshot(clip: CLIP, classnames: Sequence[str], config: ZeroShotConfig | None = None) -> ZeroShot:
    """Registry builder of :class:`ZeroShot`."""
    return ZeroShot(clip, classnames, config)


def build_ensemble(clip: CLIP, classnames: Sequence[str], config: EnsembleConfig | None = None) -> Ensemble:
    """Registry builder of :class:`Ensemble`."""
    return Ensemble(clip, classnames, config)
