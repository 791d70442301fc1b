"""Bench bookkeeping beside the run folders: claims (which worker is running a run) and error records.

Both live in ``OUT/.bench/`` (hidden, so the report never reads them, and outside the run folders, which must hold
nothing but a run):

- ``claims/<run>.lock``: a worker runs a run only while it holds this file's exclusive lock
  (:mod:`vlprompt.common.locks`: it never goes stale, and records the holder's pid for messages).
- ``errors/<run>.json``: why the last attempt of a run failed (written atomically, removed when the run finishes).

``<run>`` is the run's key (its folder relative to OUT) with ``/`` replaced by ``__``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlprompt.common import locks
from vlprompt.common.io import atomic_write_json, writing

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


def try_claim(out: Path, key: str) -> locks.FileLock | None:
    """Claim run ``key`` without waiting: the held lock, or None when another worker holds it."""
    with writing(claim_path(out, key)):  # a read-only or full --out: one clear error for the whole bench
        return locks.acquire(claim_path(out, key))


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
