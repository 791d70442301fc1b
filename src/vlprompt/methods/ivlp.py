"""IVLP (independent vision-language prompting): deep prompts in both towers, learned independently.

The baseline of the MaPLe (CVPR 2023) and PromptSRC (ICCV 2023) papers; the defaults are the PromptSRC repository's
``configs/trainers/IVLP/vit_b16_c2_ep20_batch4_4+4ctx.yaml`` (4 text + 4 vision tokens, depth 9 in both towers).
Where each token enters: :mod:`vlprompt.methods.deep_prompt`. Learned: the first-layer text context (from the words
of ``ctx_init``), ``depth_text - 1`` deep text token sets, the first-layer vision tokens and ``depth_vision - 1`` deep
vision token sets (all N(0, 0.02^2) but the context). With text depth 1 and no vision prompts IVLP is CoOp with the
same context.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlprompt.backbone.model import CLIP
from vlprompt.backbone.tokenizer import ClipTokenizer
from vlprompt.errors import ConfigError
from vlprompt.methods.configs import IVLPConfig, IndependentPromptOptions
from vlprompt.methods.recipe import RecipeContext
from vlprompt.methods.deep_prompt import DeepPromptLearner, DeepPrompts, check_depths, deep_tokens
from vlprompt.methods.prompt_layout import INIT_STD

__all__ = ["IVLP", "IVLPConfig", "IndependentPrompts", "build_ivlp"]


class IndependentPrompts(nn.Module):
    """Deep text tokens for text blocks 1..depth_text-1; vision tokens for the image input and image blocks
    1..depth_vision-1 (none when ``n_ctx_vision`` or ``depth_vision`` is 0). Shared by IVLP and PromptSRC."""

    def __init__(self, clip: CLIP, *, n_ctx_text: int, n_ctx_vision: int, depth_text: int, depth_vision: int,
                 method: str) -> None:
        super().__init__()
        check_depths(clip, text_depth=depth_text, vision_depth=depth_vision, n_ctx_vision=n_ctx_vision, method=method)
        device = clip.device
        self.text = deep_tokens(depth_text - 1, n_ctx_text, clip.config.transformer_width, device)
        self.vision_first: nn.Parameter | None = None
        self.vision = nn.ParameterList()
        if n_ctx_vision and depth_vision:
            width = clip.config.vision_width
            self.vision_first = nn.Parameter(torch.empty(n_ctx_vision, width, device=device).normal_(0.0, INIT_STD))
            self.vision = deep_tokens(depth_vision - 1, n_ctx_vision, width, device)

    @classmethod
    def of(cls, clip: CLIP, config: IndependentPromptOptions, method: str) -> IndependentPrompts:
        """The prompts ``config`` asks for (IVLP's or PromptSRC's, whose prompt options are the same fields)."""
        return cls(clip, n_ctx_text=config.n_ctx_text, n_ctx_vision=config.n_ctx_vision,
                   depth_text=config.prompt_depth_text, depth_vision=config.prompt_depth_vision, method=method)

    def prompts(self) -> DeepPrompts:
        return DeepPrompts(text=list(self.text), vision_first=self.vision_first, vision=list(self.vision))


class IVLP(DeepPromptLearner):
    """IVLP over K classes; ``self(images)`` gives logits [B, K] with gradients to every prompt."""

    method_name = "ivlp"

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: IVLPConfig | None = None, *,
                 tokenizer: ClipTokenizer | None = None) -> None:
        config = config or IVLPConfig()
        if not isinstance(config, IVLPConfig):
            raise ConfigError(f"IVLP needs an IVLPConfig, got {type(config).__name__}")
        # fields left to the recipe (None) and not filled from a run's setting (RunConfig, api.build_method): few-shot's
        config = config.for_recipe(RecipeContext())
        super().__init__(clip, classnames, config, n_ctx=config.n_ctx_text, ctx_init=config.ctx_init,
                         tokenizer=tokenizer)
        self.deep = IndependentPrompts.of(clip, config, "IVLP")

    def prompts(self) -> DeepPrompts:
        return self.deep.prompts()


def build_ivlp(clip: CLIP, classnames: Sequence[str], config: IVLPConfig | None = None) -> IVLP:
    """Registry builder of :class:`IVLP`."""
    return IVLP(clip, classnames, config)
