"""The built-in datasets: one explicit dict from registry key to :class:`~vlprompt.data.info.DatasetInfo`, the only
home of a dataset's key, title, aliases, hand-crafted template, folder, layout and expected counts.

Expected counts are the reference's (CoOp's dataset table; for the seven shipped split files they are the files'
own counts). Templates are the hand-crafted CLIP/CoOp prompts; the ImageNet variants use ImageNet's. The order is the
papers' table order (the 11 benchmarks, then the ImageNet variants).

Importing this module loads no reader: each entry names its reader (:class:`LazyReader`), imported on first use, so
the report and the CLI can ask what a dataset is called without loading the data code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vlprompt.common.vocab import DEFAULT_TEMPLATE
from vlprompt.data.info import DatasetInfo
from vlprompt.data.types import SplitCounts

if TYPE_CHECKING:
    from vlprompt.data.info import ReadContext
    from vlprompt.data.splitfile import LabelledSplits

IMAGENET_TEMPLATE = DEFAULT_TEMPLATE


@dataclass(frozen=True)
class LazyReader:
    """A dataset reader ``"module:function"``, imported on first call."""

    target: str

    def __call__(self, info: DatasetInfo, context: ReadContext) -> LabelledSplits:
        module_name, attr = self.target.split(":")
        return getattr(importlib.import_module(module_name), attr)(info, context)


read_standard = LazyReader("vlprompt.data.standard:read_standard")
read_fgvc_aircraft = LazyReader("vlprompt.data.fgvc:read_fgvc_aircraft")
read_imagenet = LazyReader("vlprompt.data.imagenet:read_imagenet")
read_imagenet_v2 = LazyReader("vlprompt.data.imagenet:read_imagenet_v2")
read_imagenet_sketch = LazyReader("vlprompt.data.imagenet:read_imagenet_sketch")
read_imagenet_subset = LazyReader("vlprompt.data.imagenet:read_imagenet_subset")


def _infos() -> dict[str, DatasetInfo]:
    infos = [
        DatasetInfo("imagenet", "ImageNet", "ImageNet", "imagenet", "images", IMAGENET_TEMPLATE,
                    SplitCounts(1_281_167, 0, 50_000, 1000), read_imagenet, aliases=("imagenet1k", "ilsvrc2012")),
        DatasetInfo("caltech101", "Caltech101", "Caltech101", "caltech-101", "101_ObjectCategories",
                    DEFAULT_TEMPLATE, SplitCounts(4128, 1649, 2465, 100), read_standard,
                    split_file="split_zhou_Caltech101.json", aliases=("caltech",)),
        DatasetInfo("oxford_pets", "OxfordPets", "OxfordPets", "oxford_pets", "images",
                    "a photo of a {}, a type of pet.", SplitCounts(2944, 736, 3669, 37), read_standard,
                    split_file="split_zhou_OxfordPets.json", aliases=("pets",)),
        DatasetInfo("stanford_cars", "StanfordCars", "StanfordCars", "stanford_cars", "", DEFAULT_TEMPLATE,
                    SplitCounts(6509, 1635, 8041, 196), read_standard, split_file="split_zhou_StanfordCars.json",
                    aliases=("cars",)),
        DatasetInfo("oxford_flowers", "Flowers102", "OxfordFlowers", "oxford_flowers", "jpg",
                    "a photo of a {}, a type of flower.", SplitCounts(4093, 1633, 2463, 102), read_standard,
                    split_file="split_zhou_OxfordFlowers.json", aliases=("flowers", "oxford_flowers102")),
        DatasetInfo("food101", "Food101", "Food101", "food-101", "images", "a photo of {}, a type of food.",
                    SplitCounts(50_500, 20_200, 30_300, 101), read_standard, split_file="split_zhou_Food101.json",
                    aliases=("food",)),
        DatasetInfo("fgvc_aircraft", "FGVCAircraft", "FGVCAircraft", "fgvc_aircraft", "images",
                    "a photo of a {}, a type of aircraft.", SplitCounts(3334, 3333, 3333, 100), read_fgvc_aircraft,
                    aliases=("aircraft", "fgvc")),
        DatasetInfo("sun397", "SUN397", "SUN397", "sun397", "SUN397", DEFAULT_TEMPLATE,
                    SplitCounts(15_880, 3970, 19_850, 397), read_standard, split_file="split_zhou_SUN397.json",
                    aliases=("sun",)),
        DatasetInfo("dtd", "DTD", "DescribableTextures", "dtd", "images", "{} texture.",
                    SplitCounts(2820, 1128, 1692, 47), read_standard,
                    split_file="split_zhou_DescribableTextures.json", aliases=("textures",)),
        DatasetInfo("eurosat", "EuroSAT", "EuroSAT", "eurosat", "2750", "a centered satellite photo of {}.",
                    SplitCounts(13_500, 5400, 8100, 10), read_standard, split_file="split_zhou_EuroSAT.json"),
        DatasetInfo("ucf101", "UCF101", "UCF101", "ucf101", "UCF-101-midframes", "a photo of a person doing {}.",
                    SplitCounts(7639, 1898, 3783, 101), read_standard, split_file="split_zhou_UCF101.json",
                    aliases=("ucf",)),
        DatasetInfo("imagenetv2", "ImageNet-V2", "ImageNetV2", "imagenetv2", "imagenetv2-matched-frequency-format-val",
                    IMAGENET_TEMPLATE, SplitCounts(0, 0, 10_000, 1000), read_imagenet_v2, test_only=True),
        DatasetInfo("imagenet_sketch", "ImageNet-Sketch", "ImageNetSketch", "imagenet-sketch", "images",
                    IMAGENET_TEMPLATE, SplitCounts(0, 0, 50_889, 1000), read_imagenet_sketch, aliases=("sketch",),
                    test_only=True),
        DatasetInfo("imagenet_a", "ImageNet-A", "ImageNetA", "imagenet-adversarial", "imagenet-a", IMAGENET_TEMPLATE,
                    SplitCounts(0, 0, 7500, 200), read_imagenet_subset, aliases=("imagenet_adversarial",),
                    test_only=True),
        DatasetInfo("imagenet_r", "ImageNet-R", "ImageNetR", "imagenet-rendition", "imagenet-r", IMAGENET_TEMPLATE,
                    SplitCounts(0, 0, 30_000, 200), read_imagenet_subset, aliases=("imagenet_rendition",),
                    test_only=True),
    ]
    return {info.key: info for info in infos}


# registry key -> dataset; the single source of truth for built-in datasets (treat as read-only)
DATASETS: dict[str, DatasetInfo] = _infos()


def normalise_name(name: str) -> str:
    """Case-, space-, dash- and underscore-insensitive form of a dataset name ("Flowers-102" -> "flowers102")."""
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


def _alias_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for key, info in DATASETS.items():
        for alias in (key, info.title, info.reference_name, info.folder, *info.aliases):
            table.setdefault(normalise_name(alias), key)
    return table


# normalised alias -> registry key ("Flowers102", "OxfordFlowers", "oxford_flowers" -> "oxford_flowers")
ALIASES: Mapping[str, str] = MappingProxyType(_alias_table())


def lookup(name: str) -> DatasetInfo | None:
    """The built-in dataset called ``name`` (key, paper name, reference name, folder name or alias), else None."""
    if not isinstance(name, str):
        return None
    key = ALIASES.get(normalise_name(name))
    return DATASETS[key] if key is not None else None


BENCHMARK_DATASETS: tuple[str, ...] = tuple(key for key, info in DATASETS.items() if not info.test_only)
"""The 11 benchmark datasets, in the papers' table order."""


def key_of(name: str) -> str:
    """The registry key of a built-in dataset's any spelling (``"OxfordPets"``, ``"pets"`` -> ``"oxford_pets"``);
    any other name (a custom dataset spec) is returned unchanged."""
    info = lookup(name)
    return info.key if info is not None else name


def same_dataset(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` name the same dataset (built-in spellings compared by registry key)."""
    return key_of(a) == key_of(b)


def title_of(name: str) -> str:
    """The papers' name of a built-in dataset (``"oxford_flowers"`` -> ``"Flowers102"``); else the name itself."""
    info = lookup(name)
    return info.title if info is not None else name
