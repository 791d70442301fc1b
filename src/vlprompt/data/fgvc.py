"""FGVCAircraft from its official variant lists, as the reference reads it.

Layout (the ``data`` folder of ``fgvc-aircraft-2013b`` renamed ``fgvc_aircraft``): ``variants.txt`` names the 100
classes, one a line, in label order; ``images_variant_{train,val,test}.txt`` hold lines ``<image id> <variant name>``
(the name may contain spaces); images are ``images/<image id>.jpg``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from vlprompt.common.io import read_text
from vlprompt.data.info import DatasetInfo, ReadContext
from vlprompt.data.listing import format_offenders
from vlprompt.data.splitfile import LabelledSplits
from vlprompt.data.types import SPLIT_NAMES, Item
from vlprompt.errors import DatasetError


def read_fgvc_aircraft(info: DatasetInfo, context: ReadContext) -> LabelledSplits:
    """The official train / val / test lists with classes from ``variants.txt``."""
    dataset_dir, _ = info.require_dirs(context.root)
    variants = _read_lines(dataset_dir / "variants.txt")
    if not variants:
        raise DatasetError(f"{dataset_dir / 'variants.txt'} is empty: it must name one aircraft variant per line.")
    label_of = {name: label for label, name in enumerate(variants)}
    splits = {split: _read_list(dataset_dir / f"images_variant_{split}.txt", label_of) for split in SPLIT_NAMES}
    return LabelledSplits(splits["train"], splits["val"], splits["test"], variants,
                          f"official variant lists in {dataset_dir}")


def _read_lines(path: Path) -> list[str]:
    try:
        text = read_text(path, "the FGVCAircraft list", DatasetError)
    except FileNotFoundError:
        raise DatasetError(
            f"{path} does not exist: FGVCAircraft needs variants.txt and images_variant_{{train,val,test}}.txt from "
            "the official release (the 'data' folder of fgvc-aircraft-2013b)."
        ) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_list(path: Path, label_of: Mapping[str, int]) -> list[Item]:
    items: list[Item] = []
    bad: list[str] = []
    unknown: dict[str, None] = {}
    for number, line in enumerate(_read_lines(path), start=1):
        image_id, _, variant = line.partition(" ")
        variant = variant.strip()
        if not variant:
            bad.append(f"line {number}: {line!r}")
            continue
        label = label_of.get(variant)
        if label is None:
            unknown.setdefault(variant)
            continue
        items.append(Item(f"{image_id}.jpg", label))
    if bad:
        raise DatasetError(f"{path} has {len(bad)} lines that are not '<image id> <variant>': {format_offenders(bad)}.")
    if unknown:
        names = list(unknown)
        raise DatasetError(f"{path} names {len(names)} variants absent from variants.txt: {format_offenders(names)}.")
    return items
