"""CoCoOp: meta-net shape and defaults, equality with CoOp when the meta-net's last layer is zero, per-image prompts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlprompt.errors import ConfigError
from vlprompt.methods.cocoop import CoCoOp, CoCoOpConfig
from vlprompt.methods.coop import CoOp, CoOpConfig

CLASSNAMES = ["cat", "golden retriever", "sea or lake", "x"]


def _zero_last_layer(method: CoCoOp) -> None:
    with torch.no_grad():
        method.meta_net.linear2.weight.zero_()
        method.meta_net.linear2.bias.zero_()


def test_defaults_and_meta_net_shape(clip):
    method = CoCoOp(clip, CLASSNAMES)
    d, width = clip.config.embed_dim, clip.config.transformer_width
    assert method.n_ctx == 4  # "a photo of a"
    assert torch.equal(method.ctx.detach(), clip.token_embedding.weight[[320, 1125, 539, 320]])
    assert method.meta_net.linear1.weight.shape == (d // 16, d)
    assert method.meta_net.linear2.weight.shape == (width, d // 16)
    assert isinstance(method.meta_net.relu, torch.nn.ReLU)
    assert list(method.state_dict()) == ["ctx", "meta_net.linear1.weight", "meta_net.linear1.bias",
                                         "meta_net.linear2.weight", "meta_net.linear2.bias"]


@pytest.mark.parametrize("position", ["end", "middle"])
@pytest.mark.parametrize("fast_text", [True, False])
def test_zero_meta_net_output_equals_coop_with_the_same_context(clip, features, position, fast_text):
    torch.manual_seed(0)
    cocoop = CoCoOp(clip, CLASSNAMES, CoCoOpConfig(n_ctx=5, ctx_init="", class_token_position=position,
                                                   fast_text=fast_text))
    _zero_last_layer(cocoop)
    coop = CoOp(clip, CLASSNAMES, CoOpConfig(n_ctx=5, class_token_position=position), ctx=cocoop.ctx.detach())
    expected = coop(features)
    assert expected.abs().max() > 0.1
    assert (cocoop(features) - expected).abs().max().item() < 1e-5


def test_meta_net_sees_the_normalised_image_feature_and_shifts_every_context_vector(clip, features):
    torch.manual_seed(1)
    method = CoCoOp(clip, CLASSNAMES)
    ctx = method.image_context(features)
    expected_shift = method.meta_net(F.normalize(features, dim=-1))
    assert ctx.shape == (5, 4, clip.config.transformer_width)
    assert torch.allclose(ctx - method.ctx[None], expected_shift[:, None].expand_as(ctx), atol=1e-6)
    assert torch.allclose(method.image_context(features * 7.0), ctx, atol=1e-6)  # scale-invariant input


def test_prompts_are_per_image(clip, features):
    torch.manual_seed(2)
    method = CoCoOp(clip, CLASSNAMES)
    with torch.no_grad():
        method.meta_net.linear2.weight.normal_(0.0, 0.5)
    text = method.text_features(features)
    assert text.shape == (5, len(CLASSNAMES), clip.config.embed_dim)
    assert (text[0] - text[1]).abs().max() > 1e-3
    # each image is scored against its own prompts
    own = clip.logit_scale.exp() * torch.einsum("bd,bkd->bk", F.normalize(features, dim=-1),
                                                F.normalize(text, dim=-1))
    assert torch.allclose(method(features), own, atol=1e-5)


def test_training_reaches_the_context_and_the_meta_net_only(clip, features):
    torch.manual_seed(3)
    method = CoCoOp(clip, CLASSNAMES)
    F.cross_entropy(method(features), torch.tensor([0, 1, 2, 3, 0])).backward()
    assert {name for name, p in method.named_parameters() if p.grad is not None and p.grad.abs().max() > 0} == {
        "ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight",
        "meta_net.linear2.bias"}
    assert all(p.grad is None for p in clip.parameters())


def test_meta_net_runs_in_fp32_under_autocast(clip, features):
    method = CoCoOp(clip, CLASSNAMES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ctx = method.image_context(features)
        logits = method(features)
    assert ctx.dtype == torch.float32 and logits.dtype == torch.float32


def test_classifier_matches_forward_in_chunks(clip, features):
    torch.manual_seed(4)
    method = CoCoOp(clip, CLASSNAMES)
    classify = method.classifier(prompt_batch=2 * len(CLASSNAMES))  # 2 images per text-tower call
    logits = classify(features)
    assert not logits.requires_grad
    assert (logits - method(features)).abs().max().item() < 1e-5


def test_with_classnames_carries_the_learned_state(clip, features):
    torch.manual_seed(5)
    method = CoCoOp(clip, CLASSNAMES)
    with torch.no_grad():
        method.ctx += 0.01
    rng_before = torch.random.get_rng_state()
    other = method.with_classnames(["sea or lake", "cat"])
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), method.state_dict().values()))
    assert (other(features) - method(features)[:, [2, 0]]).abs().max().item() < 1e-5


def test_bad_input(clip):
    with pytest.raises(ConfigError, match="class list is empty"):
        CoCoOp(clip, [])
    with pytest.raises(ConfigError, match="meta_net_reduction"):
        CoCoOp(clip, CLASSNAMES, CoCoOpConfig(meta_net_reduction=clip.config.embed_dim + 1))
    with pytest.raises(ConfigError, match="CoCoOpConfig"):
        CoCoOp(clip, CLASSNAMES, CoOpConfig())
