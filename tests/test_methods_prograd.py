"""ProGrad: the projection and the KL term against independent computations, its initialisation, and its training
step through the one loop: where the cross-entropy and KL gradients agree it is CoOp's step bit for bit; where they
conflict it is SGD on the projected gradient.

Tolerances: the conflicting step is compared with a hand-written SGD update (same fp32 operations, different order):
agreement to 1e-6 of the context's scale.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_train_standins import Features

from vlprompt.backbone.tokenizer import get_tokenizer
from vlprompt.errors import ConfigError
from vlprompt.methods.coop import CoOp, CoOpConfig
from vlprompt.methods.prograd import (
    ProGrad,
    ProGradConfig,
    project_conflicting,
    template_phrase,
)
from vlprompt.methods.zeroshot import ZeroShot, ZeroShotConfig
from vlprompt.training.config import TrainConfig
from vlprompt.training.loop import train

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSNAMES = ["banded", "dotted", "striped", "zigzagged"]
TEMPLATE = "a type of pattern, a photo of a {}."


def test_projection_removes_the_conflicting_component_only():
    generator = torch.Generator().manual_seed(0)
    g = torch.randn(3, 4, generator=generator)
    h = -g + 0.3 * torch.randn(3, 4, generator=generator)  # conflicting: g . h < 0
    assert float((g * h).sum()) < 0
    for lam in (1.0, 0.8):
        projected = project_conflicting(g, h, lam)
        unit = h.flatten() / h.flatten().norm()
        expected = g.flatten() - lam * float(g.flatten() @ unit) * unit
        assert torch.allclose(projected.flatten(), expected, atol=1e-6)
    # lambda = 1: what is left is orthogonal to the guide
    assert abs(float((project_conflicting(g, h, 1.0) * h).sum())) < 1e-5
    agreeing = g + 0.1 * torch.randn(3, 4, generator=generator)
    assert project_conflicting(g, agreeing, 1.0) is g  # no conflict: the gradient itself, untouched
    assert project_conflicting(g, torch.zeros_like(g), 1.0) is g


def test_guide_loss_is_the_kl_to_zero_shot_clip(clip):
    method = ProGrad(clip, CLASSNAMES, ProGradConfig(n_ctx=10, template=TEMPLATE, temperature=2.0))
    zeroshot = ZeroShot(clip, CLASSNAMES, ZeroShotConfig(template=TEMPLATE))
    features = torch.randn(5, clip.config.embed_dim, generator=torch.Generator().manual_seed(1))
    logits = method(features)
    teacher = F.softmax(zeroshot(features) / 2.0, dim=-1)
    student = F.log_softmax(logits.detach() / 2.0, dim=-1)
    expected = float((teacher * (teacher.log() - student)).sum()) * 4.0
    assert abs(method.guide_loss(features, logits).item() - expected) < 1e-4 * max(1.0, abs(expected))


def test_initial_context_is_zeros_then_the_template_phrase(clip):
    assert template_phrase(TEMPLATE) == "a type of pattern, a photo of a"
    assert template_phrase("{} texture.") == "" and template_phrase("a photo of a {}, a type of pet.") == ""
    method = ProGrad(clip, CLASSNAMES, ProGradConfig(n_ctx=16, template="a photo of a {}."))
    tokenizer = get_tokenizer()
    ids = tokenizer("a photo of a", context_length=77)
    phrase = clip.token_embedding(ids)[0, 1:5].float()
    assert method.ctx.shape == (16, clip.config.transformer_width)
    assert torch.equal(method.ctx[:12], torch.zeros(12, clip.config.transformer_width))
    assert torch.equal(method.ctx[12:], phrase)
    decoded = tokenizer.decode(method.layout.layout_ids()[0, : int(method.layout.eot_index[0]) + 1].tolist())
    assert decoded == "<|startoftext|>" + "x " * 16 + "banded . <|endoftext|>"
    # no phrase before the class name: random N(0, 0.02^2) as the official code without CTX_INIT
    random = ProGrad(clip, CLASSNAMES, ProGradConfig(n_ctx=4, template="{} texture."))
    assert 0.005 < random.ctx.std().item() < 0.05
    with pytest.raises(ConfigError, match="more than the 4 context vectors"):
        ProGrad(clip, CLASSNAMES, ProGradConfig(n_ctx=4, template=TEMPLATE))


def _one_step_config() -> TrainConfig:
    # one epoch, one batch, no warm-up: a single SGD step at the full learning rate
    return TrainConfig(epochs=1, batch_size=8, lr=0.05, warmup_epochs=0, precision="fp32")


def _gradients(method: ProGrad, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and KL gradients w.r.t. the context, computed on their own."""
    logits = method(features)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(logits, labels), [method.ctx], retain_graph=True)
    (g_kl,) = torch.autograd.grad(method.guide_loss(features, logits) / labels.numel(), [method.ctx])
    return g_ce, g_kl


@pytest.mark.parametrize("agree", [True, False])
def test_the_step_is_coops_where_the_gradients_agree_and_projected_where_they_conflict(clip, agree):
    prograd = ProGrad(clip, CLASSNAMES, ProGradConfig(n_ctx=10, template=TEMPLATE))
    # the first seeded batch whose two gradients (computed on their own) agree / conflict: the premise of each case
    for seed in range(100):
        generator = torch.Generator().manual_seed(seed)
        features = torch.randn(8, clip.config.embed_dim, generator=generator)
        labels = torch.randint(len(CLASSNAMES), (8,), generator=generator)
        g_ce, g_kl = _gradients(prograd, features, labels)
        if (float((g_ce * g_kl).sum()) > 0) == agree:
            break
    else:
        pytest.fail(f"no seeded batch with {'agreeing' if agree else 'conflicting'} gradients")
    start = prograd.ctx.detach().clone()
    coop = CoOp(clip, CLASSNAMES, CoOpConfig(n_ctx=10), ctx=start)
    train(prograd, Features(features, labels), _one_step_config())
    train(coop, Features(features, labels), _one_step_config())
    if agree:
        assert torch.equal(prograd.ctx, coop.ctx)
    else:
        unit = g_kl / g_kl.norm()
        projected = g_ce - 1.0 * (g_ce * unit).sum() * unit
        expected = start - 0.05 * (projected + 5e-4 * start)  # SGD's first step: momentum buffer = gradient
        assert (prograd.ctx - expected).abs().max() < 1e-6
        assert not torch.allclose(prograd.ctx, coop.ctx, atol=1e-6)


def test_with_classnames_and_errors(clip):
    method = ProGrad(clip, CLASSNAMES, ProGradConfig(n_ctx=10, template=TEMPLATE))
    other = method.with_classnames(["cat", "dog", "fish"])
    assert isinstance(other, ProGrad) and torch.equal(other.ctx, method.ctx) and other.teacher.shape[0] == 3
    assert other.config == method.config
    with pytest.raises(ConfigError, match="class-specific"):
        ProGrad(clip, CLASSNAMES, ProGradConfig(n_ctx=10, csc=True, template=TEMPLATE)).with_classnames(["cat"])
    with pytest.raises(ConfigError, match="ProGradConfig"):
        ProGrad(clip, CLASSNAMES, CoOpConfig())
