"""Unpacking downloaded archives safely and moving their contents into a dataset's layout.

:func:`extract` refuses, before writing it, any member that would land outside the destination: absolute names,
``..`` components, drive letters, links whose target leaves the destination (tar), links at all (zip) and device or
FIFO entries. The caller extracts into a fresh temporary folder, so a refused archive leaves nothing behind once that
folder is removed. :func:`place` then moves named parts of the extracted tree into the dataset folder being built.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from vlprompt.common.fetch import Progress
from vlprompt.data.listing import format_offenders
from vlprompt.errors import DatasetError

log = logging.getLogger(__name__)


class UnusableArchiveError(DatasetError):
    """An archive that cannot be used: damaged, or holding a member that would land outside its destination."""


def safe_member_name(name: str, archive: str) -> str:
    """The member's normalised relative POSIX path, or :class:`DatasetError` if it could leave the destination."""
    unix = name.replace("\\", "/")
    parts = PurePosixPath(unix).parts
    if (unix.startswith("/") or (len(unix) > 1 and unix[1] == ":") or ".." in parts):
        raise UnusableArchiveError(f"{archive} holds the member {name!r}, whose path leads outside the folder it is "
                                   "extracted to; the archive was refused and nothing of it was kept.")
    normalised = posixpath.normpath(unix) if unix not in ("", ".") else "."
    return normalised


def extract(archive: Path, kind: str, destination: Path, *, label: str, progress: bool | None = None) -> None:
    """Extract ``archive`` (``kind`` "tar" or "zip") into the existing folder ``destination``, member by member."""
    log.info("extracting %s", archive.name)
    size = archive.stat().st_size
    bar = Progress(f"extracting {label}", size, bar=progress)
    try:
        with open(archive, "rb") as raw:
            if kind == "tar":
                _extract_tar(raw, archive.name, destination, bar)
            elif kind == "zip":
                _extract_zip(raw, archive.name, destination, bar)
            else:
                raise DatasetError(f"{archive.name}: unknown archive kind {kind!r}.")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise UnusableArchiveError(f"{archive} cannot be unpacked ({exc}): the archive is damaged or not a {kind} "
                                   "file (a file this run downloaded is deleted, one you provided is left as it "
                                   "is).") from None
    finally:
        bar.close()


def _extract_tar(raw: BinaryIO, name: str, destination: Path, bar: Progress) -> None:
    position = 0
    with tarfile.open(fileobj=raw, mode="r:*") as tar:
        for member in tar:
            member.name = safe_member_name(member.name, name)
            if member.issym() or member.islnk():
                _check_link(member, name)
            elif not (member.isfile() or member.isdir()):
                raise UnusableArchiveError(f"{name} holds {member.name!r}, a device or FIFO entry; the archive was "
                                           "refused.")
            tar.extract(member, destination, filter="data")
            bar.update(raw.tell() - position)
            position = raw.tell()


def _check_link(member: tarfile.TarInfo, archive: str) -> None:
    target = member.linkname.replace("\\", "/")
    if member.issym():
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(member.name), target))
    else:
        resolved = posixpath.normpath(target)
    if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
        raise UnusableArchiveError(f"{archive} holds the link {member.name!r} -> {member.linkname!r}, which points "
                                   "outside the folder it is extracted to; the archive was refused and nothing of it "
                                   "was kept.")


def _extract_zip(raw: BinaryIO, name: str, destination: Path, bar: Progress) -> None:
    with zipfile.ZipFile(raw) as archive:
        for info in archive.infolist():
            safe_member_name(info.filename, name)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnusableArchiveError(f"{name} holds the link {info.filename!r}; links are not extracted from "
                                           "zip archives, so the archive was refused.")
            archive.extract(info, destination)
            bar.update(info.compress_size)


def place(extracted: Path, moves: Iterable[tuple[str, str]], dataset_dir: Path, *, archive: str) -> None:
    """Move ``extracted/<source>`` to ``dataset_dir/<target>`` for each pair (merging into existing folders).

    A source with wildcards moves every match (``pathlib`` glob, ``**`` recursive; ``__MACOSX`` and hidden entries
    skipped) into the target folder; one that matches nothing is an error naming what the archive holds at its top
    level.
    """
    for source, target in moves:
        destination = dataset_dir if target == "." else dataset_dir / target
        if any(c in source for c in "*?["):
            matches = sorted(p for p in extracted.glob(source) if p.exists() and not _junk(p.relative_to(extracted)))
            if not matches:
                raise DatasetError(f"{archive} holds nothing matching {source!r} ({_top_level(extracted)}); the "
                                   "archive's layout is not the expected one.")
            destination.mkdir(parents=True, exist_ok=True)
            for match in matches:
                _merge(match, destination / match.name)
            continue
        origin = extracted if source == "." else extracted / source
        if not origin.exists():
            raise DatasetError(f"{archive} has no {source!r} ({_top_level(extracted)}); the archive's layout is not "
                               "the expected one.")
        _merge(origin, destination)


def _junk(relative: Path) -> bool:
    """Entries archivers add beside the data (``__MACOSX/``, ``._name`` resource forks, hidden files)."""
    return any(part == "__MACOSX" or part.startswith(".") for part in relative.parts)


def _merge(origin: Path, destination: Path) -> None:
    """Rename ``origin`` to ``destination``; folders are merged entry by entry; an existing file is an error."""
    if not destination.exists():
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(origin, destination)
        return
    if origin.is_dir() and destination.is_dir():
        for entry in sorted(origin.iterdir()):
            _merge(entry, destination / entry.name)
        origin.rmdir()
        return
    raise DatasetError(f"two downloaded files both provide {destination.name} ({origin} and {destination}).")


def _top_level(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()) if folder.is_dir() else []
    return f"its top level holds {format_offenders(names)}" if names else "it is empty"


def remove_tree(path: Path) -> None:
    """Delete a folder we created (temporary extraction or staging folder), ignoring one that is already gone."""
    shutil.rmtree(path, ignore_errors=True)
