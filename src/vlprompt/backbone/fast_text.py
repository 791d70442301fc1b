"""Exact shortcuts for encoding prompts given as token embeddings.

CLIP's text tower is causal and read at the end-of-text (EOT) token, which gives two exact savings:

1. **Shortest length** (:func:`encode_trimmed`): positions after the longest prompt's EOT never influence any
   result, so the sequences can be cut right after it instead of running all 77 positions.
2. **Shared prefix** (:func:`encode_shared_prefix`): when K prompts start with the same P token embeddings (the start
   token and, for CoOp's unified context, the context vectors before the class name), the hidden states of those
   positions are the same for every prompt at every layer. They are computed once (per image for CoCoOp, where the
   prefix depends on the image); each prompt's remaining "suffix" positions attend to the prefix keys and values
   (broadcast over the K prompts, never copied) and causally to their own suffix. Class names differ in length
   (Stanford Cars: 18 suffix positions for the longest, 6.2 on average), so the suffixes run in a few buckets of
   similar length (:func:`plan_buckets`), each cut after its own longest EOT, instead of all padded to the longest.
   Layer by layer, the prefix rows and every bucket's rows form one row matrix that goes through each linear layer
   in one matmul (only attention is split), so each weight is read once per layer forward and once backward: with
   few prompts (CoCoOp, K=10) the rows are few and the step is bound by reading the weights, not by FLOPs.

Both take the text tower's :class:`~vlprompt.backbone.extension.TowerExtension` (deep prompts shared by all classes,
q/k/v updates): deep prompts replace positions inside the shared prefix, so they are applied to the prefix rows only
and the shortcuts stay exact (deep prompts outside the prefix are refused there: use :func:`encode_trimmed`).

Both give the plain 77-token result (:func:`encode_full`, i.e. ``clip.encode_text_embeddings``) up to floating-point
rounding (summation order differs; fp32 differences are ~1e-6 of the feature scale). They work under autocast
(bf16 on CPU, fp16/bf16 on CUDA) and run no Python loop over prompts or images, only over layers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from vlprompt.backbone.extension import TowerExtension, is_active
from vlprompt.backbone.model import CLIP, SelfAttention

MIN_BUCKET_GAIN = 0.02
"""More length buckets are used only if they save at least this fraction of the padded suffix positions.

