"""KgCoOp: the knowledge-guided term against an independent computation, lambda = 0 takes CoOp's steps bit for bit,
the hand-crafted features, transfer to other classes and the prompt file.

Tolerances: cosines of fp32 text features agree to ~1e-7 between two encodings of the same prompt (summation order
of the text tower only), so the knowledge term (1 - mean cos) is compared to 1e-6.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_train_standins import clustered_features

from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.errors import CheckpointError, ConfigError
from vlprompt.methods.coop import CoOp, CoOpConfig
from vlprompt.methods.kgcoop import KgCoOp, KgCoOpConfig, knowledge_term
from vlprompt.methods.prompt_file import load_prompt, save_prompt
from vlprompt.methods.zeroshot import ZeroShot, ZeroShotConfig
from vlprompt.training.config import TrainConfig
from vlprompt.training.loop import train

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSNAMES = ["banded", "dotted", "striped", "zigzagged"]


def _features(clip, count=6):
    return torch.randn(count, clip.config.embed_dim, generator=torch.Generator().manual_seed(3))


def test_knowledge_term_is_one_minus_the_mean_cosine():
    generator = torch.Generator().manual_seed(0)
    text, crafted = torch.randn(5, 8, generator=generator), torch.randn(5, 8, generator=generator)
    crafted = crafted / crafted.norm(dim=-1, keepdim=True)
    cosines = [float(t @ c) / float(t.norm() * c.norm()) for t, c in zip(text, crafted, strict=True)]
    assert abs(float(knowledge_term(text, crafted)) - (1.0 - sum(cosines) / 5)) < 1e-6
    assert float(knowledge_term(crafted * 3.0, crafted)) == pytest.approx(0.0, abs=1e-6)


def test_handcrafted_features_are_zero_shot_clips_and_the_regularizer_uses_the_last_forward(clip):
    method = KgCoOp(clip, CLASSNAMES, KgCoOpConfig(ctx_init="", n_ctx=3, template="a photo of a {}, a texture."))
    zeroshot = ZeroShot(clip, CLASSNAMES, ZeroShotConfig(template="a photo of a {}, a texture."))
    expected = zeroshot.classifier().text_features
    assert (method.handcrafted - expected).abs().max() < 1e-6
    method.train()
    method(_features(clip))
    with torch.no_grad():
        text = F.normalize(method.text_features(), dim=-1)
    cosines = (text * expected).sum(-1)
    assert abs(method.regularizer().item() - 8.0 * (1.0 - float(cosines.mean()))) < 1e-5
    with pytest.raises(RuntimeError, match="forward"):
        method.regularizer()  # consumed: each forward gives one term
    method.eval()
    method(_features(clip))
    with pytest.raises(RuntimeError, match="training mode"):
        method.regularizer()


def test_untrained_kgcoop_is_zero_shot_with_a_zero_knowledge_term(clip):
    """From "a photo of a" with the template "a photo of a {}." the learned and hand-crafted prompts are the same."""
    method = KgCoOp(clip, CLASSNAMES, KgCoOpConfig(template="a photo of a {}."))
    zeroshot = ZeroShot(clip, CLASSNAMES, ZeroShotConfig(template="a photo of a {}."))
    features = _features(clip)
    method.train()
    assert (method(features) - zeroshot(features)).abs().max() < 1e-5
    assert abs(method.regularizer().item()) < 1e-6
    assert [name for name, _ in method.named_parameters()] == ["ctx"] and method.ctx.shape == (4, 128)


def _trained(method, feats, config):
    train(method, feats, config)
    return {key: value.clone() for key, value in method.state_dict().items()}


def test_lambda_zero_takes_coops_steps_bit_for_bit(clip):
    feats = clustered_features(num_classes=len(CLASSNAMES), per_class=6, dim=clip.config.embed_dim, views=3)
    config = TrainConfig(epochs=3, batch_size=8, lr=0.05, precision="fp32")
    coop = _trained(CoOp(clip, CLASSNAMES, CoOpConfig(ctx_init="a photo of a")), feats, config)
    zero = _trained(KgCoOp(clip, CLASSNAMES, KgCoOpConfig(kg_weight=0.0, template="a {} pattern.")), feats, config)
    assert coop.keys() == zero.keys() == {"ctx"}
    assert torch.equal(coop["ctx"], zero["ctx"])
    # the term does act: with the official weight the same run ends elsewhere
    eight = _trained(KgCoOp(clip, CLASSNAMES, KgCoOpConfig(template="a {} pattern.")), feats, config)
    assert not torch.equal(eight["ctx"], coop["ctx"])


def test_the_knowledge_term_keeps_the_text_features_nearer_the_hand_crafted_ones(clip):
    feats = clustered_features(num_classes=len(CLASSNAMES), per_class=6, dim=clip.config.embed_dim)
    config = TrainConfig(epochs=6, batch_size=8, lr=0.2, precision="fp32")
    distances = []
    for weight in (0.0, 8.0):
        method = KgCoOp(clip, CLASSNAMES, KgCoOpConfig(kg_weight=weight, template="a photo of a {}."))
        train(method, feats, config)
        with torch.no_grad():
            distances.append(float(knowledge_term(method.text_features(), method.handcrafted)))
    assert distances[1] < distances[0]


def test_with_classnames_prompt_file_and_errors(clip, tmp_path):
    method = KgCoOp(clip, CLASSNAMES, KgCoOpConfig(template="a {} pattern."))
    with torch.no_grad():
        method.ctx.add_(0.1)
    other = method.with_classnames(["cat", "dog"])
    assert isinstance(other, KgCoOp) and torch.equal(other.ctx, method.ctx) and other.handcrafted.shape[0] == 2
    path = save_prompt(method, tmp_path / "kgcoop.safetensors")
    loaded = load_prompt(path, clip)
    assert isinstance(loaded, KgCoOp) and torch.equal(loaded.ctx, method.ctx)
    assert loaded.config == method.config and (loaded.handcrafted - method.handcrafted).abs().max() == 0
    with pytest.raises(CheckpointError, match="backbone"):
        load_prompt(path, build_tiny_clip("vit", seed=1))
    csc = KgCoOp(clip, CLASSNAMES, KgCoOpConfig(csc=True))
    with pytest.raises(ConfigError, match="class-specific"):
        csc.with_classnames(["cat"])
    with pytest.raises(ConfigError, match="KgCoOpConfig"):
        KgCoOp(clip, CLASSNAMES, CoOpConfig())
