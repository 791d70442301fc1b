"""``vlprompt data download``: bring built-in datasets from their sources into the layout the readers expect.

For each dataset (sources in :mod:`vlprompt.data.sources`):

1. the terms are shown; a dataset folder that already exists is left alone and only checked;
2. each file is taken from ``--from-file``, from the downloads folder (``<root>/.downloads`` unless given), from the
   data root (``copy_from``: ImageNet's ``classnames.txt``) or fetched, URL after URL, resuming a partial download
   (``<name>.<url-hash>.part``) where one was left; free disk space is checked first;
3. every file is verified against its published checksum (or its size, where none is published) before anything is
   extracted; a file that fails is deleted (when we fetched it) and the next URL is tried;
4. archives are extracted safely into ``<root>/.vlprompt-partial-<folder>/`` and their parts moved into the reader's
   layout there; split files the readers would create (Food101, SUN397) are created now with the reference procedure
   and saved beside the data; then the finished folder is renamed to ``<root>/<folder>`` in one step, so a
   half-extracted folder is never taken for a dataset;
5. the archives fetched are deleted (unless kept) and :func:`vlprompt.data.check.check_dataset` runs on the result.

Files that cannot be fetched end in one :class:`DatasetError` listing, per file, the URLs tried, the expected name,
size and checksum, and where to put the file so that the next run picks it up. ImageNet needs the user's account: its
steps and layout are printed, ``classnames.txt`` is added and the result checked once it is there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from vlprompt.common import locks
from vlprompt.common.io import atomic_write, atomic_write_bytes
from vlprompt.data.archives import UnusableArchiveError, extract, place, remove_tree
from vlprompt.data.check import CheckReport, check_dataset
from vlprompt.common.fetch import FetchError, Opener, fetch, file_digest, format_size
from vlprompt.data.info import DatasetInfo
from vlprompt.data.registry import DATASETS, lookup
from vlprompt.data.resolve import write_created_split
from vlprompt.data.sources import DatasetSource, SourceFile, Sources, load_sources
from vlprompt.data.splitfile import read_shipped_bytes, shipped_split_names
from vlprompt.data.standard import CREATORS
from vlprompt.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

DOWNLOADS_FOLDER = ".downloads"      # under the data root, unless --downloads says otherwise
STAGING_PREFIX = ".vlprompt-partial-"
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class DownloadOptions:
    """How to download: where files go and come from, verification of the result, network behaviour."""

    downloads_dir: Path | None = None        # default <root>/.downloads
    from_files: tuple[Path, ...] = ()        # files the user already has, matched by name
    keep_archives: bool = False              # keep what was fetched after a successful install
    decode: bool = True                      # the final check decodes every image
    workers: int | None = None               # decoding processes of the final check
    progress: bool | None = None             # progress bars (default: when stderr is a terminal)
    timeout: float = 60.0                    # seconds without data before a connection counts as failed
    retries: int = 3                         # resumed attempts after a connection cut short
    opener: Opener | None = None             # urllib.request.urlopen unless given
    cache_dir: Path | None = None            # where the final check puts created splits of read-only folders


@dataclass
class DownloadResult:
    """What happened to one dataset. ``status``: installed, present (already there), missing (ImageNet not built)."""

    key: str
    title: str
    status: str
    path: Path
    report: CheckReport | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in ("installed", "present") and self.report is not None and self.report.ok


def downloadable_keys(sources: Sources) -> list[str]:
    """Registry keys (registry order) of the datasets ``all`` stands for: those that can be fetched."""
    return [key for key in DATASETS if key in sources.datasets and sources.datasets[key].downloadable]


def resolve_names(names: Iterable[str], sources: Sources) -> list[str]:
    """Registry keys for the names given (aliases accepted, ``all`` = every fetchable one), without repeats."""
    keys: list[str] = []
    for name in names:
        if name.strip().lower() == "all":
            keys.extend(downloadable_keys(sources))
            continue
        info = lookup(name)
        if info is None:
            raise ConfigError(f"unknown dataset {name!r}: give one of {', '.join(DATASETS)} or 'all'.")
        sources.get(info.key)
        keys.append(info.key)
    if not keys:
        raise ConfigError("name at least one dataset (or 'all').")
    return list(dict.fromkeys(keys))


def download_datasets(names: Sequence[str], root: str | Path, *, sources: Sources | None = None,
                      options: DownloadOptions = DownloadOptions(),
                      out: Callable[[str], None] = print) -> list[DownloadResult]:
    """Download, verify, arrange and check each named dataset under ``root``; messages go to ``out``.

    Raises one :class:`DatasetError` at the end naming every dataset that failed (the others are installed).
    """
    sources = sources if sources is not None else load_sources()
    keys = resolve_names(names, sources)
    root = Path(root).expanduser().absolute()
    created_root = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create the data root {root}: {exc}") from None
    session = _Session(root, options.downloads_dir or root / DOWNLOADS_FOLDER, options, out,
                       _index_given(options.from_files, [sources.get(key) for key in keys]))
    results: list[DownloadResult] = []
    failures: list[str] = []
    try:
        pending = [key for key in keys
                   if sources.get(key).downloadable and not DATASETS[key].dataset_dir(root).exists()]
        if len(pending) > 1:   # all of them before starting; each one is checked again before its own downloads
            session.require_space(", ".join(DATASETS[key].title for key in pending),
                                  [session.plan(f) for key in pending for f in sources.get(key).files])
        for key in keys:
            info, entry = DATASETS[key], sources.get(key)
            try:
                run = session.install if entry.downloadable else session.manual
                results.append(run(info, entry))
            except (DatasetError, OSError) as exc:   # OSError: a folder not writable, the disk full, ...
                failures.append(f"{info.title}: {exc}")
                out(f"{info.title}: FAILED (details at the end)")
    finally:
        _remove_if_empty(session.downloads)
        if created_root:
            _remove_if_empty(root)
    if failures:
        raise DatasetError("\n\n".join(failures))
    return results


def _index_given(paths: Iterable[Path], entries: Sequence[DatasetSource]) -> Mapping[str, Path]:
    """``--from-file`` paths by file name; each must be a file one of the named datasets needs."""
    wanted = {f.name for entry in entries for f in entry.files}
    given: dict[str, Path] = {}
    for path in paths:
        path = Path(path).expanduser().absolute()
        if not path.is_file():
            raise ConfigError(f"--from-file {path} is not a file.")
        if path.name not in wanted:
            raise ConfigError(f"--from-file {path}: no dataset named here needs a file called {path.name!r}; the "
                              f"files are {', '.join(sorted(wanted))} (rename it if it is one of them).")
        given[path.name] = path
    return MappingProxyType(given)


@dataclass
class _Session:
    root: Path
    downloads: Path
    options: DownloadOptions
    out: Callable[[str], None]
    given: Mapping[str, Path]

    # ---- one dataset -------------------------------------------------------------------------------------------
    def install(self, info: DatasetInfo, entry: DatasetSource) -> DownloadResult:
        """One dataset, while holding ``<root>/.vlprompt-partial-<folder>.lock`` (two runs never build it at once)."""
        lock_path = self.root / f"{STAGING_PREFIX}{info.folder}.lock"
        lock = locks.acquire(lock_path)
        if lock is None:
            holder = locks.recorded_holder(lock_path)
            raise DatasetError(f"another `vlprompt data download` (pid {holder or 'unknown'}) is installing "
                               f"{info.title} into {self.root}; let it finish, or stop it first.")
        try:
            return self._install(info, entry)
        finally:
            # unlinked while still held, so nothing is left in the root; a run that opened the old file meanwhile
            # either fails to lock it or locks it after us and then finds the dataset installed
            lock_path.unlink(missing_ok=True)
            lock.release()

    def _install(self, info: DatasetInfo, entry: DatasetSource) -> DownloadResult:
        target = info.dataset_dir(self.root)
        if target.exists():
            self.out(f"{info.title}: {target} already exists: not downloaded again (delete it to start over); "
                     "checking it")
            return DownloadResult(info.key, info.title, "present", target, self._check(info))
        self.out(f"{info.title}: terms: {entry.terms} ({entry.homepage})")
        plans = [self.plan(f) for f in entry.files]
        self.require_space(info.title, plans)
        fetched: list[Path] = []
        paths = [self._obtain(info, plan, fetched) for plan in plans]
        staging = self.root / f"{STAGING_PREFIX}{info.folder}"
        remove_tree(staging)   # left by an interrupted run
        staging.mkdir()
        try:
            building = staging / info.folder
            building.mkdir()
            for number, (file, path) in enumerate(zip(entry.files, paths)):
                try:
                    self._unpack(info, file, path, staging / f"extract-{number}", building)
                except UnusableArchiveError:
                    if path in fetched:   # it can never be used: do not keep it
                        path.unlink(missing_ok=True)
                    raise
            prepare_layout(info, building)
            if not info.images_in(building).is_dir():
                raise DatasetError(f"after unpacking, {info.images_in(building).relative_to(building)} is missing: "
                                   "the files do not have the layout the reader expects.")
            if target.exists():
                raise DatasetError(f"{target} appeared while downloading (another process?); left as it is.")
            os.rename(building, target)
        finally:
            remove_tree(staging)
        self.out(f"{info.title}: installed at {target}")
        notes = self._discard(fetched)
        notes += [f"kept {plan.path} (it was there before this run; delete it if you no longer need it)"
                  for plan in plans if plan.how == "placed"]
        return DownloadResult(info.key, info.title, "installed", target, self._check(info), notes)

    def manual(self, info: DatasetInfo, entry: DatasetSource) -> DownloadResult:
        """ImageNet: print the steps and layout; once the images are there, add the small files and check."""
        assert entry.manual is not None
        self.out(f"{info.title}: {entry.terms}")
        self.out(entry.manual.replace("{root}", str(self.root)).rstrip())
        if entry.layout:
            self.out("Layout:\n" + entry.layout.replace("{root}", str(self.root)).strip("\n"))
        dataset_dir = info.dataset_dir(self.root)
        if not info.images_in(dataset_dir).is_dir():
            self.out(f"{info.title}: {info.images_in(dataset_dir)} does not exist yet; follow the steps above.")
            return DownloadResult(info.key, info.title, "missing", dataset_dir)
        fetched: list[Path] = []
        for file in entry.files:
            destination = dataset_dir / file.place[0][1]
            if destination.exists():
                continue
            path = self._obtain(info, self.plan(file), fetched)
            _copy_atomic(path, destination)
            self.out(f"{info.title}: added {destination}")
        notes = self._discard(fetched)
        return DownloadResult(info.key, info.title, "present", dataset_dir, self._check(info), notes)

    # ---- files -------------------------------------------------------------------------------------------------
    def plan(self, file: SourceFile) -> _Plan:
        if file.name in self.given:
            return _Plan(file, self.given[file.name], "given")
        if file.copy_from is not None and (self.root / file.copy_from).is_file():
            return _Plan(file, self.root / file.copy_from, "copy")
        placed = self.downloads / file.name
        if placed.exists():
            return _Plan(file, placed, "placed")
        return _Plan(file, placed, "fetch")

    def _obtain(self, info: DatasetInfo, plan: _Plan, fetched: list[Path]) -> Path:
        file = plan.file
        if plan.how == "copy":
            log.info("%s: using %s", info.title, plan.path)
            return plan.path
        if plan.how in ("given", "placed"):
            self._verify_or_fail(plan.path, file, f"the file {plan.path}")
            return plan.path
        reasons: list[str] = []
        for source in file.urls:
            part = partial_file(self.downloads, file.name, source.url)
            self.out(f"{info.title}: downloading {file.name} ({format_size(file.size)}) from {source.url}")
            try:
                fetch(source.url, part, label=file.name, size=file.size, opener=self.options.opener,
                      timeout=self.options.timeout, retries=self.options.retries, progress=self.options.progress)
            except FetchError as exc:
                reasons.append(f"{source.url}: {exc.reason}")
                log.info("%s: %s", info.title, exc)
                continue
            problem = self._verify(part, file)
            if problem is not None:
                part.unlink(missing_ok=True)
                reasons.append(f"{source.url}: {problem}; the file was deleted")
                log.info("%s: %s from %s: %s", info.title, file.name, source.url, problem)
                continue
            os.replace(part, plan.path)
            fetched.append(plan.path)
            return plan.path
        raise DatasetError(self._unavailable_message(file, reasons))

    def _verify(self, path: Path, file: SourceFile) -> str | None:
        """None if ``path`` matches the published checksum (or the size, without one), else what is wrong."""
        size = path.stat().st_size
        if file.checksum is None:
            if file.size is not None and size != file.size:
                return f"it has {size} bytes, expected {file.size} (no checksum is published for it)"
            log.warning("%s: no checksum is published for this file; %s", file.name,
                        "only its size was checked" if file.size is not None else "it could not be verified")
            return None
        assert file.algorithm is not None
        actual = file_digest(path, file.algorithm, label=file.name, progress=self.options.progress)
        if actual == file.digest:
            return None
        if _is_gzip(path):  # some sources record the checksum of the gzip-decoded stream (Content-Encoding: gzip)
            try:
                decoded = file_digest(path, file.algorithm, label=file.name, progress=self.options.progress,
                                      decompress=True)
            except (OSError, EOFError, zlib.error):   # not a valid gzip stream: the raw digest stands
                decoded = None
            if decoded == file.digest:
                log.info("%s: the published checksum is that of the decompressed archive; it matches", file.name)
                return None
        return f"its {file.algorithm.upper()} is {actual}, expected {file.digest}"

    def _verify_or_fail(self, path: Path, file: SourceFile, what: str) -> None:
        problem = self._verify(path, file)
        if problem is not None:
            raise DatasetError(f"{what} is not the expected {file.name}: {problem}. It was left as it is: replace it "
                               f"with the right file ({file.describe_checksum()}) or delete it to download it.")

    def _unavailable_message(self, file: SourceFile, reasons: Sequence[str]) -> str:
        size = f"{file.size} bytes" if file.size is not None else "size unknown"
        tried = "\n".join(f"  {reason}" for reason in reasons)
        return (f"could not download {file.name} ({size}, {file.describe_checksum()}). Tried:\n{tried}\n"
                f"Get the file by other means (from the URLs above or a copy you trust) and put it at "
                f"{self.downloads / file.name}, or pass --from-file PATH; the next run verifies it and carries on.")

    def require_space(self, what: str, plans: Sequence[_Plan]) -> None:
        """Free disk space for the downloads still to do and for unpacking (estimated as the archives' size)."""
        download = 0
        unknown: list[str] = []
        for plan in plans:
            if plan.how != "fetch":
                continue
            if plan.file.size is None:
                unknown.append(plan.file.name)
                continue
            parts = self.downloads.glob(f"{plan.file.name}.*.part") if self.downloads.is_dir() else []
            have = max((p.stat().st_size for p in parts), default=0)
            download += max(0, plan.file.size - have)
        unpack = sum(plan.file.size or 0 for plan in plans if plan.file.archive_kind is not None)
        by_device: dict[int, list[tuple[Path, int, str]]] = {}
        for folder, amount, kind in ((self.downloads, download, "downloads"), (self.root, unpack, "unpacking")):
            by_device.setdefault(_device(folder), []).append((folder, amount, kind))
        for group in by_device.values():
            total = sum(amount for _, amount, _ in group)
            free = shutil.disk_usage(_existing(group[0][0])).free
            if total > free:
                needs = " + ".join(f"{format_size(amount)} for {kind} in {folder}" for folder, amount, kind in group)
                raise DatasetError(f"not enough free disk space: {what} needs about {needs}, and "
                                   f"{format_size(free)} is free there. Free some space, or put the downloads on "
                                   "another disk with --downloads DIR.")
        if unknown:
            log.info("%s: the size of %s is not known; it was not counted in the disk space check", what,
                     ", ".join(unknown))

    def _unpack(self, info: DatasetInfo, file: SourceFile, path: Path, scratch: Path, building: Path) -> None:
        kind = file.archive_kind
        if kind is None:
            destination = building / file.place[0][1]
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)
            return
        scratch.mkdir()
        extract(path, kind, scratch, label=file.name, progress=self.options.progress)
        place(scratch, file.place, building, archive=file.name)
        remove_tree(scratch)

    def _discard(self, fetched: Sequence[Path]) -> list[str]:
        if self.options.keep_archives:
            return [f"kept {path}" for path in fetched]
        for path in fetched:
            path.unlink(missing_ok=True)
        return []

    def _check(self, info: DatasetInfo) -> CheckReport:
        self.out(f"{info.title}: checking")
        return check_dataset(info.key, self.root, decode=self.options.decode, workers=self.options.workers,
                             progress=self.options.progress, cache_dir=self.options.cache_dir)


