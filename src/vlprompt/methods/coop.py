"""CoOp (Zhou et al., IJCV 2022): learnable context vectors in the text prompt of a frozen CLIP.

The prompt of class k is ``[SOT] [V]_1 ... [V]_M [CLASS_k] . [EOT]`` (or the middle / front layouts, see
:mod:`vlprompt.methods.prompt_layout`). Only the context ``ctx`` is learned: ``[M, width]`` (unified) or
``[K, M, width]`` (class-specific, CSC). Initialisation: N(0, 0.02^2), or the word embeddings of ``ctx_init`` (then
M = its token count and, untrained, CoOp equals zero-shot CLIP with the template ``"<ctx_init> {}."``). With CSC
and ``ctx_init`` every class starts from the phrase (the reference silently falls back to one unified context there).

The context is kept in fp32 (master weights); the text tower runs in the CLIP's dtype or under the caller's autocast.
With ``fast_text`` (default) a unified context's shared prefix is encoded once per step
(:func:`vlprompt.backbone.fast_text.encode_shared_prefix`); CSC and the front layout share only the start token, so
they use the trimmed path. ``fast_text=False`` runs the plain 77-token path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from vlprompt.backbone.fast_text import encode_full, encode_shared_prefix, encode_trimmed
from vlprompt.backbone.model import CLIP
from vlprompt.backbone.tokenizer import ClipTokenizer, get_tokenizer
from vlprompt.errors import ConfigError
from vlprompt.methods.base import CosineClassifier, FrozenClipMethod, cosine_logits, logit_scale_of
from vlprompt.methods.configs import CoOpConfig
from vlprompt.methods.prompt_layout import PromptLayout, initial_context, prepare_prompts

__all__ = ["CoOp", "CoOpConfig", "build_coop", "encode_context"]


def encode_context(clip: CLIP, layout: PromptLayout, ctx: Tensor, *, fast: bool) -> Tensor:
    """Text features [B, K, D] of the prompts with context ``ctx`` [B, K or 1, M, width] (1 = unified).

    ``fast``: shared-prefix path for a unified context with a prefix beyond the start token, else the trimmed path;
    not ``fast``: the plain 77-token path. All three agree up to floating-point rounding.
    """
    batch, classes = ctx.shape[0], layout.num_classes
    if fast and ctx.shape[1] == 1 and layout.shared_length > 1:
        prefix, suffix = layout.split_shared(ctx[:, 0])
        return encode_shared_prefix(clip, prefix, suffix, layout.eot_index)
    length = layout.trimmed_length if fast else layout.length
    prompts = layout.assemble(ctx, length).reshape(batch * classes, length, -1)
    encode = encode_trimmed if fast else encode_full
    return encode(clip, prompts, layout.eot_index.repeat(batch)).view(batch, classes, -1)


class CoOp(FrozenClipMethod):
    """CoOp prompt learner over K classes; ``self(image_features)`` gives logits [B, K] (grad to ``ctx`` only)."""

    method_name = "coop"

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: CoOpConfig | None = None, *,
                 tokenizer: ClipTokenizer | None = None, ctx: Tensor | None = None) -> None:
        config = config or CoOpConfig()
        if not isinstance(config, CoOpConfig):
            raise ConfigError(f"CoOp needs a CoOpConfig, got {type(config).__name__}")
        super().__init__(clip, classnames, config)
        self._tokenizer = tokenizer or get_tokenizer()
        phrase, n_ctx, self.layout = prepare_prompts(clip, self.classnames, config.ctx_init, config.n_ctx,
                                                     config.class_token_position, self._tokenizer)
        self.n_ctx = n_ctx
        width = clip.config.transformer_width
        shape = (self.num_classes, n_ctx, width) if config.csc else (n_ctx, width)
        if ctx is None:
            ctx = initial_context(clip, phrase, n_ctx, config.ctx_init, shape, self._tokenizer)
        elif tuple(ctx.shape) != shape:
            raise ConfigError(f"a context of shape {tuple(ctx.shape)} does not fit this CoOp (expected {shape})")
        self.ctx = nn.Parameter(ctx.detach().to(device=clip.device, dtype=torch.float32).clone())

    def _apply_frozen(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.layout = self.layout.apply(fn)

    def text_features(self) -> Tensor:
        """Class text features [K, D] (not normalised) from the current context."""
        ctx = self.ctx if self.config.csc else self.ctx[None]  # [K or 1, M, width]
        return encode_context(self.clip, self.layout, ctx[None], fast=self.config.fast_text)[0]

    def forward(self, image_features: Tensor) -> Tensor:
        """Logits [B, K] (fp32) of image features [B, D]: exp(logit_scale) * cos(image, class text)."""
        text = self.text_features()
        return cosine_logits(image_features.to(text.device), text, logit_scale_of(self.clip))

    @torch.no_grad()
    def classifier(self) -> CosineClassifier:
        return CosineClassifier(nn.functional.normalize(self.text_features().float(), dim=-1),
                                logit_scale_of(self.clip))

    def with_classnames(self, classnames: Sequence[str]) -> CoOp:
        """The learned unified context on another class list; CSC contexts belong to their classes (ConfigError)."""
        if self.config.csc and list(classnames) != self.classnames:
            raise ConfigError(
                "a class-specific (CSC) CoOp context belongs to the classes it was trained on and cannot be moved "
                "to other class names; train with a unified context (csc=False) for cross-dataset evaluation"
            )
        return CoOp(self.clip, classnames, self.config, tokenizer=self._tokenizer, ctx=self.ctx.detach())


def build_coop(clip: CLIP, classnames: Sequence[str], config: CoOpConfig | None = None) -> CoOp:
    """Registry builder of :class:`CoOp`."""
    return CoOp(clip, classnames, config)
