"""CoOp split files: ``{"train"|"val"|"test": [[relative_path, label, classname], ...]}``.

Reading validates the structure and the label <-> class name pairing and reports the first offenders; writing produces
the same format (plus a ``"vlprompt"`` metadata key that reference readers ignore), atomically. The seven standard split
files we have are shipped gzip-compressed in ``vlprompt/data/splits`` and read through :mod:`importlib.resources`.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from vlprompt.data.listing import format_offenders
from vlprompt.data.types import SPLIT_NAMES, Item
from vlprompt.errors import DatasetError
from vlprompt.common.io import atomic_write_json

# (relative path, label, class name) as stored in a split file
Entry = tuple[str, int, str]

log = logging.getLogger(__name__)

_SHIPPED_PACKAGE = "vlprompt.data"
_SHIPPED_FOLDER = "splits"


@dataclass(frozen=True)
class LabelledSplits:
    """A split before it becomes a :class:`~vlprompt.data.types.DatasetSplits`: items plus raw class names."""

    train: list[Item]
    val: list[Item]
    test: list[Item]
    raw_classnames: list[str]   # ordered by label, as in the split file / folders (not cleaned)
    source: str                 # where it came from, for messages and logs
    listed: bool = False        # True when the items come from listing folders (so their files exist)

    def split(self, name: str) -> list[Item]:
        """The items of split ``name``."""
        items: list[Item] = getattr(self, name)
        return items


def shipped_split_names() -> list[str]:
    """File names (without ``.gz``) of the split files shipped with the package."""
    folder = resources.files(_SHIPPED_PACKAGE).joinpath(_SHIPPED_FOLDER)
    return sorted(p.name[: -len(".gz")] for p in folder.iterdir()
                  if p.name.startswith("split_") and p.name.endswith(".json.gz"))


def read_shipped_bytes(file_name: str) -> bytes:
    """The original bytes of the shipped ``<file_name>.gz`` (e.g. ``"cat_to_name_OxfordFlowers.json"``)."""
    resource = resources.files(_SHIPPED_PACKAGE).joinpath(_SHIPPED_FOLDER, file_name + ".gz")
    if not resource.is_file():
        raise DatasetError(f"no shipped file {file_name}; shipped split files: {', '.join(shipped_split_names())}")
    return gzip.decompress(resource.read_bytes())


def read_shipped_json(file_name: str) -> Any:
    """Parse the shipped ``<file_name>.gz`` (e.g. ``"split_zhou_EuroSAT.json"``)."""
    return json.loads(read_shipped_bytes(file_name).decode("utf-8"))


def read_split_json(path: Path) -> Any:
    """Parse a split file on disk (plain or ``.gz``) with an error naming the file when it is not valid JSON."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        return json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"split file {path} does not exist.") from None
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(
            f"split file {path} cannot be read ({exc}); it may be truncated: delete it to use the shipped or a newly "
            "created split, or restore it."
        ) from None


def parse_split(data: Any, source: str, required: Sequence[str] = SPLIT_NAMES) -> LabelledSplits:
    """Validate a parsed split file and convert it to :class:`LabelledSplits`.

    Checks: an object with the ``required`` splits (others may be absent: empty); each entry a
    ``[relative path, label >= 0, class name]``; one class name per label and one label per class name; labels
    0..n-1 with no gap (a gap is a class with zero images). Backslashes in paths become ``/``.
    """
    if not isinstance(data, Mapping):
        raise DatasetError(f"{source} must be a JSON object with keys {', '.join(SPLIT_NAMES)}.")
    absent = [name for name in required if name not in data]
    if absent:
        raise DatasetError(f"{source} has no {' / '.join(absent)} split; it needs keys {', '.join(required)}.")
    splits: dict[str, list[Item]] = {}
    names_by_label: dict[int, str] = {}
    first_entry: dict[int, str] = {}
    conflicts: list[str] = []
    for split in SPLIT_NAMES:
        entries = data.get(split, [])
        if not isinstance(entries, list):
            raise DatasetError(f"{source}: {split!r} must be a list of [path, label, classname] entries.")
        items: list[Item] = []
        for index, entry in enumerate(entries):
            path, label, classname = _entry(entry, f"{source}: {split}[{index}]")
            first_entry.setdefault(label, f"{split}[{index}]")
            known = names_by_label.setdefault(label, classname)
            if known != classname:
                conflicts.append(f"label {label} is {known!r} and {classname!r} ({split}[{index}])")
            items.append(Item(path, label))
        splits[split] = items
    check_label_bound(first_entry, source)
    if conflicts:
        raise DatasetError(f"{source} gives {len(conflicts)} entries a class name that disagrees with their label: "
                           f"{format_offenders(conflicts)}.")
    return LabelledSplits(splits["train"], splits["val"], splits["test"], _classnames(names_by_label, source), source)


