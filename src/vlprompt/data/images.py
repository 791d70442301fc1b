"""A torch ``Dataset`` over :class:`Item` lists that decodes images in DataLoader workers and survives bad files.

Each ``__getitem__`` opens its image exactly once (:func:`vlprompt.backbone.transforms.load_image`: RGB, EXIF
orientation, truncated / corrupt / empty / non-image files refused with :class:`DatasetError`), so decoding runs in the
DataLoader's worker processes and no image is opened twice per epoch. On a bad file:

- ``on_error="raise"`` (default): raise :class:`UnreadableImageError` (a :class:`DatasetError`) naming every bad
  file of the batch being fetched (the run stops; ``vlprompt data check`` lists every unreadable file of a dataset);
- ``on_error="skip"``: return a :class:`BadImage`; :func:`collate_images` (``dataset.collate_fn``) drops it from the
  batch and reports it in ``batch.bad`` so the caller can count and list skipped files.

Use ``DataLoader(dataset, collate_fn=dataset.collate_fn)``; batches are :class:`ImageBatch` with ``images``,
``labels``, ``indices`` (positions in the item list, to match features to items) and ``bad``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from vlprompt.backbone import transforms
from vlprompt.data.listing import MAX_LISTED, format_offenders
from vlprompt.data.types import BadImage, Item
from vlprompt.errors import ConfigError, DatasetError

OnError = Literal["raise", "skip"]
ON_ERROR_CHOICES: tuple[str, ...] = ("raise", "skip")
SKIP_HINT = "or leave them out with --skip-bad-images (on_error='skip' from Python)"
"""The end of every unreadable-image error: how to skip them, on the command line and from Python."""


class ImageBatch(NamedTuple):
    """A collated batch: stacked images (or a list when untransformed), int64 labels and indices, skipped files."""

    images: Any
    labels: torch.Tensor
    indices: torch.Tensor
    bad: list[BadImage]


class UnreadableImageError(DatasetError):
    """An image of an :class:`ImageDataset` cannot be decoded (``on_error="raise"``).

    Raised in a DataLoader worker, torch re-raises it in the main process as ``UnreadableImageError(text)`` where
    ``text`` wraps the original message in the worker's traceback; the constructor keeps only the original message, so
    the command line prints one clear line.
    """

    def __init__(self, message: str, bad: Sequence[BadImage] = ()) -> None:
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)
        self.bad: list[BadImage] = list(bad)   # empty once re-raised from a worker (only the message crosses)


def _load_image(path: str) -> Any:
    return transforms.load_image(path)


class ImageDataset(torch.utils.data.Dataset):
    """Images of ``items`` (paths relative to ``image_dir``) with their labels, decoded on access.

    ``transform`` maps an RGB PIL image to what the model takes (e.g. a tensor); None keeps the PIL image. A sample is
    ``(image, label, index)``; with ``on_error="skip"`` a bad file gives a :class:`BadImage` instead.
    """

    def __init__(self, items: Sequence[Item], image_dir: str | Path,
                 transform: Callable[[Any], Any] | None = None, on_error: OnError = "raise") -> None:
        if on_error not in ON_ERROR_CHOICES:
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
        self.items = list(items)
        self.image_dir = Path(image_dir)
        self.transform = transform
        self.on_error: OnError = on_error

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, int, int] | BadImage:
        sample = self._sample(index)
        if isinstance(sample, BadImage) and self.on_error == "raise":
            raise UnreadableImageError(self._failure([sample]), [sample])
        return sample

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, int, int] | BadImage]:
        """A batch of samples (the DataLoader's batched fetch) through ``__getitem__`` (so subclasses may override
        it); with "raise", one error names every bad file of the batch instead of only the first."""
        samples: list[tuple[Any, int, int] | BadImage] = []
        bad: list[BadImage] = []
        for index in indices:
            try:
                samples.append(self[index])
            except UnreadableImageError as exc:
                bad.extend(exc.bad)
        if bad:
            raise UnreadableImageError(self._failure(bad), bad)
        return samples

    def _sample(self, index: int) -> tuple[Any, int, int] | BadImage:
        item = self.items[index]
        try:
            image = _load_image(os.path.join(self.image_dir, item.path))
        except DatasetError as exc:
            return BadImage(index, item.path, str(exc))
        if self.transform is not None:
            image = self.transform(image)
        return image, item.label, index

    def _failure(self, bad: Sequence[BadImage]) -> str:
        where = ", ".join(f"item {b.index}" for b in bad[:MAX_LISTED])
        head = bad[0].reason if len(bad) == 1 else \
            f"{len(bad)} unreadable images: " + "; ".join(b.reason for b in bad[:MAX_LISTED]) + \
            (f"; ... (and {len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else "")
        return (f"{head} ({where} of {len(self.items)}). Run `vlprompt data check` to list every unreadable file of "
                f"the dataset, then remove or replace them, {SKIP_HINT}.")

    @property
    def collate_fn(self) -> Callable[[Sequence[tuple[Any, int, int] | BadImage]], ImageBatch]:
        """The collate function for ``DataLoader`` (picklable, works in worker processes)."""
        return collate_images


def collate_images(samples: Sequence[tuple[Any, int, int] | BadImage]) -> ImageBatch:
    """Stack good samples into an :class:`ImageBatch` and list the bad ones in ``batch.bad``."""
    good = [s for s in samples if not isinstance(s, BadImage)]
    bad = [s for s in samples if isinstance(s, BadImage)]
    images: Any = [s[0] for s in good]
    if images and all(isinstance(image, torch.Tensor) for image in images):
        images = torch.stack(images)
    labels = torch.tensor([s[1] for s in good], dtype=torch.int64)
    indices = torch.tensor([s[2] for s in good], dtype=torch.int64)
    return ImageBatch(images, labels, indices, bad)


def describe_bad_images(bad: Sequence[BadImage], total: int) -> str:
    """One line for logs and results: how many of ``total`` images were skipped, and the first of them."""
    if not bad:
        return f"all {total} images decoded"
    return f"skipped {len(bad)} of {total} unreadable images: {format_offenders([b.path for b in bad])}"
