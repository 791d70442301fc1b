"""The steps of an experiment as plain functions: data -> features -> method -> fit -> metrics.

:mod:`vlprompt.harness.pipeline` (run folders, result files) and :mod:`vlprompt.api` (the Python API) both run these steps;
nothing here touches a run folder except through the ``run_dir`` handed to :func:`fit_method` for checkpoints.

- :func:`build_method_for`: the method built from its typed config for a dataset (its hand-crafted template filled
  in) with a seeded initialisation.
- :func:`training_splits`: the few-shot sample (saved as portable JSON and reused when a path is given), then the
  base / new class subset.
- :class:`FeatureOptions`, :func:`eval_features`, :func:`train_features`: frozen image-tower features through the
  feature cache (evaluation transform; augmented views for gradient-trained methods).
- :func:`fit_method`: SGD (:func:`vlprompt.training.loop.train`), closed form (``method.fit``) or nothing, by the method's kind.
- :func:`adapt_method`: the method for another class list (cross-dataset, base-to-novel "new").
- :func:`evaluation_features`: what the classifier scores (frozen or prompted tower features; a test-time method's
  views of each test image, :func:`test_time_views`).
- :func:`score`: test metrics with the classifier's text features computed once (a test-time classifier adapts to
  each image's views).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vlprompt.backbone.loaders import load_clip
from vlprompt.backbone.transforms import TrainTransform
from vlprompt.common import dist
from vlprompt.common.precision import resolve_precision
from vlprompt.common.vocab import seeded_torch
from vlprompt.data import load_or_sample_fewshot, sample_fewshot, subsample_classes
from vlprompt.errors import ConfigError, DatasetError
from vlprompt.evaluation.metrics import evaluate
from vlprompt.features.cache import FeatureCache
from vlprompt.features.extract import augmented_views, extract_features
from vlprompt.methods import RecipeContext, Training, config_for_dataset, method_config
from vlprompt.training.loop import train as run_training
from vlprompt.training.sources import image_train_set

if TYPE_CHECKING:
    from vlprompt.backbone.model import CLIP
    from vlprompt.training.config import TrainConfig
    from vlprompt.data import DatasetSplits
    from vlprompt.features.extract import FeatureSet
    from vlprompt.methods import MethodSpec
    from vlprompt.training.loop import CheckpointStore, EpochStats
    from vlprompt.training.sources import ImageTrainSet

logger = logging.getLogger(__name__)

FEATURE_BATCH_SIZE = 64
"""Images per image-tower call when extracting features on a CPU (ViT-B/16's tower reaches its full rate there)."""
FEATURE_BATCH_SIZE_CUDA = 256
"""Images per image-tower call on a GPU (enough rows to fill it; ViT-B/16 at 224 px needs well under 10 GiB)."""


# ------------------------------------------------------------------------------------------------------ resources


def open_feature_cache(cache: Any = None) -> FeatureCache | None:
    """The feature cache to use: None or True -> the default location (``$VLPROMPT_CACHE/features`` or the user
    cache folder), False -> no cache, a path -> a cache there, a :class:`FeatureCache` -> itself."""
    if cache is False:
        return None
    if cache is None or cache is True:
        return FeatureCache()
    if isinstance(cache, FeatureCache):
        return cache
    if isinstance(cache, str | os.PathLike):
        return FeatureCache(cache)
    raise ConfigError(f"feature_cache must be a FeatureCache, a folder path, True/None (default location) or False "
                      f"(no cache), got {type(cache).__name__}")


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``auto`` (CUDA when available, the process's own GPU under torchrun), ``cpu``, ``cuda`` or ``cuda:N``."""
    if isinstance(spec, torch.device):
        return spec
    return dist.resolve_device(spec or "auto")


def load_backbone(model: str, device: torch.device) -> CLIP:
    """``load_clip(model)`` in fp32 on ``device`` (mixed precision comes from autocast, weights stay fp32)."""
    return load_clip(model, device=device, precision="fp32")


# ---------------------------------------------------------------------------------------------------------- method


def build_method_for(spec: MethodSpec, clip: CLIP, classnames: list[str], config: Any, *,
                     dataset: str | None, template: str, seed: int) -> Any:
    """Build ``spec``'s method on ``clip`` for ``classnames`` from its typed ``config`` (or a mapping of its fields);
    the dataset's ``template`` completes the config (zero-shot, ensemble) and the initialisation (CoOp's random
    context) is drawn from ``seed`` alone."""
    # fields left to the recipe are normally filled already (RunConfig, api.build_method); else few-shot's
    config = config_for_dataset(method_config(spec, config, RecipeContext(dataset=dataset)), dataset, template)
    with seeded_torch(clip.device, seed, "init"):
        return spec.build(clip, list(classnames), config)


def adapt_method(method: Any, spec: MethodSpec, config: Any, target: DatasetSplits, *,
                 same_dataset: bool, seed: int) -> Any:
    """``method`` for ``target``'s classes.

    The same classes of the same dataset: ``method`` itself. Fixed methods (zero-shot, ensemble) are rebuilt from the
    run's ``config`` with the target dataset's own template, as the baselines of the papers are evaluated. Learned
    methods move their learned state with ``method.with_classnames`` (ConfigError where impossible: class-specific
    contexts, linear probes).
    """
    if same_dataset and list(method.classnames) == list(target.classnames):
        return method
    if not spec.training.uses_training_images:
        return build_method_for(spec, method.clip, target.classnames, config, dataset=target.name,
                                template=target.template, seed=seed)
    return method.with_classnames(list(target.classnames))


# ------------------------------------------------------------------------------------------------------------- data


def training_splits(splits: DatasetSplits, *, shots: int, seed: int, subset: str,
                    fewshot_path: str | os.PathLike[str] | None = None) -> DatasetSplits:
    """The data a method learns from: ``shots`` per class (0 = every training image) drawn with ``seed`` from the
    full dataset, then the ``subset`` of classes ("all", "base", "new"; relabelled from 0).

    With ``fewshot_path`` the sample is saved there as portable JSON, and an existing file is reused (it must hold the
    same shots and seed). Sampling before the class subset is what the base-to-novel reference does.
    """
    if shots > 0:
        if fewshot_path is not None:
            sampled = load_or_sample_fewshot(splits, shots, seed, fewshot_path)
        else:
            sampled = sample_fewshot(splits, shots, seed)
        splits = sampled.as_splits()
    return subsample_classes(splits, subset)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------- features


@dataclass
class FeatureOptions:
    """How image features are computed: device, autocast precision, batch, workers, cache, progress bars.

    ``precision`` "auto" is resolved on construction (:func:`vlprompt.common.precision.resolve_precision`), so
    ``options.precision`` is the concrete precision every stage runs and the results record. ``batch_size`` None:
    :data:`FEATURE_BATCH_SIZE` on a CPU, :data:`FEATURE_BATCH_SIZE_CUDA` on a GPU.
    """

    device: torch.device
    precision: str = "fp32"
    batch_size: int | None = None
    num_workers: int | str = "auto"
    cache: FeatureCache | None = None
    progress: bool | None = None
    on_error: str = "raise"  # unreadable images: "raise" (stop, listing them) or "skip" (leave out, count)
    seconds: float = field(default=0.0)  # time spent extracting, accumulated by the functions below
    skipped: list[str] = field(default_factory=list)  # images left out so far (on_error="skip"), in order met

    def __post_init__(self) -> None:
        self.precision = resolve_precision(self.precision, self.device)
        if self.batch_size is None:
            self.batch_size = FEATURE_BATCH_SIZE_CUDA if self.device.type == "cuda" else FEATURE_BATCH_SIZE

    def note_skipped(self, features: FeatureSet) -> FeatureSet:
        """Remember the images ``features`` left out (each path once) and return ``features``."""
        self.skipped.extend(path for path in features.skipped if path not in self.skipped)
        return features

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started


def eval_features(clip: CLIP, splits: DatasetSplits, split: str, options: FeatureOptions) -> FeatureSet:
    """Evaluation-transform features ``[N, D]`` of one split ("train", "val" or "test")."""
    with options.timed():
        return options.note_skipped(extract_features(
            clip, splits.image_dir, splits.split(split), device=options.device,
            precision=options.precision, batch_size=options.batch_size,  # type: ignore[arg-type]
            num_workers=options.num_workers, cache=options.cache, progress=options.progress,
            on_error=options.on_error))  # type: ignore[arg-type]


# seed of the shared pool of augmented training views (not the run's seed: see train_features)
AUGMENTATION_POOL_SEED = 0


def train_features(clip: CLIP, splits: DatasetSplits, train: TrainConfig, options: FeatureOptions) -> FeatureSet:
    """Training features of a gradient-trained method: ``[V, N, D]`` augmented views (``train.views``), or
    evaluation-transform features ``[N, D]`` when ``views`` is 0.

    The views form one pool per image, drawn from :data:`AUGMENTATION_POOL_SEED` rather than the run's seed, so the
    feature cache serves them to every run, method and seed; the run's seed decides which view each image shows in
    each epoch (:func:`vlprompt.features.extract.epoch_view_indices`). The crop's smallest area fraction is
    ``train.crop_scale_min`` (CoOp 0.08; a pool per value)."""
    views = train.num_views(len(splits.train))
    if views == 0:
        return eval_features(clip, splits, "train", options)
    scale = train.completed().crop_scale_min
    assert scale is not None
    transform = TrainTransform(clip.config.image_resolution, scale=(scale, 1.0))
    with options.timed():
        return options.note_skipped(augmented_views(
            clip, splits.image_dir, splits.train, views=views, seed=AUGMENTATION_POOL_SEED, transform=transform,
            device=options.device, precision=options.precision,  # type: ignore[arg-type]
            batch_size=options.batch_size, num_workers=options.num_workers, cache=options.cache,
            progress=options.progress, on_error=options.on_error))  # type: ignore[arg-type]


def require_images(splits: DatasetSplits, split: str) -> None:
    """A DatasetError when ``split`` of ``splits`` is empty (nothing to learn from or to evaluate)."""
    if not splits.split(split):
        raise DatasetError(f"{splits.name} has no {split} images for these classes; a method needs {split} images "
                           f"here (check the dataset's split file or --subset)")


# -------------------------------------------------------------------------------------------------------------- fit


@dataclass
class FitOutcome:
    """What fitting did: the method's training kind (``Training`` value), seconds spent, and a JSON-ready summary for the result file."""

    kind: str
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[EpochStats] = field(default_factory=list)


def training_sets(spec: MethodSpec, clip: CLIP, data: DatasetSplits, train: TrainConfig,
                  options: FeatureOptions) -> tuple[FeatureSet | ImageTrainSet | None, FeatureSet | None]:
    """``(train_set, val_set)`` a method learns from, as its registry entry declares: augmented views for the SGD loop
    on cached features (``train.views``), the training images for the SGD loop through the towers (same view pool),
    eval-transform validation features and eval-transform train features (or, with ``spec.fit_views``, augmented
    views as the SGD loop gets them) for a closed-form fit, nothing for methods without training images."""
    if spec.training is Training.FEATURES:
        return train_features(clip, data, train, options), None
    if spec.training is Training.CLOSED_FORM:
        val = eval_features(clip, data, "val", options) if data.val else None
        fitted = train_features(clip, data, train, options) if spec.fit_views else eval_features(clip, data, "train",
                                                                                                 options)
        return fitted, val
    if spec.training is Training.IMAGES:
        return train_images(clip, data, train, options), None
    return None, None


def train_images(clip: CLIP, splits: DatasetSplits, train: TrainConfig, options: FeatureOptions) -> ImageTrainSet:
    """The training images of an image-in-the-loop method (decoded and augmented on the fly by the training loop),
    with the same pool of augmented views as :func:`train_features` (``train.views``, :data:`AUGMENTATION_POOL_SEED`).

    With ``options.on_error == "skip"`` every image is decoded once here and the unreadable ones are left out."""
    with options.timed():
        images = image_train_set(splits.image_dir, splits.train, resolution=clip.config.image_resolution,
                                 views=train.num_views(len(splits.train)), pool_seed=AUGMENTATION_POOL_SEED,
                                 num_workers=options.num_workers, skip_unreadable=options.on_error == "skip",
                                 progress=options.progress)
    options.skipped.extend(path for path in images.skipped if path not in options.skipped)
    if not images.items:
        raise DatasetError(f"none of the {len(images.skipped)} training images of {splits.name} can be read")
    return images


def evaluation_features(spec: MethodSpec, method: Any, clip: CLIP, splits: DatasetSplits, split: str,
                  options: FeatureOptions) -> FeatureSet:
    """The image features ``method``'s classifier scores on ``split``, as its registry entry declares: the frozen
    tower's (cached) evaluation features, for ``Training.IMAGES`` the method's own prompted image tower
    (``method.encode_images``) over the split, computed once per evaluation and never cached, and for
    ``Training.TEST_TIME`` the frozen tower's features ``[V, N, D]`` of the views ``method.test_views()`` asks for
    (each test image decoded once, its views augmented from it with generators seeded per image and view, whole
    images' views per tower call; not cached), which its classifier adapts to image by image."""
    if spec.training is Training.TEST_TIME:
        return test_time_views(method, clip, splits, split, options)
    if spec.training is not Training.IMAGES:
        return eval_features(clip, splits, split, options)
    method.eval()
    with options.timed():
        return options.note_skipped(extract_features(
            clip, splits.image_dir, splits.split(split), device=options.device,
            precision=options.precision, batch_size=options.batch_size,  # type: ignore[arg-type]
            num_workers=options.num_workers, cache=None, progress=options.progress,
            on_error=options.on_error, encoder=method.encode_images))  # type: ignore[arg-type]


def test_time_views(method: Any, clip: CLIP, splits: DatasetSplits, split: str,
                    options: FeatureOptions) -> FeatureSet:
    """The frozen tower's features ``[V, N, D]`` of the views of every image of ``split`` that a test-time method
    asks for (``method.test_views()``: view 0 the image itself, the others augmented); the tower batch is the
    largest multiple of V within ``options.batch_size`` (at least one image's views), so an image's views are encoded
    together."""
    views = method.test_views()
    batch = max(1, options.batch_size // views.count) * views.count  # type: ignore[operator]
    with options.timed():
        return options.note_skipped(augmented_views(
            clip, splits.image_dir, splits.split(split), views=views.count, seed=views.seed,
            transform=views.transform, original=views.original, device=options.device,
            precision=options.precision, batch_size=batch, num_workers=options.num_workers,  # type: ignore[arg-type]
            cache=None, progress=options.progress, on_error=options.on_error))  # type: ignore[arg-type]


def fit_method(method: Any, spec: MethodSpec, train_set: FeatureSet | ImageTrainSet | None,
               val_set: FeatureSet | None, *, train: TrainConfig | None = None, run_dir: CheckpointStore | None = None,
               device: torch.device | None = None, on_epoch_end: Callable[[EpochStats], None] | None = None,
               progress: bool | None = None) -> FitOutcome:
    """Fit ``method`` as its registry entry declares (``spec.training``): the SGD loop
    (:func:`vlprompt.training.loop.train`, ``train`` resolved; checkpoints into ``run_dir`` and resumes from one),
    ``method.fit(train_set, val_set, seed=...)`` for a closed-form fit, nothing otherwise. An SGD-trained method may
    add to the summary through ``method.fit_record()`` (optional, JSON-ready dict)."""
    kind = spec.training.value
    if not spec.training.uses_training_images:
        return FitOutcome(kind)
    if train_set is None:
        raise ConfigError(f"method {spec.name} learns from training images: give training features")
    started = time.perf_counter()
    if spec.training is Training.CLOSED_FORM:
        info = method.fit(train_set, val_set, seed=train.seed if train is not None else 0)
        seconds = time.perf_counter() - started
        return FitOutcome(kind, seconds, {"num_train": len(train_set), **_jsonable(info)})
    if train is None or not train.is_resolved:
        raise ConfigError("SGD training needs a resolved TrainConfig (epochs or steps, and batch size set)")
    result = run_training(method, train_set, train, run_dir=run_dir, device=device, on_epoch_end=on_epoch_end,
                          progress=progress)
    last = result.history[-1] if result.history else None
    summary = {"num_train": len(train_set), "views": train_set.num_views, "precision": result.precision,
               "epochs": len(result.history),
               "resumed_after_epoch": result.start_epoch,
               "final_loss": last.loss if last else None, "final_train_accuracy": last.accuracy if last else None,
               "loss_history": [stats.loss for stats in result.history]}
    record = getattr(method, "fit_record", None)  # optional: what the method itself reports (CLAP: no selection)
    if record is not None:
        summary.update(_jsonable(record()))
    return FitOutcome(kind, result.train_s, summary, list(result.history))


def _jsonable(info: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(info), default=float))


# ------------------------------------------------------------------------------------------------------------ score


def score(method: Any, features: FeatureSet, classnames: list[str], options: FeatureOptions) -> tuple[dict[str, Any],
                                                                                                     float]:
    """``(metrics, seconds)`` of ``method`` on ``features``: its classifier (text features computed once) applied
    in batches; metrics as :func:`vlprompt.evaluation.metrics.evaluate` (accuracy in percent)."""
    if len(classnames) == 1:
        logger.warning("only one class (%r): every image is assigned to it, so the accuracy of 100%% measures "
                       "nothing; evaluate on a dataset or subset with several classes", classnames[0])
    started = time.perf_counter()
    classifier = method.classifier()
    metrics = evaluate(classifier, features.features, features.labels, classnames, device=options.device,
                       precision=options.precision, progress=options.progress)
    return metrics, time.perf_counter() - started
