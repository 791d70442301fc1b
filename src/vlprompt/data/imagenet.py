"""ImageNet and its four test-only variants, read from class folders as the reference reads them.

Class order is the sorted WordNet ids (wnids) of ``classnames.txt`` (lines ``<wnid> <class name>``), which is the
reference's order (sorted class folders). Each variant looks for ``classnames.txt`` in its own folder (the reference's
instructions copy it there) and otherwise uses ``<root>/imagenet/classnames.txt``.

- ImageNet: ``imagenet/images/train/<wnid>/*`` is train, ``imagenet/images/val/<wnid>/*`` is test (the papers
  evaluate on the official val set); val is empty (few-shot sampling draws its val images from train).
- ImageNet-V2: ``imagenetv2/imagenetv2-matched-frequency-format-val/<label>/*`` with label = position in wnid order.
- ImageNet-Sketch: ``imagenet-sketch/images/<wnid>/*``, 1000 classes.
- ImageNet-A / -R: ``imagenet-adversarial/imagenet-a/<wnid>/*`` and ``imagenet-rendition/imagenet-r/<wnid>/*``: the
  classes are the 200 wnid folders present, relabelled 0..199 in sorted-wnid order, named from ``classnames.txt``.
The variants are test-only: train and val are empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vlprompt.common.io import read_text
from vlprompt.data.info import DatasetInfo, ReadContext
from vlprompt.data.listing import format_offenders, image_files, require_dir, subfolders
from vlprompt.data.splitfile import LabelledSplits
from vlprompt.data.types import Item
from vlprompt.errors import DatasetError

CLASSNAMES_FILE = "classnames.txt"


def read_classnames_txt(path: Path) -> dict[str, str]:
    """``{wnid: class name}`` in file order from lines ``<wnid> <class name>``."""
    try:
        text = read_text(path, "the ImageNet class list", DatasetError)
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist: it lists the ImageNet classes as '<wnid> <class name>' lines "
                           "(the reference's classnames.txt).") from None
    names: dict[str, str] = {}
    bad: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not name.strip() or wnid in names:
            bad.append(f"line {number}: {line.strip()!r}")
            continue
        names[wnid] = name.strip()
    if bad:
        raise DatasetError(f"{path} has {len(bad)} lines that are not '<wnid> <class name>' or repeat a wnid: "
                           f"{format_offenders(bad)}.")
    if not names:
        raise DatasetError(f"{path} is empty: it must list the classes as '<wnid> <class name>' lines.")
    return names


def _classnames(dataset_dir: Path, context: ReadContext) -> dict[str, str]:
    own = dataset_dir / CLASSNAMES_FILE
    shared = context.root / "imagenet" / CLASSNAMES_FILE
    if own.is_file():
        return read_classnames_txt(own)
    if shared.is_file():
        return read_classnames_txt(shared)
    raise DatasetError(f"no {CLASSNAMES_FILE} in {dataset_dir} nor in {shared.parent}: copy ImageNet's "
                       f"{CLASSNAMES_FILE} ('<wnid> <class name>' lines) into one of them.")


def _folder_items(folder: Path, prefix: str, classes: Sequence[str], what: str) -> list[Item]:
    """Items of ``folder/<class>/*`` labelled by position in ``classes``; every class must have a non-empty folder."""
    present = subfolders(require_dir(folder, f"{what} folder", "Check the dataset layout (see `vlprompt data list`)."))
    if not present and image_files(folder)[0]:
        raise DatasetError(f"{folder} holds images but no class folders: {what} needs one folder per class "
                           "(ImageNet's val images must be moved into <wnid> folders, e.g. with the usual valprep.sh).")
    known = set(classes)
    unknown = [name for name in present if name not in known]
    if unknown:
        raise DatasetError(f"{folder} has {len(unknown)} folders that are not classes of {what}: "
                           f"{format_offenders(unknown)}.")
    items: list[Item] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        files = image_files(folder / name)[0] if name in present else []
        if not files:
            empty.append(name)
        items.extend(Item(f"{prefix}{name}/{file}", label) for file in files)
    if empty:
        raise DatasetError(f"{what}: {len(empty)} classes have zero images in {folder}: {format_offenders(empty)}.")
    return items


def read_imagenet(info: DatasetInfo, context: ReadContext) -> LabelledSplits:
    """ImageNet: train from ``images/train``, test from ``images/val``, val empty."""
    dataset_dir, image_dir = info.require_dirs(context.root)
    names = read_classnames_txt(dataset_dir / CLASSNAMES_FILE)
    wnids = sorted(names)
    train = _folder_items(image_dir / "train", "train/", wnids, f"{info.title} train")
    test = _folder_items(image_dir / "val", "val/", wnids, f"{info.title} val")
    return LabelledSplits(train, [], test, [names[w] for w in wnids], f"class folders in {image_dir}", listed=True)


def read_imagenet_v2(info: DatasetInfo, context: ReadContext) -> LabelledSplits:
    """ImageNet-V2: folders named by label (0..999) in sorted-wnid order."""
    dataset_dir, image_dir = info.require_dirs(context.root)
    names = _classnames(dataset_dir, context)
    wnids = sorted(names)
    test = _folder_items(image_dir, "", [str(label) for label in range(len(wnids))], info.title)
    return LabelledSplits([], [], test, [names[w] for w in wnids], f"class folders in {image_dir}", listed=True)


def read_imagenet_sketch(info: DatasetInfo, context: ReadContext) -> LabelledSplits:
    """ImageNet-Sketch: ``images/<wnid>`` for every ImageNet class."""
    dataset_dir, image_dir = info.require_dirs(context.root)
    names = _classnames(dataset_dir, context)
    wnids = sorted(names)
    test = _folder_items(image_dir, "", wnids, info.title)
    return LabelledSplits([], [], test, [names[w] for w in wnids], f"class folders in {image_dir}", listed=True)


def read_imagenet_subset(info: DatasetInfo, context: ReadContext) -> LabelledSplits:
    """ImageNet-A / -R: the wnid folders present are the classes, relabelled 0.. in sorted-wnid order."""
    dataset_dir, image_dir = info.require_dirs(context.root)
    names = _classnames(dataset_dir, context)
    present = subfolders(image_dir)
    unknown = [name for name in present if name not in names]
    if unknown:
        raise DatasetError(f"{image_dir} has {len(unknown)} folders that are not ImageNet wnids of "
                           f"{CLASSNAMES_FILE}: {format_offenders(unknown)}.")
    if not present:
        raise DatasetError(f"{image_dir} holds no class folders: {info.title} has one <wnid> folder per class.")
    test = _folder_items(image_dir, "", present, info.title)
    return LabelledSplits([], [], test, [names[w] for w in present], f"class folders in {image_dir}", listed=True)
