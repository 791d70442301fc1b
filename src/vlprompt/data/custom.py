"""The user's own datasets, with no code to write.

A custom dataset is named by a *spec* wherever a built-in name is accepted:

- ``folder:PATH`` (or an existing folder): one sub-folder of images per class, ``PATH/<class>/*``; or the same under
  ``PATH/train``, ``PATH/test`` and optionally ``PATH/val``. Without train/val/test folders the split is created
  (per class 50% / 20% / 30%, deterministic) and written to ``PATH/split_vlprompt_<name>.json``, which later loads
  reuse (delete it, or run ``vlprompt data split --force``, to re-create it). Without ``val`` 20% of each class's
  training images become val the same way.
- ``csv:FILE`` (or an existing ``.csv``): rows ``path,label[,split]``, optionally under a header naming those columns.
- ``json:FILE`` (or an existing ``.json``): a CoOp split file ``{"train": [[path, label, classname], ...], ...}``,
  or a list of ``[path, label]`` / ``[path, label, split]`` / ``{"path": .., "label": .., "split": ..}``.

In lists, paths are relative to the list file's folder (or all absolute: then relative to their common folder); labels
are class names, or integers 0..n-1 named by a names file; ``split`` is train / val / test (when no row has one the
split is created as for folders). Relative spec paths are looked up in the current folder, then under the data root.

Optional files in the dataset folder (the list file's folder): ``classnames.txt`` / ``classnames.json`` (a names file,
see :mod:`vlprompt.data.classnames`; by default the class names are the folder names / labels, cleaned) and
``template.txt`` (the prompt template, with ``{}`` for the class name; default ``"a photo of a {}."``).
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vlprompt.common.vocab import DEFAULT_TEMPLATE
from vlprompt.common.io import read_text
from vlprompt.data.classnames import NamesSpec, read_names_file
from vlprompt.data.creating import split_per_class, split_trainval
from vlprompt.data.info import ReadContext
from vlprompt.data.listing import format_offenders, image_files, require_dir, subfolders
from vlprompt.data.resolve import resolve_split
from vlprompt.data.splitfile import LabelledSplits, check_entries, check_label_bound, parse_split, read_split_json
from vlprompt.data.standard import split_class_folders
from vlprompt.data.types import SPLIT_NAMES, Item
from vlprompt.errors import DatasetError

log = logging.getLogger(__name__)

CustomKind = Literal["folder", "csv", "json"]
CUSTOM_KINDS: tuple[CustomKind, ...] = ("folder", "csv", "json")
NAMES_FILES = ("classnames.json", "classnames.txt")
TEMPLATE_FILE = "template.txt"


@dataclass(frozen=True)
class CustomSpec:
    """A parsed custom dataset spec: its kind and (resolved) path."""

    kind: CustomKind
    path: Path

    @property
    def name(self) -> str:
        """The dataset's name: the folder's or list file's name, reduced to letters, digits, ``.``, ``-``, ``_``."""
        stem = self.path.name if self.kind == "folder" else self.path.stem
        return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_") or "custom"

    @property
    def base_dir(self) -> Path:
        """The folder that holds the dataset's optional files and its created split file."""
        return self.path if self.kind == "folder" else self.path.parent

    @property
    def created_split_file(self) -> Path:
        """Where a created split is written: ``<base>/split_vlprompt_<name>.json``."""
        return self.base_dir / f"split_vlprompt_{self.name}.json"


@dataclass(frozen=True)
class CustomDataset:
    """A custom dataset read from disk, before names and checks are applied."""

    spec: CustomSpec
    image_dir: Path
    splits: LabelledSplits
    template: str
    names: NamesSpec | None
    names_source: str


