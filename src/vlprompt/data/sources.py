"""Where each built-in dataset's files come from: the shipped table ``sources.toml``, loaded into typed records.

The table is data, not code: per dataset its homepage, the terms shown before downloading, and the files to fetch,
each with its URLs (official first, then known mirrors), size, published checksum (or the explicit mark
``"none published"``), where its contents go in the reader's layout, and the source the entry was taken from.
ImageNet has manual steps instead (its files need the user's own account). ``load_sources(path)`` reads another
table of the same form (a local mirror, or a test's); every table is validated when loaded.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

from vlprompt.data.registry import DATASETS
from vlprompt.errors import DatasetError

# the mark a file's ``checksum`` carries when its source publishes none
NO_CHECKSUM = "none published"
# hex digest length per accepted checksum algorithm
DIGEST_LENGTHS: Mapping[str, int] = MappingProxyType({"sha256": 64, "md5": 32})
# file name endings read as archives, and their kind
ARCHIVE_KINDS: Mapping[str, str] = MappingProxyType({".tar.gz": "tar", ".tgz": "tar", ".tar": "tar", ".zip": "zip"})
URL_SCHEMES = ("http://", "https://", "file://")
SCHEMA = 1


@dataclass(frozen=True)
class SourceUrl:
    """One place a file can be fetched from: ``kind`` is "official" or "mirror"; ``note`` says what it is."""

    url: str
    kind: str
    note: str = ""


@dataclass(frozen=True)
class SourceFile:
    """One file of a dataset: where to get it, how to verify it and where its contents go."""

    name: str
    urls: tuple[SourceUrl, ...]
    checksum: str | None             # "sha256:<hex>" / "md5:<hex>"; None: the source publishes no checksum
    size: int | None                 # bytes; None: unknown
    place: tuple[tuple[str, str], ...]   # (path in the archive or ".", path in the dataset folder)
    source: str                      # where the URLs, size and checksum were taken from
    copy_from: str | None = None     # data-root-relative file used instead of downloading, when present

    @property
    def algorithm(self) -> str | None:
        """``"sha256"`` / ``"md5"``, or None without a published checksum."""
        return self.checksum.partition(":")[0] if self.checksum else None

    @property
    def digest(self) -> str | None:
        """The published hex digest, or None."""
        return self.checksum.partition(":")[2] if self.checksum else None

    @property
    def archive_kind(self) -> str | None:
        """``"tar"`` or ``"zip"`` for an archive, None for a plain file (placed as it is)."""
        return archive_kind(self.name)

    def describe_checksum(self) -> str:
        """``"SHA-256 <hex>"`` or ``"no published checksum"``, for messages."""
        if self.checksum is None:
            return "no published checksum"
        return f"{self.algorithm.upper().replace('SHA', 'SHA-')} {self.digest}"  # type: ignore[union-attr]


@dataclass(frozen=True)
class DatasetSource:
    """Everything ``data download`` needs about one dataset. ``manual`` (ImageNet) means it cannot be fetched."""

    key: str
    homepage: str
    terms: str
    files: tuple[SourceFile, ...]
    manual: str | None = None        # steps to follow by hand ({root} is replaced by the data root)
    layout: str | None = None        # the folder layout those steps build

    @property
    def downloadable(self) -> bool:
        return self.manual is None

    @property
    def known_size(self) -> int:
        """Sum of the known file sizes (bytes)."""
        return sum(f.size for f in self.files if f.size is not None)


@dataclass(frozen=True)
class Sources:
    """A validated sources table: registry key -> :class:`DatasetSource`; ``origin`` names the file it came from."""

    datasets: Mapping[str, DatasetSource]
    origin: str

    def get(self, key: str) -> DatasetSource:
        entry = self.datasets.get(key)
        if entry is None:
            raise DatasetError(f"the sources table {self.origin} has no entry for {key!r}; it lists "
                               f"{', '.join(self.datasets)}.")
        return entry


def archive_kind(name: str) -> str | None:
    """``"tar"`` / ``"zip"`` from a file name's ending (case-insensitive), else None."""
    lower = name.lower()
    return next((kind for suffix, kind in ARCHIVE_KINDS.items() if lower.endswith(suffix)), None)


def load_sources(path: str | Path | None = None) -> Sources:
    """The shipped table (``path`` None) or the table at ``path``, validated; :class:`DatasetError` if malformed."""
    if path is None:
        origin = "vlprompt/data/sources.toml"
        text = resources.files("vlprompt.data").joinpath("sources.toml").read_text(encoding="utf-8")
    else:
        origin = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"cannot read the sources table {path}: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DatasetError(f"the sources table {origin} is not valid TOML: {exc}") from None
    return parse_sources(data, origin)


