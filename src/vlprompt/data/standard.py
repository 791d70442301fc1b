"""Readers of the nine datasets that use a CoOp split file (Caltech101 ... UCF101), and how their splits are created.

All nine read their split with the precedence of :mod:`vlprompt.data.resolve`. Where no split file exists at all, the
datasets in :data:`CREATORS` create one as the reference does:

- DTD, Food101: class folders of the image folder, 50% / 20% / 30% per class (``read_and_split_data``);
- Caltech101: the same without ``BACKGROUND_Google`` and ``Faces_easy``, with the reference's four renames;
- EuroSAT: the same with the reference's descriptive class names;
- SUN397: the official partition 01 (``Training_01.txt`` / ``Testing_01.txt``, classes from ``ClassName.txt``),
  with 20% of each class's training images moved to val (``split_trainval``).

OxfordPets, StanfordCars, Flowers102 and UCF101 are created by the reference from annotation formats (``.mat`` files,
UCF lists) that vlprompt does not read; their split files ship with vlprompt, so this is never needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

from vlprompt.data.creating import split_per_class, split_trainval
from vlprompt.common.io import read_text
from vlprompt.data.info import DatasetInfo, ReadContext
from vlprompt.data.listing import format_offenders, image_files, subfolders
from vlprompt.data.resolve import resolve_split
from vlprompt.data.splitfile import LabelledSplits
from vlprompt.data.types import Item
from vlprompt.errors import DatasetError

CALTECH101_IGNORED: frozenset[str] = frozenset({"BACKGROUND_Google", "Faces_easy"})
CALTECH101_RENAMES: Mapping[str, str] = MappingProxyType(
    {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
)
EUROSAT_RENAMES: Mapping[str, str] = MappingProxyType({
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
})


def read_standard(info: DatasetInfo, context: ReadContext) -> LabelledSplits:
    """Read a split-file dataset under ``context.root`` (its own split file, the shipped one, or a created one)."""
    dataset_dir, image_dir = info.require_dirs(context.root)
    creator = CREATORS.get(info.key)
    create = (lambda: creator(info, dataset_dir)) if creator is not None else None
    return resolve_split(dataset_dir=dataset_dir, standard_file=info.split_file, created_file=info.created_split_file,
                         create=create, context=context, what=info.title)


def split_class_folders(
    image_dir: Path,
    *,
    ignored: frozenset[str] = frozenset(),
    renames: Mapping[str, str] = MappingProxyType({}),
    what: str = "dataset",
) -> LabelledSplits:
    """Create a split from ``image_dir/<class>/<image>`` with the reference's 50/20/30 per-class procedure.

    Classes are the sorted folder names minus ``ignored`` (labels in that order); ``renames`` maps a folder name to its
    class name. Files without an image extension are not part of the dataset.
    """
    folders = [name for name in subfolders(image_dir) if name not in ignored]
    if not folders:
        raise DatasetError(f"{image_dir} holds no class folders: {what} expects one folder of images per class.")
    classes = [(renames.get(folder, folder), [f"{folder}/{name}" for name in image_files(image_dir / folder)[0]])
               for folder in folders]
    train, val, test = split_per_class(classes, source=f"{what} ({image_dir})")
    return LabelledSplits(train, val, test, [name for name, _ in classes],
                          "reference procedure: 50/20/30 per class folder")


def _create_dtd_like(info: DatasetInfo, dataset_dir: Path) -> LabelledSplits:
    return split_class_folders(info.images_in(dataset_dir), what=info.title)


def create_caltech101(info: DatasetInfo, dataset_dir: Path) -> LabelledSplits:
    """Caltech101 from ``101_ObjectCategories`` without background / easy faces, with the reference's renames."""
    return split_class_folders(info.images_in(dataset_dir), ignored=CALTECH101_IGNORED, renames=CALTECH101_RENAMES,
                               what=info.title)


def create_eurosat(info: DatasetInfo, dataset_dir: Path) -> LabelledSplits:
    """EuroSAT from ``2750/<class>`` with the reference's descriptive class names."""
    return split_class_folders(info.images_in(dataset_dir), renames=EUROSAT_RENAMES, what=info.title)


def create_sun397(info: DatasetInfo, dataset_dir: Path) -> LabelledSplits:
    """SUN397's partition 01: ``ClassName.txt`` lines ``/a/abbey``; list lines ``/a/abbey/sun_x.jpg``.

    Class names as the reference writes them: the path under the first letter, its parts reversed and joined by
    spaces (``/b/bakery/shop`` -> ``shop bakery``).
    """
    class_dirs = [line[1:] for line in _lines(dataset_dir / "ClassName.txt", info.title)]
    label_of = {name: label for label, name in enumerate(class_dirs)}
    names = [" ".join(reversed(name.split("/")[1:])) for name in class_dirs]
    trainval = _sun397_items(dataset_dir / "Training_01.txt", label_of, info.title)
    test = _sun397_items(dataset_dir / "Testing_01.txt", label_of, info.title)
    train, val = split_trainval(trainval, names, source=info.title)
    return LabelledSplits(train, val, test, names, "reference procedure: partition 01, 20% of train to val")


def _sun397_items(path: Path, label_of: Mapping[str, int], what: str) -> list[Item]:
    items: list[Item] = []
    unknown: list[str] = []
    for line in _lines(path, what):
        rel = line[1:]
        label = label_of.get(rel.rpartition("/")[0])
        if label is None:
            unknown.append(line)
        else:
            items.append(Item(rel, label))
    if unknown:
        raise DatasetError(f"{path} names {len(unknown)} images of classes absent from ClassName.txt: "
                           f"{format_offenders(unknown)}.")
    return items


def _lines(path: Path, what: str) -> list[str]:
    try:
        text = read_text(path, f"the {what} list file", DatasetError)
    except FileNotFoundError:
        raise DatasetError(f"{what}: {path} does not exist; it comes with the dataset's official release.") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


# datasets whose split vlprompt can create from the raw images (reference procedures)
CREATORS: Mapping[str, Callable[[DatasetInfo, Path], LabelledSplits]] = MappingProxyType({
    "caltech101": create_caltech101,
    "dtd": _create_dtd_like,
    "eurosat": create_eurosat,
    "food101": _create_dtd_like,
    "sun397": create_sun397,
})
