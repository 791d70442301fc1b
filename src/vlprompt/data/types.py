"""Datasets as plain data: an item is a relative image path and a label; a dataset is three lists of items."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")


@dataclass(frozen=True)
class Item:
    """One labelled image: ``path`` is relative to :attr:`DatasetSplits.image_dir` with POSIX separators."""

    path: str
    label: int


@dataclass(frozen=True)
class SplitCounts:
    """Number of images per split (and of classes) of a dataset."""

    train: int
    val: int
    test: int
    classes: int

    def as_dict(self) -> dict[str, int]:
        """``{"train": .., "val": .., "test": .., "classes": ..}``."""
        return {"train": self.train, "val": self.val, "test": self.test, "classes": self.classes}


@dataclass
class DatasetSplits:
    """A dataset's train / val / test items with its class names (ordered by label, cleaned for prompts).

    ``split_source`` says where the split came from (a split file's path, "shipped split_zhou_DTD.json", "folders"),
    for logs and ``vlprompt data check``.
    """

    name: str
    image_dir: Path
    classnames: list[str]
    template: str
    train: list[Item]
    val: list[Item]
    test: list[Item]
    split_source: str = field(default="", compare=False)

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classnames)``)."""
        return len(self.classnames)

    def split(self, name: str) -> list[Item]:
        """The items of split ``name`` ("train", "val" or "test")."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}: use one of {', '.join(SPLIT_NAMES)}")
        items: list[Item] = getattr(self, name)
        return items

    def counts(self) -> SplitCounts:
        """Per-split item counts and the number of classes."""
        return SplitCounts(len(self.train), len(self.val), len(self.test), len(self.classnames))

    def image_path(self, item: Item) -> Path:
        """Absolute path of ``item``'s image."""
        return self.image_dir / item.path


@dataclass(frozen=True)
class BadImage:
    """An image that could not be decoded: its position in the item list, relative path and the reason."""

    index: int
    path: str
    reason: str
