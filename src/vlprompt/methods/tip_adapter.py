"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022): a key-value cache of the few-shot training features.

Cache (official ``build_cache_model``): every training image's raw features of ``cache_views`` augmented views
(10; random resized crop 0.5-1 + flip, from the feature cache's pool of views) are averaged and L2-normalised into
one key ``K_i``; the value is the one-hot label ``V_i``. For a normalised test feature ``f``:

    logits = exp(logit_scale) * f W^T + alpha * exp(-beta * (1 - f K^T)) V

with ``W`` the normalised zero-shot class features (the dataset's template; ImageNet: CoOp's 7 selected templates).
With ``alpha`` 0, or an empty cache, the logits are zero-shot CLIP's.

alpha and beta are searched on the grid of the official ``search_hp`` (beta outer, alpha inner, the first best
kept), scored on the **validation split**: the official code scores ImageNet's search and Tip-Adapter-F's epoch on the
test split; vlprompt never reads test labels while fitting. The fit record names the grid, the chosen values and
their validation accuracy.

Tip-Adapter-F makes the keys learnable (initialised with the cache, values fixed) and fine-tunes them with AdamW
(lr 0.001, eps 1e-4, weight decay 0.01, cosine annealing per step to 0, batch 256 with the last batch kept) for 20
epochs (EuroSAT 100) at the initial alpha and beta; epoch ``e`` shows image ``i`` its pool view
``(e + offset_i) % V`` (:func:`vlprompt.features.extract.epoch_view_indices`, offsets from the run's seed). After every
epoch the validation accuracy is measured; the keys of the best epoch (the first on ties) are kept, then alpha and
beta are searched as above. The fine-tuned keys are not renormalised (as the official code).

The learned state is the cache itself (keys [N, D], labels [N]) plus the chosen alpha and beta: a cache holds
training-class keys only, so the method classifies its training classes (or a subset, e.g. ImageNet-A's 200) and
refuses other class lists.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlprompt.backbone.model import CLIP
from vlprompt.common.vocab import derive_seed, seeded_torch
from vlprompt.errors import ConfigError, DatasetError
from vlprompt.features.extract import epoch_view_indices
from vlprompt.methods.base import FrozenClipMethod, class_positions, logit_scale_of
from vlprompt.methods.configs import TIP_FALLBACK_INIT_ALPHA, TipAdapterConfig, TipAdapterFConfig
from vlprompt.methods.templates import DEFAULT_TEMPLATE
from vlprompt.methods.zeroshot import class_text_features

__all__ = ["TipAdapter", "TipAdapterConfig", "TipAdapterF", "TipAdapterFConfig", "build_tip_adapter",
           "build_tip_adapter_f", "cache_keys", "search_alpha_beta", "search_grid", "tip_logits"]

logger = logging.getLogger(__name__)


def cache_keys(features: Tensor, views: int) -> Tensor:
    """Cache keys [N, D]: the raw features of the first ``views`` views ([V, N, D], or [N, D] = one view) averaged
    per image, then L2-normalised (fp32)."""
    if features.ndim == 2:
        features = features.unsqueeze(0)
    return F.normalize(features[:views].float().mean(dim=0), dim=-1)


def tip_logits(image: Tensor, text: Tensor, keys: Tensor, values: Tensor, alpha: float | Tensor,
               beta: float | Tensor, scale: Tensor) -> Tensor:
    """``scale * f W^T + alpha * exp(-beta * (1 - f K^T)) V`` for normalised image features ``f`` [B, D], text
    features ``W`` [K, D], keys ``K`` [N, D] and values ``V`` [N, K] (fp32)."""
    affinity = image @ keys.t()
    return scale * image @ text.t() + alpha * torch.exp(-beta * (1.0 - affinity)) @ values


def search_grid(largest: float, steps: int) -> list[float]:
    """The official grid: ``i * (largest - 0.1) / steps + 0.1`` for ``i < steps`` (0.1 up to just below largest)."""
    return [i * (largest - 0.1) / steps + 0.1 for i in range(steps)]


@torch.no_grad()
def search_alpha_beta(image: Tensor, text: Tensor, keys: Tensor, values: Tensor, labels: Tensor, scale: Tensor,
                      betas: Sequence[float], alphas: Sequence[float]) -> tuple[float, float, int]:
    """``(beta, alpha, correct)``: the grid point with the most correct predictions on ``(image, labels)``, the
    first one in the official order (beta outer, alpha inner) on ties."""
    zero_shot = scale * image @ text.t()
    affinity = image @ keys.t()
    alpha_row = torch.tensor(list(alphas), dtype=torch.float32, device=image.device)[:, None, None]
    correct = torch.empty(len(betas), len(alphas), dtype=torch.long)
    for row, beta in enumerate(betas):
        cache = torch.exp(-beta * (1.0 - affinity)) @ values
        predictions = (zero_shot + alpha_row * cache).argmax(dim=-1)  # [A, B]
        correct[row] = (predictions == labels.to(image.device)).sum(dim=-1).cpu()
    best = int(correct.flatten().argmax())  # the first maximum in row-major (beta, alpha) order
    row, column = divmod(best, len(alphas))
    return float(betas[row]), float(alphas[column]), int(correct[row, column])


class TipAdapter(FrozenClipMethod):
    """Tip-Adapter over K classes: learned state ``cache_keys`` [N, D], ``cache_labels`` [N], ``alpha``, ``beta``."""

    method_name = "tip_adapter"
    config_cls: type = TipAdapterConfig

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: TipAdapterConfig | None = None) -> None:
        config = config or self.config_cls()
        if type(config) is not self.config_cls:
            raise ConfigError(f"{self.method_name} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        super().__init__(clip, classnames, config)
        self.templates: tuple[str, ...] = config.templates or (DEFAULT_TEMPLATE,)
        width, device = clip.config.embed_dim, clip.device
        self.register_buffer("cache_keys", torch.zeros(0, width, device=device))
        self.register_buffer("cache_labels", torch.zeros(0, dtype=torch.long, device=device))
        alpha = config.alpha if config.alpha is not None else TIP_FALLBACK_INIT_ALPHA
        # float64: the chosen grid values are recorded exactly (results and prompt file agree)
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float64, device=device))
        self.register_buffer("beta", torch.tensor(float(config.beta), dtype=torch.float64, device=device))
        self._text: Tensor | None = None

    # -------------------------------------------------------------------------------------------- state and logits

    def _apply_frozen(self, fn: Callable[[Tensor], Tensor]) -> None:
        self._text = None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("cache_keys", "cache_labels"):  # the cache's size is the training set's: take the saved one
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor) and saved.ndim == self._buffers[name].ndim:  # type: ignore[union-attr]
                current = self._buffers[name]
                assert current is not None
                self._buffers[name] = torch.empty(saved.shape, dtype=current.dtype, device=current.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def zero_shot_features(self) -> Tensor:
        """The frozen zero-shot class features [K, D] (normalised, fp32), computed once per device."""
        if self._text is None or self._text.device != self.clip.device:
            self._text = class_text_features(self.clip, self.classnames, self.templates)
        return self._text

    def cache_values(self) -> Tensor:
        """The one-hot values [N, K] (fp32) of the cache."""
        return F.one_hot(self.cache_labels, self.num_classes).float()

    def forward(self, image_features: Tensor) -> Tensor:
        """Logits [B, K] (fp32) of raw image features [B, D]."""
        text = self.zero_shot_features()
        image = F.normalize(image_features.to(text.device).float(), dim=-1)
        return tip_logits(image, text, self.cache_keys, self.cache_values(), float(self.alpha), float(self.beta),
                          logit_scale_of(self.clip))

    @torch.no_grad()
    def classifier(self) -> Callable[[Tensor], Tensor]:
        text = self.zero_shot_features().clone()
        keys, values = self.cache_keys.detach().clone(), self.cache_values()
        alpha, beta, scale = float(self.alpha), float(self.beta), logit_scale_of(self.clip).to(text.device)

        @torch.no_grad()
        def classify(image_features: Tensor) -> Tensor:
            image = F.normalize(image_features.to(text.device).float(), dim=-1)
            return tip_logits(image, text, keys, values, alpha, beta, scale)

        return classify

    def with_classnames(self, classnames: Sequence[str]) -> TipAdapter:
        """The cache restricted to a subset of its classes (any order); other class lists raise ConfigError."""
        positions = class_positions(self.classnames, classnames, f"{self.method_name}'s cache")
        with seeded_torch(self.clip.device, None):
            other = type(self)(self.clip, classnames, self.config)
        new_label = torch.full((self.num_classes,), -1, dtype=torch.long, device=self.cache_labels.device)
        new_label[torch.tensor(positions, device=new_label.device)] = torch.arange(len(positions),
                                                                                   device=new_label.device)
        labels = new_label[self.cache_labels]
        keep = labels >= 0  # keys of the classes left out only ever feed their own (dropped) columns
        state = {**self.state_dict(), "cache_keys": self.cache_keys[keep].clone(), "cache_labels": labels[keep]}
        other.load_state_dict(state)
        return other

    # ------------------------------------------------------------------------------------------------------- fit

    def _check_training_set(self, train: Any) -> tuple[Tensor, Tensor]:
        features, labels = getattr(train, "features", None), getattr(train, "labels", None)
        if not isinstance(features, Tensor) or features.ndim not in (2, 3) or not isinstance(labels, Tensor):
            raise DatasetError(f"{self.method_name} builds its cache from training features [V, N, D] or [N, D] and "
                               "their labels")
        if labels.ndim != 1 or labels.numel() != features.shape[-2] or labels.numel() == 0:
            raise DatasetError(f"{self.method_name}: {features.shape[-2]} training features but labels of shape "
                               f"{tuple(labels.shape)}")
        if features.shape[-1] != self.cache_keys.shape[1]:
            raise DatasetError(f"training features have width {features.shape[-1]}, this backbone's image features "
                               f"have {self.cache_keys.shape[1]}; extract the features with the same CLIP")
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise DatasetError(f"training labels run {int(labels.min())}..{int(labels.max())}, outside "
                               f"0..{self.num_classes - 1}")
        device = self.cache_keys.device
        return features.to(device).float(), labels.to(device, torch.long)

    def _validation(self, val: Any, why: str) -> tuple[Tensor, Tensor]:
        if val is None or getattr(val, "features", None) is None or val.labels.numel() == 0:
            raise ConfigError(f"{self.method_name} {why} on the validation split, and there is none: give validation "
                              "features (few-shot runs sample min(K, 4) per class)" +
                              ("" if self.method_name != "tip_adapter" else ", or pass --no-search"))
        features = val.features
        if features.ndim != 2:
            raise DatasetError(f"{self.method_name} scores eval-transform validation features [N, D], got shape "
                               f"{tuple(features.shape)}")
        device = self.cache_keys.device
        return F.normalize(features.to(device).float(), dim=-1), val.labels.to(device, torch.long)

    @torch.no_grad()
    def _search(self, val_image: Tensor | None, val_labels: Tensor | None) -> dict[str, Any]:
        """alpha and beta searched on the validation features (or the configured ones when ``search`` is off)."""
        config = self.config
        record: dict[str, Any] = {"selected_on": "val" if config.search else "none (search off)",
                                  "initial_alpha": float(self.alpha), "initial_beta": float(self.beta)}
        if not config.search or val_image is None or val_labels is None:
            return {**record, "alpha": float(self.alpha), "beta": float(self.beta)}
        scale, text = logit_scale_of(self.clip).to(val_image.device), self.zero_shot_features()
        keys, values = self.cache_keys, self.cache_values()
        total = val_labels.numel()

        def accuracy(alpha: float, beta: float) -> float:
            logits = tip_logits(val_image, text, keys, values, alpha, beta, scale)
            return 100.0 * int((logits.argmax(dim=-1) == val_labels).sum()) / total

        (beta_max, alpha_max), (beta_steps, alpha_steps) = config.grid_scale, config.grid_steps
        betas, alphas = search_grid(beta_max, beta_steps), search_grid(alpha_max, alpha_steps)
        beta, alpha, correct = search_alpha_beta(val_image, text, keys, values, val_labels, scale, betas, alphas)
        record.update({
            "zero_shot_val_accuracy": accuracy(0.0, 0.0),
            "initial_val_accuracy": accuracy(float(self.alpha), float(self.beta)),
            "beta_grid": {"min": betas[0], "max": betas[-1], "steps": beta_steps, "scale": beta_max},
            "alpha_grid": {"min": alphas[0], "max": alphas[-1], "steps": alpha_steps, "scale": alpha_max},
            "alpha": alpha, "beta": beta, "val_accuracy": 100.0 * correct / total, "num_val": total,
        })
        self.alpha.fill_(alpha)
        self.beta.fill_(beta)
        return record

    @torch.no_grad()
    def fit(self, train: Any, val: Any = None, *, seed: int = 0) -> dict[str, Any]:
        """Build the cache from ``train`` (augmented views) and choose alpha and beta on ``val``; returns the record
        (``cache_size``, ``cache_views``, the grids, the chosen ``alpha`` / ``beta``, validation accuracies). ``seed``
        is not used (the cache and the search are deterministic)."""
        features, labels = self._check_training_set(train)
        val_image, val_labels = self._validation(val, "searches alpha and beta") if self.config.search else (None,
                                                                                                             None)
        self._set_cache(cache_keys(features, self.config.cache_views), labels)
        return {"cache_size": int(labels.numel()), "cache_views": min(self.config.cache_views, _num_views(features)),
                **self._search(val_image, val_labels)}

    def _set_cache(self, keys: Tensor, labels: Tensor) -> None:
        self.load_state_dict({**self.state_dict(), "cache_keys": keys, "cache_labels": labels})


class TipAdapterF(TipAdapter):
    """Tip-Adapter-F: Tip-Adapter with fine-tuned keys (the epoch and then alpha, beta chosen on validation)."""

    method_name = "tip_adapter_f"
    config_cls = TipAdapterFConfig

    def fit(self, train: Any, val: Any = None, *, seed: int = 0) -> dict[str, Any]:
        """Cache, fine-tuning (epoch chosen on ``val``), then the alpha / beta search on ``val``; ``seed`` draws the
        batch order and each image's view sequence. Returns the record (per-epoch loss and validation accuracy,
        the chosen epoch, and the search as :meth:`TipAdapter.fit`)."""
        config: TipAdapterFConfig = self.config
        features, labels = self._check_training_set(train)
        val_image, val_labels = self._validation(val, "chooses its fine-tuning epoch and alpha, beta")
        if features.ndim == 2:
            features = features.unsqueeze(0)
        num_views, num_items = features.shape[0], features.shape[1]
        keys = cache_keys(features, config.cache_views)
        values = F.one_hot(labels, self.num_classes).float()
        text, scale = self.zero_shot_features(), logit_scale_of(self.clip).to(keys.device)
        alpha, beta = float(self.alpha), float(self.beta)
        epochs = config.finetune_epochs if config.finetune_epochs is not None else 20
        weight = keys.clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([weight], lr=config.finetune_lr, eps=config.finetune_eps,
                                      weight_decay=config.finetune_weight_decay)
        steps_per_epoch = math.ceil(num_items / config.finetune_batch_size)
        total_steps, step = max(1, epochs * steps_per_epoch), 0
        history: list[dict[str, float]] = []
        best_correct, best_epoch, best_keys = -1, 0, keys  # 0 epochs: no fine-tuning, exactly Tip-Adapter
        for epoch in range(epochs):
            views = epoch_view_indices(num_views, num_items, seed, epoch).to(features.device)
            image = F.normalize(features[views, torch.arange(num_items, device=features.device)], dim=-1)
            generator = torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
            order = torch.randperm(num_items, generator=generator).to(features.device)
            loss_sum = 0.0
            for batch in order.split(config.finetune_batch_size):
                for group in optimizer.param_groups:  # CosineAnnealingLR(T_max = all steps), stepped per step
                    group["lr"] = config.finetune_lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
                with torch.enable_grad():
                    logits = tip_logits(image[batch], text, weight, values, alpha, beta, scale)
                    loss = F.cross_entropy(logits, labels[batch])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                step += 1
                loss_sum += float(loss.detach()) * batch.numel()
            if not math.isfinite(loss_sum):
                raise DatasetError(f"tip_adapter_f diverged in fine-tuning epoch {epoch + 1} (loss {loss_sum}); "
                                   "lower --finetune-lr")
            predictions = tip_logits(val_image, text, weight.detach(), values, alpha, beta, scale).argmax(dim=-1)
            correct = int((predictions == val_labels).sum())
            history.append({"epoch": epoch + 1, "loss": loss_sum / num_items,
                            "val_accuracy": 100.0 * correct / val_labels.numel()})
            logger.info("tip_adapter_f epoch %d/%d: loss %.4f, val accuracy %.2f%%", epoch + 1, epochs,
                        history[-1]["loss"], history[-1]["val_accuracy"])
            if correct > best_correct:  # the first best epoch, as the official strict '>'
                best_correct, best_epoch, best_keys = correct, epoch + 1, weight.detach().clone()
        self._set_cache(best_keys, labels)
        record = {"cache_size": num_items, "cache_views": min(config.cache_views, num_views),
                  "finetune_epochs": epochs, "chosen_epoch": best_epoch, "epoch_selected_on": "val",
                  "finetune_history": history}
        return {**record, **self._search(val_image, val_labels)}


def _num_views(features: Tensor) -> int:
    return 1 if features.ndim == 2 else int(features.shape[0])


def build_tip_adapter(clip: CLIP, classnames: Sequence[str], config: TipAdapterConfig | None = None) -> TipAdapter:
    """Registry builder of :class:`TipAdapter`."""
    return TipAdapter(clip, classnames, config)


def build_tip_adapter_f(clip: CLIP, classnames: Sequence[str], config: TipAdapterFConfig | None = None
                        ) -> TipAdapterF:
    """Registry builder of :class:`TipAdapterF`."""
    return TipAdapterF(clip, classnames, config)
