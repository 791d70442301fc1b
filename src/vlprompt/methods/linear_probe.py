"""Linear probe CLIP: L2-regularised multinomial logistic regression on frozen image features.

As the reference (CoOp's ``lpclip``): scikit-learn's ``LogisticRegression(solver="lbfgs", max_iter=1000,
penalty="l2")`` on the image tower's raw features (evaluation transform, not normalised unless ``normalize``), with C
searched on the validation split:

1. coarse sweep over ``c_grid`` (1e6, 1e4, ..., 1e-6): the C with the best validation accuracy (the first, i.e. the
   largest, on ties) is the peak;
2. ``search_steps`` (8) bisection steps in log10(C), starting from [peak / 10, peak * 10]: fit both ends, keep the
   better (the left one on ties), and halve the interval towards it. The final model is the last step's choice.

After :meth:`LinearProbe.fit` the method is a ``Linear(D, K)``: ``method(features)`` gives the regression's decision
values (logits) [B, K]; these are not CLIP similarities, so no logit scale is involved.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from vlprompt.backbone.model import CLIP
from vlprompt.errors import ConfigError, DatasetError
from vlprompt.methods.base import FrozenClipMethod, class_positions
from vlprompt.methods.configs import LinearProbeConfig

__all__ = ["LinearProbe", "LinearProbeConfig", "build_linear_probe", "search_c"]


class Features(Protocol):
    """What :meth:`LinearProbe.fit` reads from a ``vlprompt.features.extract.FeatureSet``."""

    features: Tensor
    labels: Tensor


class LinearProbe(FrozenClipMethod):
    """A linear classifier on image features, fitted in closed form by :meth:`fit`; learned state ``linear``."""

    method_name = "linear_probe"

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: LinearProbeConfig | None = None) -> None:
        config = config or LinearProbeConfig()
        if not isinstance(config, LinearProbeConfig):
            raise ConfigError(f"the linear probe needs a LinearProbeConfig, got {type(config).__name__}")
        super().__init__(clip, classnames, config)
        self.linear = nn.Linear(clip.config.embed_dim, self.num_classes, device=clip.device)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def _inputs(self, image_features: Tensor) -> Tensor:
        features = image_features.to(self.linear.weight.device).float()
        return F.normalize(features, dim=-1) if self.config.normalize else features

    def forward(self, image_features: Tensor) -> Tensor:
        """Logits [B, K] (fp32) of image features [B, D]."""
        return self.linear(self._inputs(image_features))

    def classifier(self) -> Callable[[Tensor], Tensor]:
        weight, bias = self.linear.weight.detach().clone(), self.linear.bias.detach().clone()
        normalize = self.config.normalize

        def classify(image_features: Tensor) -> Tensor:
            features = image_features.to(weight.device).float()
            if normalize:
                features = F.normalize(features, dim=-1)
            return F.linear(features, weight, bias)

        return classify

    def with_classnames(self, classnames: Sequence[str]) -> LinearProbe:
        """The rows of a subset of the fitted classes (ImageNet-A / -R); other class lists raise ConfigError."""
        positions = torch.tensor(class_positions(self.classnames, classnames, "a linear probe"))
        other = LinearProbe(self.clip, classnames, self.config)
        state = self.state_dict()
        other.load_state_dict({"linear.weight": state["linear.weight"][positions.to(state["linear.weight"].device)],
                               "linear.bias": state["linear.bias"][positions.to(state["linear.bias"].device)]})
        return other

    def fit(self, train: Features, val: Features | None = None, *, seed: int = 0) -> dict[str, Any]:
        """Fit on ``train`` (C searched on ``val`` unless ``config.c`` is set); returns the search record. ``seed`` is
        not used: the lbfgs fit is deterministic.

        The record: ``{"c": chosen C, "val_accuracy": percent or None, "coarse": [[C, acc], ...],
        "refine": [[C_left, acc_left, C_right, acc_right], ...], "converged": bool}``.
        """
        if self.num_classes < 2:
            raise DatasetError(f"the linear probe needs at least two classes, but this dataset has one "
                               f"({self.classnames[0]!r}): logistic regression cannot separate a single class; use a "
                               "dataset (or --subset) with several classes")
        x_train, y_train = self._arrays(train, "train")
        if x_train.shape[1] != self.linear.in_features:
            raise DatasetError(f"train features have width {x_train.shape[1]}, this backbone's image features have "
                               f"{self.linear.in_features}; extract the features with the same CLIP")
        missing = sorted(set(range(self.num_classes)) - set(np.unique(y_train).tolist()))
        if missing:
            shown = ", ".join(repr(self.classnames[i]) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise DatasetError(f"{len(missing)} class(es) have no training features ({shown}); the linear probe "
                               "needs at least one example of every class")
        if self.config.c is not None:
            c, record = float(self.config.c), {"coarse": [], "refine": []}
            model = _fit(x_train, y_train, c, self.config.max_iter)
            val_accuracy = _accuracy(model, *self._arrays(val, "val")) if val is not None else None
        else:
            if val is None:
                raise ConfigError("the linear probe searches C on a validation split: pass val features, or set c")
            x_val, y_val = self._arrays(val, "val")
            c, model, val_accuracy, record = search_c(x_train, y_train, x_val, y_val, self.config)
        self._load_sklearn(model)
        converged = bool(np.all(np.asarray(model.n_iter_) < self.config.max_iter))
        return {"c": c, "val_accuracy": val_accuracy, **record, "converged": converged}

    def _arrays(self, data: Features, what: str) -> tuple[np.ndarray, np.ndarray]:
        features, labels = data.features, data.labels
        if features.ndim != 2:
            raise DatasetError(f"the linear probe fits {what} features [N, D] of the evaluation transform, got shape "
                               f"{tuple(features.shape)} (augmented views are for SGD-trained methods)")
        if labels.ndim != 1 or labels.shape[0] != features.shape[0] or features.shape[0] == 0:
            raise DatasetError(f"{what} features {tuple(features.shape)} and labels {tuple(labels.shape)} do not match "
                               "(or are empty)")
        x = features.detach().float()
        if self.config.normalize:
            x = F.normalize(x, dim=-1)
        y = labels.detach().cpu().numpy().astype(np.int64)
        if y.min() < 0 or y.max() >= self.num_classes:
            raise DatasetError(f"{what} labels run {y.min()}..{y.max()}, outside 0..{self.num_classes - 1}")
        return x.cpu().double().numpy(), y

    @torch.no_grad()
    def _load_sklearn(self, model: Any) -> None:
        coef = torch.as_tensor(model.coef_, dtype=torch.float64)
        intercept = torch.as_tensor(model.intercept_, dtype=torch.float64)
        classes = torch.as_tensor(model.classes_, dtype=torch.long)
        weight = torch.zeros(self.num_classes, coef.shape[1], dtype=torch.float64)
        bias = torch.zeros(self.num_classes, dtype=torch.float64)
        if coef.shape[0] == 1:  # two classes: sklearn keeps one row, the log-odds of classes_[1] vs classes_[0]
            weight[classes[1]], bias[classes[1]] = coef[0], intercept[0]
        else:
            weight[classes], bias[classes] = coef, intercept
        self.linear.weight.copy_(weight)
        self.linear.bias.copy_(bias)


# below this many feature values, BLAS threads cost more than they save (a few-shot fit is ~40x slower threaded)
_SINGLE_THREAD_BELOW = 2_000_000


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int) -> Any:
    limit = threadpool_limits(limits=1) if x.size < _SINGLE_THREAD_BELOW else contextlib.nullcontext()
    with warnings.catch_warnings(), limit:
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported as "converged" in fit()'s record
        return LogisticRegression(solver="lbfgs", max_iter=max_iter, C=c).fit(x, y)


def _accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float(100.0 * np.mean(model.predict(x) == y))


def search_c(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
             config: LinearProbeConfig) -> tuple[float, Any, float, dict[str, list]]:
    """The reference's C search (module docstring): ``(C, fitted model, val accuracy %, record)``.

    Fits are memoised by C (the same C always gives the same lbfgs fit), so a bound kept between steps is not refit.
    """
    fitted: dict[float, tuple[Any, float]] = {}

    def evaluate(c: float) -> tuple[Any, float]:
        if c not in fitted:
            model = _fit(x_train, y_train, c, config.max_iter)
            fitted[c] = (model, _accuracy(model, x_val, y_val))
        return fitted[c]

    coarse = [[c, evaluate(c)[1]] for c in config.c_grid]
    peak = config.c_grid[int(np.argmax([acc for _, acc in coarse]))]
    chosen = peak
    left, right = peak * 0.1, peak * 10.0
    refine = []
    for _ in range(config.search_steps):
        acc_left, acc_right = evaluate(left)[1], evaluate(right)[1]
        refine.append([left, acc_left, right, acc_right])
        middle = 0.5 * (math.log10(left) + math.log10(right))
        if acc_left < acc_right:
            chosen, left = right, 10.0**middle
        else:
            chosen, right = left, 10.0**middle
    model, accuracy = evaluate(chosen)
    return chosen, model, accuracy, {"coarse": coarse, "refine": refine}


def build_linear_probe(clip: CLIP, classnames: Sequence[str], config: LinearProbeConfig | None = None) -> LinearProbe:
    """Registry builder of :class:`LinearProbe`."""
    return LinearProbe(clip, classnames, config)
