"""Small stand-in methods and feature sets for the training, run-folder, evaluation and DDP tests.

They follow docs/architecture.md's method contract without depending on vlprompt.methods: ``method(features[B, D])
-> logits[B, K]``, learned state only in ``parameters()``/``state_dict()``, ``classifier()`` computing the text side
once. Other test modules import them (pytest puts this folder on sys.path).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

SOT, EOT = 49406, 49407


pytestmark = pytest.mark.usefixtures("single_thread")



class Interrupt(Exception):
    """Stands for a crash or Ctrl-C between epochs."""


def interrupt_after(epoch: int):
    """An ``on_epoch_end`` callback that raises :class:`Interrupt` once ``epoch`` has finished."""

    def callback(stats):
        if stats.epoch == epoch:
            raise Interrupt

    return callback


@dataclass
class Features:
    """A FeatureSet look-alike: ``features`` [N, D] or [V, N, D], ``labels`` [N]."""

    features: torch.Tensor
    labels: torch.Tensor
    paths: list[str] = field(default_factory=list)


def clustered_features(num_classes: int = 5, per_class: int = 8, dim: int = 64, views: int = 0,
                       seed: int = 0) -> Features:
    """Gaussian clusters, one per class (separable, so training can lower the loss); views > 0 gives [V, N, D]."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    centres = torch.randn(num_classes, dim, generator=generator) * 2.0
    shape = (views, labels.numel(), dim) if views else (labels.numel(), dim)
    features = centres[labels] + torch.randn(*shape, generator=generator)
    return Features(features=features, labels=labels, paths=[f"img{i}.jpg" for i in range(labels.numel())])


class LinearHead(nn.Module):
    """Logits = W f + b (learned W, b); the simplest trainable method."""

    def __init__(self, dim: int, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(num_classes, dim, generator=generator) * 0.01)
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.classnames = [f"class{i}" for i in range(num_classes)]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.t() + self.bias

    def classifier(self):
        weight, bias = self.weight.detach().clone(), self.bias.detach().clone()
        return lambda features: features @ weight.t() + bias


class TinyPrompt(nn.Module):
    """A minimal CoOp: prompt ``[SOT] ctx_1..ctx_M [2 class tokens] [EOT]`` through a frozen tiny CLIP text tower.

    Only ``ctx`` is registered; CLIP and the fixed token embeddings are plain attributes, so ``state_dict()`` holds
    the learned context alone.
    """

    def __init__(self, clip: nn.Module, num_classes: int, n_ctx: int = 4, seed: int = 0) -> None:
        super().__init__()
        object.__setattr__(self, "clip", clip.requires_grad_(False).eval())
        generator = torch.Generator().manual_seed(seed)
        width = clip.config.transformer_width
        self.ctx = nn.Parameter(torch.randn(n_ctx, width, generator=generator) * 0.02)
        class_ids = torch.randint(1000, 40000, (num_classes, 2), generator=torch.Generator().manual_seed(1234))
        with torch.no_grad():
            self._prefix = clip.token_embedding(torch.full((num_classes, 1), SOT)).float()
            self._suffix = clip.token_embedding(torch.cat([class_ids, torch.full((num_classes, 1), EOT)], 1)).float()
        self._eot_index = torch.full((num_classes,), 1 + n_ctx + 2)
        self.classnames = [f"class{i}" for i in range(num_classes)]
        self.text_encodings = 0  # how often the text tower ran (tests count it)
        self.rows_seen = 0  # image features seen by the training path

    def text_features(self) -> torch.Tensor:
        self.text_encodings += 1
        count = self._prefix.shape[0]
        prompts = torch.cat([self._prefix, self.ctx.unsqueeze(0).expand(count, -1, -1), self._suffix], dim=1)
        return F.normalize(self.clip.encode_text_embeddings(prompts, self._eot_index).float(), dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.training:  # the training path only (the trainer's finite-logits check runs in eval mode)
            self.rows_seen += features.shape[0]
        text = self.text_features()
        return self.clip.logit_scale.exp() * F.normalize(features, dim=-1) @ text.t()

    def classifier(self):
        with torch.no_grad():
            text = self.text_features()
            scale = self.clip.logit_scale.exp()
        return lambda features: scale * F.normalize(features.float(), dim=-1) @ text.t()


def tiny_prompt(num_classes: int = 5, seed: int = 0) -> TinyPrompt:
    from vlprompt.backbone.tiny import build_tiny_clip

    return TinyPrompt(build_tiny_clip("vit", seed=0), num_classes, seed=seed)


def test_stand_ins_follow_the_method_contract():
    method = tiny_prompt(num_classes=3)
    assert list(method.state_dict()) == ["ctx"]
    assert [name for name, _ in method.named_parameters()] == ["ctx"]
    feats = clustered_features(num_classes=3, per_class=2, dim=64)
    logits = method(feats.features)
    assert logits.shape == (6, 3)
    # the classifier computes the text side once and then reproduces the training-path logits
    before = method.text_encodings
    classify = method.classifier()
    torch.testing.assert_close(classify(feats.features), logits.detach(), rtol=1e-5, atol=1e-5)
    classify(feats.features)
    assert method.text_encodings == before + 1
