"""``load_dataset``: one entry point for built-in and custom datasets, returning plain :class:`DatasetSplits`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from vlprompt.data.classnames import NamesSpec, apply_names, read_names_file
from vlprompt.data.custom import CUSTOM_KINDS, parse_custom_spec, read_custom
from vlprompt.data.info import ReadContext, default_cache_dir
from vlprompt.data.listing import format_offenders, require_files
from vlprompt.data.registry import DATASETS, lookup
from vlprompt.data.splitfile import LabelledSplits, check_entries
from vlprompt.data.types import SPLIT_NAMES, DatasetSplits
from vlprompt.errors import DatasetError

log = logging.getLogger(__name__)

# file in a dataset's folder whose names replace the default class names (any dataset); see vlprompt.data.classnames
OVERRIDE_FILES = ("classnames_override.json", "classnames_override.txt")


def load_dataset(
    name_or_path: str,
    root: str | Path | None = None,
    *,
    check_files: bool = True,
    classnames: str | Path | NamesSpec | None = None,
    cache_dir: str | Path | None = None,
) -> DatasetSplits:
    """Load a dataset's train / val / test items and class names.

    ``name_or_path`` is a built-in dataset (registry key or alias, case-insensitive: ``"dtd"``,
    ``"DescribableTextures"``, ``"Flowers102"`` ...) read from ``<root>/<folder>``, or a custom dataset spec
    (``folder:PATH``, ``csv:FILE``, ``json:FILE`` or an existing path; see :mod:`vlprompt.data.custom`). A built-in
    name wins over a same-named folder: write ``folder:dtd`` to mean the folder.

    ``check_files`` verifies that every image a split file names exists (folder listings need no check); a split that
    disagrees with the disk raises :class:`DatasetError` listing the first missing files and their count.
    ``classnames`` overrides class names (a names file path, a list in label order or a ``{class: name}`` mapping);
    without it, a ``classnames_override.json``/``.txt`` in the dataset folder is used if present. ``cache_dir`` is
    where created splits of read-only datasets go (default ``$VLPROMPT_CACHE/splits`` or the user cache folder).
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise DatasetError("give a dataset name (see `vlprompt data list`) or a custom dataset path.")
    root_path = Path(root).expanduser().absolute() if root is not None else None
    context = ReadContext(root_path or Path("."), Path(cache_dir) if cache_dir is not None else default_cache_dir())
    info = lookup(name_or_path) if not _has_custom_prefix(name_or_path) else None
    if info is not None:
        if root_path is None:
            raise DatasetError(f"{info.title} is read from <root>/{info.folder}: give the data root (--root).")
        labelled = info.reader(info, context)
        name, image_dir, template = info.key, info.image_dir(root_path), info.template
        dataset_dir = info.dataset_dir(root_path)
        layers: list[tuple[NamesSpec | None, str]] = []
        list_file = None
    else:
        spec = parse_custom_spec(name_or_path, root_path)
        if spec is None:
            raise DatasetError(
                f"unknown dataset {name_or_path!r}: use a built-in name ({', '.join(DATASETS)}) or your own data as "
                "folder:PATH, csv:FILE or json:FILE (an existing folder, .csv or .json path also works)."
            )
        custom = read_custom(spec, context)
        labelled, name, image_dir, template = custom.splits, spec.name, custom.image_dir, custom.template
        dataset_dir = spec.base_dir
        layers = [(custom.names, custom.names_source)]
        list_file = spec.path if spec.kind != "folder" else None
    if check_files and not labelled.listed:
        require_files(image_dir, [item.path for split in SPLIT_NAMES for item in labelled.split(split)],
                      labelled.source, hint=_missing_files_hint(labelled, list_file))
    _require_images_per_class(labelled)
    check_entries({split: labelled.split(split) for split in SPLIT_NAMES}, labelled.source, labelled.raw_classnames)
    layers.append(_overrides(classnames, dataset_dir))
    names = apply_names(labelled.raw_classnames, *layers)
    splits = DatasetSplits(name, image_dir, names, template, labelled.train, labelled.val, labelled.test,
                           split_source=labelled.source)
    counts = splits.counts()
    log.info("%s: %d classes, %d train / %d val / %d test images (%s)", name, counts.classes, counts.train,
             counts.val, counts.test, labelled.source)
    return splits


def _missing_files_hint(labelled: LabelledSplits, list_file: Path | None) -> str:
    """What to do about images a split names but the disk lacks, by where the split comes from."""
    if list_file is not None:  # the list file is the dataset: a split made from it would name the same images
        return (f"Restore the missing images, or remove their rows from {list_file} (and delete the split file "
                "vlprompt created from it, if any, so that it is made again).")
    if labelled.source.startswith("shipped"):  # the standard split: it cannot be removed, and should not be
        return ("Restore the missing images from the dataset's official release (the standard split shipped with "
                "vlprompt lists all of them), or put a split file of your own into the dataset folder.")
    return "Restore the missing images, or delete that split file to create a new split from the images on disk."


def _has_custom_prefix(spec: str) -> bool:
    return any(spec.startswith(f"{kind}:") for kind in CUSTOM_KINDS)


def _require_images_per_class(labelled: LabelledSplits) -> None:
    counts = [0] * len(labelled.raw_classnames)
    for split in SPLIT_NAMES:
        for item in labelled.split(split):
            counts[item.label] += 1
    empty = [name for name, count in zip(labelled.raw_classnames, counts) if count == 0]
    if empty:
        raise DatasetError(f"{labelled.source}: {len(empty)} classes have zero images: {format_offenders(empty)}. "
                           "Add images for them or remove them from the class list.")


def _overrides(classnames: str | Path | NamesSpec | None, dataset_dir: Path) -> tuple[NamesSpec | None, str]:
    if isinstance(classnames, str | Path):
        return read_names_file(classnames), f"class names file {classnames}"
    if isinstance(classnames, Mapping):
        return {str(k): str(v) for k, v in classnames.items()}, "class name overrides"
    if classnames is not None:
        return list(classnames), "class name overrides"
    for file_name in OVERRIDE_FILES:
        path = dataset_dir / file_name
        if path.is_file():
            log.info("using class name overrides from %s", path)
            return read_names_file(path), f"class names file {path}"
    return None, ""
