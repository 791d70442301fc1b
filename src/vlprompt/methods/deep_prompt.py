"""Deep prompts in both towers: what IVLP, MaPLe and PromptSRC share (where each learned token enters each layer).

Text tower (as the official code, ``clip/model.py`` of the MaPLe and PromptSRC repositories): the prompt of class k is
tokenised as ``"<ctx_init> <class name>."``; its first ``n_ctx`` word embeddings after the start token (positions
1 .. n_ctx) are the learned first-layer context, shared by all classes (CoOp's unified context, with the positional
embedding added); the rest of the phrase stays fixed (MaPLe: n_ctx = 2 of "a photo of a" learned, "of a" fixed).
Before text block l = 1 .. depth-1 the hidden states at positions 1 .. n_ctx are *replaced* by that layer's learned
tokens (no positional embedding). They are the same for every class, so they lie inside the shared prefix of
:func:`~vlprompt.backbone.fast_text.encode_shared_prefix` and the fast text path stays exact; the K class prompts are
encoded once per step, not once per image.

Image tower (ViT only): the first-layer tokens are *appended* after the class and patch tokens (after the positional
embedding, before ``ln_pre``); before image block l = 1 .. depth-1 the last ``n`` positions are replaced by that
layer's tokens. The feature is read at the class token, as always.

Every learned tensor is fp32; the towers run in the CLIP's dtype or under the caller's autocast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlprompt.backbone.extension import TokenEdit, TowerExtension
from vlprompt.backbone.fast_text import encode_full, encode_shared_prefix
from vlprompt.backbone.model import CLIP
from vlprompt.backbone.tokenizer import ClipTokenizer, get_tokenizer
from vlprompt.errors import ConfigError
from vlprompt.methods.base import (CosineClassifier, FrozenClipMethod, TrainOutput, cosine_logits, logit_scale_of,
                                   rebuilt_on)
from vlprompt.methods.prompt_layout import INIT_STD, PromptLayout, build_layout, context_phrase, phrase_embeddings


@dataclass(frozen=True)
class DeepPrompts:
    """One step's learned tokens: text blocks 1.. (``text``), the image input (``vision_first``) and image blocks
    1.. (``vision``); empty lists / None where a tower has none."""

    text: Sequence[Tensor]
    vision_first: Tensor | None
    vision: Sequence[Tensor]


def check_depths(clip: CLIP, *, text_depth: int, vision_depth: int, n_ctx_vision: int, method: str) -> None:
    """ConfigError for depths the backbone cannot take: text depth in 1..layers, vision depth in 0..layers, vision
    prompts on a ResNet image tower."""
    config = clip.config
    if not 1 <= text_depth <= config.transformer_layers:
        raise ConfigError(f"{method}: text prompt depth must be between 1 and the text tower's "
                          f"{config.transformer_layers} layers, got {text_depth}")
    if vision_depth and n_ctx_vision:
        if not config.is_vit:
            raise ConfigError(f"{method}: backbone {config.name or 'this CLIP'!r} has a ResNet image tower, which has no "
                              "token sequence to take vision prompts; use a ViT backbone (e.g. ViT-B/16), or set "
                              "the vision prompt depth to 0")
        layers = int(config.vision_layers)  # type: ignore[arg-type]
        if vision_depth > layers:
            raise ConfigError(f"{method}: vision prompt depth must be at most the image tower's {layers} layers, got "
                              f"{vision_depth}")


def context_and_layout(clip: CLIP, classnames: Sequence[str], ctx_init: str, n_ctx: int,
                       tokenizer: ClipTokenizer) -> tuple[Tensor, PromptLayout]:
    """The first-layer text context ``[n_ctx, width]`` (fp32) and the class prompts' layout.

    With ``ctx_init`` the prompts are ``"<ctx_init> <name>."`` and the context starts from the phrase's first
    ``n_ctx`` word embeddings (n_ctx must not exceed its token count); without, ``"X X .. X <name>."`` and
    N(0, 0.02^2) (drawn from torch's current RNG).
    """
    phrase, count = context_phrase(ctx_init, n_ctx, tokenizer)
    if ctx_init.strip() and n_ctx > count:
        raise ConfigError(f"n_ctx {n_ctx} exceeds the {count} token(s) of ctx_init {ctx_init!r}: give a longer phrase, "
                          "fewer context tokens, or an empty ctx_init (random initialisation)")
    layout = build_layout(clip, classnames, phrase, n_ctx, "end", tokenizer)
    if ctx_init.strip():
        ctx = phrase_embeddings(clip, phrase, n_ctx, tokenizer)
    else:
        ctx = torch.empty(n_ctx, clip.config.transformer_width, device=clip.device).normal_(0.0, INIT_STD)
    return ctx, layout


def deep_tokens(count: int, n_ctx: int, width: int, device: torch.device) -> nn.ParameterList:
    """``count`` learned token sets ``[n_ctx, width]``, each N(0, 0.02^2) as the official deep prompts."""
    return nn.ParameterList([nn.Parameter(torch.empty(n_ctx, width, device=device).normal_(0.0, INIT_STD))
                             for _ in range(count)])


def text_extension(deep: Sequence[Tensor], checkpoint: bool = False) -> TowerExtension | None:
    """Text blocks 1.. get ``deep[l-1]`` at positions 1..n (replacing the previous layer's outputs there)."""
    if not deep and not checkpoint:
        return None
    return TowerExtension(blocks={layer: TokenEdit(tokens, position=1) for layer, tokens in enumerate(deep, start=1)},
                          checkpoint=checkpoint)


def vision_extension(first: Tensor | None, deep: Sequence[Tensor], checkpoint: bool = False) -> TowerExtension | None:
    """``first`` appended to the image tokens before ``ln_pre``; image blocks 1.. get ``deep[l-1]`` in the last n
    positions (replacing the previous layer's outputs there)."""
    if first is None and not deep and not checkpoint:
        return None
    blocks = {layer: TokenEdit(tokens, position=-tokens.shape[-2]) for layer, tokens in enumerate(deep, start=1)}
    embed = TokenEdit(first, position=None, replace=False) if first is not None else None
    return TowerExtension(embed=embed, blocks=blocks, checkpoint=checkpoint)


class DeepPromptLearner(FrozenClipMethod):
    """Base of IVLP, MaPLe and PromptSRC: the first-layer text context ``ctx`` plus the subclass's deep prompts
    (:meth:`prompts`); ``self(images)`` gives logits [B, K] of pre-processed images [B, 3, R, R] with gradients to
    every learned tensor; evaluation encodes images with :meth:`encode_images` and scores them with
    :meth:`classifier` (class text features computed once)."""

    trains_on_images = True

    def __init__(self, clip: CLIP, classnames: Sequence[str], config, *, n_ctx: int, ctx_init: str,
                 tokenizer: ClipTokenizer | None = None) -> None:
        super().__init__(clip, classnames, config)
        self._tokenizer = tokenizer or get_tokenizer()
        ctx, self.layout = context_and_layout(clip, self.classnames, ctx_init, n_ctx, self._tokenizer)
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(ctx.detach().to(device=clip.device, dtype=torch.float32).clone())
        self.checkpointing = False

    def _apply_frozen(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.layout = self.layout.apply(fn)

    def use_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each tower block's activations in backward (less memory, same results)."""
        self.checkpointing = bool(enabled)

    def prompts(self) -> DeepPrompts:
        raise NotImplementedError

    # -- towers -------------------------------------------------------------------------------------------------------
    def text_features(self, prompts: DeepPrompts | None = None) -> Tensor:
        """Class text features [K, D] (not normalised) through the prompted text tower (fast path by default)."""
        prompts = prompts if prompts is not None else self.prompts()
        extension = text_extension(prompts.text, self.checkpointing)
        layout = self.layout
        if self.config.fast_text:
            prefix, suffix = layout.split_shared(self.ctx[None])
            return encode_shared_prefix(self.clip, prefix, suffix, layout.eot_index, extension=extension)[0]
        sequences = layout.assemble(self.ctx[None, None], layout.length)[0]
        return encode_full(self.clip, sequences, layout.eot_index, extension)

    def image_features(self, images: Tensor, prompts: DeepPrompts | None = None) -> Tensor:
        """Image features [B, D] (not normalised) through the prompted image tower."""
        prompts = prompts if prompts is not None else self.prompts()
        extension = vision_extension(prompts.vision_first, prompts.vision, self.checkpointing)
        return self.clip.encode_image(images, extension)

    def forward(self, images: Tensor) -> Tensor | TrainOutput:
        """Logits [B, K] (fp32) of images [B, 3, R, R]."""
        prompts = self.prompts()
        text = self.text_features(prompts)
        return cosine_logits(self.image_features(images.to(text.device), prompts), text, logit_scale_of(self.clip))

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Prompted image features [B, D] (not normalised): what :meth:`classifier` scores."""
        return self.image_features(images)

    @torch.no_grad()
    def classifier(self) -> CosineClassifier:
        return CosineClassifier(nn.functional.normalize(self.text_features().float(), dim=-1),
                                logit_scale_of(self.clip))

    def with_classnames(self, classnames: Sequence[str]) -> DeepPromptLearner:
        """The same learned prompts on another class list (none of them depends on the classes)."""
        return rebuilt_on(self, classnames, tokenizer=self._tokenizer)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_ctx={self.n_ctx}"


def gaussian_epoch_weights(epochs: int, mean: float, std: float) -> list[float]:
    """PromptSRC's aggregation weights of epochs 1..E: the normal density N(e; mean, std^2), normalised to sum 1."""
    density = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2.0 * math.pi)) for e in range(1, epochs + 1)]
    total = sum(density)
    if not total > 0.0:
        raise ConfigError(f"the Gaussian aggregation weights (mean {mean}, std {std}) vanish over epochs 1..{epochs}: "
                          "choose a mean within or near the epochs")
    return [value / total for value in density]
