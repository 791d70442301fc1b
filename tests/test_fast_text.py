"""The exact fast text paths equal the plain 77-token computation, forward and backward.

Tolerances: the tiny CLIP's text features have magnitude ~1-4; fp32 has a relative precision of 1.2e-7, and the fast
paths only change the summation order (shorter softmax rows, split prefix/suffix matmuls), which across 2 layers of
width 128 gives differences of a few 1e-6 at most. ``ATOL = 2e-5`` is about 10x the observed worst case, and still
3-4 orders of magnitude below any real difference (a wrong mask or position shifts features by ~1e-1). Gradients are
compared relative to their largest entry with the same margin. Under bf16 autocast (8 mantissa bits, relative
precision 4e-3) both paths round differently, so they are compared with 0.1 absolute tolerance and a cosine > 0.999.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlprompt.backbone.fast_text import encode_full, encode_shared_prefix, encode_trimmed, trimmed_length
from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.methods.cocoop import CoCoOp, CoCoOpConfig
from vlprompt.methods.coop import CoOp, CoOpConfig

ATOL = 2e-5
CLASSNAMES = ["cat", "golden retriever", "sea or lake", "x", "the quick brown fox jumps over a lazy dog"]


@pytest.fixture(scope="module")
def clip():
    return build_tiny_clip("vit", seed=0)


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
    assert torch.equal(fast, copied)
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


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_cocoop_fast_equals_plain_for_a_batch_of_images(clip, position):
    features = torch.randn(3, clip.config.embed_dim, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 3, 4])
    torch.manual_seed(5)
    fast = CoCoOp(clip, CLASSNAMES, CoCoOpConfig(class_token_position=position))
    plain = CoCoOp(clip, CLASSNAMES, CoCoOpConfig(class_token_position=position, fast_text=False))
    plain.load_state_dict(fast.state_dict())
    logits_fast, logits_plain = fast(features), plain(features)
    assert logits_fast.shape == (3, len(CLASSNAMES))
    assert (logits_fast - logits_plain).abs().max().item() < ATOL
    F.cross_entropy(logits_fast, labels).backward()
    F.cross_entropy(logits_plain, labels).backward()
    for (name, fast_param), plain_param in zip(fast.named_parameters(), plain.parameters(), strict=True):
        assert fast_param.grad is not None and fast_param.grad.abs().max() > 0, name
        _close_grads(plain_param.grad, fast_param.grad)


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
