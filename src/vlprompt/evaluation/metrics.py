"""Classification metrics: top-1 accuracy, macro F1, per-class accuracy, confusion matrix; top-k predictions.

``classifier`` is the callable returned by ``method.classifier()``: the text side (class weights) is computed once
there, and the callable maps image features [B, D] to logits [B, K]. A test-time method's classifier (TPT) takes the
features of each image's views ``[V, B, D]`` instead and adapts to every image: features ``[V, N, D]`` are passed to
it one image at a time (the progress counts images). Accuracies are percentages (0-100).

Macro F1 follows ``sklearn.metrics.f1_score(average="macro")``: per-class F1 = 2TP / (2TP + FP + FN), averaged over
the classes that occur in the labels or the predictions (a class in neither has no defined F1 and is left out).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from vlprompt.common.precision import autocast_for
from vlprompt.common.progress import progress as make_progress
from vlprompt.errors import ConfigError, DatasetError, NonFiniteError

logger = logging.getLogger(__name__)

Classifier = Callable[["torch.Tensor"], "torch.Tensor"]


def evaluate(classifier: Classifier, features: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str], *,
             batch_size: int = 1024, device: str | torch.device = "cpu", precision: str = "fp32",
             progress: bool | None = None) -> dict[str, Any]:
    """Metrics of ``classifier`` on ``features`` [N, D] with ``labels`` [N] in ``range(len(classnames))``.

    Returns ``{"accuracy", "macro_f1", "per_class_accuracy" (by class name, see :func:`unique_class_keys`; None for a
    class without samples),
    "confusion_matrix" (rows: true class, columns: predicted class), "num_samples"}``.
    """
    predictions = predict(classifier, features, len(classnames), labels=labels, batch_size=batch_size, device=device,
                          precision=precision, progress=progress)
    return metrics_from_predictions(predictions, labels, classnames)


def predict(classifier: Classifier, features: torch.Tensor, num_classes: int, *, labels: torch.Tensor | None = None,
            batch_size: int = 1024, device: str | torch.device = "cpu", precision: str = "fp32",
            progress: bool | None = None) -> torch.Tensor:
    """Top-1 predicted class [N] (int64, CPU) of every feature row, in batches, without gradients."""
    return _run_batches(classifier, features, num_classes, batch_size, device, precision, progress, labels,
                        reduce=lambda logits: logits.argmax(dim=1)).to(torch.int64)


def predict_topk(classifier: Classifier, features: torch.Tensor, classnames: Sequence[str], k: int = 5, *,
                 batch_size: int = 1024, device: str | torch.device = "cpu", precision: str = "fp32",
                 progress: bool | None = None) -> list[list[tuple[str, float]]]:
    """For each feature row, the ``k`` most probable classes as ``(class name, softmax probability)``, best first."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    k = min(k, len(classnames))

    def top(logits: torch.Tensor) -> torch.Tensor:
        probs, index = logits.float().softmax(dim=1).topk(k, dim=1)
        return torch.stack([probs, index.to(probs.dtype)], dim=2)  # [B, k, 2]

    packed = _run_batches(classifier, features, len(classnames), batch_size, device, precision, progress, None,
                          reduce=top)
    return [[(classnames[int(index)], float(prob)) for prob, index in row.tolist()] for row in packed]


