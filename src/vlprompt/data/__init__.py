"""Datasets as plain data: readers for the standard layouts and the user's own data, shipped split files,
few-shot sampling, base / novel classes, and image loading that survives bad files.

Importing this package does not import torch; :class:`ImageDataset` and its helpers load on first use (PEP 562).

    splits = load_dataset("dtd", root)                   # or "folder:PATH", "csv:FILE", "json:FILE"
    fewshot = sample_fewshot(splits, shots=16, seed=1)   # a DatasetSplits with the report of short classes
    base = subsample_classes(fewshot, "base")
"""

from __future__ import annotations

import importlib
from typing import Any

from vlprompt.data.check import CheckReport, check_dataset, find_unreadable
from vlprompt.data.classnames import clean_classname, read_names_file
from vlprompt.data.fewshot import (
    FewShotResult,
    load_fewshot,
    load_or_sample_fewshot,
    sample_fewshot,
    save_fewshot,
)
from vlprompt.data.info import DatasetInfo
from vlprompt.data.load import load_dataset
from vlprompt.data.registry import DATASETS, lookup
from vlprompt.data.subsample import cap_test_split, subsample_classes
from vlprompt.data.types import BadImage, DatasetSplits, Item, SplitCounts

# public name -> "module:attribute" for names that need torch
_LAZY: dict[str, str] = {
    "ImageDataset": "vlprompt.data.images:ImageDataset",
    "ImageBatch": "vlprompt.data.images:ImageBatch",
    "UnreadableImageError": "vlprompt.data.images:UnreadableImageError",
    "collate_images": "vlprompt.data.images:collate_images",
    "describe_bad_images": "vlprompt.data.images:describe_bad_images",
}

__all__ = [
    "DATASETS",
    "BadImage",
    "CheckReport",
    "DatasetInfo",
    "DatasetSplits",
    "FewShotResult",
    "Item",
    "SplitCounts",
    "check_dataset",
    "clean_classname",
    "find_unreadable",
    "load_dataset",
    "load_fewshot",
    "load_or_sample_fewshot",
    "lookup",
    "read_names_file",
    "sample_fewshot",
    "save_fewshot",
    "subsample_classes",
    "cap_test_split",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'vlprompt.data' has no attribute {name!r}")
    module_name, attr = target.split(":")
    return getattr(importlib.import_module(module_name), attr)


def __dir__() -> list[str]:
    return sorted(__all__)
