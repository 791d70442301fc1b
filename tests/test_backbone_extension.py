"""The towers' extension points: without an extension they are the frozen CLIP bit for bit; deep prompts, q/k/v
updates and activation checkpointing compute what an independent computation does.

Tolerances: the tiny CLIP's features have magnitude ~1-4 and fp32 a relative precision of 1.2e-7; paths that only
change the summation order (fast text paths, a weight update folded into the weights) differ by a few 1e-6, so
``ATOL = 2e-5`` (as tests/test_fast_text.py). Paths that run the same operations on the same shapes are compared
exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from vlprompt.backbone.extension import TokenEdit, TowerExtension
from vlprompt.backbone.fast_text import encode_full, encode_shared_prefix, encode_trimmed
from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.errors import ConfigError

ATOL = 2e-5


@pytest.fixture(scope="module")
def clip():
    return build_tiny_clip("vit", seed=0, layers=3, text_layers=3)


def _images(seed: int = 0, count: int = 3):
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _text(clip, seed: int = 0, classes: int = 4, prefix_len: int = 5):
    generator = torch.Generator().manual_seed(seed)
    width = clip.config.transformer_width
    prefix = torch.randn(1, prefix_len, width, generator=generator) * 0.02
    suffix = torch.randn(1, classes, 77 - prefix_len, width, generator=generator) * 0.02
    eot = torch.tensor([prefix_len + 2, prefix_len + 7, prefix_len, prefix_len + 3])[:classes]
    full = torch.cat([prefix[:, None].expand(-1, classes, -1, -1), suffix], dim=2)[0]
    return prefix, suffix, eot, full


def _tokens(count: int, width: int, seed: int, batch: int | None = None):
    shape = (count, width) if batch is None else (batch, count, width)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


# ------------------------------------------------------------------------------------------------ no extension


def test_without_an_extension_the_towers_are_unchanged_bit_for_bit(clip):
    images = _images()
    plain = clip.encode_image(images)
    assert torch.equal(clip.encode_image(images, None), plain)
    assert torch.equal(clip.encode_image(images, TowerExtension()), plain)
    prefix, suffix, eot, full = _text(clip)
    text = clip.encode_text_embeddings(full, eot)
    assert torch.equal(clip.encode_text_embeddings(full, eot, TowerExtension()), text)
    assert torch.equal(encode_trimmed(clip, full, eot, TowerExtension()), encode_trimmed(clip, full, eot))
    assert torch.equal(encode_shared_prefix(clip, prefix, suffix, eot, extension=TowerExtension()),
                       encode_shared_prefix(clip, prefix, suffix, eot))


def test_the_plain_tower_is_the_blocks_applied_in_turn(clip):
    """An independent statement of the frozen image tower (the extension-free path is this computation)."""
    visual = clip.visual
    images = _images(1)
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(3, 1, -1), x], 1) + visual.positional_embedding
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks:
        x = block(x)
    assert torch.equal(visual.ln_post(x[:, 0]) @ visual.proj, clip.encode_image(images))


# ------------------------------------------------------------------------------------------------ token edits


def test_token_edit_replaces_inserts_and_appends():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    tokens = -torch.ones(2, 3)
    replaced = TokenEdit(tokens, position=1).apply(hidden)
    assert replaced.shape == hidden.shape and torch.equal(replaced[:, 1:3], -torch.ones(2, 2, 3))
    assert torch.equal(replaced[:, [0, 3, 4]], hidden[:, [0, 3, 4]])
    last = TokenEdit(tokens, position=-2).apply(hidden)
    assert torch.equal(last[:, 3:], -torch.ones(2, 2, 3)) and torch.equal(last[:, :3], hidden[:, :3])
    appended = TokenEdit(tokens, position=None, replace=False).apply(hidden)
    assert appended.shape == (2, 7, 3) and torch.equal(appended[:, :5], hidden)
    inserted = TokenEdit(tokens, position=2, replace=False).apply(hidden)
    assert torch.equal(inserted[:, [0, 1, 4, 5, 6]], hidden) and torch.equal(inserted[:, 2:4], -torch.ones(2, 2, 3))
    per_row = TokenEdit(torch.stack([tokens, 2 * tokens]), position=0).apply(hidden)
    assert torch.equal(per_row[1, :2], -2 * torch.ones(2, 3))
    with pytest.raises(ValueError, match="does not fit"):
        TokenEdit(tokens, position=4).apply(hidden)
    with pytest.raises(ValueError, match="needs a position"):
        TokenEdit(tokens, position=None)


def test_deep_vision_prompts_enter_where_an_independent_computation_puts_them(clip):
    """Appended before ln_pre, then the last n positions overwritten before blocks 1 and 2 (index assignment, not
    the extension's concatenation)."""
    visual, images, n = clip.visual, _images(2), 2
    width = clip.config.vision_width
    first, deep1, deep2 = (_tokens(n, width, seed) for seed in (1, 2, 3))
    extension = TowerExtension(embed=TokenEdit(first, None, replace=False),
                               blocks={1: TokenEdit(deep1, -n), 2: TokenEdit(deep2, -n)})
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(3, 1, -1), x], 1) + visual.positional_embedding
    x = visual.ln_pre(torch.cat([x, first.expand(3, -1, -1)], 1))
    for layer, block in enumerate(visual.transformer.resblocks):
        if layer:
            x = x.clone()
            x[:, -n:] = (deep1, deep2)[layer - 1]
        x = block(x)
    assert torch.equal(clip.encode_image(images, extension), visual.ln_post(x[:, 0]) @ visual.proj)
    assert not torch.equal(clip.encode_image(images, extension), clip.encode_image(images))


