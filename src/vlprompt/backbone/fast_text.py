"""Exact shortcuts for encoding prompts given as token embeddings.

CLIP's text tower is causal and read at the end-of-text (EOT) token, which gives two exact savings:

1. **Shortest length** (:func:`encode_trimmed`): positions after the longest prompt's EOT never influence any
   result, so the sequences can be cut right after it instead of running all 77 positions.
2. **Shared prefix** (:func:`encode_shared_prefix`): when K prompts start with the same P token embeddings (the start
   token and, for CoOp's unified context, the context vectors before the class name), the hidden states of those
   positions are the same for every prompt at every layer. They are computed once (per image for CoCoOp, where the
   prefix depends on the image); each prompt's remaining "suffix" positions attend to the shared prefix keys and
   values (broadcast over the K prompts, never copied) and causally to their own suffix.

Both give the plain 77-token result (:func:`encode_full`, i.e. ``clip.encode_text_embeddings``) up to floating-point
rounding (summation order differs; fp32 differences are ~1e-6 of the feature scale). They work under autocast
(bf16 on CPU, fp16/bf16 on CUDA) and run no Python loop over prompts or images, only over layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlprompt.backbone.model import CLIP, ResidualAttentionBlock, SelfAttention


def trimmed_length(eot_index: Tensor) -> int:
    """Number of positions that matter: one past the last EOT position."""
    if eot_index.numel() == 0:
        raise ValueError("no prompts to encode (eot_index is empty)")
    return int(eot_index.max()) + 1


def encode_full(clip: CLIP, x: Tensor, eot_index: Tensor) -> Tensor:
    """The plain path: text features ``[N, D]`` of token embeddings ``x`` ``[N, L, width]`` at all L positions."""
    return clip.encode_text_embeddings(x, eot_index)


def encode_trimmed(clip: CLIP, x: Tensor, eot_index: Tensor) -> Tensor:
    """As :func:`encode_full`, running only the positions up to the last EOT (exact: later ones are never read)."""
    return clip.encode_text_embeddings(x[:, : trimmed_length(eot_index)], eot_index)


def encode_shared_prefix(clip: CLIP, prefix: Tensor, suffix: Tensor, eot_index: Tensor) -> Tensor:
    """Text features ``[B, K, D]`` of the B x K prompts ``prefix[b] + suffix[b, k]``, with each prefix computed once.

    ``prefix``: ``[B, P, width]`` token embeddings (no positional embedding) shared by the K prompts of row b
    (B = 1 for CoOp, B images for CoCoOp). ``suffix``: ``[B, K, S, width]`` or ``[1, K, S, width]`` (the same
    suffixes for every row) with S >= the needed length. ``eot_index``: ``[K]`` EOT position of each prompt in the
    whole sequence (prefix included), all >= P. Positions after the last EOT are dropped (exact).
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

    dtype = clip.dtype
    positions = clip.positional_embedding.to(dtype)
    hidden_prefix = prefix.to(dtype) + positions[:prefix_len]
    hidden_suffix = suffix[:, :, :suffix_len].to(dtype) + positions[prefix_len : prefix_len + suffix_len]
    hidden_suffix = hidden_suffix.expand(batch, -1, -1, -1).reshape(batch * num_prompts, suffix_len, width)
    causal = torch.ones(suffix_len, suffix_len, dtype=torch.bool, device=prefix.device).tril()
    for block in clip.transformer.resblocks:
        hidden_prefix, hidden_suffix = _block(block, hidden_prefix, hidden_suffix, num_prompts, causal)
    read_at = (eot_index.to(prefix.device) - prefix_len).repeat(batch)
    features = clip.text_features_from_hidden(hidden_suffix, read_at)
    return features.view(batch, num_prompts, -1)


def _block(block: ResidualAttentionBlock, prefix: Tensor, suffix: Tensor, num_prompts: int,
           causal: Tensor) -> tuple[Tensor, Tensor]:
    """One pre-LN residual block over the shared prefix [B, P, w] and the suffixes [B*K, S, w]."""
    attn = block.attn
    q_prefix, k_prefix, v_prefix = attn.qkv(block.ln_1(prefix))
    prefix_out = F.scaled_dot_product_attention(q_prefix, k_prefix, v_prefix, is_causal=True)
    suffix_out = _suffix_attention(attn, block.ln_1(suffix), k_prefix, v_prefix, num_prompts, causal)
    prefix = prefix + attn.merge(prefix_out)
    suffix = suffix + attn.merge(suffix_out)
    prefix = prefix + block.mlp(block.ln_2(prefix))
    suffix = suffix + block.mlp(block.ln_2(suffix))
    return prefix, suffix


def _suffix_attention(attn: SelfAttention, x: Tensor, k_prefix: Tensor, v_prefix: Tensor, num_prompts: int,
                      causal: Tensor) -> Tensor:
    """Attention of the suffix queries over [shared prefix keys; own suffix keys (causal)]: [B*K, heads, S, d].

    Scores against the prefix are one matmul of all K*S queries of a row with that row's P prefix keys, so the
    prefix keys and values are never repeated K times. The softmax over both parts runs in fp32.
    """
    q, k, v = attn.qkv(x)  # [B*K, H, S, d]
    rows, heads, length, head_dim = q.shape
    batch = rows // num_prompts
    prefix_len = k_prefix.shape[2]
    q = q * head_dim**-0.5
    # [B, H, K*S, d] @ [B, H, d, P] -> [B, H, K*S, P] -> [B*K, H, S, P]
    q_rows = q.view(batch, num_prompts, heads, length, head_dim).transpose(1, 2)
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
