"""``vlprompt data check``: is a dataset present, complete, of the expected size, and does every image decode?"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vlprompt.backbone import transforms
from vlprompt.common.progress import progress as make_progress
from vlprompt.data.listing import find_missing, format_offenders
from vlprompt.data.load import load_dataset
from vlprompt.data.registry import lookup
from vlprompt.data.types import SPLIT_NAMES, BadImage, DatasetSplits, SplitCounts
from vlprompt.errors import DatasetError

CHUNK = 64


def _check_chunk(task: tuple[str, int, Sequence[str]]) -> list[tuple[int, str, str]]:
    """Decode each image of a chunk; return ``(index, path, reason)`` of those that fail (runs in pool workers)."""
    image_dir, start, paths = task
    bad: list[tuple[int, str, str]] = []
    for offset, rel in enumerate(paths):
        try:
            transforms.load_image(os.path.join(image_dir, rel))
        except DatasetError as exc:
            bad.append((start + offset, rel, str(exc)))
    return bad


def find_unreadable(image_dir: str | Path, paths: Sequence[str], *, workers: int | None = None,
                    progress: bool | None = None, chunk_size: int = CHUNK) -> list[BadImage]:
    """Fully decode every image of ``paths`` (relative to ``image_dir``); the ones that fail, in input order.

    ``workers`` > 1 decodes in a process pool, ``chunk_size`` images per task (default: up to 8 workers, one per
    CPU); ``progress`` shows a tqdm bar (default: only when stderr is a terminal); progress lines
    go to the ``vlprompt.progress`` logger either way.
    """
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    tasks = [(str(image_dir), start, list(paths[start : start + chunk_size]))
             for start in range(0, len(paths), chunk_size)]
    bad: list[tuple[int, str, str]] = []
    with make_progress(len(paths), "decoding", "img", show=progress) as bar:
        for result, size in _run(tasks, workers):
            bad.extend(result)
            bar.update(size)
    return [BadImage(index, path, reason) for index, path, reason in sorted(bad)]


def _run(tasks: list[tuple[str, int, list[str]]], workers: int) -> Iterator[tuple[list[tuple[int, str, str]], int]]:
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield _check_chunk(task), len(task[2])
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for task, result in zip(tasks, pool.map(_check_chunk, tasks)):
            yield result, len(task[2])


@dataclass
class CheckReport:
    """What ``data check`` found. ``ok`` is True when counts match and no file is missing or unreadable."""

    splits: DatasetSplits
    expected: SplitCounts | None
    missing: list[str] = field(default_factory=list)
    unreadable: list[BadImage] = field(default_factory=list)
    decoded: int = 0

    @property
    def count_mismatches(self) -> list[str]:
        """``"train: 4 images, expected 2820"`` for each split / class count that differs from the expected one."""
        if self.expected is None:
            return []
        found, wanted = self.splits.counts().as_dict(), self.expected.as_dict()
        return [f"{key}: {found[key]}{' images' if key != 'classes' else ''}, expected {wanted[key]}"
                for key in wanted if found[key] != wanted[key]]

    @property
    def ok(self) -> bool:
        """No count mismatch, no missing and no unreadable file."""
        return not (self.count_mismatches or self.missing or self.unreadable)

    def lines(self) -> list[str]:
        """The report as text lines."""
        s = self.splits
        counts = s.counts()
        out = [f"dataset: {s.name}", f"image folder: {s.image_dir}", f"split: {s.split_source}",
               f"classes: {counts.classes}", "images: " + ", ".join(f"{n} {getattr(counts, n)}" for n in SPLIT_NAMES)]
        mismatches = self.count_mismatches
        if self.expected is not None:
            out.append("counts: as expected" if not mismatches else
                       "counts differ from the reference: " + "; ".join(mismatches))
        out.append(f"missing files: {len(self.missing)}" +
                   (f": {format_offenders(self.missing)}" if self.missing else ""))
        out.append(f"decoded: {self.decoded} images, unreadable: {len(self.unreadable)}")
        out.extend(f"  unreadable: {bad.reason}" for bad in self.unreadable)
        out.append("OK" if self.ok else "PROBLEMS FOUND")
        return out


def check_dataset(name_or_path: str, root: str | Path | None, *, decode: bool = True, workers: int | None = None,
                  progress: bool | None = None, cache_dir: str | Path | None = None) -> CheckReport:
    """Load ``name_or_path`` without failing on missing files, then report counts, missing and unreadable images."""
    splits = load_dataset(name_or_path, root, check_files=False, cache_dir=cache_dir)
    info = lookup(name_or_path)
    paths = list(dict.fromkeys(item.path for split in SPLIT_NAMES for item in splits.split(split)))
    missing = find_missing(splits.image_dir, paths)
    missing_set = set(missing)
    present = [p for p in paths if p not in missing_set]
    unreadable = find_unreadable(splits.image_dir, present, workers=workers, progress=progress) if decode else []
    return CheckReport(splits, info.expected if info is not None and splits.name == info.key else None, missing,
                       unreadable, len(present) if decode else 0)
