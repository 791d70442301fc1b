"""Fetching one file over HTTP(S) with the standard library: resumable, with progress, verified afterwards.

``fetch(url, part)`` appends to ``part`` (a ``<name>.part`` file): when it already holds bytes, the request asks for
the rest (``Range: bytes=N-``); a server that answers 206 continues the file, one that answers 200 (no range support)
sends it whole again and ``part`` is rewritten. A connection cut short is retried the same way ``retries`` times.
Nothing here decides where files live or whether they are right: :func:`file_digest` and the caller do. It is the
one downloader: datasets (:mod:`vlprompt.data.download`) and CLIP checkpoints (:mod:`vlprompt.backbone.download`)
fetch through it.

Progress goes to a tqdm bar when stderr is a terminal and otherwise to the ``vlprompt.common.fetch`` log, one line per
10% (or per 256 MiB when the size is unknown), so that logs of unattended runs show it too. Imports only the standard
library (tqdm when a bar is shown).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from vlprompt.errors import DatasetError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
VERIFY_PROGRESS_FROM = 64 << 20   # files smaller than this are hashed without a progress display
USER_AGENT = "vlprompt-data-download (Python urllib)"
# An opener: ``opener(request, timeout=seconds)`` -> a context manager over a response with ``status``, ``headers``
# and ``read(n)`` (``urllib.request.urlopen`` by default).
Opener = Callable[..., Any]

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_NETWORK_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException, OSError)


class FetchError(DatasetError):
    """A URL could not deliver the file (no connection, refused, HTTP error, a web page instead of the file). A
    DatasetError, as dataset downloads report it; the checkpoint download reports it as a CheckpointError."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


