"""Extension points of the frozen towers: learned tokens at chosen layers, and low-rank updates of q, k, v.

A method never forks the towers. It describes what it adds for one forward call in a :class:`TowerExtension` and
passes it to :meth:`CLIP.encode_image`, :meth:`CLIP.encode_text_embeddings` or the fast text paths
(:mod:`vlprompt.backbone.fast_text`); the towers stay one implementation and, without an extension (``None``) or
with an empty one, compute exactly what they compute without (bit for bit: the same operations run).

- :class:`TokenEdit`: tokens that *replace* ``n`` positions of the hidden states from ``position`` on, or are
  *inserted* there (the sequence grows by ``n``; ``position=None`` appends). Deep prompts (VPT-deep, IVLP, MaPLe,
  PromptSRC) replace the previous layer's outputs at the prompt positions with the next layer's learned tokens.
- ``TowerExtension.embed``: an edit of the image tower's input, after the positional embedding and before
  ``ln_pre`` (where the first-layer vision prompts of IVLP and MaPLe are appended). The text tower's first-layer
  context is part of its token embeddings (CoOp's layout), so the text tower takes no ``embed`` edit.
- ``TowerExtension.blocks[l]``: an edit of the hidden states just before transformer block ``l`` (0-based).
- ``TowerExtension.qkv_delta(l, x)``: a term added to block ``l``'s joint q, k, v projection of its (layer-normed)
  input ``x`` (``[..., 3 * width]``, q then k then v): a LoRA update ``x A^T B^T`` of any of the three. It is
  applied wherever the towers project q, k, v, the fast text paths included.
- ``TowerExtension.checkpoint``: activation checkpointing per transformer block (recompute in backward) when
  gradients are being recorded: less memory for image-in-the-loop training, same results.

The text tower accepts only replacing edits (an insertion would move the end-of-text positions).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenEdit:
    """Learned tokens put into hidden states ``[N, L, width]``.

    ``tokens``: ``[n, width]`` (the same for every sequence) or ``[N, n, width]`` (one set per sequence).
    ``position``: index of the first token's place; negative counts from the end (``-n`` = the last ``n``
    positions); ``None`` (insert only) = after the last position. ``replace``: overwrite the ``n`` positions from
    ``position`` (True), or insert the tokens there (False).
    """

    tokens: Tensor
    position: int | None
    replace: bool = True

    def __post_init__(self) -> None:
        if self.tokens.ndim not in (2, 3):
            raise ValueError(f"edit tokens must be [n, width] or [N, n, width], got shape {tuple(self.tokens.shape)}")
        if self.replace and self.position is None:
            raise ValueError("a replacing edit needs a position (None means 'append', which inserts)")

    @property
    def count(self) -> int:
        return int(self.tokens.shape[-2])

    def span(self, length: int) -> tuple[int, int]:
        """``(start, stop)`` of the edited positions in a sequence of ``length`` (after the edit for an insert)."""
        start = length if self.position is None else (self.position + length if self.position < 0 else self.position)
        stop = start + self.count
        limit = length if self.replace else length + self.count
        if not 0 <= start <= (length if not self.replace else length - self.count) or stop > limit:
            raise ValueError(f"an edit of {self.count} token(s) at position {self.position} does not fit a sequence "
                             f"of {length}")
        return start, stop

    def apply(self, hidden: Tensor) -> Tensor:
        """``hidden`` ``[N, L, width]`` with the tokens in place (a new tensor; gradients flow to the tokens)."""
        batch, length, width = hidden.shape
        start, stop = self.span(length)
        tokens = self.tokens.to(hidden.dtype)
        tokens = tokens.expand(batch, -1, -1) if tokens.ndim == 2 else tokens
        if tokens.shape[0] != batch or tokens.shape[-1] != width:
            raise ValueError(f"edit tokens of shape {tuple(self.tokens.shape)} do not fit hidden states "
                             f"{tuple(hidden.shape)}")
        rest = stop if self.replace else start
        return torch.cat([hidden[:, :start], tokens, hidden[:, rest:]], dim=1)


QkvDelta = Callable[[int, Tensor], Tensor]
"""``delta(layer, x)``: what block ``layer`` adds to its q, k, v projection of ``x`` (``[..., 3 * width]``)."""


@dataclass(frozen=True)
class TowerExtension:
    """What a method adds to one tower for one forward call (see the module docstring); empty = the plain tower."""

    embed: TokenEdit | None = None
    blocks: Mapping[int, TokenEdit] = field(default_factory=lambda: MappingProxyType({}))
    qkv_delta: QkvDelta | None = None
    checkpoint: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", MappingProxyType(dict(self.blocks)))
        for layer in self.blocks:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"block edits are keyed by block index >= 0, got {layer!r}")

    @property
    def is_empty(self) -> bool:
        return self.embed is None and not self.blocks and self.qkv_delta is None and not self.checkpoint

    def check_layers(self, layers: int, tower: str) -> None:
        """ValueError when an edit names a block the tower does not have."""
        beyond = sorted(layer for layer in self.blocks if layer >= layers)
        if beyond:
            raise ValueError(f"the {tower} tower has {layers} blocks; edits were given for block(s) {beyond}")

    def check_text(self) -> None:
        """ValueError for what the text tower cannot take (an input edit, insertions)."""
        if self.embed is not None:
            raise ValueError("the text tower takes no input edit: its first-layer context belongs in the token "
                             "embeddings")
        if any(not edit.replace for edit in self.blocks.values()):
            raise ValueError("the text tower takes only replacing edits (an insertion would move the end-of-text "
                             "positions)")


def is_active(extension: TowerExtension | None) -> bool:
    """True when ``extension`` changes anything (None and empty extensions do not)."""
    return extension is not None and not extension.is_empty
