"""CLAP (Silva-Rodriguez et al., CVPR 2024): the zero-shot-initialised linear probe with a class-adaptive constraint.

The classifier is a set of class prototypes ``w_k`` [K, D] scored like CLIP: ``exp(logit_scale) * cos(f, w_k)``.
They start at the zero-shot prototypes ``t_k``: the mean of the UNnormalised text features over the templates (the
dataset's; ImageNet: CoOp's 7 selected templates plus it), as the official ``_get_base_text_features``; untrained,
the logits are zero-shot CLIP's. Training is the shared SGD loop on cached features with CLAP's recipe (SGD lr 0.1,
weight decay 0, batch 256, 300 epochs, 20 augmented views per image), minimising

    CE + mean_k lambda_k ||w_k - t_k||^2          (constraint "l2"; "none" is ZS-LP, the plain probe)

with ``lambda_k`` fixed before training: the mean zero-shot probability of class k over class k's training samples
(every augmented view), the official ``init_lagrangian_multipliers``. The official default constraint ("l2") never
runs the augmented-Lagrangian outer update (``outer_step`` only runs for an "adaptative" constraint), so the
multipliers stay fixed, as here. No validation set is used.

The prototypes belong to the training classes: a subset of them (any order) can be evaluated, other class lists are
refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.backbone.model import CLIP
from vlprompt.common.vocab import seeded_torch
from vlprompt.errors import ConfigError, DatasetError
from vlprompt.methods.base import (
    CosineClassifier,
    FrozenClipMethod,
    class_positions,
    cosine_logits,
    logit_scale_of,
)
from vlprompt.methods.configs import CLAPConfig
from vlprompt.methods.templates import DEFAULT_TEMPLATE
from vlprompt.methods.zeroshot import class_text_features

__all__ = ["CLAP", "CLAPConfig", "build_clap", "clap_multipliers", "clap_penalty"]


def clap_multipliers(logits: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``lambda_k``: the mean softmax probability of class k over the samples labelled k ([K], fp32)."""
    one_hot = F.one_hot(labels, num_classes).float()
    probs = torch.softmax(logits.float(), dim=-1)
    return (probs * one_hot).sum(dim=0) / one_hot.sum(dim=0).clamp(min=1.0)


def clap_penalty(prototypes: Tensor, anchors: Tensor, multipliers: Tensor) -> Tensor:
    """``mean_k lambda_k ||w_k - t_k||^2``."""
    return (multipliers * (prototypes - anchors).pow(2).sum(dim=-1)).mean()


class CLAP(FrozenClipMethod):
    """CLAP (or ZS-LP with ``constraint="none"``) over K classes; learned state ``prototypes`` [K, D]."""

    method_name = "clap"

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: CLAPConfig | None = None) -> None:
        config = config or CLAPConfig()
        if not isinstance(config, CLAPConfig):
            raise ConfigError(f"CLAP needs a CLAPConfig, got {type(config).__name__}")
        super().__init__(clip, classnames, config)
        self.templates: tuple[str, ...] = config.templates or (DEFAULT_TEMPLATE,)
        self._anchors = class_text_features(clip, self.classnames, self.templates, raw=True)  # t_k, frozen
        self.prototypes = nn.Parameter(self._anchors.clone())
        self._multipliers: Tensor | None = None

    def _apply_frozen(self, fn: Callable[[Tensor], Tensor]) -> None:
        self._anchors = fn(self._anchors)
        if self._multipliers is not None:
            self._multipliers = fn(self._multipliers)

    @property
    def anchors(self) -> Tensor:
        """The zero-shot prototypes ``t_k`` [K, D] (unnormalised, fp32)."""
        return self._anchors

    def forward(self, image_features: Tensor) -> Tensor:
        """Logits [B, K] (fp32) of raw image features [B, D]."""
        return cosine_logits(image_features.to(self.prototypes.device), self.prototypes, logit_scale_of(self.clip))

    @torch.no_grad()
    def prepare(self, train_set: Any) -> None:
        """The multipliers ``lambda_k`` from the zero-shot predictions on every training view (called by the
        training loop before the first epoch; they depend only on the frozen ``t_k``, so a resumed run gets the
        same)."""
        features, labels = getattr(train_set, "features", None), getattr(train_set, "labels", None)
        if not isinstance(features, Tensor) or not isinstance(labels, Tensor):
            raise DatasetError("CLAP's multipliers need the training features and labels")
        views = features if features.ndim == 3 else features.unsqueeze(0)
        device = self.prototypes.device
        logits = torch.cat([cosine_logits(view.to(device), self._anchors, logit_scale_of(self.clip))
                            for view in views])
        self._multipliers = clap_multipliers(logits, labels.to(device, torch.long).repeat(views.shape[0]),
                                             self.num_classes)

    def regularizer(self) -> Tensor:
        """The class-adaptive penalty added to the batch's cross-entropy (zero for ZS-LP)."""
        if self.config.constraint == "none":
            return self.prototypes.new_zeros(())
        if self._multipliers is None:
            raise ConfigError("CLAP's penalty needs its multipliers from the training features: call "
                              "method.prepare(train_set) first (vlprompt.training.loop.train does)")
        return clap_penalty(self.prototypes, self._anchors, self._multipliers)

    def fit_record(self) -> dict[str, Any]:
        """What the results record about the fit: the constraint, the multipliers, and that nothing was selected."""
        record: dict[str, Any] = {"constraint": self.config.constraint,
                                  "selected_on": "none (fixed hyper-parameters, last epoch)"}
        if self._multipliers is not None:
            multipliers = self._multipliers.float().cpu()
            record["multipliers"] = {"min": float(multipliers.min()), "mean": float(multipliers.mean()),
                                     "max": float(multipliers.max())}
        return record

    @torch.no_grad()
    def classifier(self) -> CosineClassifier:
        return CosineClassifier(F.normalize(self.prototypes.detach().float(), dim=-1), logit_scale_of(self.clip))

    def with_classnames(self, classnames: Sequence[str]) -> CLAP:
        """The prototypes of a subset of the training classes (any order); other class lists raise ConfigError."""
        positions = torch.tensor(class_positions(self.classnames, classnames, "CLAP"), device=self.prototypes.device)
        with seeded_torch(self.clip.device, None):
            other = CLAP(self.clip, classnames, self.config)
        other.load_state_dict({"prototypes": self.prototypes.detach()[positions].clone()})
        return other


def build_clap(clip: CLIP, classnames: Sequence[str], config: CLAPConfig | None = None) -> CLAP:
    """Registry builder of :class:`CLAP`."""
    return CLAP(clip, classnames, config)