class Progress:
    """Bytes done out of ``total``: a tqdm bar on a terminal, else log lines every 10% (or every 256 MiB)."""

    LOG_STEP_UNKNOWN = 256 << 20

    def __init__(self, label: str, total: int | None, *, initial: int = 0, bar: bool | None = None,
                 unit: str = "B") -> None:
        self.label, self.total, self.done, self.unit = label, total, initial, unit
        self._bar = None
        if (sys.stderr.isatty() if bar is None else bar):
            from tqdm import tqdm  # ~70 ms, only for a bar (the `data download` path is kept light)

            self._bar = tqdm(total=total, initial=initial, desc=label, unit=unit, unit_scale=unit == "B",
                             unit_divisor=1024, file=sys.stderr, leave=False)
        self._next_log = self._step(initial)

    def _step(self, done: int) -> int:
        if self.total:
            tenth = max(1, self.total // 10)
            return (done // tenth + 1) * tenth
        return (done // self.LOG_STEP_UNKNOWN + 1) * self.LOG_STEP_UNKNOWN

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.done >= self._next_log:
            self._next_log = self._step(self.done)
            log.info("%s: %s", self.label, self.describe())

    def describe(self) -> str:
        if self.unit != "B":
            return f"{self.done} of {self.total} {self.unit}" if self.total else f"{self.done} {self.unit}"
        if self.total:
            return f"{100 * self.done // self.total}% ({format_size(self.done)} of {format_size(self.total)})"
        return format_size(self.done)

    def reset(self, done: int) -> None:
        """Start counting again from ``done`` (the server resent the file from the start)."""
        if self._bar is not None:
            self._bar.reset(total=self.total)
            self._bar.update(done)
        self.done = done
        self._next_log = self._step(done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def format_size(n: int | None) -> str:
    """``"1.2 GiB"``; ``"unknown size"`` for None."""
    if n is None:
        return "unknown size"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def fetch(url: str, part: Path, *, label: str, size: int | None = None, opener: Opener | None = None,
          timeout: float = 60.0, retries: int = 3, progress: bool | None = None) -> int:
    """Download ``url`` into ``part``, resuming from the bytes it already holds; returns the file's final size.

    ``size`` (when known) only sizes the progress display; the server's length decides completeness. Raises
    :class:`FetchError` when the URL fails (after ``retries`` resumed attempts for connections cut short).
    """
    opener = opener or urllib.request.urlopen
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    bar = Progress(f"downloading {label}", size, initial=have, bar=progress)
    if have:
        log.info("%s: resuming at %s", label, format_size(have))
    attempt = 0
    try:
        while True:
            try:
                done, total = _transfer(url, part, bar, opener, timeout)
            except _Incomplete as cut:
                attempt += 1
                if attempt > retries:
                    raise FetchError(url, f"the connection ended after {format_size(cut.have)} of "
                                          f"{format_size(cut.total)} ({attempt} attempts); run the command again to "
                                          "resume from there") from None
                log.warning("%s: the connection ended after %s; resuming (attempt %d of %d)", label,
                            format_size(cut.have), attempt, retries)
                time.sleep(min(2.0 ** (attempt - 1), 10.0) * 0.1)
                continue
            if total is not None and done != total:
                raise FetchError(url, f"got {done} bytes, the server announced {total}")
            return done
    finally:
        bar.close()


class _Incomplete(Exception):
    def __init__(self, have: int, total: int | None) -> None:
        super().__init__(have, total)
        self.have, self.total = have, total


def _transfer(url: str, part: Path, bar: Progress, opener: Opener, timeout: float) -> tuple[int, int | None]:
    """One request: append the rest of the file to ``part``; ``(bytes in part, expected total or None)``."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response_cm = opener(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            total = _content_range_total(exc.headers.get("Content-Range", ""))
            if total == have:  # the part file is already complete
                return have, total
            part.unlink()      # the part file is longer than the file, or the server cannot say: start over
            bar.reset(0)
            return _transfer(url, part, bar, opener, timeout)
        raise FetchError(url, f"HTTP {exc.code} {exc.reason}") from None
    except _NETWORK_ERRORS as exc:
        raise FetchError(url, str(getattr(exc, "reason", None) or exc)) from None
    with response_cm as response:
        status = getattr(response, "status", 200)
        content_type = response.headers.get("Content-Type", "") or ""
        if content_type.lower().startswith("text/html"):
            raise FetchError(url, "the server answered with a web page instead of the file (Google Drive does this "
                                  "when it asks for a confirmation or refuses the download)")
        length = _int(response.headers.get("Content-Length"))
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if match is None or int(match.group(1)) != have:
                raise FetchError(url, "the server resumed at another position than asked; delete the .part file")
            total = _int(match.group(3))
            mode = "ab"
        else:
            if have:
                log.info("%s does not resume downloads; starting again from the beginning", url)
                bar.reset(0)
            have, total, mode = 0, length, "wb"
        if total is not None and bar.total is None:
            bar.total = total
        with open(part, mode) as handle:
            received, cut = _copy(response, handle, bar)
    done = have + received
    if (total is not None and done < total) or (total is None and cut):
        raise _Incomplete(done, total)
    return done, total


def _copy(response: Any, handle: BinaryIO, bar: Progress) -> tuple[int, bool]:
    """Copy the body into ``handle``: ``(bytes written, whether the connection broke)``."""
    received = 0
    cut = False
    while True:
        try:
            chunk = response.read(CHUNK)
        except http.client.IncompleteRead as exc:
            chunk, cut = exc.partial, True
        except _NETWORK_ERRORS:
            chunk, cut = b"", True
        if chunk:
            handle.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
        if cut or not chunk:
            break
    handle.flush()
    return received, cut


def _content_range_total(value: str) -> int | None:
    match = re.fullmatch(r"bytes \*/(\d+)", value.strip())
    return int(match.group(1)) if match else None


def _int(value: Any) -> int | None:
    return int(value) if value is not None and str(value).isdigit() else None


def file_digest(path: Path, algorithm: str, *, label: str, progress: bool | None = None,
                decompress: bool = False) -> str:
    """Hex digest of a file (of its gzip-decoded bytes with ``decompress``), with progress for large files."""
    digest = hashlib.new(algorithm)
    size = path.stat().st_size
    bar = Progress(f"verifying {label}", size, bar=progress) if size > VERIFY_PROGRESS_FROM else None
    try:
        with open(path, "rb") as raw:
            handle: BinaryIO = gzip.GzipFile(fileobj=raw) if decompress else raw  # type: ignore[assignment]
            position = 0
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
                if bar is not None:
                    bar.update(raw.tell() - position)
                    position = raw.tell()
    finally:
        if bar is not None:
            bar.close()
    return digest.hexdigest()