def parse_custom_spec(spec: str, root: Path | None) -> CustomSpec | None:
    """The custom dataset ``spec`` names, or None if it is neither prefixed (``folder:`` ...) nor an existing path."""
    for kind in CUSTOM_KINDS:
        if spec.startswith(f"{kind}:"):
            raw = spec[len(kind) + 1 :]
            if not raw:
                raise DatasetError(f"dataset spec {spec!r} has no path after '{kind}:'.")
            return CustomSpec(kind, _find_path(raw, root, must_exist=True))
    path = _find_path(spec, root, must_exist=False)
    if path.is_dir():
        return CustomSpec("folder", path)
    if path.is_file() and path.suffix.lower() in (".csv", ".json"):
        return CustomSpec("csv" if path.suffix.lower() == ".csv" else "json", path)
    return None


def _find_path(raw: str, root: Path | None, must_exist: bool) -> Path:
    path = Path(raw).expanduser()
    candidates = [path] if path.is_absolute() or root is None else [path, root / path]
    for candidate in candidates:
        if candidate.exists():
            return candidate.absolute()
    if must_exist:
        where = " or ".join(str(c) for c in candidates)
        raise DatasetError(f"custom dataset {raw!r} not found (looked for {where}).")
    return path


def read_custom(spec: CustomSpec, context: ReadContext) -> CustomDataset:
    """Read the custom dataset ``spec`` (see the module docstring)."""
    if spec.kind == "folder":
        require_dir(spec.path, "custom dataset folder", "Pass a folder holding one folder of images per class.")
        image_dir, splits = spec.path, _read_folder(spec, context)
    else:
        image_dir, splits = _read_list_file(spec, context)
    names, names_source = _names_file(spec.base_dir)
    return CustomDataset(spec, image_dir, splits, _template(spec.base_dir), names, names_source)


def _names_file(folder: Path) -> tuple[NamesSpec | None, str]:
    for file_name in NAMES_FILES:
        path = folder / file_name
        if path.is_file():
            return read_names_file(path), f"class names file {path}"
    return None, ""


def _template(folder: Path) -> str:
    path = folder / TEMPLATE_FILE
    if not path.is_file():
        return DEFAULT_TEMPLATE
    template = read_text(path, "the template file", DatasetError).strip()
    if "{}" not in template:
        raise DatasetError(f"{path} must hold a prompt template with '{{}}' where the class name goes, "
                           f"e.g. {DEFAULT_TEMPLATE!r}; it holds {template!r}.")
    return template


def _read_folder(spec: CustomSpec, context: ReadContext) -> LabelledSplits:
    folder = spec.path
    has = {name: (folder / name).is_dir() for name in SPLIT_NAMES}
    if has["train"] != has["test"]:
        present, absent = ("train", "test") if has["train"] else ("test", "train")
        raise DatasetError(f"{folder} has a {present}/ folder but no {absent}/ folder: give train/ and test/ (val/ "
                           f"is optional), or rename the class folder {present!r}.")
    if not has["train"]:
        return resolve_split(dataset_dir=folder, standard_file=None, created_file=spec.created_split_file.name,
                             create=lambda: split_class_folders(folder, what=spec.name), context=context,
                             what=spec.name)
    split_names = [name for name in SPLIT_NAMES if has[name]]
    classes = sorted({cls for split in split_names for cls in subfolders(folder / split)})
    if not classes:
        raise DatasetError(f"{folder}/train holds no class folders: put the images in train/<class>/ folders.")
    listed = {split: [Item(f"{split}/{cls}/{file}", label) for label, cls in enumerate(classes)
                      for file in (image_files(folder / split / cls)[0] if (folder / split / cls).is_dir() else [])]
              for split in split_names}
    untrained = sorted(set(classes) - {classes[item.label] for item in listed["train"]})
    if untrained:
        log.warning("%s: %d classes have no training images (train/<class>/ missing or empty): %s", spec.name,
                    len(untrained), format_offenders(untrained))
    if has["val"]:
        return LabelledSplits(listed["train"], listed["val"], listed["test"], classes, f"split folders in {folder}",
                              listed=True)

    def create() -> LabelledSplits:
        train, val = split_trainval(listed["train"], classes, source=spec.name)
        return LabelledSplits(train, val, listed["test"], classes, "train/ and test/ folders, 20% of train to val")

    return resolve_split(dataset_dir=folder, standard_file=None, created_file=spec.created_split_file.name,
                         create=create, context=context, what=spec.name)