A bucket costs a few more small attention ops per layer (its rows share the linear layers' matmuls with the other
buckets); a padded position costs a full token through every layer. Measured (ViT-B/16 text tower, CoOp M=16,
K=102 Stanford Cars names, CPU, 1 thread, when each bucket still made its own pass through the layers): 4 buckets
(1,092 positions) ran 4.5% faster than 2 (1,175), i.e. the per-bucket overhead is worth a handful of positions, so
only gains of a few percent are treated as negligible."""


def trimmed_length(eot_index: Tensor) -> int:
    """Number of positions that matter: one past the last EOT position."""
    if eot_index.numel() == 0:
        raise ValueError("no prompts to encode (eot_index is empty)")
    return int(eot_index.max()) + 1


def encode_full(clip: CLIP, x: Tensor, eot_index: Tensor, extension: TowerExtension | None = None) -> Tensor:
    """The plain path: text features ``[N, D]`` of token embeddings ``x`` ``[N, L, width]`` at all L positions."""
    return clip.encode_text_embeddings(x, eot_index, extension)


def encode_trimmed(clip: CLIP, x: Tensor, eot_index: Tensor, extension: TowerExtension | None = None) -> Tensor:
    """As :func:`encode_full`, running only the positions up to the last EOT (exact: later ones are never read;
    deep prompts must lie before the EOT positions, as those at the start of a prompt do)."""
    return clip.encode_text_embeddings(x[:, : trimmed_length(eot_index)], eot_index, extension)


@dataclass(frozen=True)
class BucketPlan:
    """A split of prompts, sorted by needed suffix length, into contiguous length buckets.

    ``limits``: each bucket's (padded) suffix length, increasing; a prompt needing ``n`` positions runs in the first
    bucket whose limit is >= n. ``padded``: total suffix positions run, sum over buckets of limit x prompts in it.
    """

    limits: tuple[int, ...]
    padded: int


def plan_buckets(needed: Sequence[int], max_buckets: int = 4, min_gain: float = MIN_BUCKET_GAIN) -> BucketPlan:
    """Split prompts needing ``needed[k]`` suffix positions into at most ``max_buckets`` length buckets.

    Over the sorted distinct lengths ``l_1 < ... < l_m`` with counts ``c_i``, a bucket is a contiguous run
    ``i..j`` and costs ``l_j * (c_i + ... + c_j)`` padded positions; a dynamic programme gives the minimal total
    ``cost(b)`` for every bucket count ``b <= max_buckets`` (exact, O(max_buckets * m^2) with m <= 77). Extra
    buckets cost passes (small ops, launches), so the fewest buckets ``b`` are used such that no larger count saves
    ``min_gain`` (a fraction) of ``cost(b)``: ``cost(b) * (1 - min_gain) < cost(max)``, or ``b = 1`` if even the
    best split saves less than ``min_gain`` of the single bucket.
    """
    if max_buckets < 1:
        raise ValueError(f"max_buckets must be >= 1, got {max_buckets}")
    if not 0.0 <= min_gain < 1.0:
        raise ValueError(f"min_gain must be in [0, 1), got {min_gain}")
    if len(needed) == 0:
        raise ValueError("no prompts to encode (needed is empty)")
    if min(needed) < 1:
        raise ValueError(f"every prompt needs at least one suffix position, got {min(needed)}")
    counts = Counter(int(n) for n in needed)
    return _plan_sorted(tuple(sorted(counts.items())), max_buckets, float(min_gain))


@lru_cache(maxsize=64)
def _plan_sorted(length_counts: tuple[tuple[int, int], ...], max_buckets: int, min_gain: float) -> BucketPlan:
    """:func:`plan_buckets` on the sorted distinct ``(length, count)`` pairs (cached: a layout plans once)."""
    lengths = [length for length, _ in length_counts]
    cumulative = [0]
    for _, count in length_counts:
        cumulative.append(cumulative[-1] + count)
    distinct = len(lengths)
    buckets = min(max_buckets, distinct)
    # best[b][j]: minimal cost of the first j distinct lengths in b buckets; cut[b][j]: start of the last bucket
    infinity = float("inf")
    best = [[infinity] * (distinct + 1) for _ in range(buckets + 1)]
    cut = [[0] * (distinct + 1) for _ in range(buckets + 1)]
    best[0][0] = 0
    for b in range(1, buckets + 1):
        for j in range(b, distinct + 1):
            for i in range(b - 1, j):  # last bucket = distinct lengths i..j-1
                cost = best[b - 1][i] + lengths[j - 1] * (cumulative[j] - cumulative[i])
                if cost < best[b][j]:
                    best[b][j], cut[b][j] = cost, i
    costs = [best[b][distinct] for b in range(1, buckets + 1)]
    chosen = next(b for b in range(1, buckets + 1) if costs[b - 1] * (1.0 - min_gain) < costs[-1]
                  or costs[b - 1] == costs[-1])
    limits, j = [], distinct
    for b in range(chosen, 0, -1):
        limits.append(lengths[j - 1])
        j = cut[b][j]
    return BucketPlan(limits=tuple(reversed(limits)), padded=int(costs[chosen - 1]))


def encode_shared_prefix(clip: CLIP, prefix: Tensor, suffix: Tensor, eot_index: Tensor, *,
                         max_buckets: int = 4, extension: TowerExtension | None = None) -> Tensor:
    """Text features ``[B, K, D]`` of the B x K prompts ``prefix[b] + suffix[b, k]``, with each prefix computed once.

    ``prefix``: ``[B, P, width]`` token embeddings (no positional embedding) shared by the K prompts of row b
    (B = 1 for CoOp, B images for CoCoOp). ``suffix``: ``[B, K, S, width]`` or ``[1, K, S, width]`` (the same
    suffixes for every row) with S >= the needed length. ``eot_index``: ``[K]`` EOT position of each prompt in the
    whole sequence (prefix included), all >= P.

    The prompts are grouped into at most ``max_buckets`` buckets of similar needed suffix length ``eot - P + 1``
    (:func:`plan_buckets`); each bucket runs only up to its own longest EOT (exact: later positions are never read).
    The prefix rows and all buckets' rows run through the layers together (:func:`_run_layers`: one matmul per
    weight per layer), each suffix attending to its row's prefix keys and values, and the features are read in
    prompt order. Gradients reach the prefix from every bucket through autograd. ``max_buckets=1`` is the single
    padded pass. ``extension``: the text tower's deep prompts, whose edits must replace positions inside the prefix
    (they are applied to the prefix rows before their block), and q/k/v updates (applied to every row).
    Activation checkpointing is not applied on this path (its activations are a small part of a step's memory).
    """
    if prefix.ndim != 3 or suffix.ndim != 4:
        raise ValueError(f"prefix must be [B, P, width] and suffix [B, K, S, width], got {tuple(prefix.shape)} and "
                         f"{tuple(suffix.shape)}")
    batch, prefix_len, width = prefix.shape
    num_prompts = suffix.shape[1]
    if suffix.shape[0] not in (1, batch) or suffix.shape[-1] != width or eot_index.shape != (num_prompts,):
        raise ValueError(f"incompatible shapes: prefix {tuple(prefix.shape)}, suffix {tuple(suffix.shape)}, "
                         f"eot_index {tuple(eot_index.shape)}")
    if int(eot_index.min()) < prefix_len:
        raise ValueError(f"every EOT must come after the shared prefix of {prefix_len} positions")
    suffix_len = trimmed_length(eot_index) - prefix_len
    if suffix.shape[2] < suffix_len:
        raise ValueError(f"suffix holds {suffix.shape[2]} positions, the EOT positions need {suffix_len}")
    if is_active(extension):
        assert extension is not None
        extension.check_text()
        extension.check_layers(clip.config.transformer_layers, "text")
        for layer, edit in extension.blocks.items():
            if edit.position is None or edit.position < 0 or edit.position + edit.count > prefix_len:
                raise ValueError(f"the edit of block {layer} (position {edit.position}, {edit.count} tokens) lies "
                                 f"outside the shared prefix of {prefix_len} positions; use encode_trimmed")
    else:
        extension = None

    needed = eot_index.to(prefix.device) - prefix_len + 1  # [K] suffix positions each prompt needs
    plan = plan_buckets(needed.tolist(), max_buckets)
    dtype = clip.dtype
    positions = clip.positional_embedding.to(dtype)
    if len(plan.limits) == 1:
        members = [torch.arange(num_prompts, device=needed.device)]
    else:
        bucket_of = torch.bucketize(needed, torch.tensor(plan.limits, device=needed.device))  # first limit >= needed
        members = [torch.nonzero(bucket_of == b).flatten() for b in range(len(plan.limits))]

    # one row matrix: [prefix rows (B*P); bucket 0 rows (B*n_0*S_0); bucket 1 rows; ...], row-major within each part
    rows = [(prefix.to(dtype) + positions[:prefix_len]).reshape(batch * prefix_len, width)]
    buckets = []  # (number of prompts, length, causal mask) per bucket
    read_rows = torch.empty(batch, num_prompts, dtype=torch.long, device=needed.device)  # row of each feature
    offset = 0  # within the suffix rows
    image = torch.arange(batch, device=needed.device)[:, None]
    for index, length in zip(members, plan.limits, strict=True):
        count = index.numel()
        part = suffix if len(members) == 1 else suffix.index_select(1, index)
        part = (part[:, :, :length].to(dtype) + positions[prefix_len : prefix_len + length]).expand(batch, -1, -1, -1)
        rows.append(part.reshape(batch * count * length, width))
        slot = torch.arange(count, device=needed.device)[None, :]
        read_rows[:, index] = offset + (image * count + slot) * length + (needed[index] - 1)[None, :]
        causal = torch.ones(length, length, dtype=torch.bool, device=needed.device).tril()
        buckets.append((count, length, causal))
        offset += batch * count * length
    hidden = torch.cat(rows)
    hidden = _run_layers(clip, hidden, batch, prefix_len, buckets, extension=extension)  # suffix rows only
    features = clip.ln_final(hidden.index_select(0, read_rows.flatten()))
    return (features @ clip.text_projection.to(features.dtype)).view(batch, num_prompts, -1)


def _run_layers(clip: CLIP, hidden: Tensor, batch: int, prefix_len: int,
                buckets: list[tuple[int, int, Tensor]], blocks: Sequence[torch.nn.Module] | None = None,
                keep_prefix: bool = False, extension: TowerExtension | None = None) -> Tensor:
    """All layers (or ``blocks``) over the row matrix ``hidden`` ``[B*P + sum_b B*n_b*S_b, w]``; returns the final
    suffix rows (``keep_prefix``: all rows, the prefix's first).

    Every linear layer (and layer norm) runs once per layer over all rows, prefix and every bucket together, so each
    weight is read once per layer forward and once backward whatever the number of buckets; only attention is split:
    the prefix attends causally to itself, each bucket's suffixes to their row's prefix keys/values and causally to
    their own positions (:func:`_attend_suffix`). The last layer's prefix rows are never read afterwards (only their
    keys and values), so that layer's output projection and MLP run on the suffix rows only. ``extension``'s block
    edits replace prefix positions (checked by the caller); its q/k/v update applies to every row.
    """
    blocks = list(clip.transformer.resblocks) if blocks is None else list(blocks)
    prefix_rows = batch * prefix_len
    sizes = [prefix_rows] + [batch * count * length for count, length, _ in buckets]
    edits = extension.blocks if extension is not None else {}
    delta = extension.qkv_delta if extension is not None else None
    for layer, block in enumerate(blocks):
        attn = block.attn
        heads = attn.heads
        width = hidden.shape[-1]
        head_dim = width // heads
        edit = edits.get(layer)
        if edit is not None:  # deep prompts: the prefix rows of every row b get this layer's tokens
            prefix_part = edit.apply(hidden[:prefix_rows].view(batch, prefix_len, width))
            hidden = torch.cat([prefix_part.reshape(prefix_rows, width), hidden[prefix_rows:]])
        normed = block.ln_1(hidden)
        qkv = F.linear(normed, attn.in_proj_weight, attn.in_proj_bias)  # [R, 3w]
        if delta is not None:
            qkv = qkv + delta(layer, normed)
        # one split (its backward concatenates the parts' gradients once; separate slices would each zero-fill a
        # gradient of the whole matrix)
        parts = qkv.split(sizes)
        # [B, P, 3, H, d] -> 3 x [B, H, P, d]
        q, k_prefix, v_prefix = parts[0].view(batch, prefix_len, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        last = layer + 1 == len(blocks) and not keep_prefix
        outputs = []
        if not last:
            out = F.scaled_dot_product_attention(q, k_prefix, v_prefix, is_causal=True)  # [B, H, P, d]
            outputs.append(out.transpose(1, 2).reshape(prefix_rows, width))
        for part, (count, length, causal) in zip(parts[1:], buckets, strict=True):
            q, k, v = part.view(batch * count, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
            out = _attend_suffix(q, k, v, k_prefix, v_prefix, count, causal)  # [B*n_b, H, S_b, d]
            outputs.append(out.transpose(1, 2).reshape(part.shape[0], width))
        attended = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        if last:
            hidden = hidden[prefix_rows:]
        hidden = hidden + attn.out_proj(attended)
        hidden = hidden + block.mlp(block.ln_2(hidden))
    return hidden


def _suffix_attention(attn: SelfAttention, x: Tensor, k_prefix: Tensor, v_prefix: Tensor, num_prompts: int,
                      causal: Tensor) -> Tensor:
    """Attention of the suffix queries over [shared prefix keys; own suffix keys (causal)]: [B*K, heads, S, d].

    Scores against the prefix are one matmul of all K*S queries of a row with that row's P prefix keys, so the
    prefix keys and values are never repeated K times. The softmax over both parts runs in fp32.
    """
    q, k, v = attn.qkv(x)  # [B*K, H, S, d]
    return _attend_suffix(q, k, v, k_prefix, v_prefix, num_prompts, causal)


def _attend_suffix(q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor, num_prompts: int,
                   causal: Tensor) -> Tensor:
    """:func:`_suffix_attention` given the suffix queries, keys and values ``[B*K, heads, S, d]``."""
    rows, heads, length, head_dim = q.shape
    batch = rows // num_prompts
    prefix_len = k_prefix.shape[2]
    q = q * head_dim**-0.5
    # [B, H, K*S, d] @ [B, H, d, P] -> [B, H, K*S, P] -> [B*K, H, S, P]
    q_rows = q.reshape(batch, num_prompts, heads, length, head_dim).transpose(1, 2)
    q_rows = q_rows.reshape(batch, heads, num_prompts * length, head_dim)
    to_prefix = (q_rows @ k_prefix.transpose(-2, -1)).view(batch, heads, num_prompts, length, prefix_len)
    to_prefix = to_prefix.transpose(1, 2).reshape(rows, heads, length, prefix_len)
    to_self = (q @ k.transpose(-2, -1)).float().masked_fill(~causal, float("-inf"))
    weights = torch.softmax(torch.cat([to_prefix.float(), to_self], dim=-1), dim=-1).to(v.dtype)
    w_prefix = weights[..., :prefix_len].reshape(batch, num_prompts, heads, length, prefix_len).transpose(1, 2)
    w_prefix = w_prefix.reshape(batch, heads, num_prompts * length, prefix_len)
    from_prefix = (w_prefix @ v_prefix).view(batch, heads, num_prompts, length, head_dim).transpose(1, 2)
    from_self = weights[..., prefix_len:] @ v
    return from_prefix.reshape(rows, heads, length, head_dim) + from_self


def encode_replacing(clip: CLIP, x: Tensor, eot_index: Tensor, tokens: Tensor, *, layer: int, start: int = 1,
                     trim: bool = True) -> Tensor:
    """Text features ``[N, D]`` of token embeddings ``x`` ``[N, L, width]`` whose hidden states at positions
    ``start .. start + T - 1`` are replaced by ``tokens`` ``[N, T, width]`` at the input of text block ``layer``
    (0-based; ``layer = 0`` replaces the embeddings after the positional embedding is added).

    This is the deep-prompt pattern of TCP (class-aware tokens entering the text tower at one layer): the replaced
    positions' earlier hidden states only influence the later positions through the layers before ``layer``.
    ``trim`` runs only the positions up to the last EOT (exact, as :func:`encode_trimmed`); ``trim=False`` runs all L.
    """
    blocks = list(clip.transformer.resblocks)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} is not a text block of this CLIP (0 .. {len(blocks) - 1})")
    count = tokens.shape[1]
    if tokens.shape[0] != x.shape[0] or tokens.shape[-1] != x.shape[-1] or start < 1 \
            or start + count > int(eot_index.min()):
        raise ValueError(f"tokens {tuple(tokens.shape)} at position {start} do not fit prompts {tuple(x.shape)} "
                         f"with EOT positions from {int(eot_index.min())}")
    if trim:
        x = x[:, : trimmed_length(eot_index)]
    length = x.shape[1]
    hidden = x.to(clip.dtype) + clip.positional_embedding[:length].to(clip.dtype)
    for index, block in enumerate(blocks):
        if index == layer:
            hidden = torch.cat([hidden[:, :start], tokens.to(hidden.dtype), hidden[:, start + count :]], dim=1)
        hidden = block(hidden, causal=True)
    return clip.text_features_from_hidden(hidden, eot_index)


def encode_shared_prefix_replacing(clip: CLIP, prefix: Tensor, suffix: Tensor, eot_index: Tensor, tokens: Tensor, *,
                                   layer: int) -> Tensor:
    """:func:`encode_replacing` (``start = 1``) of the K prompts ``prefix + suffix[0, k]``, the shared prefix computed
    once in the blocks before ``layer``: text features ``[K, D]``.

    ``prefix`` ``[1, P, width]`` (e.g. SOT and a unified context), ``suffix`` ``[1, K, S, width]``, ``tokens``
    ``[K, T, width]`` with T <= P - 1 (they replace prefix positions 1..T, which makes the sequences differ per prompt
    from ``layer`` on). Blocks before ``layer`` run the prefix once and the suffixes attending to it (one length
    bucket, cut after the last EOT); from ``layer`` on, each prompt's whole sequence runs on its own. Exact up to
    floating-point rounding, like :func:`encode_shared_prefix`.
    """
    blocks = list(clip.transformer.resblocks)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} is not a text block of this CLIP (0 .. {len(blocks) - 1})")
    if prefix.ndim != 3 or prefix.shape[0] != 1 or suffix.ndim != 4 or suffix.shape[0] != 1:
        raise ValueError(f"prefix must be [1, P, width] and suffix [1, K, S, width], got {tuple(prefix.shape)} and "
                         f"{tuple(suffix.shape)}")
    prefix_len, width = prefix.shape[1], prefix.shape[2]
    num_prompts, count = suffix.shape[1], tokens.shape[1]
    if tokens.shape[0] != num_prompts or count > prefix_len - 1 or int(eot_index.min()) < prefix_len:
        raise ValueError(f"tokens {tuple(tokens.shape)} must replace positions inside the shared prefix of "
                         f"{prefix_len} positions of {num_prompts} prompts, whose EOTs come after it")
    length = trimmed_length(eot_index) - prefix_len
    dtype = clip.dtype
    if layer == 0:
        prompts = torch.cat([prefix.expand(num_prompts, -1, -1), suffix[0, :, :length]], dim=1)
        return encode_replacing(clip, prompts, eot_index, tokens, layer=0)
    positions = clip.positional_embedding.to(dtype)
    rows = torch.cat([
        (prefix[0].to(dtype) + positions[:prefix_len]),
        (suffix[0, :, :length].to(dtype) + positions[prefix_len : prefix_len + length]).reshape(-1, width),
    ])
    causal = torch.ones(length, length, dtype=torch.bool, device=rows.device).tril()
    hidden = _run_layers(clip, rows, 1, prefix_len, [(num_prompts, length, causal)], blocks=blocks[:layer],
                         keep_prefix=True)
    shared, own = hidden[:prefix_len], hidden[prefix_len:].view(num_prompts, length, width)
    x = torch.cat([shared[None, :1].expand(num_prompts, 1, width), tokens.to(hidden.dtype),
                   shared[None, 1 + count :].expand(num_prompts, -1, width), own], dim=1)
    for block in blocks[layer:]:
        x = block(x, causal=True)
    return clip.text_features_from_hidden(x, eot_index)
