"""CLIP-Adapter (Gao et al., IJCV 2023): a residual bottleneck MLP on the frozen CLIP features.

The adapter is ``Linear(D, D / r, no bias) - ReLU - Linear(D / r, D, no bias) - ReLU`` (r = ``reduction``, 4) and the
adapted feature is ``ratio * A(x) + (1 - ratio) * x`` (``ratio`` 0.2), as the official ``clip_adapter.py``. The
visual branch (the paper's default and the only one in the official code) adapts the raw image feature before it is
normalised; the text branch adapts the class text features of the frozen zero-shot classifier (normalised, computed
once per class list from the hand-crafted templates); ``both`` does both. Logits are
``exp(logit_scale) * cos(adapted image, adapted text)``; with ``ratio`` 0 they are zero-shot CLIP's.

The adapter acts on features, not on classes, so the learned state moves to any class list (base-to-novel, another
dataset): the new classes get their own zero-shot text features, built with the run's templates.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from vlprompt.backbone.model import CLIP
from vlprompt.common.vocab import seeded_torch
from vlprompt.errors import ConfigError
from vlprompt.methods.base import FrozenClipMethod, cosine_logits, logit_scale_of
from vlprompt.methods.configs import CLIPAdapterConfig
from vlprompt.methods.templates import DEFAULT_TEMPLATE
from vlprompt.methods.zeroshot import class_text_features

__all__ = ["CLIPAdapter", "CLIPAdapterConfig", "blend", "bottleneck", "build_clip_adapter"]


def bottleneck(width: int, reduction: int, device: torch.device | None = None) -> nn.Sequential:
    """The official adapter: two bias-free linear layers through a ``width // reduction`` bottleneck, each followed
    by a ReLU (PyTorch's default initialisation, drawn from the caller's RNG)."""
    hidden = width // reduction
    if hidden < 1:
        raise ConfigError(f"reduction {reduction} leaves no bottleneck for features of width {width}")
    return nn.Sequential(nn.Linear(width, hidden, bias=False, device=device), nn.ReLU(),
                         nn.Linear(hidden, width, bias=False, device=device), nn.ReLU())


def blend(adapter: nn.Module, x: Tensor, ratio: float) -> Tensor:
    """``ratio * adapter(x) + (1 - ratio) * x``: CLIP-Adapter's residual feature blending."""
    return ratio * adapter(x) + (1.0 - ratio) * x


class CLIPAdapter(FrozenClipMethod):
    """CLIP-Adapter over K classes; learned state: ``visual`` and/or ``text`` adapters."""

    method_name = "clip_adapter"

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: CLIPAdapterConfig | None = None) -> None:
        config = config or CLIPAdapterConfig()
        if not isinstance(config, CLIPAdapterConfig):
            raise ConfigError(f"CLIP-Adapter needs a CLIPAdapterConfig, got {type(config).__name__}")
        super().__init__(clip, classnames, config)
        self.templates: tuple[str, ...] = config.templates or (DEFAULT_TEMPLATE,)
        width = clip.config.embed_dim
        if config.branch in ("visual", "both"):
            self.visual = bottleneck(width, config.reduction, clip.device)
        if config.branch in ("text", "both"):
            self.text = bottleneck(width, config.reduction, clip.device)
        self._text: Tensor | None = None

    def _apply_frozen(self, fn: Callable[[Tensor], Tensor]) -> None:
        self._text = None  # recomputed on the new device

    def zero_shot_features(self) -> Tensor:
        """The frozen zero-shot class features [K, D] (normalised, fp32), computed once per device."""
        if self._text is None or self._text.device != self.clip.device:
            self._text = class_text_features(self.clip, self.classnames, self.templates)
        return self._text

    def _adapted(self, image_features: Tensor) -> tuple[Tensor, Tensor]:
        x = image_features.to(self.clip.device).float()
        text = self.zero_shot_features()
        ratio = self.config.ratio
        if hasattr(self, "visual"):
            x = blend(self.visual, x, ratio)
        if hasattr(self, "text"):
            text = blend(self.text, text, ratio)
        return x, text

    def forward(self, image_features: Tensor) -> Tensor:
        """Logits [B, K] (fp32) of raw image features [B, D]."""
        x, text = self._adapted(image_features)
        return cosine_logits(x, text, logit_scale_of(self.clip))

    @torch.no_grad()
    def classifier(self) -> Callable[[Tensor], Tensor]:
        """A frozen copy: the adapted text features once, the visual adapter applied per batch."""
        visual = copy.deepcopy(self.visual).eval() if hasattr(self, "visual") else None
        text = self.zero_shot_features()
        if hasattr(self, "text"):
            text = blend(self.text, text, self.config.ratio)
        text, scale, ratio = text.detach().clone(), logit_scale_of(self.clip), self.config.ratio

        @torch.no_grad()
        def classify(image_features: Tensor) -> Tensor:
            x = image_features.to(text.device).float()
            if visual is not None:
                x = blend(visual, x, ratio)
            return cosine_logits(x, text, scale.to(text.device))

        return classify

    def with_classnames(self, classnames: Sequence[str]) -> CLIPAdapter:
        """The same adapters on another class list (its zero-shot text features from the run's templates)."""
        with seeded_torch(self.clip.device, None):  # the fresh initialisation is overwritten at once
            other = CLIPAdapter(self.clip, classnames, self.config)
        other.load_state_dict(self.state_dict())
        return other


def build_clip_adapter(clip: CLIP, classnames: Sequence[str], config: CLIPAdapterConfig | None = None) -> CLIPAdapter:
    """Registry builder of :class:`CLIPAdapter`."""
    return CLIPAdapter(clip, classnames, config)
