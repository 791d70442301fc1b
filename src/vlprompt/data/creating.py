"""The reference's procedures for creating a split where no split file exists, made deterministic.

- :func:`split_per_class` mirrors CoOp's ``DTD.read_and_split_data``: per class (label order), shuffle its images and
  take ``round(n * 0.5)`` for train, ``round(n * 0.2)`` for val and the rest for test; every class needs at least one
  image in each split (4 images or more).
- :func:`split_trainval` mirrors CoOp's ``OxfordPets.split_trainval``: per class (order of first appearance), shuffle
  and move ``round(n * 0.2)`` images to val (at least one).

The reference shuffles with the global ``random`` module over ``os.listdir`` order, which differs between machines;
here the images are sorted by name first and one local ``random.Random(seed)`` drives every shuffle, so the same
images always give the same split.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from vlprompt.data.listing import format_offenders
from vlprompt.data.types import Item
from vlprompt.errors import DatasetError

# seed of the random generator used to create splits (recorded in the split file's metadata)
CREATE_SEED = 1
P_TRAIN = 0.5
P_VAL = 0.2


def split_per_class(
    classes: Sequence[tuple[str, Sequence[str]]],
    *,
    seed: int = CREATE_SEED,
    p_train: float = P_TRAIN,
    p_val: float = P_VAL,
    source: str = "dataset",
) -> tuple[list[Item], list[Item], list[Item]]:
    """Split ``classes`` (``(class name, image paths)`` in label order) into train / val / test items.

    Raises :class:`DatasetError` listing every class too small to give each split at least one image.
    """
    if not (0 < p_train < 1 and 0 < p_val < 1 and p_train + p_val < 1):
        raise DatasetError(f"split fractions train={p_train} val={p_val} must be in (0, 1) and sum to less than 1.")
    plan: list[tuple[int, int]] = []
    too_small: list[str] = []
    for name, paths in classes:
        n_total = len(paths)
        n_train, n_val = round(n_total * p_train), round(n_total * p_val)
        if n_train <= 0 or n_val <= 0 or n_total - n_train - n_val <= 0:
            too_small.append(f"{name} ({n_total} images)")
        plan.append((n_train, n_val))
    if too_small:
        raise DatasetError(
            f"cannot split {source}: {len(too_small)} classes have too few images to give train, val and test at "
            f"least one each ({p_train:.0%} / {p_val:.0%} / {1 - p_train - p_val:.0%}; 4 images or more are needed): "
            f"{format_offenders(too_small)}. Add images, remove those class folders, or provide a split file."
        )
    rng = random.Random(seed)
    train: list[Item] = []
    val: list[Item] = []
    test: list[Item] = []
    for label, ((_, paths), (n_train, n_val)) in enumerate(zip(classes, plan)):
        shuffled = sorted(paths)
        rng.shuffle(shuffled)
        train.extend(Item(p, label) for p in shuffled[:n_train])
        val.extend(Item(p, label) for p in shuffled[n_train : n_train + n_val])
        test.extend(Item(p, label) for p in shuffled[n_train + n_val :])
    return train, val, test


def split_trainval(
    trainval: Sequence[Item],
    classnames: Sequence[str],
    *,
    seed: int = CREATE_SEED,
    p_val: float = P_VAL,
    source: str = "dataset",
) -> tuple[list[Item], list[Item]]:
    """Move ``round(n * p_val)`` images of each class of ``trainval`` to val (reference ``split_trainval``)."""
    by_label: dict[int, list[Item]] = {}
    for item in trainval:
        by_label.setdefault(item.label, []).append(item)
    too_small = [f"{classnames[label]} ({len(items)} images)"
                 for label, items in by_label.items() if round(len(items) * p_val) <= 0]
    if too_small:
        raise DatasetError(
            f"cannot take a validation split from the training images of {source}: {len(too_small)} classes have too "
            f"few images to put {p_val:.0%} (at least one) in val: {format_offenders(too_small)}. Give a val split "
            "yourself (a val/ folder, 'val' rows) or add training images."
        )
    rng = random.Random(seed)
    train: list[Item] = []
    val: list[Item] = []
    for items in by_label.values():
        n_val = round(len(items) * p_val)
        shuffled = list(items)
        rng.shuffle(shuffled)
        val.extend(shuffled[:n_val])
        train.extend(shuffled[n_val:])
    return train, val
