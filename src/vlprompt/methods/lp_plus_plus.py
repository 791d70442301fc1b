"""LP++ (Huang et al., CVPR 2024): a linear probe whose class weights blend visual prototypes and text features.

For normalised image features ``f_i`` and the normalised zero-shot class features ``t_k`` (the dataset's template;
ImageNet: CoOp's 7 selected templates), the logits are the paper's

    l_ik = f_i . (w_k + alpha_k t_k)

(raw inner products, no temperature). Fitted full batch on the training features (every augmented view is a sample;
by default one view, crop scale 0.5-1, as the official loader), following the official
``linear_probe_p2.py`` (FereshteShakeri/FewShot-CLIP-Strong-Baseline):

- initialisation: ``w_k`` = the sum of class k's features (the official ``compute_centroids``); every ``alpha_k`` =
  ``alpha_init_scale`` (250) x the mean over classes of the mean ``f_i . t_k`` over class k's samples;
- data-driven step sizes: ``lr_w = 4 N / lambda_max(F^T F)`` and ``lr_alpha = N / (4 max_k sum_i (f_i . t_k)^2)``;
- ``iterations`` (300) full-batch steps on the mean cross-entropy: ``w`` by gradient descent with momentum 0.9 and
  step ``lr_w``; every ``alpha_every``-th (10th) iteration also ``alpha -= lr_alpha * grad_alpha``, the gradient taken
  at the same point as w's. The last iterate is the model: no validation set, no epoch selection.

Deliberate differences from the official code: no bias (the paper's logits have none; the code's ``nn.Linear`` keeps
a randomly initialised, trained bias); the alpha step uses the current gradient (the code never zeroes alpha's
gradient, so its step uses the sum of all gradients so far); the last iterate rather than the code's best epoch on a
few-shot validation split (the paper's claim: no validation search).

Before :meth:`LPPlusPlus.fit` the method is the zero-shot classifier (``w = 0``, ``alpha_k = exp(logit_scale)``), so
its logits are zero-shot CLIP's. The learned state (``w`` [K, D], ``alpha`` [K]) belongs to the training classes: a
subset of them (any order) can be evaluated, other class lists are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlprompt.backbone.model import CLIP
from vlprompt.common.vocab import seeded_torch
from vlprompt.errors import ConfigError, DatasetError
from vlprompt.methods.base import FrozenClipMethod, class_positions, logit_scale_of
from vlprompt.methods.configs import LPPlusPlusConfig
from vlprompt.methods.templates import DEFAULT_TEMPLATE
from vlprompt.methods.zeroshot import class_text_features

__all__ = ["LPPlusPlus", "LPPlusPlusConfig", "build_lp_plus_plus", "lp_plus_plus_init", "lp_plus_plus_logits",
           "lp_plus_plus_step_sizes"]


def lp_plus_plus_logits(image: Tensor, weight: Tensor, alpha: Tensor, text: Tensor) -> Tensor:
    """``f . (w_k + alpha_k t_k)`` for normalised image features [B, D], weights [K, D], alpha [K], text [K, D]."""
    return image @ weight.t() + alpha * (image @ text.t())


def lp_plus_plus_init(image: Tensor, labels: Tensor, text: Tensor, num_classes: int,
                      scale: float) -> tuple[Tensor, Tensor]:
    """``(w [K, D], alpha [K])``: per-class sums of the features, and ``scale`` x the mean over classes of the mean
    text similarity ``f_i . t_k`` of class k's samples, for every class."""
    one_hot = F.one_hot(labels, num_classes).to(image.dtype)  # [N, K]
    weight = one_hot.t() @ image
    counts = one_hot.sum(dim=0)
    own = ((image @ text.t()) * one_hot).sum(dim=0) / counts  # [K] mean similarity to the own class text
    alpha = torch.full((num_classes,), float(scale * own.double().mean()), dtype=image.dtype, device=image.device)
    return weight, alpha


def lp_plus_plus_step_sizes(image: Tensor, text: Tensor) -> tuple[float, float]:
    """``(lr_w, lr_alpha)`` = ``(4 N / lambda_max(F^T F), N / (4 max_k sum_i (f_i . t_k)^2))``."""
    n = image.shape[0]
    gram = (image.t() @ image).double()
    largest = float(torch.linalg.eigvalsh(gram.cpu())[-1])
    text_energy = float(((image @ text.t()) ** 2).sum(dim=0).max())
    return 4.0 * n / largest, n / (4.0 * text_energy)


