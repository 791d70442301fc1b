"""Subsets of a dataset: the base / novel class split of the base-to-novel protocol (CoCoOp's
``subsample_classes``) and a capped test split for smoke tests."""

from __future__ import annotations

import dataclasses
import math
import random

from vlprompt.common.vocab import SUBSETS, Subset
from vlprompt.data.types import DatasetSplits, Item
from vlprompt.errors import ConfigError


def base_novel_labels(num_classes: int, subset: Subset) -> list[int]:
    """The original labels kept by ``subset``: labels sorted, the first ``ceil(n / 2)`` base, the rest new."""
    if subset not in SUBSETS:
        raise ConfigError(f"unknown class subset {subset!r}: use one of {', '.join(SUBSETS)}.")
    labels = list(range(num_classes))
    cut = math.ceil(num_classes / 2)
    return labels if subset == "all" else labels[:cut] if subset == "base" else labels[cut:]


def subsample_classes(splits: DatasetSplits, subset: Subset) -> DatasetSplits:
    """Keep only the base or new classes of every split, relabelled from 0 in label order ("all" keeps everything).

    The reference takes the labels present in the training split; with every class present in train (all standard
    datasets, and few-shot samples of them) that is ``range(n)``, which is what is used here, so test-only datasets
    can be subsampled too.
    """
    kept = base_novel_labels(splits.num_classes, subset)
    if subset == "all":
        return DatasetSplits(splits.name, splits.image_dir, list(splits.classnames), splits.template,
                             list(splits.train), list(splits.val), list(splits.test), split_source=splits.split_source)
    relabel = {old: new for new, old in enumerate(kept)}

    def keep(items: list[Item]) -> list[Item]:
        return [Item(item.path, relabel[item.label]) for item in items if item.label in relabel]

    return DatasetSplits(splits.name, splits.image_dir, [splits.classnames[old] for old in kept], splits.template,
                         keep(splits.train), keep(splits.val), keep(splits.test), split_source=splits.split_source)


def cap_test_split(splits: DatasetSplits, limit: int | None, seed: int = 0) -> DatasetSplits:
    """``splits`` with its test split cut to at most ``limit`` items (smoke tests), the same items every time.

    The kept items are a seeded random sample (``random.Random(seed)``, no global state) kept in their original
    order, so every class keeps roughly its share. ``limit=None`` or a test split already small enough: unchanged.
    """
    if limit is None or len(splits.test) <= limit:
        return splits
    keep = sorted(random.Random(seed).sample(range(len(splits.test)), limit))
    return dataclasses.replace(splits, test=[splits.test[i] for i in keep])