@dataclass(frozen=True)
class _Plan:
    file: SourceFile
    path: Path
    how: str    # "given" (--from-file), "copy" (copy_from under the root), "placed" (in downloads), "fetch"


def prepare_layout(info: DatasetInfo, dataset_dir: Path) -> None:
    """What the reader needs besides the archives' contents, made in ``dataset_dir`` before it is moved into place.

    - the split of a dataset whose standard split file is not shipped but that the reader can create (Food101,
      SUN397): created now with the reference procedure and saved beside the data (``split_vlprompt_<Name>.json``);
    - Flowers102: ``cat_to_name.json``, the class names file of the reference layout (the shipped copy).
    """
    creator = CREATORS.get(info.key)
    if creator is not None and info.split_file not in shipped_split_names():
        log.info("%s: creating the split with the reference procedure", info.title)
        splits = creator(info, dataset_dir)
        write_created_split(splits, dataset_dir / info.created_split_file, dataset_dir)
    if info.key == "oxford_flowers":
        atomic_write_bytes(dataset_dir / "cat_to_name.json", read_shipped_bytes("cat_to_name_OxfordFlowers.json"))


def _copy_atomic(source: Path, destination: Path) -> None:
    def write(handle):  # type: ignore[no-untyped-def]
        with open(source, "rb") as src:
            shutil.copyfileobj(src, handle)

    atomic_write(destination, write)


