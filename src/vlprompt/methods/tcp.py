"""TCP, textual-based class-aware prompt tuning (Yao, Zhang, Xu, CVPR 2024).

A small generator maps each class's hand-crafted text embedding to M class-aware tokens, which enter the text tower
at one layer, in place of the hidden states of the M context positions (official ``trainers/tcp.py`` and
``clip_text/model.py``):

- prompt of class k: ``[SOT] [V]_1 .. [V]_M <prompt_template(name_k)> [EOT]``, the context V unified and learned
  (random N(0, 0.02^2) as the official config), ``prompt_template`` e.g. ``"{}, a type of pet."``;
- c_k = normalised feature of the hand-crafted prompt ``template(name_k)`` (computed once, frozen);
- class-aware tokens ``T_k = W2 QuickGELU(W1 c_k + b1) + b2`` reshaped to [M, width]
  (W1: D -> D / reduction, W2: D / reduction -> M * width);
- at the input of text block ``class_token_layer`` (official: 8 of 12) the hidden states of positions 1..M of class
  k's prompt are replaced by T_k (the official weight 1.0: full replacement, no positional embedding added);
- loss: CE + ``kg_weight`` (8) * (1 - mean_k cos(t_k, c_k)) as KgCoOp (:meth:`TCP.regularizer`).

Unseen classes get their tokens from their own hand-crafted embeddings, so TCP classifies novel classes. The text
tower runs through :func:`vlprompt.backbone.fast_text.encode_shared_prefix_replacing` (``fast_text``: the shared
SOT + context computed once in the blocks before the class-token layer, everything cut after the last end token) or
:func:`~vlprompt.backbone.fast_text.encode_replacing` over all 77 positions.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.backbone.fast_text import encode_replacing, encode_shared_prefix_replacing
from vlprompt.backbone.model import CLIP, QuickGELU
from vlprompt.backbone.tokenizer import ClipTokenizer, get_tokenizer
from vlprompt.common.vocab import seeded_torch
from vlprompt.errors import ConfigError
from vlprompt.methods.base import CosineClassifier, FrozenClipMethod, logit_scale_of
from vlprompt.methods.configs import TCPConfig
from vlprompt.methods.kgcoop import guided_forward, guided_regularizer, handcrafted_features
from vlprompt.methods.prompt_layout import initial_context, prepare_prompts
from vlprompt.methods.templates import DEFAULT_TEMPLATE

__all__ = ["TCP", "TCPConfig", "build_tcp"]


class TCP(FrozenClipMethod):
    """TCP over K classes; learned state: ``ctx`` [M, width] and the class-token generator ``meta_net``."""

    method_name = "tcp"

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: TCPConfig | None = None, *,
                 tokenizer: ClipTokenizer | None = None) -> None:
        config = config or TCPConfig()
        if not isinstance(config, TCPConfig):
            raise ConfigError(f"TCP needs a TCPConfig, got {type(config).__name__}")
        super().__init__(clip, classnames, config)
        layers = clip.config.transformer_layers
        if config.class_token_layer >= layers:
            raise ConfigError(f"class_token_layer {config.class_token_layer} is not a text block of this backbone "
                              f"({layers} blocks, 0 .. {layers - 1}); official: 8 for 12 blocks")
        self._tokenizer = tokenizer or get_tokenizer()
        phrase, n_ctx, self.layout = prepare_prompts(clip, self.classnames, config.ctx_init, config.n_ctx, "end",
                                                     self._tokenizer, config.prompt_template or "{}.")
        self.n_ctx = n_ctx
        width, dim = clip.config.transformer_width, clip.config.embed_dim
        hidden = dim // config.reduction
        if hidden < 1:
            raise ConfigError(f"reduction {config.reduction} leaves no hidden units for features of width {dim}")
        self.ctx = nn.Parameter(initial_context(clip, phrase, n_ctx, config.ctx_init, (n_ctx, width), self._tokenizer))
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(dim, hidden)),
            ("gelu", QuickGELU()),
            ("linear2", nn.Linear(hidden, n_ctx * width)),
        ])).to(clip.device)
        self.handcrafted = handcrafted_features(clip, self.classnames, config.template or DEFAULT_TEMPLATE,
                                                self._tokenizer)
        self._last_text: Tensor | None = None

    def _apply_frozen(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.layout = self.layout.apply(fn)
        self.handcrafted = fn(self.handcrafted).float()

    def class_tokens(self) -> Tensor:
        """Class-aware tokens [K, M, width] from the hand-crafted features (fp32)."""
        with torch.autocast(device_type=self.ctx.device.type, enabled=False):
            tokens = self.meta_net(self.handcrafted.to(self.ctx.device))
        return tokens.view(self.num_classes, self.n_ctx, -1)

    def text_features(self) -> Tensor:
        """Class text features [K, D] (not normalised).

        ``fast_text``: the shared prefix (SOT and the context) runs once through the blocks before the class-token
        layer, the rest only up to the last EOT; else all K prompts at 77 positions through every block."""
        layer = self.config.class_token_layer
        if self.config.fast_text:
            prefix, suffix = self.layout.split_shared(self.ctx[None])
            return encode_shared_prefix_replacing(self.clip, prefix, suffix, self.layout.eot_index,
                                                  self.class_tokens(), layer=layer)
        prompts = self.layout.assemble(self.ctx[None], self.layout.length)  # [K, 77, width]
        return encode_replacing(self.clip, prompts, self.layout.eot_index, self.class_tokens(), layer=layer,
                                start=1, trim=False)

    def forward(self, image_features: Tensor) -> Tensor:
        return guided_forward(self, image_features)

    def regularizer(self) -> Tensor:
        """``kg_weight * (1 - mean_k cos(t_k, c_k))`` of the text features of the last training forward (as KgCoOp)."""
        return guided_regularizer(self)

    @torch.no_grad()
    def classifier(self) -> CosineClassifier:
        return CosineClassifier(F.normalize(self.text_features().float(), dim=-1), logit_scale_of(self.clip))

    def with_classnames(self, classnames: Sequence[str]) -> TCP:
        """The learned context and token generator on another class list (tokens from the new classes' embeddings)."""
        with seeded_torch(self.clip.device, None):  # the fresh initialisation is overwritten at once
            other = TCP(self.clip, classnames, self.config, tokenizer=self._tokenizer)
        other.load_state_dict(self.state_dict())
        return other


def build_tcp(clip: CLIP, classnames: Sequence[str], config: TCPConfig | None = None) -> TCP:
    """Registry builder of :class:`TCP`."""
    return TCP(clip, classnames, config)