# one row of a list file: (path as written, label as written, split or None, where for messages)
Row = tuple[str, Any, str | None, str]


def _read_list_file(spec: CustomSpec, context: ReadContext) -> tuple[Path, LabelledSplits]:
    path = spec.path
    if spec.kind == "json":
        data = read_split_json(path)
        if isinstance(data, dict):
            return path.parent, parse_split(data, f"split file {path}")
        rows = _json_rows(data, path)
    else:
        rows = _csv_rows(path)
    if not rows:
        raise DatasetError(f"{path} lists no images.")
    image_dir, rel_paths = _relative_paths([row[0] for row in rows], path)
    labels, raw_names = _labels(rows, spec)
    check_entries({"list": [Item(rel, label) for rel, label in zip(rel_paths, labels)]}, str(path), raw_names,
                  warn=False)  # before a split is made from them; load_dataset warns about the final split
    splits = [row[2] for row in rows]
    if all(split is None for split in splits):
        classes = [(raw_names[label], [p for p, lab in zip(rel_paths, labels) if lab == label])
                   for label in range(len(raw_names))]

        def create() -> LabelledSplits:
            train, val, test = split_per_class(classes, source=spec.name)
            return LabelledSplits(train, val, test, raw_names, "reference procedure: 50/20/30 per class of the list")

        return image_dir, resolve_split(dataset_dir=spec.base_dir, standard_file=None,
                                        created_file=spec.created_split_file.name, create=create, context=context,
                                        what=spec.name)
    return image_dir, _given_splits(rows, rel_paths, labels, raw_names, spec, context)


def _given_splits(rows: Sequence[Row], rel_paths: list[str], labels: list[int], raw_names: list[str],
                  spec: CustomSpec, context: ReadContext) -> LabelledSplits:
    bad = [f"{row[3]}: {row[2]!r}" for row in rows if row[2] not in SPLIT_NAMES]
    if bad:
        raise DatasetError(f"{spec.path}: {len(bad)} rows have no valid split (train, val or test; give it for every "
                           f"row or for none): {format_offenders(bad)}.")
    by_split: dict[str, list[Item]] = {name: [] for name in SPLIT_NAMES}
    for row, rel, label in zip(rows, rel_paths, labels):
        by_split[str(row[2])].append(Item(rel, label))
    absent = [name for name in ("train", "test") if not by_split[name]]
    if absent:
        raise DatasetError(f"{spec.path} has no {' / '.join(absent)} rows: give train and test rows (val optional).")
    if by_split["val"]:
        return LabelledSplits(by_split["train"], by_split["val"], by_split["test"], raw_names,
                              f"splits given in {spec.path}")

    def create() -> LabelledSplits:
        train, val = split_trainval(by_split["train"], raw_names, source=spec.name)
        return LabelledSplits(train, val, by_split["test"], raw_names, "list's train/test, 20% of train to val")

    return resolve_split(dataset_dir=spec.base_dir, standard_file=None, created_file=spec.created_split_file.name,
                         create=create, context=context, what=spec.name)


def _csv_rows(path: Path) -> list[Row]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            table = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    if not table:
        return []
    columns = {"path": 0, "label": 1, "split": 2}
    start = 0
    header = [cell.strip().lower() for cell in table[0]]
    if "path" in header:
        if "label" not in header:
            raise DatasetError(f"{path}: the header names no 'label' column; columns are path,label[,split].")
        columns = {name: header.index(name) for name in ("path", "label", "split") if name in header}
        start = 1
    rows: list[Row] = []
    for number, row in enumerate(table[start:], start=start + 1):
        cells = [cell.strip() for cell in row]
        if len(cells) <= max(columns["path"], columns["label"]):
            raise DatasetError(f"{path} line {number}: expected path,label[,split], got {row!r}.")
        split_col = columns.get("split")
        split = cells[split_col].lower() if split_col is not None and split_col < len(cells) and cells[split_col] \
            else None
        rows.append((cells[columns["path"]], cells[columns["label"]], split, f"line {number}"))
    return rows