def parse_sources(data: Mapping[str, Any], origin: str) -> Sources:
    """Validate a parsed table (see ``sources.toml`` for the format)."""
    if data.get("schema") != SCHEMA:
        raise DatasetError(f"the sources table {origin} must declare schema = {SCHEMA}.")
    datasets = data.get("datasets")
    if not isinstance(datasets, Mapping) or not datasets:
        raise DatasetError(f"the sources table {origin} has no [datasets.<key>] entries.")
    parsed: dict[str, DatasetSource] = {}
    for key, entry in datasets.items():
        where = f"{origin}: datasets.{key}"
        if key not in DATASETS:
            raise DatasetError(f"{where}: {key!r} is not a built-in dataset ({', '.join(DATASETS)}).")
        if not isinstance(entry, Mapping):
            raise DatasetError(f"{where} must be a table.")
        files = entry.get("files", [])
        if not isinstance(files, list):
            raise DatasetError(f"{where}.files must be an array of tables.")
        manual = _optional_text(entry, "manual", where)
        parsed_files = tuple(_file(f, f"{where}.files[{i}]") for i, f in enumerate(files))
        if manual is None and not parsed_files:
            raise DatasetError(f"{where} lists no files and no manual steps.")
        names = [f.name for f in parsed_files]
        if len(set(names)) != len(names):
            raise DatasetError(f"{where} lists a file name twice: {', '.join(names)}.")
        parsed[key] = DatasetSource(key, _text(entry, "homepage", where), _text(entry, "terms", where),
                                    parsed_files, manual, _optional_text(entry, "layout", where))
    return Sources(MappingProxyType(parsed), origin)


def _text(entry: Mapping[str, Any], field: str, where: str) -> str:
    value = entry.get(field)
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: {field!r} must be a non-empty string.")
    return value.strip()


def _optional_text(entry: Mapping[str, Any], field: str, where: str) -> str | None:
    return _text(entry, field, where) if field in entry else None


def _file(entry: Any, where: str) -> SourceFile:
    if not isinstance(entry, Mapping):
        raise DatasetError(f"{where} must be a table.")
    name = _text(entry, "name", where)
    if "/" in name or "\\" in name or name in (".", ".."):
        raise DatasetError(f"{where}: the file name {name!r} must be a plain file name.")
    urls = entry.get("urls")
    if not isinstance(urls, list) or not urls:
        raise DatasetError(f"{where}: 'urls' must list at least one {{url, kind, note}} table.")
    parsed_urls = tuple(_url(u, f"{where}.urls[{i}]") for i, u in enumerate(urls))
    place = entry.get("place")
    if not isinstance(place, list) or not place:
        raise DatasetError(f"{where}: 'place' must list [path in the archive, path in the dataset folder] pairs.")
    pairs = tuple(_pair(p, f"{where}.place[{i}]") for i, p in enumerate(place))
    if archive_kind(name) is None and pairs != ((".", pairs[0][1]),):
        raise DatasetError(f"{where}: {name} is not an archive, so 'place' must be one pair ['.', target].")
    copy_from = entry.get("copy_from")
    if copy_from is not None:
        copy_from = _relative(copy_from, f"{where}.copy_from", allow_glob=False)
    return SourceFile(name, parsed_urls, _checksum(entry.get("checksum"), where), _size(entry.get("size"), where),
                      pairs, _text(entry, "source", where), copy_from)


def _url(entry: Any, where: str) -> SourceUrl:
    if not isinstance(entry, Mapping):
        raise DatasetError(f"{where} must be a {{url, kind, note}} table.")
    url = _text(entry, "url", where)
    if not url.startswith(URL_SCHEMES):
        raise DatasetError(f"{where}: {url!r} must start with {' or '.join(URL_SCHEMES)}.")
    kind = entry.get("kind")
    if kind not in ("official", "mirror"):
        raise DatasetError(f"{where}: 'kind' must be 'official' or 'mirror', got {kind!r}.")
    note = entry.get("note", "")
    if not isinstance(note, str):
        raise DatasetError(f"{where}: 'note' must be a string.")
    return SourceUrl(url, kind, note)


def _checksum(value: Any, where: str) -> str | None:
    if value == NO_CHECKSUM:
        return None
    if isinstance(value, str):
        algorithm, _, digest = value.partition(":")
        length = DIGEST_LENGTHS.get(algorithm)
        if length is not None and re.fullmatch(f"[0-9a-f]{{{length}}}", digest):
            return value
    raise DatasetError(f"{where}: 'checksum' must be 'sha256:<64 hex digits>', 'md5:<32 hex digits>' or "
                       f"{NO_CHECKSUM!r}, got {value!r}.")


def _size(value: Any, where: str) -> int | None:
    if value == "unknown":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DatasetError(f"{where}: 'size' must be a positive number of bytes or 'unknown', got {value!r}.")
    return value


def _pair(value: Any, where: str) -> tuple[str, str]:
    if not (isinstance(value, list) and len(value) == 2):
        raise DatasetError(f"{where} must be [path in the archive, path in the dataset folder].")
    return _relative(value[0], where, allow_glob=True), _relative(value[1], where, allow_glob=False)


def _relative(value: Any, where: str, *, allow_glob: bool) -> str:
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{where}: paths must be non-empty strings ('.' for the top level).")
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or "\\" in value:
        raise DatasetError(f"{where}: {value!r} must be a relative path without '..'.")
    if not allow_glob and any(c in value for c in "*?["):
        raise DatasetError(f"{where}: {value!r} may not contain wildcards.")
    return value