def test_deep_text_prompts_are_exact_on_every_text_path_forward_and_backward(clip):
    prefix, suffix, eot, full = _text(clip, seed=3)
    width = clip.config.transformer_width
    deep = [_tokens(3, width, seed).requires_grad_() for seed in (5, 6)]
    extension = TowerExtension(blocks={1: TokenEdit(deep[0], 1), 2: TokenEdit(deep[1], 2)})
    # independent: the text transformer's blocks with the positions overwritten in place
    x = full + clip.positional_embedding
    for layer, block in enumerate(clip.transformer.resblocks):
        if layer:
            x = x.clone()
            x[:, layer:layer + 3] = deep[layer - 1]
        x = block(x, causal=True)
    reference = clip.text_features_from_hidden(x, eot)
    grads_ref = torch.autograd.grad(reference.square().sum(), deep)
    for name, features in (
        ("full", encode_full(clip, full, eot, extension)),
        ("trimmed", encode_trimmed(clip, full, eot, extension)),
        ("shared prefix", encode_shared_prefix(clip, prefix, suffix, eot, extension=extension)[0]),
        ("one bucket", encode_shared_prefix(clip, prefix, suffix, eot, extension=extension, max_buckets=1)[0]),
    ):
        assert (features - reference).abs().max() <= ATOL, name
        grads = torch.autograd.grad(features.square().sum(), deep)
        for got, want in zip(grads, grads_ref, strict=True):
            assert (got - want).abs().max() <= ATOL * max(1.0, want.abs().max().item()), name
    assert (reference - encode_full(clip, full, eot)).abs().max() > 1e-3  # the prompts do change the features


def test_text_prompts_per_prefix_row(clip):
    """CoCoOp-style prefixes (B rows) each take their own deep tokens [B, n, width]."""
    generator = torch.Generator().manual_seed(9)
    width = clip.config.transformer_width
    prefix = torch.randn(2, 4, width, generator=generator) * 0.02
    suffix = torch.randn(1, 3, 10, width, generator=generator) * 0.02
    eot = torch.tensor([5, 9, 4])
    tokens = _tokens(2, width, 11, batch=2)
    fast = encode_shared_prefix(clip, prefix, suffix, eot, extension=TowerExtension(blocks={1: TokenEdit(tokens, 1)}))
    for row in range(2):
        full = torch.cat([prefix[row, None].expand(3, -1, -1), suffix[0]], 1)
        plain = encode_full(clip, full, eot, TowerExtension(blocks={1: TokenEdit(tokens[row], 1)}))
        assert (fast[row] - plain).abs().max() <= ATOL


