"""Interpreting learned context vectors: their nearest vocabulary words, as in the CoOp paper's table.

Each context vector is compared with every row of CLIP's token-embedding table by Euclidean distance (computed
directly, not through the ``|a|^2 + |b|^2 - 2ab`` expansion, so a vector equal to a word's embedding is at distance
exactly 0). Words are shown readably: the ``</w>`` end-of-word mark is dropped and byte-level symbols are decoded.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from vlprompt.backbone.model import CLIP
from vlprompt.backbone.tokenizer import ClipTokenizer, get_tokenizer
from vlprompt.errors import ConfigError

__all__ = ["Neighbour", "context_vectors", "format_neighbours", "nearest_words"]

ROWS_PER_CHUNK = 64
"""Context vectors compared with the vocabulary at a time (bounds the exact distance computation's memory)."""


class Neighbour(NamedTuple):
    """One vocabulary entry near a context vector: the readable word, its Euclidean distance, its token id."""

    word: str
    distance: float
    token_id: int


def context_vectors(method: Any) -> Tensor:
    """The learned context of a prompt learner: [M, width] (unified, CoCoOp's before the image shift) or [K, M, width]."""
    ctx = getattr(method, "ctx", None)
    if not isinstance(ctx, Tensor):
        name = getattr(method, "method_name", type(method).__name__)
        raise ConfigError(f"method {name!r} has no learned context vectors to interpret (only coop and cocoop do)")
    return ctx.detach()


def _readable(tokenizer: ClipTokenizer, token_id: int) -> str:
    word = tokenizer.decode([token_id]).strip()
    if word and "\ufffd" not in word:
        return word
    # a piece of a multi-byte character, or white space: show the vocabulary symbol itself
    return tokenizer.id_to_token(token_id).replace("</w>", "")


@torch.no_grad()
def nearest_words(ctx: Tensor, clip: CLIP, tokenizer: ClipTokenizer | None = None, k: int = 5
                  ) -> list[list[Neighbour]] | list[list[list[Neighbour]]]:
    """The ``k`` nearest vocabulary words of each context vector, nearest first.

    ``ctx`` [M, width] gives one list per vector; [K, M, width] (class-specific) one list of M lists per class.
    """
    if ctx.ndim not in (2, 3):
        raise ConfigError(f"context vectors must be [M, width] or [K, M, width], got shape {tuple(ctx.shape)}")
    table = clip.token_embedding.weight.detach().float()
    if ctx.shape[-1] != table.shape[1]:
        raise ConfigError(f"context vectors have width {ctx.shape[-1]} but this CLIP's word embeddings have "
                          f"{table.shape[1]}: interpret a prompt with the backbone it was learned on")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= table.shape[0]:
        raise ConfigError(f"k must be an integer between 1 and {table.shape[0]}, got {k!r}")
    tokenizer = tokenizer or get_tokenizer()
    vectors = ctx.detach().float().to(table.device).reshape(-1, table.shape[1])
    rows: list[list[Neighbour]] = []
    for chunk in vectors.split(ROWS_PER_CHUNK):
        distances = torch.cdist(chunk, table, compute_mode="donot_use_mm_for_euclid_dist")
        values, indices = distances.topk(k, dim=1, largest=False)
        for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True):
            rows.append([Neighbour(_readable(tokenizer, index), value, index)
                         for value, index in zip(row_values, row_indices, strict=True)])
    if ctx.ndim == 2:
        return rows
    per_class = ctx.shape[1]
    return [rows[start : start + per_class] for start in range(0, len(rows), per_class)]


def format_neighbours(rows: list[list[Neighbour]], title: str | None = None, decimals: int = 4) -> str:
    """A plain-text table, one line per context vector: ``#1   photo (0.8123)  picture (0.8190) ...``.

    ``rows`` is one list of neighbours per vector (for class-specific context, call once per class with its name as
    ``title``).
    """
    lines = [title] if title else []
    for index, neighbours in enumerate(rows, start=1):
        cells = "  ".join(f"{n.word} ({n.distance:.{decimals}f})" for n in neighbours)
        lines.append(f"#{index:<3d} {cells}")
    return "\n".join(lines)