def partial_file(downloads: Path, name: str, url: str) -> Path:
    """Where a download of ``name`` from ``url`` is kept until complete (one per URL, so resuming never mixes two
    sources): ``<downloads>/<name>.<8 hex digits of the URL's SHA-1>.part``."""
    return downloads / f"{name}.{hashlib.sha1(url.encode('utf-8')).hexdigest()[:8]}.part"


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == GZIP_MAGIC


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _device(path: Path) -> int:
    return _existing(path).stat().st_dev


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def describe_sources(keys: Sequence[str], sources: Sources, root: Path,
                     downloads_dir: Path | None = None) -> list[str]:
    """What ``download --dry-run`` prints: per dataset its terms, target folder and files (size, checksum, URLs)."""
    downloads = downloads_dir or root / DOWNLOADS_FOLDER
    lines: list[str] = []
    for key in keys:
        info, entry = DATASETS[key], sources.get(key)
        lines.append(f"{info.title} -> {info.dataset_dir(root)}")
        lines.append(f"  terms: {entry.terms} ({entry.homepage})")
        if not entry.downloadable:
            lines.append("  manual: needs your own ImageNet account; `data download imagenet` prints the steps")
        for file in entry.files:
            lines.append(f"  {file.name}: {format_size(file.size)}, {file.describe_checksum()}; put a copy at "
                         f"{downloads / file.name} or pass --from-file")
            if file.copy_from:
                lines.append(f"    taken from {root / file.copy_from} when present")
            for source in file.urls:
                lines.append(f"    {source.kind}: {source.url}" + (f" ({source.note})" if source.note else ""))
            lines.append(f"    source: {file.source}")
    return lines