# ------------------------------------------------------------------------------------------------ q/k/v updates


def test_a_qkv_update_equals_the_tower_with_updated_weights(clip):
    """``delta(l, x) = x @ D_l^T`` is the same as adding D_l to block l's in_proj_weight (what LoRA merges)."""
    generator = torch.Generator().manual_seed(4)
    images = _images(5)
    prefix, suffix, eot, full = _text(clip, seed=5)
    merged = copy.deepcopy(clip)
    updates = {}
    for tower_name, tower, merged_tower in (("vision", clip.visual.transformer, merged.visual.transformer),
                                            ("text", clip.transformer, merged.transformer)):
        width = tower.width
        updates[tower_name] = [torch.randn(3 * width, width, generator=generator) * 0.02 for _ in range(tower.layers)]
        with torch.no_grad():
            for block, update in zip(merged_tower.resblocks, updates[tower_name], strict=True):
                block.attn.in_proj_weight += update

    def delta_of(tower_name):
        return lambda layer, x: F.linear(x, updates[tower_name][layer])

    vision = TowerExtension(qkv_delta=delta_of("vision"))
    text = TowerExtension(qkv_delta=delta_of("text"))
    assert (clip.encode_image(images, vision) - merged.encode_image(images)).abs().max() <= ATOL
    want = merged.encode_text_embeddings(full, eot)
    assert (clip.encode_text_embeddings(full, eot, text) - want).abs().max() <= ATOL
    assert (encode_shared_prefix(clip, prefix, suffix, eot, extension=text)[0] - want).abs().max() <= ATOL


# ------------------------------------------------------------------------------------------------ checkpointing


def test_activation_checkpointing_gives_the_same_values_and_gradients(clip):
    images = _images(6)
    width = clip.config.vision_width
    first = _tokens(2, width, 7).requires_grad_()
    deep = _tokens(2, width, 8).requires_grad_()

    def run(checkpoint: bool):
        extension = TowerExtension(embed=TokenEdit(first, None, replace=False), blocks={1: TokenEdit(deep, -2)},
                                   checkpoint=checkpoint)
        out = clip.encode_image(images, extension)
        return out, torch.autograd.grad(out.square().sum(), [first, deep])

    plain, plain_grads = run(False)
    again, again_grads = run(True)
    assert torch.equal(plain, again)
    for a, b in zip(plain_grads, again_grads, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ refusals


def test_what_the_towers_refuse(clip):
    prefix, suffix, eot, full = _text(clip)
    width = clip.config.transformer_width
    tokens = _tokens(2, width, 1)
    with pytest.raises(ValueError, match="only replacing edits"):
        clip.encode_text_embeddings(full, eot, TowerExtension(blocks={1: TokenEdit(tokens, 1, replace=False)}))
    with pytest.raises(ValueError, match="no input edit"):
        clip.encode_text_embeddings(full, eot, TowerExtension(embed=TokenEdit(tokens, 1)))
    with pytest.raises(ValueError, match="outside the shared prefix"):
        encode_shared_prefix(clip, prefix, suffix, eot, extension=TowerExtension(blocks={1: TokenEdit(tokens, 4)}))
    with pytest.raises(ValueError, match="has 3 blocks"):
        clip.encode_text_embeddings(full, eot, TowerExtension(blocks={3: TokenEdit(tokens, 1)}))
    with pytest.raises(ValueError, match="block index"):
        TowerExtension(blocks={-1: TokenEdit(tokens, 1)})
    resnet = build_tiny_clip("resnet", seed=0)
    images = torch.randn(1, 3, 64, 64)
    assert torch.equal(resnet.encode_image(images, TowerExtension()), resnet.encode_image(images))
    with pytest.raises(ConfigError, match="ResNet image tower has no token sequence"):
        resnet.encode_image(images, TowerExtension(checkpoint=True))
