"""CoOp-style prompts: where the learned context vectors and each class's tokens go, as index arithmetic.

As the reference, the prompts are tokenised as ``"<ctx phrase> <class name>."`` (the phrase is ``ctx_init``, or M
placeholders ``"X X ... X"`` for random initialisation) and split into the start-token embedding, M context slots and
a per-class suffix (class tokens, ".", EOT, padding). That is the "end" layout ``[SOT][ctx 0..M-1][class][.][EOT]``.

The other layouts are per-class permutations of the end layout's positions (no Python loop over classes):

- middle: ``[SOT][ctx 0..M/2-1][class][ctx M/2..M-1][.][EOT]``
- front:  ``[SOT][class][ctx 0..M-1][.][EOT]``

The class name spans ``len(tokenizer.encode(name))`` tokens, as in the reference. The EOT position is the same in
every layout. The first :attr:`PromptLayout.shared_length` positions (SOT and the context vectors before the class
name) are the same for every class when the context is unified, which is what the fast text path exploits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from vlprompt.backbone.model import CLIP
from vlprompt.backbone.tokenizer import ClipTokenizer
from vlprompt.errors import ConfigError
from vlprompt.methods.templates import PLACEHOLDER, fill

PLACEHOLDER_WORD = "X"


@dataclass(frozen=True)
class PromptLayout:
    """Frozen token data of K class prompts with M context slots (see the module docstring).

    ``token_ids`` [K, L]: the end-layout prompts' ids (context slots hold the phrase's / placeholder ids);
    ``sot`` [width]: start-token embedding; ``suffix`` [K, L-1-M, width]: embeddings after the context slots;
    ``eot_index`` [K]; ``name_lengths`` [K]; ``order`` [K, L] or None (end): position p of class k's prompt takes
    position ``order[k, p]`` of its end-layout sequence.
    """

    position: str
    n_ctx: int
    token_ids: Tensor
    sot: Tensor
    suffix: Tensor
    eot_index: Tensor
    name_lengths: Tensor
    order: Tensor | None

    @property
    def num_classes(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def length(self) -> int:
        """Full sequence length (the context length, 77)."""
        return int(self.token_ids.shape[1])

    @property
    def trimmed_length(self) -> int:
        """Positions up to the last EOT: the only ones that influence any class's feature."""
        return int(self.eot_index.max()) + 1

    @property
    def shared_length(self) -> int:
        """Leading positions that are the same for all classes with a unified context: SOT + ctx before the name."""
        return 1 + {"end": self.n_ctx, "middle": self.n_ctx // 2, "front": 0}[self.position]

    def apply(self, fn: Callable[[Tensor], Tensor]) -> PromptLayout:
        """This layout with ``fn`` (a device / dtype move) applied to its tensors (index tensors keep their dtype)."""
        return replace(
            self, token_ids=fn(self.token_ids), sot=fn(self.sot), suffix=fn(self.suffix),
            eot_index=fn(self.eot_index), name_lengths=fn(self.name_lengths),
            order=None if self.order is None else fn(self.order),
        )

    def layout_ids(self) -> Tensor:
        """Token ids [K, L] in this layout (context slots show the phrase / placeholder ids): for decoding."""
        if self.order is None:
            return self.token_ids
        return torch.take_along_dim(self.token_ids, self.order, dim=1)

    def assemble(self, ctx: Tensor, length: int | None = None) -> Tensor:
        """Prompt embeddings [*batch, K, length, width] from context ``ctx`` [*batch, K or 1, M, width].

        ``length`` defaults to :attr:`trimmed_length`; pass :attr:`length` for the plain 77-token sequences.
        ``ctx`` with 1 in the class dimension is shared by all classes (unified context).
        """
        length = self.trimmed_length if length is None else length
        *batch, classes, n_ctx, width = ctx.shape
        if n_ctx != self.n_ctx or classes not in (1, self.num_classes):
            raise ValueError(f"context of shape {tuple(ctx.shape)} does not fit {self.num_classes} classes x "
                             f"{self.n_ctx} slots")
        k = self.num_classes
        parts = [
            self.sot.to(ctx.dtype).expand(*batch, k, 1, width),
            ctx.expand(*batch, k, n_ctx, width),
            self.suffix[:, : length - 1 - n_ctx].to(ctx.dtype).expand(*batch, k, length - 1 - n_ctx, width),
        ]
        prompts = torch.cat(parts, dim=-2)
        if self.order is None:
            return prompts
        index = self.order[:, :length, None].reshape(*([1] * len(batch)), k, length, 1)
        return torch.take_along_dim(prompts, index, dim=-2)

    def split_shared(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        """Shared prefix [B, P, width] and per-class suffixes [B or 1, K, S, width] for a unified context [B, M, width].

        P = :attr:`shared_length`; S = :attr:`trimmed_length` - P. With the class name at the end the suffixes do not
        depend on the context and are returned once ([1, K, S, width]).
        """
        batch, n_ctx, width = ctx.shape
        shared = self.shared_length
        prefix = torch.cat([self.sot.to(ctx.dtype).expand(batch, 1, width), ctx[:, : shared - 1]], dim=1)
        if self.position == "end":
            suffix = self.suffix[None, :, : self.trimmed_length - shared].to(ctx.dtype)
        else:
            suffix = self.assemble(ctx[:, None])[:, :, shared:]
        return prefix, suffix


def _position_order(position: str, n_ctx: int, name_lengths: list[int], length: int) -> Tensor | None:
    """Per-class permutation of end-layout positions into the requested layout (None for end)."""
    if position == "end":
        return None
    rows = []
    for name_length in name_lengths:  # once at construction, not on the hot path
        ctx = list(range(1, 1 + n_ctx))
        name = list(range(1 + n_ctx, 1 + n_ctx + name_length))
        rest = list(range(1 + n_ctx + name_length, length))
        if position == "middle":
            half = n_ctx // 2
            rows.append([0, *ctx[:half], *name, *ctx[half:], *rest])
        else:  # front
            rows.append([0, *name, *ctx, *rest])
    return torch.tensor(rows, dtype=torch.long)


def context_phrase(ctx_init: str, n_ctx: int, tokenizer: ClipTokenizer) -> tuple[str, int]:
    """The phrase the prompts are tokenised with and M: ``ctx_init`` and its token count, or ``"X X ... X"`` and n_ctx.

    As the reference, ``_`` in ``ctx_init`` becomes a space.
    """
    phrase = ctx_init.replace("_", " ").strip()
    if not phrase:
        return " ".join([PLACEHOLDER_WORD] * n_ctx), n_ctx
    count = len(tokenizer.encode(phrase))
    if count == 0:
        raise ConfigError(f"ctx_init {ctx_init!r} has no tokens; give words such as 'a photo of a'")
    return phrase, count


@torch.no_grad()
def build_layout(clip: CLIP, classnames: Sequence[str], phrase: str, n_ctx: int, position: str,
                 tokenizer: ClipTokenizer, template: str = "{}.") -> PromptLayout:
    """Tokenise ``phrase + " " + template(name)`` (CoOp: ``"{}."``) for every class and keep the frozen pieces (on the
    CLIP's device). Text of ``template`` around the name stays fixed; with the middle / front layouts the name must
    open the template (the layouts move the name tokens, counted from right after the context)."""
    if position != "end" and not template.startswith(PLACEHOLDER):
        raise ConfigError(f"the {position!r} class position needs a prompt template starting with the class name, "
                          f"got {template!r}")
    prompts = [f"{phrase} {fill(template, name)}" for name in classnames]
    try:
        ids = tokenizer(prompts, context_length=clip.context_length)
    except ConfigError as exc:
        raise ConfigError(f"a class prompt does not fit CLIP's context with {n_ctx} context tokens: {exc}") from None
    name_lengths = [len(tokenizer.encode(name)) for name in classnames]
    eot = ids.argmax(dim=-1)
    embeddings = clip.token_embedding(ids.to(clip.device))
    length = ids.shape[1]
    return PromptLayout(
        position=position,
        n_ctx=n_ctx,
        token_ids=ids.to(clip.device),
        sot=embeddings[0, 0].clone(),
        suffix=embeddings[:, 1 + n_ctx :].clone(),
        eot_index=eot.to(clip.device),
        name_lengths=torch.tensor(name_lengths, dtype=torch.long, device=clip.device),
        order=None if position == "end" else _position_order(position, n_ctx, name_lengths, length).to(clip.device),
    )


@torch.no_grad()
def phrase_embeddings(clip: CLIP, phrase: str, n_ctx: int, tokenizer: ClipTokenizer) -> Tensor:
    """Word embeddings [M, width] (fp32) of the phrase's M tokens: CoOp's initialisation from words."""
    ids = tokenizer(phrase, context_length=clip.context_length).to(clip.device)
    return clip.token_embedding(ids)[0, 1 : 1 + n_ctx].float().clone()


INIT_STD = 0.02
"""Standard deviation of CoOp's random context initialisation, N(0, 0.02^2)."""


def initial_context(clip: CLIP, phrase: str, n_ctx: int, ctx_init: str, shape: tuple[int, ...],
                    tokenizer: ClipTokenizer) -> Tensor:
    """CoOp's initial context (fp32, on the CLIP's device) of ``shape`` ``(..., M, width)``: the word embeddings of
    ``ctx_init``'s phrase repeated over the leading dimensions (CSC: one copy per class), or N(0, 0.02^2) when no
    ``ctx_init`` is given (drawn from torch's current RNG)."""
    if ctx_init.strip():
        return phrase_embeddings(clip, phrase, n_ctx, tokenizer).expand(shape).clone()
    return torch.empty(shape, device=clip.device).normal_(0.0, INIT_STD)


def prepare_prompts(clip: CLIP, classnames: Sequence[str], ctx_init: str, n_ctx: int, position: str,
                    tokenizer: ClipTokenizer, template: str = "{}.") -> tuple[str, int, PromptLayout]:
    """What the CoOp family builds first: the context phrase, M (its token count, or ``n_ctx`` for a random context)
    and the frozen prompt layout of every class (``template``: the text after the context, ``"{}."`` for CoOp)."""
    phrase, count = context_phrase(ctx_init, n_ctx, tokenizer)
    return phrase, count, build_layout(clip, classnames, phrase, count, position, tokenizer, template)
