"""Listing image files on disk and checking that a split's files exist, with messages that name the offenders."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from vlprompt.errors import DatasetError

# file name endings (lower case) taken as images when a dataset is read from folders
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

# how many offenders an error message lists before "... and N more"
MAX_LISTED = 10


def format_offenders(offenders: Sequence[str], limit: int = MAX_LISTED) -> str:
    """``"a, b, c"`` or ``"a, b, ... (and 7 more)"``: the first ``limit`` offenders of a list."""
    shown = ", ".join(offenders[:limit])
    rest = len(offenders) - limit
    return f"{shown}, ... (and {rest} more)" if rest > 0 else shown


def is_hidden(name: str) -> bool:
    """Hidden entries (".DS_Store", "._x.jpg", ".git") are never part of a dataset."""
    return name.startswith(".")


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (case-insensitive) and is not hidden."""
    return not is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def require_dir(path: Path, what: str, hint: str) -> Path:
    """Return ``path`` if it is a folder, else raise :class:`DatasetError` naming ``what`` and how to fix it."""
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "does not exist"
        raise DatasetError(f"{what} {path} {state}. {hint}")
    return path


def subfolders(path: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``path``."""
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir() and not is_hidden(entry.name))


def image_files(folder: Path) -> tuple[list[str], list[str]]:
    """Sorted image file names in ``folder`` (not recursive) and, separately, the other non-hidden files it holds."""
    images: list[str] = []
    others: list[str] = []
    for entry in os.scandir(folder):
        if is_hidden(entry.name) or entry.is_dir():
            continue
        (images if is_image_name(entry.name) else others).append(entry.name)
    return sorted(images), sorted(others)


def find_missing(image_dir: Path, paths: Iterable[str]) -> list[str]:
    """The ``paths`` (relative to ``image_dir``, POSIX) that are not files on disk, in input order.

    Each distinct parent folder is listed once instead of one ``stat`` per file, which keeps checking tens of thousands
    of files on a network drive fast.
    """
    listings: dict[str, set[str] | None] = {}
    missing: list[str] = []
    for rel in paths:
        parent, _, name = rel.rpartition("/")
        if parent not in listings:
            folder = image_dir / parent if parent else image_dir
            try:
                listings[parent] = {entry.name for entry in os.scandir(folder) if not entry.is_dir()}
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                listings[parent] = None
        names = listings[parent]
        if names is None or name not in names:
            missing.append(rel)
    return missing


def require_files(image_dir: Path, paths: Sequence[str], source: str, hint: str | None = None) -> None:
    """Raise :class:`DatasetError` listing the first missing files (and their count) if any of ``paths`` is absent;
    ``hint`` says what to do when some (not all) are missing (default: restore them or remove the split file)."""
    missing = find_missing(image_dir, paths)
    if not missing:
        return
    unique_missing = list(dict.fromkeys(missing))
    tops = {p.split("/")[0] for p in unique_missing if "/" in p}
    absent_folders = sorted(top for top in tops if not (image_dir / top).is_dir())
    folder_note = f" Folders absent under the image folder: {format_offenders(absent_folders)}." \
        if absent_folders else ""
    everything = len(unique_missing) == len(set(paths))
    hint = (
        "None of its images exist: check that --root is the folder holding the dataset folder and that the images "
        "were extracted where the split expects them."
        if everything
        else hint or "Restore the missing images, or remove the split file to create a new split from the images on "
        "disk."
    )
    raise DatasetError(
        f"{source} disagrees with the images on disk: {len(unique_missing)} of its {len(set(paths))} files are missing "
        f"under {image_dir}: {format_offenders(unique_missing)}.{folder_note} {hint}"
    )