class LPPlusPlus(FrozenClipMethod):
    """LP++ over K classes; learned state ``weight`` [K, D] and ``alpha`` [K]."""

    method_name = "lp_plus_plus"

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: LPPlusPlusConfig | None = None) -> None:
        config = config or LPPlusPlusConfig()
        if not isinstance(config, LPPlusPlusConfig):
            raise ConfigError(f"LP++ needs an LPPlusPlusConfig, got {type(config).__name__}")
        super().__init__(clip, classnames, config)
        self.templates: tuple[str, ...] = config.templates or (DEFAULT_TEMPLATE,)
        device = clip.device
        self.register_buffer("weight", torch.zeros(self.num_classes, clip.config.embed_dim, device=device))
        self.register_buffer("alpha", torch.full((self.num_classes,), float(logit_scale_of(clip)), device=device))
        self._text: Tensor | None = None

    def _apply_frozen(self, fn: Callable[[Tensor], Tensor]) -> None:
        self._text = None

    def zero_shot_features(self) -> Tensor:
        """The frozen zero-shot class features [K, D] (normalised, fp32), computed once per device."""
        if self._text is None or self._text.device != self.clip.device:
            self._text = class_text_features(self.clip, self.classnames, self.templates)
        return self._text

    def forward(self, image_features: Tensor) -> Tensor:
        """Logits [B, K] (fp32) of raw image features [B, D]."""
        text = self.zero_shot_features()
        image = F.normalize(image_features.to(text.device).float(), dim=-1)
        return lp_plus_plus_logits(image, self.weight, self.alpha, text)

    @torch.no_grad()
    def classifier(self) -> Callable[[Tensor], Tensor]:
        """One matrix: ``w_k + alpha_k t_k`` computed once."""
        combined = (self.weight + self.alpha[:, None] * self.zero_shot_features()).clone()

        @torch.no_grad()
        def classify(image_features: Tensor) -> Tensor:
            return F.normalize(image_features.to(combined.device).float(), dim=-1) @ combined.t()

        return classify

    def with_classnames(self, classnames: Sequence[str]) -> LPPlusPlus:
        """The weights of a subset of the training classes (any order); other class lists raise ConfigError."""
        positions = torch.tensor(class_positions(self.classnames, classnames, "LP++"), device=self.weight.device)
        with seeded_torch(self.clip.device, None):
            other = LPPlusPlus(self.clip, classnames, self.config)
        other.load_state_dict({"weight": self.weight[positions].clone(), "alpha": self.alpha[positions].clone()})
        return other

    @torch.no_grad()
    def fit(self, train: Any, val: Any = None, *, seed: int = 0) -> dict[str, Any]:
        """Full-batch LP++ on ``train`` (every view a sample); ``val`` and ``seed`` are not used (no validation,
        deterministic). Returns the record: initial alpha, step sizes, first / final loss."""
        features, labels = getattr(train, "features", None), getattr(train, "labels", None)
        if not isinstance(features, Tensor) or features.ndim not in (2, 3) or not isinstance(labels, Tensor):
            raise DatasetError("LP++ fits training features [V, N, D] or [N, D] with their labels")
        if features.ndim == 2:
            features = features.unsqueeze(0)
        if labels.ndim != 1 or labels.numel() != features.shape[1] or labels.numel() == 0:
            raise DatasetError(f"LP++: {features.shape[1]} training features but labels of shape {tuple(labels.shape)}")
        device = self.weight.device
        labels = labels.to(device, torch.long).repeat(features.shape[0])
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise DatasetError(f"training labels run {int(labels.min())}..{int(labels.max())}, outside "
                               f"0..{self.num_classes - 1}")
        missing = sorted(set(range(self.num_classes)) - set(labels.unique().tolist()))
        if missing:
            raise DatasetError(f"{len(missing)} class(es) have no training features (first: "
                               f"{self.classnames[missing[0]]!r}); LP++ initialises every class from its samples")
        image = F.normalize(features.to(device).float().flatten(0, 1), dim=-1)
        text = self.zero_shot_features()
        config: LPPlusPlusConfig = self.config
        weight, alpha = lp_plus_plus_init(image, labels, text, self.num_classes, config.alpha_init_scale)
        lr_w, lr_alpha = lp_plus_plus_step_sizes(image, text)
        initial_alpha = float(alpha[0])
        momentum = torch.zeros_like(weight)
        losses: list[float] = []
        for iteration in range(config.iterations):
            weight.requires_grad_(True)
            alpha.requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(lp_plus_plus_logits(image, weight, alpha, text), labels)
                grad_w, grad_alpha = torch.autograd.grad(loss, (weight, alpha))
            weight, alpha = weight.detach(), alpha.detach()
            losses.append(float(loss))
            momentum = grad_w if iteration == 0 else config.prototype_momentum * momentum + grad_w  # as torch SGD
            weight = weight - lr_w * momentum
            if (iteration + 1) % config.alpha_every == 0:
                alpha = alpha - lr_alpha * grad_alpha
        self.weight.copy_(weight)
        self.alpha.copy_(alpha)
        return {"num_samples": int(labels.numel()), "views": int(features.shape[0]), "iterations": config.iterations,
                "initial_alpha": initial_alpha, "lr_w": lr_w, "lr_alpha": lr_alpha,
                "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
                "selected_on": "none (fixed hyper-parameters, last iterate)"}


def build_lp_plus_plus(clip: CLIP, classnames: Sequence[str], config: LPPlusPlusConfig | None = None) -> LPPlusPlus:
    """Registry builder of :class:`LPPlusPlus`."""
    return LPPlusPlus(clip, classnames, config)
