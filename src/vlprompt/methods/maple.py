"""MaPLe (Khattak et al., CVPR 2023): multi-modal prompts, the vision prompts coupled to the text prompts.

Defaults: the official ``configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml`` (MaPLe repository): 2 context
tokens from "a photo of a" (the first two words learned, "of a" kept), prompt depth 9. Learned (as
``trainers/maple.py``): the first-layer text context ``ctx`` [2, 512]; ``depth - 1`` deep text token sets (N(0,
0.02^2)); the coupling functions, linear maps from the text width to the vision width: ``proj`` makes the first-layer
vision tokens from ``ctx`` and ``projections[l-1]`` makes image block l's tokens from text block l's (the official
code deep-copies one freshly initialised Linear for all of them, so they start equal; so do these). Where each token
enters: :mod:`vlprompt.methods.deep_prompt`. The loss is the cross-entropy alone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from vlprompt.backbone.model import CLIP
from vlprompt.backbone.tokenizer import ClipTokenizer
from vlprompt.errors import ConfigError
from vlprompt.methods.recipe import RecipeContext
from vlprompt.methods.configs import MaPLeConfig
from vlprompt.methods.deep_prompt import DeepPromptLearner, DeepPrompts, check_depths, deep_tokens

__all__ = ["MaPLe", "MaPLeConfig", "build_maple"]


class MaPLe(DeepPromptLearner):
    """MaPLe over K classes; ``self(images)`` gives logits [B, K] with gradients to the prompts and couplings."""

    method_name = "maple"

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: MaPLeConfig | None = None, *,
                 tokenizer: ClipTokenizer | None = None) -> None:
        config = config or MaPLeConfig()
        if not isinstance(config, MaPLeConfig):
            raise ConfigError(f"MaPLe needs a MaPLeConfig, got {type(config).__name__}")
        # fields left to the recipe (None) and not filled from a run's setting (RunConfig, api.build_method): few-shot's
        config = config.for_recipe(RecipeContext())
        super().__init__(clip, classnames, config, n_ctx=config.n_ctx, ctx_init=config.ctx_init, tokenizer=tokenizer)
        check_depths(clip, text_depth=config.prompt_depth, vision_depth=config.prompt_depth,
                     n_ctx_vision=config.n_ctx, method="MaPLe")
        text_width, vision_width = clip.config.transformer_width, clip.config.vision_width
        self.proj = nn.Linear(text_width, vision_width, device=clip.device)
        self.text = deep_tokens(config.prompt_depth - 1, config.n_ctx, text_width, clip.device)
        coupling = nn.Linear(text_width, vision_width, device=clip.device)
        self.projections = nn.ModuleList([copy.deepcopy(coupling) for _ in range(config.prompt_depth - 1)])

    def prompts(self) -> DeepPrompts:
        return DeepPrompts(text=list(self.text), vision_first=self.proj(self.ctx),
                           vision=[project(tokens) for project, tokens in zip(self.projections, self.text, strict=True)])


def build_maple(clip: CLIP, classnames: Sequence[str], config: MaPLeConfig | None = None) -> MaPLe:
    """Registry builder of :class:`MaPLe`."""
    return MaPLe(clip, classnames, config)
