"""Bench bookkeeping beside the run folders: claims (which worker is running a run) and error records.

Both live in ``OUT/.bench/`` (hidden, so the report never reads them, and outside the run folders, which must hold
nothing but a run):

- ``claims/<run>.lock``: a worker runs a run only while it holds an exclusive non-blocking ``flock`` on this file.
  The kernel drops the lock when the holder's descriptor closes, including when the process dies, so a claim can
  never go stale. The holder writes its pid into the file while it holds the claim (for messages).
- ``errors/<run>.json``: why the last attempt of a run failed (written atomically, removed when the run finishes).

``<run>`` is the run's key (its folder relative to OUT) with ``/`` replaced by ``__``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlprompt.common.io import atomic_write_json

BENCH_DIR = ".bench"
CLAIMS_DIR = "claims"
ERRORS_DIR = "errors"


def _stem(key: str) -> str:
    return key.replace("/", "__")


def claim_path(out: Path, key: str) -> Path:
    """The claim file of run ``key`` under output folder ``out``."""
    return Path(out) / BENCH_DIR / CLAIMS_DIR / f"{_stem(key)}.lock"


def error_path(out: Path, key: str) -> Path:
    """The error record of run ``key`` under output folder ``out``."""
    return Path(out) / BENCH_DIR / ERRORS_DIR / f"{_stem(key)}.json"


class Claim:
    """A held claim on one run; :meth:`release` (or leaving the ``with`` block) gives it back."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """Give the run back (idempotent)."""
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            finally:
                os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def try_claim(out: Path, key: str) -> Claim | None:
    """Claim run ``key`` without waiting: the held :class:`Claim`, or None when another worker holds it."""
    import fcntl

    path = claim_path(out, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return Claim(path, fd)


def lock_holder(path: Path) -> int | None:
    """The live process that holds lock file ``path`` (a claim or a run folder's ``run.lock``), or None.

    Read without locking (so probing never makes a real claim fail): holders write their pid into the file and empty
    it when they release; a pid whose process is gone is a holder that died, i.e. none.
    """
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    if not text.isdigit():
        return None
    pid = int(text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def held_by_other(path: Path) -> str | None:
    """Whether another open file holds lock file ``path`` now, by trying its flock (authoritative, unlike
    :func:`lock_holder`): None when free or absent, else the holder's pid as written in the file ("unknown" if none).

    Only for a run this process has claimed: the probe holds the lock for an instant, so probing a run folder that
    another process is opening could make that process find it "in use".
    """
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ErrorRecord:
    """The last failure of a run: the exception and where it happened; ``session`` names the bench invocation."""

    key: str
    session: str
    error_type: str
    message: str
    traceback: str
    time: str
    pid: int

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "session": self.session, "error_type": self.error_type, "message": self.message,
                "traceback": self.traceback, "time": self.time, "pid": self.pid}

    def summary(self) -> str:
        """``ErrorType: message`` on one line."""
        text = " ".join(self.message.split())
        return f"{self.error_type}: {text}" if text else self.error_type


def write_error(out: Path, record: ErrorRecord) -> Path:
    """Write ``record`` atomically; returns its path."""
    return atomic_write_json(error_path(out, record.key), record.to_dict())


def read_error(out: Path, key: str) -> ErrorRecord | None:
    """The error record of run ``key``, or None (none, or unreadable: then the run is simply tried again)."""
    path = error_path(out, key)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ErrorRecord(key=str(data["key"]), session=str(data["session"]), error_type=str(data["error_type"]),
                           message=str(data["message"]), traceback=str(data.get("traceback", "")),
                           time=str(data.get("time", "")), pid=int(data.get("pid", 0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear_error(out: Path, key: str) -> None:
    """Remove run ``key``'s error record if there is one."""
    error_path(out, key).unlink(missing_ok=True)
