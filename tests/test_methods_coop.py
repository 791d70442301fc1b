"""CoOp: the reference's prompt layouts, initialisations, exact zero-shot equivalence, CSC, frozen CLIP, errors.

Equality tolerance: logits are exp(logit_scale) (14.3 for the tiny CLIP) times a cosine; fp32 rounding in the text
tower (summation order only) moves a cosine by ~1e-7, so logits agree to ~2e-6; the issue's bound is 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlprompt.backbone.tokenizer import get_tokenizer
from vlprompt.errors import ConfigError
from vlprompt.methods.coop import CoOp, CoOpConfig
from vlprompt.methods.zeroshot import ZeroShot, ZeroShotConfig

CLASSNAMES = ["cat", "golden retriever", "sea or lake", "x"]


def _decoded_prompts(method: CoOp) -> list[str]:
    tokenizer = get_tokenizer()
    ids = method.layout.layout_ids()
    return [tokenizer.decode(row[: int(eot) + 1].tolist()) for row, eot in zip(ids, method.layout.eot_index)]


@pytest.mark.parametrize("fast_text", [True, False])
def test_untrained_coop_from_a_photo_of_a_equals_zero_shot(clip, features, fast_text):
    coop = CoOp(clip, CLASSNAMES, CoOpConfig(ctx_init="a photo of a", fast_text=fast_text))
    zeroshot = ZeroShot(clip, CLASSNAMES, ZeroShotConfig(template="a photo of a {}."))
    assert coop.n_ctx == 4 and coop.ctx.shape == (4, clip.config.transformer_width)
    coop_logits, zs_logits = coop(features), zeroshot(features)
    assert zs_logits.abs().max() > 1.0  # non-trivial logits
    assert (coop_logits - zs_logits).abs().max().item() < 1e-5
    assert (coop.classifier()(features) - zs_logits).abs().max().item() < 1e-5


def test_logits_are_scaled_cosines(clip, features):
    coop = CoOp(clip, CLASSNAMES, CoOpConfig(n_ctx=3))
    with torch.no_grad():
        text = F.normalize(coop.text_features(), dim=-1)
        expected = clip.logit_scale.exp() * F.normalize(features, dim=-1) @ text.t()
    assert torch.allclose(coop(features), expected, atol=1e-5)
    assert coop(features).dtype == torch.float32


def test_end_layout_matches_the_reference_tokenisation(clip):
    coop = CoOp(clip, CLASSNAMES, CoOpConfig(n_ctx=4))
    assert _decoded_prompts(coop) == [
        "<|startoftext|>x x x x cat . <|endoftext|>",
        "<|startoftext|>x x x x golden retriever . <|endoftext|>",
        "<|startoftext|>x x x x sea or lake . <|endoftext|>",
        "<|startoftext|>x x x x x . <|endoftext|>",
    ]
    assert coop.layout.eot_index.tolist() == [7, 8, 9, 7]
    assert coop.layout.name_lengths.tolist() == [1, 2, 3, 1]


def test_middle_and_front_layouts(clip):
    middle = CoOp(clip, CLASSNAMES, CoOpConfig(ctx_init="a photo of a", class_token_position="middle"))
    front = CoOp(clip, CLASSNAMES, CoOpConfig(ctx_init="a photo of a", class_token_position="front"))
    assert _decoded_prompts(middle)[:2] == [
        "<|startoftext|>a photo cat of a . <|endoftext|>",
        "<|startoftext|>a photo golden retriever of a . <|endoftext|>",
    ]
    assert _decoded_prompts(front)[:3] == [
        "<|startoftext|>cat a photo of a . <|endoftext|>",
        "<|startoftext|>golden retriever a photo of a . <|endoftext|>",
        "<|startoftext|>sea or lake a photo of a . <|endoftext|>",
    ]
    assert middle.layout.shared_length == 3 and front.layout.shared_length == 1


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_assembled_embeddings_put_each_context_vector_where_the_layout_says(clip, position):
    n_ctx = 4
    coop = CoOp(clip, CLASSNAMES, CoOpConfig(n_ctx=n_ctx, class_token_position=position))
    ctx = torch.arange(n_ctx, dtype=torch.float32)[:, None].expand(n_ctx, clip.config.transformer_width) + 100.0
    prompts = coop.layout.assemble(ctx[None, None])[0]  # [K, L, width]
    table = clip.token_embedding.weight
    tokenizer = get_tokenizer()
    for k, name in enumerate(CLASSNAMES):
        name_ids = torch.tensor(tokenizer.encode(name))
        n = len(name_ids)
        if position == "end":
            ctx_at, name_at = list(range(1, 1 + n_ctx)), 1 + n_ctx
        elif position == "middle":
            ctx_at, name_at = [1, 2, 3 + n, 4 + n], 3
        else:
            ctx_at, name_at = list(range(1 + n, 1 + n + n_ctx)), 1
        assert torch.equal(prompts[k, 0], table[tokenizer.sot_token_id])
        for m, at in enumerate(ctx_at):
            assert torch.equal(prompts[k, at], ctx[m]), (k, m, at)
        assert torch.equal(prompts[k, name_at : name_at + n], table[name_ids])
        eot = int(coop.layout.eot_index[k])
        assert eot == 1 + n_ctx + n + 1
        assert torch.equal(prompts[k, eot], table[tokenizer.eot_token_id])


def test_random_initialisation(clip):
    torch.manual_seed(0)
    coop = CoOp(clip, CLASSNAMES)
    assert coop.ctx.shape == (16, clip.config.transformer_width)  # default M = 16, unified
    assert abs(coop.ctx.std().item() - 0.02) < 0.001  # 2048 draws of N(0, 0.02^2)
    assert abs(coop.ctx.mean().item()) < 0.002
    assert coop.ctx.dtype == torch.float32


def test_phrase_initialisation_uses_the_token_count_and_word_embeddings(clip):
    coop = CoOp(clip, CLASSNAMES, CoOpConfig(n_ctx=16, ctx_init="a_photo_of_a itap"))
    ids = get_tokenizer().encode("a photo of a itap")
    assert coop.n_ctx == len(ids) == 6  # "itap" is two tokens: M is the token count, not the word count
    assert torch.equal(coop.ctx.detach(), clip.token_embedding.weight[ids])


def test_class_specific_context_gives_independent_contexts(clip, features):
    torch.manual_seed(1)
    coop = CoOp(clip, CLASSNAMES, CoOpConfig(n_ctx=4, csc=True))
    assert coop.ctx.shape == (len(CLASSNAMES), 4, clip.config.transformer_width)
    before = coop(features).detach()
    with torch.no_grad():  # a random change (a constant shift of a vector would be undone by LayerNorm)
        coop.ctx[2] += 0.5 * torch.randn(coop.ctx[2].shape, generator=torch.Generator().manual_seed(2))
    after = coop(features).detach()
    changed = (after - before).abs().amax(dim=0)
    assert changed[2] > 1e-3
    assert torch.equal(changed[[0, 1, 3]], torch.zeros(3))
    coop(features)[:, 1].sum().backward()
    grad_norms = coop.ctx.grad.flatten(1).norm(dim=1)
    assert grad_norms[1] > 0 and torch.equal(grad_norms[[0, 2, 3]], torch.zeros(3))


def test_csc_from_a_phrase_starts_every_class_from_it(clip):
    coop = CoOp(clip, CLASSNAMES, CoOpConfig(ctx_init="a photo of a", csc=True))
    assert coop.ctx.shape[:2] == (len(CLASSNAMES), 4)
    assert all(torch.equal(coop.ctx[k], coop.ctx[0]) for k in range(len(CLASSNAMES)))


def test_only_the_context_is_learned_and_clip_stays_frozen(clip, features):
    coop = CoOp(clip, CLASSNAMES, CoOpConfig(n_ctx=4))
    assert [name for name, _ in coop.named_parameters()] == ["ctx"]
    assert list(coop.state_dict()) == ["ctx"]
    assert list(coop.buffers()) == [] and list(coop.children()) == []
    snapshot = {name: value.clone() for name, value in clip.state_dict().items()}
    loss = F.cross_entropy(coop(features), torch.tensor([0, 1, 2, 3, 0]))
    loss.backward()
    assert all(param.grad is None for param in clip.parameters())
    with torch.no_grad():  # one plain gradient step (torch.optim's first import costs seconds)
        coop.ctx -= 0.5 * coop.ctx.grad
    assert F.cross_entropy(coop(features), torch.tensor([0, 1, 2, 3, 0])) < loss
    assert all(torch.equal(value, clip.state_dict()[name]) for name, value in snapshot.items())


def test_train_mode_does_not_reach_clip(clip):
    coop = CoOp(clip, CLASSNAMES, CoOpConfig(n_ctx=2))
    coop.train()
    assert coop.training and not clip.training


def test_with_classnames_keeps_a_unified_context(clip, features):
    coop = CoOp(clip, CLASSNAMES, CoOpConfig(ctx_init="a photo of a"))
    with torch.no_grad():
        coop.ctx += 0.01
    other = coop.with_classnames(["dog", "sea or lake"])
    assert other.classnames == ["dog", "sea or lake"] and torch.equal(other.ctx, coop.ctx)
    assert (other(features)[:, 1] - coop(features)[:, 2]).abs().max().item() < 1e-5


def test_csc_cannot_move_to_other_classes(clip):
    coop = CoOp(clip, CLASSNAMES, CoOpConfig(n_ctx=2, csc=True))
    with pytest.raises(ConfigError, match="class-specific"):
        coop.with_classnames(["dog"])


def test_bad_input_raises_clear_errors(clip):
    with pytest.raises(ConfigError, match="class list is empty"):
        CoOp(clip, [])
    with pytest.raises(ConfigError, match="non-empty name"):
        CoOp(clip, ["cat", "  "])
    with pytest.raises(ConfigError, match="context length"):
        CoOp(clip, ["cat " * 70])
    with pytest.raises(ConfigError, match="class_token_position"):
        CoOpConfig(class_token_position="back")
    with pytest.raises(ConfigError, match="n_ctx"):
        CoOpConfig(n_ctx=0)
    with pytest.raises(ConfigError, match="CoOpConfig"):
        CoOp(clip, CLASSNAMES, ZeroShotConfig())
    with pytest.raises(ConfigError, match="shape"):
        CoOp(clip, CLASSNAMES, CoOpConfig(n_ctx=2), ctx=torch.zeros(3, clip.config.transformer_width))


def test_deep_copy_shares_clip_but_not_the_context(clip, features):
    import copy

    coop = CoOp(clip, CLASSNAMES, CoOpConfig(n_ctx=2))
    clone = copy.deepcopy(coop)
    assert clone.clip is clip and clone.ctx is not coop.ctx and torch.equal(clone.ctx, coop.ctx)
    with torch.no_grad():
        clone.ctx += 1.0
    assert not torch.equal(clone.ctx, coop.ctx)
    # the copy shares the CLIP and its context is only read into a new prompt tensor: the same computation
    assert torch.equal(copy.deepcopy(coop)(features), coop(features))


def test_half_precision_backbone(clip, features):
    import copy

    half = copy.deepcopy(clip).half()
    coop = CoOp(half, CLASSNAMES, CoOpConfig(ctx_init="a photo of a"))
    reference = CoOp(clip, CLASSNAMES, CoOpConfig(ctx_init="a photo of a"))
    assert coop.ctx.dtype == torch.float32  # master weights stay fp32
    logits = coop(features)
    assert logits.dtype == torch.float32
    # fp16 weights and activations: relative precision ~1e-3 of logits of magnitude ~5
    assert (logits - reference(features)).abs().max().item() < 0.05
    logits.sum().backward()
    assert coop.ctx.grad is not None and torch.isfinite(coop.ctx.grad).all()