def check_label_bound(first_entry: Mapping[int, str], source: str) -> None:
    """Integer labels must run 0..n-1, n being the number of distinct labels: a label >= n (a gap, or a huge label
    that would make every per-label table huge) raises DatasetError naming the entry and the bound. Call it before
    anything is allocated from the labels. ``first_entry`` maps each label to where it first occurs."""
    bound = len(first_entry)
    beyond = sorted(label for label in first_entry if label >= bound)
    if beyond:
        label = beyond[-1]
        raise DatasetError(
            f"{source}: {first_entry[label]} has label {label}, but with {bound} distinct labels they must run "
            f"0..{bound - 1} without gaps (labels at or above {bound}: {len(beyond)}); fix that entry's label, or give "
            "class names instead of numbers.")


def _entry(entry: Any, where: str) -> Entry:
    if not (isinstance(entry, list | tuple) and len(entry) == 3):
        raise DatasetError(f"{where} must be [relative_path, label, classname], got {entry!r}.")
    path, label, classname = entry
    if not isinstance(path, str) or not path.strip():
        raise DatasetError(f"{where}: the path must be a non-empty string, got {path!r}.")
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise DatasetError(f"{where}: the label must be an integer >= 0, got {label!r}.")
    if not isinstance(classname, str) or not classname.strip():
        raise DatasetError(f"{where}: the class name must be a non-empty string, got {classname!r}.")
    path = path.replace("\\", "/")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":") or ".." in path.split("/"):
        raise DatasetError(
            f"{where}: path {path!r} is not relative to the image folder; split files hold paths relative to the "
            "dataset's image folder so that they work on every machine."
        )
    return path, label, classname


def _classnames(names_by_label: Mapping[int, str], source: str) -> list[str]:
    if not names_by_label:
        raise DatasetError(f"{source} holds no images.")
    count = len(names_by_label)  # check_label_bound made them run 0..count-1 without gaps
    labels_by_name: dict[str, int] = {}
    duplicates: list[str] = []
    for label in range(count):
        name = names_by_label[label]
        if name in labels_by_name:
            duplicates.append(f"{name!r} (labels {labels_by_name[name]} and {label})")
        labels_by_name.setdefault(name, label)
    if duplicates:
        raise DatasetError(f"{source} gives {len(duplicates)} class names to two labels: "
                           f"{format_offenders(duplicates)}.")
    return [names_by_label[label] for label in range(count)]


def check_entries(splits: Mapping[str, Sequence[Item]], source: str, classnames: Sequence[str] | None = None, *,
                  warn: bool = True) -> None:
    """Refuse an image listed with two different labels (a contradiction: DatasetError naming them); with ``warn``,
    log a warning for images listed twice in one split and for images in several splits (train/test overlap).

    ``splits`` maps a split name to its items; ``classnames`` (by label) names the labels in the message."""
    labels_of: dict[str, set[int]] = {}
    found_in: dict[str, list[str]] = {}
    for split, items in splits.items():
        for item in items:
            labels_of.setdefault(item.path, set()).add(item.label)
            found_in.setdefault(item.path, []).append(split)

    def name(label: int) -> str:
        return f"{label} {classnames[label]!r}" if classnames is not None and label < len(classnames) else str(label)

    contradictions = [f"{path} (labels {' and '.join(name(label) for label in sorted(labels))})"
                      for path, labels in labels_of.items() if len(labels) > 1]
    if contradictions:
        raise DatasetError(f"{source} gives {len(contradictions)} image(s) two different classes: "
                           f"{format_offenders(contradictions)}. An image has one class: remove the wrong entries.")
    if not warn:
        return
    repeated = [path for path, where in found_in.items() if len(where) != len(set(where))]
    if repeated:
        log.warning("%s lists %d image(s) twice in the same split (each copy counts as another image): %s", source,
                    len(repeated), format_offenders(repeated))
    overlap = [f"{path} ({' and '.join(sorted(set(where)))})" for path, where in found_in.items()
               if len(set(where)) > 1]
    if overlap:
        log.warning("%s puts %d image(s) in several splits, so the same images are trained on and evaluated: %s",
                    source, len(overlap), format_offenders(overlap))


def split_document(splits: LabelledSplits, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON document of a split file (CoOp format; ``meta`` under ``"vlprompt"``)."""
    names = splits.raw_classnames
    document: dict[str, Any] = {
        name: [[item.path, item.label, names[item.label]] for item in splits.split(name)] for name in SPLIT_NAMES
    }
    if meta:
        document["vlprompt"] = dict(meta)
    return document


def write_split_file(path: Path, splits: LabelledSplits, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``splits`` as a CoOp split file at ``path`` atomically (compact JSON, one file)."""
    return atomic_write_json(path, split_document(splits, meta), indent=None)
