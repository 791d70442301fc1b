"""The exact fast text paths equal the plain 77-token computation, forward and backward.

Tolerances: the tiny CLIP's text features have magnitude ~1-4; fp32 has a relative precision of 1.2e-7, and the fast
paths only change the summation order (shorter softmax rows, split prefix/suffix matmuls), which across 2 layers of
width 128 gives differences of a few 1e-6 at most. ``ATOL = 2e-5`` is about 10x the observed worst case, and still
3-4 orders of magnitude below any real difference (a wrong mask or position shifts features by ~1e-1). Gradients are
compared relative to their largest entry with the same margin. Under bf16 autocast (8 mantissa bits, relative
precision 4e-3) both paths round differently, so they are compared with 0.1 absolute tolerance and a cosine > 0.999.
"""

from __future__ import annotations

import bisect
import itertools

import pytest
import torch
import torch.nn.functional as F

from vlprompt.backbone.fast_text import (
    MIN_BUCKET_GAIN,
    BucketPlan,
    _suffix_attention,
    encode_full,
    encode_shared_prefix,
    encode_trimmed,
    plan_buckets,
    trimmed_length,
)
from vlprompt.methods.cocoop import CoCoOp, CoCoOpConfig
from vlprompt.methods.coop import CoOp, CoOpConfig

ATOL = 2e-5
CLASSNAMES = ["cat", "golden retriever", "sea or lake", "x", "the quick brown fox jumps over a lazy dog"]


