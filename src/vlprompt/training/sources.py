"""Where the training loop takes its batches from: cached image features, or images decoded on the fly.

:func:`vlprompt.training.loop.train` decides, per epoch, the order of the items, their batches, each rank's share of
every batch and which augmented view each item shows (``(epoch + offset_i) % V``); a source only materialises the
inputs of those shares, in that order:

- :class:`FeatureBatches` (methods declared ``Training.FEATURES``): rows of the cached features ``[V, N, D]``;
- :class:`ImageBatches` (``Training.IMAGES``): pixels ``[b, 3, R, R]`` of an :class:`ImageTrainSet`, decoded and
  augmented in DataLoader workers while the previous batches train (decoding overlaps compute). View ``v`` of item
  ``i`` is drawn with the generator seeded from (pool seed, the item's path, v), exactly as the feature cache draws
  it (:func:`vlprompt.features.extract.augmented_views`), so an image method sees the very augmentations a feature
  method's cached views hold; ``V = 0`` uses the evaluation transform.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlprompt.backbone.transforms import EvalTransform, TrainTransform, view_generator
from vlprompt.data.check import find_unreadable
from vlprompt.data.images import ImageDataset
from vlprompt.data.types import Item
from vlprompt.errors import DatasetError
from vlprompt.features.extract import default_num_workers


@dataclass
class ImageTrainSet:
    """The training images of an image-in-the-loop method, with its augmentation pool.

    ``items``: paths relative to ``image_dir`` with labels; ``resolution``: the backbone's input size; ``views``:
    the pool of augmented views per image (``V``; 0 = no augmentation, the evaluation transform); ``pool_seed``: the
    seed of that pool (the feature cache's, so both paths draw the same views); ``num_workers``: decoding workers
    (an int or "auto", :func:`vlprompt.features.extract.default_num_workers`); ``skipped``: unreadable images left
    out.
    """

    image_dir: Path
    items: list[Item]
    resolution: int
    views: int
    pool_seed: int = 0
    num_workers: int | str = "auto"
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.image_dir = Path(self.image_dir)
        self.items = list(self.items)
        if isinstance(self.views, bool) or not isinstance(self.views, int) or self.views < 0:
            raise ValueError(f"views must be an integer >= 0, got {self.views!r}")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> Tensor:
        return torch.tensor([item.label for item in self.items], dtype=torch.int64)

    @property
    def num_views(self) -> int:
        """Views in the pool (at least 1: V = 0 means one unaugmented view)."""
        return max(1, self.views)

    @property
    def paths(self) -> list[str]:
        return [item.path for item in self.items]


class FeatureBatches:
    """Batches of cached features ``[V, N, D]`` (``[N, D]`` is one view)."""

    def __init__(self, features: Tensor, labels: Tensor) -> None:
        self.features = features if features.ndim == 3 else features.unsqueeze(0)
        self.labels = labels

    @property
    def num_views(self) -> int:
        return int(self.features.shape[0])

    def describe(self) -> str:
        return f"{self.labels.numel()} images x {self.num_views} cached view(s)"

    def epoch(self, views: Tensor, shares: Sequence[Tensor], device: torch.device) -> Iterator[Tensor]:
        """The rows of each share (item indices), item ``i`` at its view ``views[i]``."""
        view = self.features[views, torch.arange(self.labels.numel())]
        for local in shares:
            yield view[local.to(view.device)].to(device, non_blocking=True)


class _EpochImages(ImageDataset):
    """Item ``i`` decoded and drawn at view ``views[i]`` (None: the evaluation transform)."""

    def __init__(self, train_set: ImageTrainSet, views: list[int] | None) -> None:
        super().__init__(train_set.items, train_set.image_dir, transform=None, on_error="raise")
        self.views = views
        self.seed = train_set.pool_seed
        self.draw: Any = TrainTransform(train_set.resolution) if views is not None else \
            EvalTransform(train_set.resolution)

    def __getitem__(self, index: int) -> Tensor:  # type: ignore[override]
        image, _, _ = super().__getitem__(index)  # type: ignore[misc]  # raises UnreadableImageError on a bad file
        if self.views is None:
            return self.draw(image)
        return self.draw(image, view_generator(self.seed, self.items[index].path, self.views[index]))


def _stack(samples: Sequence[Tensor]) -> Tensor:
    return torch.stack(list(samples))


class ImageBatches:
    """Batches of pixels of an :class:`ImageTrainSet`, decoded and augmented in DataLoader workers."""

    def __init__(self, train_set: ImageTrainSet) -> None:
        self.train_set = train_set
        self.labels = train_set.labels
        self.workers = train_set.num_workers  # "auto": vlprompt.features.extract.default_num_workers, per device

    @property
    def num_views(self) -> int:
        return self.train_set.num_views

    def describe(self) -> str:
        pool = f"a pool of {self.train_set.views} augmented view(s)" if self.train_set.views else "no augmentation"
        return f"{self.labels.numel()} images decoded on the fly ({pool}, {self.workers} worker(s))"

    def _workers(self, device: torch.device) -> int:
        return default_num_workers(device, len(self.train_set)) if self.workers == "auto" else int(self.workers)

    def epoch(self, views: Tensor, shares: Sequence[Tensor], device: torch.device) -> Iterator[Tensor]:
        """Pixels ``[b, 3, R, R]`` of each share, in order; workers decode ahead while earlier batches train."""
        dataset = _EpochImages(self.train_set, views.tolist() if self.train_set.views else None)
        workers = self._workers(device)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=[share.tolist() for share in shares], num_workers=workers,
            collate_fn=_stack, pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
        for pixels in loader:
            yield pixels.to(device, non_blocking=True)


def batch_source(train_set: Any) -> FeatureBatches | ImageBatches:
    """The source of ``train_set``: an :class:`ImageTrainSet`, or features (``.features`` [N, D] / [V, N, D] and
    ``.labels`` [N]) checked for shape and type (DatasetError naming what is wrong)."""
    if isinstance(train_set, ImageTrainSet):
        if not train_set.items:
            raise DatasetError("the training set is empty: no images to train on")
        labels = train_set.labels
        if int(labels.min()) < 0:
            raise DatasetError(f"training labels must be >= 0, got {int(labels.min())}")
        return ImageBatches(train_set)
    features = getattr(train_set, "features", None)
    labels = getattr(train_set, "labels", None)
    if not isinstance(features, torch.Tensor) or not features.dtype.is_floating_point or features.ndim not in (2, 3):
        raise DatasetError(f"training features must be a float tensor [N, D] or [V, N, D], got {_shape(features)}")
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.dtype.is_floating_point:
        raise DatasetError(f"training labels must be a 1-D integer tensor, got {_shape(labels)}")
    if features.ndim == 2:
        features = features.unsqueeze(0)
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise DatasetError("the training set is empty: no features to train on")
    if features.shape[1] != labels.shape[0]:
        raise DatasetError(f"{features.shape[1]} training feature rows but {labels.shape[0]} labels")
    labels = labels.detach().to("cpu", torch.int64)
    if int(labels.min()) < 0:
        raise DatasetError(f"training labels must be >= 0, got {int(labels.min())}")
    return FeatureBatches(features.detach(), labels)


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__}"


def image_train_set(image_dir: str | os.PathLike[str], items: Sequence[Item], *, resolution: int, views: int,
                    pool_seed: int, num_workers: int | str = "auto", skip_unreadable: bool = False,
                    progress: bool | None = None) -> ImageTrainSet:
    """An :class:`ImageTrainSet`; with ``skip_unreadable`` every image is decoded once first and the unreadable ones
    are left out (listed in ``skipped``); otherwise a bad file stops training when its batch is decoded."""
    items = list(items)
    skipped: list[str] = []
    if skip_unreadable:
        bad = find_unreadable(image_dir, [item.path for item in items], progress=progress,
                              workers=None if num_workers == "auto" else max(1, int(num_workers)))
        drop = {b.index for b in bad}
        skipped = [b.path for b in bad]
        items = [item for index, item in enumerate(items) if index not in drop]
    return ImageTrainSet(Path(image_dir), items, resolution, views, pool_seed, num_workers, skipped)
