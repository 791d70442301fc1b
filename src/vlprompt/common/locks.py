"""File locks: exclusive, shared and probe operations on one lock file, used by every part that needs a lock.

A lock is a POSIX ``flock`` on an open descriptor of a small file. The kernel drops it when the descriptor closes,
including when the process dies, so a lock never goes stale. An exclusive holder writes its pid into the file while it
holds the lock and empties it on release, so messages can name the holder and a bench status can tell which process
works where without touching the lock (:func:`recorded_holder`).

- :func:`acquire` takes the lock, exclusive or shared, without waiting (``timeout=0``: None when it is held) or
  polling up to ``timeout`` seconds (:class:`LockTimeout` when it stays held); ``on_wait`` is told once when the
  wait begins, so a caller can say what it waits for.
- :func:`probe` tells whether another open file holds the lock now, by trying it for an instant (authoritative).
- :func:`recorded_holder` reads the pid an exclusive holder wrote, checking that the process still lives
  (never locks, so it cannot make a real acquisition fail).

Where ``fcntl`` does not exist (Windows) nothing is locked and :func:`acquire` warns once per path.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

POLL_SECONDS = 0.05
"""How often a waiting :func:`acquire` retries."""


class LockTimeout(TimeoutError):
    """:func:`acquire` waited ``timeout`` seconds and the lock stayed held; ``holder`` is the recorded pid or
    "unknown"."""

    def __init__(self, path: Path, timeout: float, holder: str) -> None:
        super().__init__(f"{path} stayed locked for {timeout:.0f} s (holder: pid {holder})")
        self.path = path
        self.timeout = timeout
        self.holder = holder


class FileLock:
    """A held lock; :meth:`release` (or leaving the ``with`` block) gives it back. Idempotent."""

    def __init__(self, path: Path, fd: int, shared: bool) -> None:
        self.path = path
        self.shared = shared
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if not self.shared:
                os.ftruncate(self._fd, 0)
        except OSError:  # a read-only lock file: nothing was written
            pass
        finally:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"FileLock({str(self.path)!r}, shared={self.shared}, held={self.held})"


def acquire(path: str | os.PathLike[str], *, shared: bool = False, timeout: float = 0.0, create: bool = True,
            on_wait: Callable[[str], None] | None = None) -> FileLock | None:
    """Lock ``path``: the held :class:`FileLock`, or None when ``timeout`` is 0 and another process holds it.

    ``shared`` locks may be held by many processes at once, never beside an exclusive one. With ``timeout > 0`` the
    call polls and raises :class:`LockTimeout` when the lock stays held that long (``on_wait(holder)`` is called
    once, when the first attempt fails). ``create=False`` opens an existing file only (FileNotFoundError otherwise)
    and, for a shared lock, read-only, so a reader needs no write permission. An exclusive holder writes its pid.
    """
    target = Path(path)
    if create:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
    else:
        fd = os.open(target, os.O_RDONLY if shared else os.O_RDWR)
    if fcntl is None:  # pragma: no cover - not POSIX
        logger.warning("file locking is unavailable on this platform: %s is not protected", target)
        return FileLock(target, fd, shared)
    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
    deadline = time.monotonic() + timeout
    told = False
    while True:
        try:
            fcntl.flock(fd, mode)
            break
        except OSError:
            holder = _written_pid(fd)
            if time.monotonic() >= deadline:
                os.close(fd)
                if timeout <= 0:
                    return None
                raise LockTimeout(target, timeout, holder) from None
            if on_wait is not None and not told:
                on_wait(holder)
                told = True
            time.sleep(POLL_SECONDS)
    if not shared:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return FileLock(target, fd, shared)


def probe(path: str | os.PathLike[str]) -> str | None:
    """Whether another open file holds ``path``'s lock now: None when free or absent, else the holder's recorded pid
    ("unknown" for a shared holder, which records none).

    The probe holds the lock for an instant: a process trying to acquire it without waiting at that very moment
    fails. Use it only where that cannot happen (a lock this process manages), else :func:`recorded_holder`.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if fcntl is None:  # pragma: no cover - not POSIX
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return _written_pid(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def recorded_holder(path: str | os.PathLike[str]) -> int | None:
    """The live process whose pid an exclusive holder wrote into ``path``, or None (free, never held, or its holder
    died). Never locks."""
    try:
        text = Path(path).read_text(encoding="ascii", errors="replace").strip()
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


def _written_pid(fd: int) -> str:
    return os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