def _random_prompts(clip, batch: int, prefix_len: int, classes: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    width = clip.config.transformer_width
    prefix = torch.randn(batch, prefix_len, width, generator=generator) * 0.02
    suffix = torch.randn(batch, classes, 77 - prefix_len, width, generator=generator) * 0.02
    eot = torch.randint(prefix_len, prefix_len + 12, (classes,), generator=generator)
    full = torch.cat([prefix[:, None].expand(-1, classes, -1, -1), suffix], dim=2).reshape(batch * classes, 77, width)
    return prefix, suffix, eot, full


def _close_grads(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = max(a.abs().max().item(), 1e-12)
    assert (a - b).abs().max().item() <= ATOL * max(scale, 1.0), (a - b).abs().max()


def test_trimmed_length_is_one_past_the_last_eot():
    assert trimmed_length(torch.tensor([3, 9, 4])) == 10
    with pytest.raises(ValueError):
        trimmed_length(torch.tensor([], dtype=torch.long))


def test_trimmed_path_equals_full(clip):
    _, _, eot, full = _random_prompts(clip, 1, 3, 6)
    plain = encode_full(clip, full, eot)
    trimmed = encode_trimmed(clip, full, eot)
    assert trimmed.shape == plain.shape == (6, clip.config.embed_dim)
    assert (trimmed - plain).abs().max().item() < ATOL


@pytest.mark.parametrize("batch", [1, 3])
def test_shared_prefix_forward_and_gradients_equal_full(clip, batch):
    prefix, suffix, eot, full = _random_prompts(clip, batch, 5, 7)
    prefix.requires_grad_(True)
    suffix.requires_grad_(True)
    full = torch.cat([prefix[:, None].expand(-1, 7, -1, -1), suffix], dim=2).reshape(batch * 7, 77, -1)
    plain = encode_full(clip, full, eot.repeat(batch)).view(batch, 7, -1)
    fast = encode_shared_prefix(clip, prefix, suffix, eot)
    assert fast.shape == plain.shape
    assert (fast - plain).abs().max().item() < ATOL
    weights = torch.randn(plain.shape, generator=torch.Generator().manual_seed(1))
    grads_plain = torch.autograd.grad((plain * weights).sum(), [prefix, suffix])
    grads_fast = torch.autograd.grad((fast * weights).sum(), [prefix, suffix])
    for plain_grad, fast_grad in zip(grads_plain, grads_fast, strict=True):
        assert plain_grad.abs().max() > 0
        _close_grads(plain_grad, fast_grad)


def test_shared_prefix_broadcasts_one_suffix_set_over_the_batch(clip):
    prefix, suffix, eot, _ = _random_prompts(clip, 3, 4, 5)
    shared = suffix[:1]
    fast = encode_shared_prefix(clip, prefix, shared, eot)
    copied = encode_shared_prefix(clip, prefix, shared.expand(3, -1, -1, -1).contiguous(), eot)
    assert torch.equal(fast, copied)  # both build the same row matrix (expand, then cat): the same computation
    # and the rows really differ per prefix
    assert (fast[0] - fast[1]).abs().max() > 1e-3


def test_positions_after_the_eot_do_not_matter(clip):
    prefix, suffix, eot, _ = _random_prompts(clip, 1, 4, 5)
    changed = suffix.clone()
    changed[:, :, int(eot.max()) + 1 - 4 :] = 7.0  # garbage after the last EOT
    assert torch.equal(encode_shared_prefix(clip, prefix, suffix, eot),
                       encode_shared_prefix(clip, prefix, changed, eot))


def test_shared_prefix_rejects_bad_shapes(clip):
    prefix, suffix, eot, _ = _random_prompts(clip, 2, 4, 5)
    with pytest.raises(ValueError, match="after the shared prefix"):
        encode_shared_prefix(clip, prefix, suffix, torch.full((5,), 2))
    with pytest.raises(ValueError, match="incompatible"):
        encode_shared_prefix(clip, prefix, suffix[:, :3], eot)
    with pytest.raises(ValueError):
        encode_shared_prefix(clip, prefix[0], suffix, eot)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
def test_coop_fast_equals_plain_forward_and_gradient(clip, position, csc):
    features = torch.randn(4, clip.config.embed_dim, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 4])
    torch.manual_seed(3)
    fast = CoOp(clip, CLASSNAMES, CoOpConfig(n_ctx=6, csc=csc, class_token_position=position))
    plain = CoOp(clip, CLASSNAMES, CoOpConfig(n_ctx=6, csc=csc, class_token_position=position, fast_text=False),
                 ctx=fast.ctx.detach())
    logits_fast, logits_plain = fast(features), plain(features)
    assert (logits_fast - logits_plain).abs().max().item() < ATOL
    F.cross_entropy(logits_fast, labels).backward()
    F.cross_entropy(logits_plain, labels).backward()
    assert fast.ctx.grad.abs().max() > 0
    _close_grads(plain.ctx.grad, fast.ctx.grad)


def _assert_cocoop_fast_equals_plain(clip, classnames, labels, seeds, **config) -> None:
    """CoCoOp with the fast text path and without, same weights: logits within ATOL, every gradient close."""
    features = torch.randn(3, clip.config.embed_dim, generator=torch.Generator().manual_seed(seeds[0]))
    torch.manual_seed(seeds[1])
    fast = CoCoOp(clip, classnames, CoCoOpConfig(**config))
    plain = CoCoOp(clip, classnames, CoCoOpConfig(**config, fast_text=False))
    plain.load_state_dict(fast.state_dict())
    logits_fast, logits_plain = fast(features), plain(features)
    assert logits_fast.shape == (3, len(classnames))
    assert (logits_fast - logits_plain).abs().max().item() < ATOL
    F.cross_entropy(logits_fast, torch.tensor(labels)).backward()
    F.cross_entropy(logits_plain, torch.tensor(labels)).backward()
    for (name, fast_param), plain_param in zip(fast.named_parameters(), plain.parameters(), strict=True):
        assert fast_param.grad is not None and fast_param.grad.abs().max() > 0, name
        _close_grads(plain_param.grad, fast_param.grad)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_cocoop_fast_equals_plain_for_a_batch_of_images(clip, position):
    _assert_cocoop_fast_equals_plain(clip, CLASSNAMES, [0, 3, 4], (4, 5), class_token_position=position)


def test_fast_path_under_bf16_autocast_on_cpu(clip):
    features = torch.randn(3, clip.config.embed_dim, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(7)
    coop = CoOp(clip, CLASSNAMES, CoOpConfig(n_ctx=4))
    cocoop = CoCoOp(clip, CLASSNAMES)
    reference = [coop(features).detach(), cocoop(features).detach()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results = [coop(features), cocoop(features)]
    for fp32, bf16 in zip(reference, results, strict=True):
        assert bf16.dtype == torch.float32  # logits are computed in fp32
        assert (fp32 - bf16).abs().max().item() < 0.1
        assert F.cosine_similarity(fp32.flatten(), bf16.flatten(), dim=0) > 0.999
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results[0].sum().backward()
    assert coop.ctx.grad is not None and coop.ctx.grad.dtype == torch.float32


# --- length buckets ------------------------------------------------------------------------------------------------

def _unbucketed_reference(clip, prefix, suffix, eot):
    """The single padded pass as it was before bucketing: prefix and suffixes interleaved layer by layer."""
    batch, prefix_len, width = prefix.shape
    classes = suffix.shape[1]
    length = int(eot.max()) + 1 - prefix_len
    positions = clip.positional_embedding
    hidden_prefix = prefix + positions[:prefix_len]
    hidden = (suffix[:, :, :length] + positions[prefix_len : prefix_len + length]).expand(batch, -1, -1, -1)
    hidden = hidden.reshape(batch * classes, length, width)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for block in clip.transformer.resblocks:
        q, k, v = block.attn.qkv(block.ln_1(hidden_prefix))
        prefix_out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        suffix_out = _suffix_attention(block.attn, block.ln_1(hidden), k, v, classes, causal)
        hidden_prefix = hidden_prefix + block.attn.merge(prefix_out)
        hidden = hidden + block.attn.merge(suffix_out)
        hidden_prefix = hidden_prefix + block.mlp(block.ln_2(hidden_prefix))
        hidden = hidden + block.mlp(block.ln_2(hidden))
    return clip.text_features_from_hidden(hidden, (eot - prefix_len).repeat(batch)).view(batch, classes, -1)


@pytest.mark.parametrize(
    ("needed", "max_buckets", "limits", "padded"),
    [
        ([5, 5, 5], 4, (5,), 15),                          # one distinct length: nothing to split
        ([1, 1, 1, 1, 15], 4, (1, 15), 19),                # 5 x 15 = 75 -> 4 x 1 + 15; only 2 distinct lengths
        ([1, 1, 1, 1, 15], 1, (15,), 75),                  # forced single bucket
        # 8 x 10 = 80; two buckets: (2,2,3,3 | 9,10,10,10) = 4 x 3 + 4 x 10 = 52 beats (2,2 | ...) = 4 + 60 = 64
        ([2, 2, 3, 3, 9, 10, 10, 10], 2, (3, 10), 52),
        # three buckets' best (2,2 | 3,3 | 9,10,10,10) = 4 + 6 + 40 = 50 saves 3.8% < 10% over 52: two are kept
        ([2, 2, 3, 3, 9, 10, 10, 10], 3, (3, 10), 52),
        ([1, 2, 3, 4, 5, 6, 7, 8], 2, (4, 8), 48),         # 4 x 4 + 4 x 8; cuts after 3 or 5 cost 49
        ([10, 10, 10, 11], 4, (11,), 44),                  # best split (10 | 11) = 41 saves 6.8% < 10%: kept whole
        # unsorted input; 66 -> (3,3,3 | 7,11,11) = 9 + 33 = 42; (3 | 7 | 11) = 9 + 7 + 22 = 38 saves 9.5% < 10%
        ([11, 3, 3, 7, 3, 11], 4, (3, 11), 42),
        ([11, 3, 3, 7, 3, 11, 7, 7], 4, (3, 7, 11), 52),   # now (3 | 7 | 11) = 9 + 21 + 22 = 52 vs 9 + 55 = 64
    ],
)
def test_plan_buckets_on_hand_made_lengths(needed, max_buckets, limits, padded):
    """With a 10% minimum gain (the cases' comments give the arithmetic)."""
    assert plan_buckets(needed, max_buckets, min_gain=0.1) == BucketPlan(limits=limits, padded=padded)


def test_plan_buckets_default_gain_threshold():
    # (3,3,3 | 7,11,11) = 42 -> (3 | 7 | 11) = 38 saves 9.5% >= 2%: three buckets by default
    assert MIN_BUCKET_GAIN == 0.02
    assert plan_buckets([11, 3, 3, 7, 3, 11]) == BucketPlan(limits=(3, 7, 11), padded=38)
    # 100 x 10 + 1 x 11 = 1,111 in one bucket vs 1,000 + 11 = 1,011 in two: 9% saved, split
    assert plan_buckets([10] * 100 + [11]) == BucketPlan(limits=(10, 11), padded=1011)
    # 1 x 10 + 1,000 x 11: 1,001 x 11 = 11,011 in one bucket vs 10 + 11,000 = 11,010 in two: 0.01%, negligible
    assert plan_buckets([10] + [11] * 1000) == BucketPlan(limits=(11,), padded=11011)


def test_plan_buckets_without_a_minimum_gain_is_the_exact_optimum():
    # (2,2 | 3,3 | 9,10,10,10) = 50 < (2,2,3,3 | 9 | 10,10,10) = 51 < (2,2,3,3 | 9,10,10,10) = 52
    assert plan_buckets([2, 2, 3, 3, 9, 10, 10, 10], 3, min_gain=0.0) == BucketPlan(limits=(2, 3, 10), padded=50)


def _brute_force_cost(lengths: list[int], buckets: int) -> int:
    """Minimal padded positions over every split of the sorted distinct lengths into <= ``buckets`` runs."""
    distinct = sorted(set(lengths))
    best = None
    for cuts in itertools.chain.from_iterable(itertools.combinations(range(1, len(distinct)), r)
                                              for r in range(min(buckets, len(distinct)))):
        limits = [distinct[c - 1] for c in cuts] + [distinct[-1]]
        cost = sum(limits[bisect.bisect_left(limits, n)] for n in lengths)
        best = cost if best is None else min(best, cost)
    return best


def test_plan_buckets_matches_brute_force_on_random_lengths():
    generator = torch.Generator().manual_seed(11)
    for trial in range(40):
        lengths = torch.randint(1, 19, (int(torch.randint(1, 30, (1,), generator=generator)),),
                                generator=generator).tolist()
        for buckets in (1, 2, 3, 4):
            plan = plan_buckets(lengths, buckets, min_gain=0.0)
            assert plan.padded == _brute_force_cost(lengths, buckets), (trial, lengths, buckets)
            assert plan.padded == sum(plan.limits[bisect.bisect_left(plan.limits, n)] for n in lengths)
            assert len(plan.limits) <= buckets and list(plan.limits) == sorted(set(plan.limits))
            # with the default gain threshold: never worse than one bucket, never > 10% above a larger count's best
            chosen = plan_buckets(lengths, buckets)
            assert chosen.padded <= len(lengths) * max(lengths)
            assert chosen.padded * (1 - MIN_BUCKET_GAIN) <= plan.padded


def test_plan_buckets_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_buckets"):
        plan_buckets([3], 0)
    with pytest.raises(ValueError, match="empty"):
        plan_buckets([], 4)
    with pytest.raises(ValueError, match="at least one"):
        plan_buckets([0, 3], 4)


def _mixed_length_prompts(clip, batch: int, prefix_len: int, seed: int = 0):
    """Prompts whose suffixes need 1 to 16 positions, interleaved so that the buckets are not contiguous in K."""
    needed = torch.tensor([2, 16, 1, 15, 2, 3, 16, 1, 9, 2, 15])
    prefix, suffix, _, _ = _random_prompts(clip, batch, prefix_len, len(needed), seed)
    return prefix, suffix, needed + prefix_len - 1


@pytest.mark.parametrize("batch", [1, 3])
def test_bucketed_shared_prefix_equals_full_forward_and_gradients(clip, batch):
    prefix, suffix, eot = _mixed_length_prompts(clip, batch, 5)
    classes = len(eot)
    # 11 x 16 = 176 positions -> (1,1,2,2,2 | 3 | 9 | 15,15,16,16) = 10 + 3 + 9 + 64 = 86
    assert plan_buckets((eot - 4).tolist()) == BucketPlan(limits=(2, 3, 9, 16), padded=86)
    prefix.requires_grad_(True)
    suffix.requires_grad_(True)
    shared_suffix = suffix[:1]  # CoCoOp: one suffix set broadcast over the B prefixes
    for suffix_in in (suffix, shared_suffix):
        full = torch.cat([prefix[:, None].expand(-1, classes, -1, -1), suffix_in.expand(batch, -1, -1, -1)], dim=2)
        plain = encode_full(clip, full.reshape(batch * classes, 77, -1), eot.repeat(batch)).view(batch, classes, -1)
        fast = encode_shared_prefix(clip, prefix, suffix_in, eot)
        assert fast.shape == plain.shape == (batch, classes, clip.config.embed_dim)
        assert (fast - plain).abs().max().item() < ATOL
        weights = torch.randn(plain.shape, generator=torch.Generator().manual_seed(1))
        grads_plain = torch.autograd.grad((plain * weights).sum(), [prefix, suffix])
        grads_fast = torch.autograd.grad((fast * weights).sum(), [prefix, suffix])
        for plain_grad, fast_grad in zip(grads_plain, grads_fast, strict=True):
            assert plain_grad.abs().max() > 0
            _close_grads(plain_grad, fast_grad)


@pytest.mark.parametrize("batch", [1, 3])
def test_one_bucket_equals_the_unbucketed_pass(clip, batch):
    # all rows (prefix and suffixes) share one matmul per weight per layer, so only rounding may differ
    prefix, suffix, eot = _mixed_length_prompts(clip, batch, 4, seed=2)
    prefix.requires_grad_(True)
    suffix.requires_grad_(True)
    reference = _unbucketed_reference(clip, prefix, suffix[:1], eot)
    single = encode_shared_prefix(clip, prefix, suffix[:1], eot, max_buckets=1)
    assert (single - reference).abs().max().item() < ATOL
    weights = torch.randn(reference.shape, generator=torch.Generator().manual_seed(3))
    grads_reference = torch.autograd.grad((reference * weights).sum(), [prefix, suffix])
    grads_single = torch.autograd.grad((single * weights).sum(), [prefix, suffix])
    for expected, got in zip(grads_reference, grads_single, strict=True):
        _close_grads(expected, got)
    # the bucketed result differs only by rounding
    bucketed = encode_shared_prefix(clip, prefix, suffix[:1], eot)
    assert (bucketed - single).abs().max().item() < ATOL


def test_each_weight_is_one_matmul_per_layer_whatever_the_buckets(clip):
    # prefix and every bucket go through each linear layer together: the number of weight matmuls is fixed by the
    # layer count, not by the number of buckets (the last layer's prefix rows skip out_proj and the MLP, not a matmul)
    prefix, suffix, eot = _mixed_length_prompts(clip, 2, 4, seed=4)
    calls = []
    original = F.linear

    def counting(x, weight, bias=None):
        calls.append(weight.shape)
        return original(x, weight, bias)

    counts = {}
    for max_buckets in (1, 4):
        calls.clear()
        F.linear = counting
        try:
            encode_shared_prefix(clip, prefix, suffix, eot, max_buckets=max_buckets)
        finally:
            F.linear = original
        counts[max_buckets] = len(calls)
    assert len(plan_buckets((eot - prefix.shape[1] + 1).tolist()).limits) > 1
    assert counts[1] == counts[4] == 4 * len(clip.transformer.resblocks)


MIXED_NAMES = ["x", "cat", "a", "the quick brown fox jumps over a lazy dog while the cat sleeps on a warm mat",
               "golden retriever", "b", "2012 aston martin v8 vantage convertible with a very long name"]


@pytest.mark.parametrize("csc", [False, True])
def test_coop_with_very_different_name_lengths_equals_plain(clip, csc):
    features = torch.randn(4, clip.config.embed_dim, generator=torch.Generator().manual_seed(8))
    labels = torch.tensor([0, 3, 5, 6])
    torch.manual_seed(9)
    fast = CoOp(clip, MIXED_NAMES, CoOpConfig(n_ctx=4, csc=csc))
    plain = CoOp(clip, MIXED_NAMES, CoOpConfig(n_ctx=4, csc=csc, fast_text=False), ctx=fast.ctx.detach())
    name_lengths = fast.layout.name_lengths.tolist()
    assert min(name_lengths) == 1 and max(name_lengths) >= 15
    if not csc:  # the shared-prefix path really splits these prompts into buckets
        layout = fast.layout
        assert len(plan_buckets((layout.eot_index - layout.shared_length + 1).tolist()).limits) > 1
    logits_fast, logits_plain = fast(features), plain(features)
    assert (logits_fast - logits_plain).abs().max().item() < ATOL
    F.cross_entropy(logits_fast, labels).backward()
    F.cross_entropy(logits_plain, labels).backward()
    assert fast.ctx.grad.abs().max() > 0
    _close_grads(plain.ctx.grad, fast.ctx.grad)


def test_cocoop_with_very_different_name_lengths_equals_plain(clip):
    _assert_cocoop_fast_equals_plain(clip, MIXED_NAMES, [0, 3, 6], (10, 11))


@pytest.mark.parametrize("layer", [0, 1])
def test_shared_prefix_with_replaced_positions_equals_the_plain_path(clip, layer):
    """TCP's path: the shared prefix once before ``layer``, then positions 1..T replaced per prompt; against the
    plain 77-token encoding with the same replacement (fp32 rounding only), gradients included."""
    from vlprompt.backbone.fast_text import encode_replacing, encode_shared_prefix_replacing

    generator = torch.Generator().manual_seed(layer)
    width, prompts, prefix_len = clip.config.transformer_width, 5, 4
    eot = torch.tensor([6, 9, 4, 12, 7])
    prefix = torch.randn(1, prefix_len, width, generator=generator).requires_grad_(True)
    suffix = torch.randn(1, prompts, 77 - prefix_len, width, generator=generator)
    tokens = torch.randn(prompts, prefix_len - 1, width, generator=generator).requires_grad_(True)
    fast = encode_shared_prefix_replacing(clip, prefix, suffix, eot, tokens, layer=layer)
    full = torch.cat([prefix.expand(prompts, -1, -1), suffix[0]], dim=1)
    plain = encode_replacing(clip, full, eot, tokens, layer=layer, trim=False)
    assert fast.shape == (prompts, clip.config.embed_dim)
    assert (fast - plain).abs().max() < 1e-5
    grads = [torch.autograd.grad(out.square().sum(), [prefix, tokens]) for out in (fast, plain)]
    for ours, reference in zip(*grads, strict=True):
        assert (ours - reference).abs().max() < 1e-4 * max(1.0, float(reference.abs().max()))
    with pytest.raises(ValueError, match="inside the shared prefix"):
        encode_shared_prefix_replacing(clip, prefix, suffix, eot, torch.zeros(prompts, prefix_len, width), layer=1)
