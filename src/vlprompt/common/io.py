"""Writing files: atomically (a reader never sees a half-written file, a crash never leaves one behind), with the
permissions the user's umask asks for, as JSON that is always valid, and as safetensors files that are identical
byte for byte when their content is.

A write that the file system refuses (read-only folder, permission denied, disk full, quota exceeded) raises
:class:`~vlprompt.errors.OutputError` saying what could not be written where; since every write goes to a temporary
file first, the file it would have replaced, and everything written before, is unchanged.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from vlprompt.errors import OutputError, VlpromptError

if TYPE_CHECKING:
    import torch

# what the file system answers when it cannot store a file (other OSErrors, e.g. a network error raised by a writer
# callback, are not about the output and pass through unchanged)
_WRITE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def write_failure(path: str | os.PathLike[str], exc: OSError) -> OutputError:
    """The :class:`OutputError` for ``exc``, raised while writing ``path``: what, where, why, and how to fix it."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free some space (or raise the quota) there, or write somewhere else"
    else:
        fix = "make that folder writable, or write somewhere else"
    error = OutputError(f"cannot write {os.fspath(path)}: {reason}. Nothing already finished was lost (every file is "
                        f"written to a temporary file first, so earlier results and checkpoints are unchanged); {fix} "
                        "(for a run folder: --out, or copy the run to a writable place) and run the command again")
    error.errno = exc.errno
    return error


@contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a refused write inside the block (read-only, permission, disk full) into :func:`write_failure`."""
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        raise write_failure(path, exc) from None


def read_text(path: str | os.PathLike[str], what: str, error: type[VlpromptError]) -> str:
    """The UTF-8 text of the user's file ``path`` (``what`` names it in messages). A file that is not UTF-8 or cannot
    be read raises ``error``; FileNotFoundError is left to the caller, whose message knows where the file comes from."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except UnicodeDecodeError as exc:
        raise error(f"{what} {os.fspath(path)} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at position "
                    f"{exc.start}); save it with the UTF-8 encoding") from None
    except OSError as exc:
        raise error(f"cannot read {what} {os.fspath(path)}: {exc.strerror or exc}") from None


def current_umask() -> int:
    """The process's umask (read from /proc where possible; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    The rename is atomic on POSIX and Windows (same folder, same file system). On any error the temporary file is
    removed and ``path`` is left as it was. The file gets the permissions a newly created file has under the umask
    (a temporary file is created private, and its mode would otherwise survive the rename).
    """
    target = Path(path)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                if hasattr(os, "fchmod"):
                    os.fchmod(handle.fileno(), 0o666 & ~current_umask())
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            raise
    return target


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode(encoding))


def json_text(obj: Any, indent: int | None = 2) -> str:
    """``obj`` as JSON text (UTF-8 characters kept, keys in insertion order), always valid JSON: NaN and infinite
    floats, which JSON cannot express, become ``null``. Every JSON file and ``--json`` output goes through here."""
    return json.dumps(_finite(obj), indent=indent, ensure_ascii=False, allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(value) for value in obj]
    return obj


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> Path:
    """Serialise ``obj`` with :func:`json_text` (plus a trailing newline) and write it atomically."""
    return atomic_write_text(path, json_text(obj, indent=indent) + "\n")


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors file of ``tensors`` with ``metadata``, its header in a fixed order (metadata keys sorted).

    ``safetensors`` writes the metadata in hash order, which differs from one process to the next, so two identical
    runs would give files with different bytes (and checksums); this rewrites the header canonically.
    """
    from safetensors.torch import save

    blob = save(dict(tensors), metadata=dict(metadata) if metadata else None)
    length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + length])
    ordered: dict[str, Any] = {}
    if "__metadata__" in header:
        ordered["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    ordered.update(sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as safetensors pads it
    return len(text).to_bytes(8, "little") + text + blob[8 + length:]