def _json_rows(data: Any, path: Path) -> list[Row]:
    if not isinstance(data, list):
        raise DatasetError(f"{path} must hold a CoOp split object or a list of [path, label(, split)] entries.")
    rows: list[Row] = []
    for index, entry in enumerate(data):
        where = f"entry {index}"
        if isinstance(entry, dict) and "path" in entry and "label" in entry:
            values = (entry["path"], entry["label"], entry.get("split"))
        elif isinstance(entry, list) and len(entry) in (2, 3):
            values = (entry[0], entry[1], entry[2] if len(entry) == 3 else None)
        else:
            raise DatasetError(f"{path} {where} must be [path, label(, split)] or an object with path and label, "
                               f"got {entry!r}.")
        file_path, label, split = values
        if not isinstance(file_path, str) or not file_path.strip():
            raise DatasetError(f"{path} {where}: the path must be a non-empty string, got {file_path!r}.")
        rows.append((file_path, label, split.lower() if isinstance(split, str) else split, where))
    return rows


def _relative_paths(paths: Sequence[str], list_file: Path) -> tuple[Path, list[str]]:
    """The image folder and the POSIX paths relative to it (relative to the list's folder, or common folder)."""
    posix = [p.replace("\\", "/") for p in paths]
    absolute = [os.path.isabs(p) for p in posix]
    if all(absolute):
        base = Path(os.path.commonpath([os.path.dirname(p) for p in posix]))
        return base, [Path(p).relative_to(base).as_posix() for p in posix]
    if any(absolute):
        raise DatasetError(f"{list_file} mixes absolute and relative paths: use paths relative to its folder "
                           f"{list_file.parent} (portable), or absolute paths throughout.")
    escaping = [p for p in posix if ".." in p.split("/")]
    if escaping:
        raise DatasetError(f"{list_file} has paths leaving its folder: {format_offenders(escaping)}. Move the list "
                           "file to a folder that holds all images, or use absolute paths.")
    return list_file.parent, [p[2:] if p.startswith("./") else p for p in posix]


def _labels(rows: Sequence[Row], spec: CustomSpec) -> tuple[list[int], list[str]]:
    """Integer labels and raw class names: names sorted if labels are names, else ``"0".."n-1"`` (named by file)."""
    values = [row[1] for row in rows]
    lookalike = [f"{row[3]}: {row[1]!r}" for row in rows
                 if isinstance(row[1], str) and row[1].strip().isdigit() and not _is_int_label(row[1])]
    if lookalike:
        raise DatasetError(f"{spec.path}: {len(lookalike)} labels look like numbers but are not written with the "
                           f"digits 0-9: {format_offenders(lookalike)}; write integer labels with 0-9, or use class "
                           "names.")
    if all(_is_int_label(v) for v in values):
        labels = [int(v) for v in values]
        first_entry: dict[int, str] = {}
        for label, row in zip(labels, rows):
            first_entry.setdefault(label, row[3])
        check_label_bound(first_entry, str(spec.path))  # so they run 0..count-1 without gaps
        count = len(first_entry)
        names, _ = _names_file(spec.base_dir)
        missing = [str(label) for label in range(count)
                   if names is None or (isinstance(names, dict) and str(label) not in names)]
        if missing or (isinstance(names, list) and len(names) != count):
            raise DatasetError(
                f"{spec.path} uses integer labels, so the class names must come from a names file: write "
                f"{spec.base_dir / 'classnames.txt'} with the {count} class names, one per line in label order.")
        return labels, [str(label) for label in range(count)]
    bad = [f"{v!r}" for v in values if not isinstance(v, str) or not v.strip()]
    if bad:
        raise DatasetError(f"{spec.path}: labels must be class names or integers 0..n-1; invalid: "
                           f"{format_offenders(bad)}.")
    names = sorted({str(v).strip() for v in values})
    index = {name: label for label, name in enumerate(names)}
    return [index[str(v).strip()] for v in values], names


def _is_int_label(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    return isinstance(value, str) and re.fullmatch(r"[0-9]+", value.strip()) is not None  # "²".isdigit() is True