def metrics_from_predictions(predictions: torch.Tensor, labels: torch.Tensor,
                             classnames: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro F1, per-class accuracy and confusion matrix from predicted and true labels [N]."""
    num_classes = len(classnames)
    labels = _check_labels(labels, num_classes)
    predictions = predictions.detach().to("cpu", torch.int64).reshape(-1)
    if predictions.shape != labels.shape:
        raise ConfigError(f"{predictions.numel()} predictions for {labels.numel()} labels")
    if predictions.numel() and (predictions.min() < 0 or predictions.max() >= num_classes):
        raise ConfigError(f"predictions must lie in [0, {num_classes}), got range "
                          f"[{int(predictions.min())}, {int(predictions.max())}]")
    confusion = torch.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    confusion = confusion.reshape(num_classes, num_classes)
    true_positive = confusion.diagonal()
    support = confusion.sum(dim=1)  # samples per true class
    predicted = confusion.sum(dim=0)  # predictions per class
    f1_denominator = support + predicted  # = 2TP + FP + FN
    present = f1_denominator > 0
    f1 = 2.0 * true_positive[present].double() / f1_denominator[present].double()
    total = int(labels.numel())
    per_class = {name: (100.0 * int(true_positive[i]) / int(support[i]) if int(support[i]) else None)
                 for i, name in enumerate(unique_class_keys(classnames))}
    return {
        "accuracy": 100.0 * int(true_positive.sum()) / total,
        "macro_f1": 100.0 * float(f1.mean()) if f1.numel() else 0.0,
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
        "num_samples": total,
    }


def unique_class_keys(classnames: Sequence[str]) -> list[str]:
    """Class names usable as dict keys: a name that occurs more than once (ImageNet's two "crane" classes) gets its
    label appended to every occurrence, ``"crane (134)"``; unique names stay as they are."""
    counts: dict[str, int] = {}
    for name in classnames:
        counts[name] = counts.get(name, 0) + 1
    return [f"{name} ({label})" if counts[name] > 1 else name for label, name in enumerate(classnames)]


# ---------------------------------------------------------------------------------------------------------- helpers


def _check_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    if num_classes < 1:
        raise ConfigError("classnames is empty: evaluation needs at least one class")
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.dtype.is_floating_point:
        raise DatasetError(f"labels must be a 1-D integer tensor, got {_describe(labels)}")
    if labels.numel() == 0:
        raise DatasetError("no samples to evaluate: the test set is empty")
    labels = labels.detach().to("cpu", torch.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DatasetError(f"labels must lie in [0, {num_classes}) for {num_classes} class names, got range "
                           f"[{int(labels.min())}, {int(labels.max())}]; are the class names those of this dataset?")
    return labels


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__} of shape {tuple(shape)} and dtype {value.dtype}" if shape is not None else repr(value)


def _run_batches(classifier: Classifier, features: torch.Tensor, num_classes: int, batch_size: int,
                 device: str | torch.device, precision: str, progress: bool | None, labels: torch.Tensor | None,
                 reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``classifier`` batch by batch and collect ``reduce(logits)`` on the CPU."""
    if not isinstance(features, torch.Tensor) or features.ndim not in (2, 3) or not features.dtype.is_floating_point:
        raise DatasetError(f"features must be a float tensor [N, D] (or [V, N, D]: views of each image), got "
                           f"{_describe(features)}")
    views = features.ndim == 3
    count = features.shape[-2]
    if count == 0:
        raise DatasetError("no samples to evaluate: the feature set is empty")
    if labels is not None:
        labels = _check_labels(labels, num_classes)
        if labels.shape[0] != count:
            raise DatasetError(f"{count} feature rows but {labels.shape[0]} labels")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    target = torch.device(device)
    outputs = []
    step = 1 if views else batch_size  # a test-time classifier adapts per image: one image per call
    with torch.inference_mode(), autocast_for(target, precision), \
            make_progress(count, "evaluate", "img", show=progress) as shown:
        for start in range(0, count, step):
            rows = features[:, start:start + step] if views else features[start:start + step]
            logits = classifier(rows.to(target, non_blocking=True))
            if logits.ndim != 2 or logits.shape[1] != num_classes:
                raise ConfigError(f"the classifier returned logits of shape {tuple(logits.shape)} for "
                                  f"{num_classes} class names; expected [batch, {num_classes}]")
            if not bool(logits.isfinite().all()):
                raise NonFiniteError(
                    f"the classifier gave NaN or infinite logits (images {start}..{start + logits.shape[0] - 1} of "
                    f"{count}), so no score or prediction can be computed: its learned state is unusable "
                    "(a training that diverged, or a damaged prompt file); train it again, e.g. with a lower --lr")
            outputs.append(reduce(logits).cpu())
            shown.update(logits.shape[0])
    return torch.cat(outputs)
