"""CoCoOp (Zhou et al., CVPR 2022): CoOp's unified context plus a per-image token from a small meta-net.

``meta_net = Linear(d, d/16) - ReLU - Linear(d/16, width)`` maps each L2-normalised image feature x to pi(x), which is
added to every context vector: ``v_m(x) = v_m + pi(x)``. Each image therefore has its own K prompts; logits are
``exp(logit_scale) * cos(x, g(t_k(x)))`` over all K classes per image. The meta-net runs in fp32 (autocast off).
Reference defaults: M = 4 from "a photo of a", class name at the end.

With ``fast_text`` (default) each image's shared prefix (SOT and the shifted context) is encoded once and the K class
suffixes attend to it, for all images of the batch at once; ``fast_text=False`` runs the plain 77-token path on all
B x K prompts. Neither loops over images or classes in Python.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.common.vocab import seeded_torch
from vlprompt.backbone.model import CLIP
from vlprompt.backbone.tokenizer import ClipTokenizer, get_tokenizer
from vlprompt.errors import ConfigError
from vlprompt.methods.base import FrozenClipMethod, cosine_logits, logit_scale_of
from vlprompt.methods.configs import CoCoOpConfig
from vlprompt.methods.coop import encode_context
from vlprompt.methods.prompt_layout import initial_context, prepare_prompts

__all__ = ["CoCoOp", "CoCoOpConfig", "build_cocoop"]

EVAL_PROMPT_BATCH = 4096
"""Prompts (images x classes) encoded per text-tower call by :meth:`CoCoOp.classifier`."""


class CoCoOp(FrozenClipMethod):
    """CoCoOp prompt learner over K classes; learned state: ``ctx`` [M, width] and ``meta_net``."""

    method_name = "cocoop"

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: CoCoOpConfig | None = None, *,
                 tokenizer: ClipTokenizer | None = None) -> None:
        config = config or CoCoOpConfig()
        if not isinstance(config, CoCoOpConfig):
            raise ConfigError(f"CoCoOp needs a CoCoOpConfig, got {type(config).__name__}")
        super().__init__(clip, classnames, config)
        self._tokenizer = tokenizer or get_tokenizer()
        phrase, n_ctx, self.layout = prepare_prompts(clip, self.classnames, config.ctx_init, config.n_ctx,
                                                     config.class_token_position, self._tokenizer)
        self.n_ctx = n_ctx
        width = clip.config.transformer_width
        feature_dim = clip.config.embed_dim
        hidden = feature_dim // config.meta_net_reduction
        if hidden < 1:
            raise ConfigError(f"meta_net_reduction {config.meta_net_reduction} leaves no hidden units for image "
                              f"features of width {feature_dim}; use a value <= {feature_dim}")
        self.ctx = nn.Parameter(initial_context(clip, phrase, n_ctx, config.ctx_init, (n_ctx, width), self._tokenizer))
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(feature_dim, hidden)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(hidden, width)),
        ])).to(clip.device)

    def _apply_frozen(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.layout = self.layout.apply(fn)

    def image_context(self, image_features: Tensor) -> Tensor:
        """Per-image context [B, M, width] = ctx + meta_net(normalised image feature), in fp32."""
        features = F.normalize(image_features.to(self.ctx.device).float(), dim=-1)
        with torch.autocast(device_type=features.device.type, enabled=False):
            shift = self.meta_net(features)  # [B, width]
        return self.ctx[None] + shift[:, None]

    def text_features(self, image_features: Tensor) -> Tensor:
        """Per-image class text features [B, K, D] (not normalised)."""
        ctx = self.image_context(image_features)
        return encode_context(self.clip, self.layout, ctx[:, None], fast=self.config.fast_text)

    def forward(self, image_features: Tensor) -> Tensor:
        """Logits [B, K] (fp32) of image features [B, D], each image scored against its own prompts."""
        features = image_features.to(self.ctx.device)
        return cosine_logits(features, self.text_features(features), logit_scale_of(self.clip))

    def classifier(self, prompt_batch: int = EVAL_PROMPT_BATCH) -> Callable[[Tensor], Tensor]:
        """Evaluation callable. CoCoOp's text features depend on the image, so they cannot be computed once: the
        callable encodes the prompts of the given images without gradients, ``prompt_batch // K`` images at a time."""
        images_per_call = max(1, prompt_batch // self.num_classes)

        @torch.no_grad()
        def classify(image_features: Tensor) -> Tensor:
            return torch.cat([self(chunk) for chunk in image_features.split(images_per_call)])

        return classify

    def with_classnames(self, classnames: Sequence[str]) -> CoCoOp:
        """The learned context and meta-net on another class list (cross-dataset evaluation)."""
        with seeded_torch(self.clip.device, None):  # the fresh initialisation is overwritten at once
            other = CoCoOp(self.clip, classnames, self.config, tokenizer=self._tokenizer)
        other.load_state_dict(self.state_dict())
        return other


def build_cocoop(clip: CLIP, classnames: Sequence[str], config: CoCoOpConfig | None = None) -> CoCoOp:
    """Registry builder of :class:`CoCoOp`."""
    return CoCoOp(clip, classnames, config)
