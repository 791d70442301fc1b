"""On-disk cache of frozen image-tower features, shared by runs, methods, seeds and processes.

Storage is one SQLite database (stdlib :mod:`sqlite3`, WAL journal) under the cache root:

* ``features(key TEXT PRIMARY KEY, dim INTEGER, crc INTEGER, data BLOB)``: one row per (image, view); ``data`` holds
  ``dim`` little-endian float32 values and ``crc`` their CRC-32. A row whose byte length, dimension or checksum does not
  match is *corrupt*: :meth:`FeatureCache.get_many` treats it as missing (it is recomputed and overwritten), so an
  invalid entry is never served.
* ``file_hashes(path TEXT PRIMARY KEY, size, mtime_ns, ctime_ns, ino, digest, hashed_at_ns)``: SHA-256 of image files,
  reused while the file's stat is unchanged so unchanged files are not read again to be hashed.

A feature's key (:class:`FeatureKeyer`) is the SHA-256 of the backbone's fingerprint (architecture and every weight),
the precision, the device kind, the transform's description, the view (``"eval"``, or seed + view index + image path
for augmented views) and the SHA-256 of the image file's bytes. A changed image, model, transform or view therefore
gives a new key; nothing is ever invalidated in place.

Concurrency: several processes (ranks of one job, or separate runs) may read and write the same cache at once; SQLite
serialises writers, and each connection waits up to ``timeout`` seconds for a lock. A :class:`FeatureCache` object
opens one connection per process, lazily, and may be pickled to workers.

Clusters: WAL's shared memory and SQLite's locks do not work across nodes on a network file system (NFS, Lustre,
GPFS, CIFS, ...), so a read-write cache must not be shared by processes of *several nodes* there. Opening one
read-write on such a file system logs a warning (:func:`network_filesystem` reads ``/proc/mounts``). Safe schemes
(docs/cluster.md): a per-node cache on local scratch (``VLPROMPT_CACHE=$TMPDIR/vlprompt``), or one extraction job
that fills a shared cache, then jobs that open it *read-only* (``FeatureCache(root, read_only=True)``,
``--cache-read-only``): SQLite opens the file ``immutable`` (no locks, no WAL files, nothing written), rows it lacks are
computed and used but not stored, and unchanged image hashes are not remembered. A read-only cache must not be
written by anyone while it is open.

This module does not import torch: vectors go in and come out as float32 numpy arrays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlprompt.common import locks
from vlprompt.common.paths import cache_dir
from vlprompt.errors import VlpromptError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DB_NAME = "features.sqlite"
KEY_FORMAT = "vlprompt-features/1"
# A stored file hash is trusted only if the file's last change was this long before it was hashed: file systems with
# coarse timestamps could otherwise hide a same-size rewrite within the same tick ("racily clean" files, as in git).
RACY_MARGIN_NS = 2_000_000_000
_SQL_CHUNK = 500  # keys per "IN (...)" query, well under SQLite's variable limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS features (key TEXT PRIMARY KEY, dim INTEGER NOT NULL, crc INTEGER NOT NULL,
                                     data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS file_hashes (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
                                        ctime_ns INTEGER NOT NULL, ino INTEGER NOT NULL, digest TEXT NOT NULL,
                                        hashed_at_ns INTEGER NOT NULL);
"""


NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "ceph", "beegfs", "panfs", "afs", "9p",
    "fuse.glusterfs", "fuse.sshfs", "fuse.cephfs", "fuse.beegfs", "fuse.gcsfuse", "fuse.s3fs",
})
"""File system types (``/proc/mounts``, third column) on which SQLite's WAL must not be shared across nodes."""


def _read_mounts() -> str:
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def network_filesystem(path: str | os.PathLike[str], mounts: str | None = None) -> str | None:
    """The network file system type ``path`` lies on (``"nfs4"``, ``"lustre"`` ...), or None (local, or unknown).

    ``mounts`` is the text of a mounts table (``/proc/mounts`` format: device, mount point, type, ...; default: this
    machine's); the mount point that is the longest prefix of the resolved path decides.
    """
    target = Path(os.path.realpath(Path(path).expanduser()))
    best, kind = -1, ""
    for line in (mounts if mounts is not None else _read_mounts()).splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = Path(fields[1].replace("\\040", " "))
        if (target == point or point in target.parents) and len(point.parts) > best:
            best, kind = len(point.parts), fields[2]
    return kind if kind in NETWORK_FILESYSTEMS else None


class FeatureCacheError(VlpromptError):
    """The feature cache database cannot be opened, is not a vlprompt feature cache, or has another format version."""


def default_cache_root() -> Path:
    """``$VLPROMPT_CACHE/features`` if that variable is set, else ``<user cache dir>/vlprompt/features``."""
    return cache_dir("features")


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@dataclass(frozen=True)
class FeatureKeyer:
    """Builds cache keys: the constant part (model, precision, device kind, transform) is hashed once.

    ``model`` is the backbone's :meth:`~vlprompt.backbone.model.CLIP.fingerprint`, ``transform`` the transform's
    ``describe()``; ``device_kind`` is ``"cpu"`` or ``"cuda"`` (kernels differ in their last bits).
    """

    model: str
    precision: str
    device_kind: str
    transform: str

    def _base(self) -> Any:
        head = json.dumps([KEY_FORMAT, self.model, self.precision, self.device_kind, self.transform])
        return hashlib.sha256(head.encode())

    def eval_key(self, digest: str) -> str:
        """Key of the evaluation (deterministic) feature of the image whose content hash is ``digest``."""
        h = self._base()
        h.update(json.dumps(["eval", digest]).encode())
        return h.hexdigest()

    def view_key(self, digest: str, *, seed: int, view: int, path: str) -> str:
        """Key of augmented view ``view`` (drawn with ``seed`` and the item ``path``) of the image ``digest``."""
        h = self._base()
        h.update(json.dumps(["view", int(seed), int(view), path, digest]).encode())
        return h.hexdigest()


@dataclass(frozen=True)
class CacheStats:
    """Size of the cache and what this :class:`FeatureCache` object served since it was created."""

    path: Path
    rows: int            # stored feature rows
    payload_bytes: int   # bytes of feature data
    file_bytes: int      # database file size on disk (with its WAL)
    hashed_files: int    # files whose content hash is remembered
    hits: int            # rows served by this object
    misses: int          # keys asked for and not found (or corrupt)
    corrupt: int         # rows found but rejected (wrong length, dimension or checksum)


class FeatureCache:
    """SQLite-backed feature cache; see the module docstring for the format and guarantees."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, timeout: float = 120.0,
                 read_only: bool = False) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_root()
        self.timeout = timeout
        self.read_only = bool(read_only)
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self.unstored = 0  # rows a read-only cache was given and did not store
        self._conn: sqlite3.Connection | None = None
        self._pid = -1

    @property
    def path(self) -> Path:
        """The database file."""
        return self.root / DB_NAME

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.root)!r}{', read_only=True' if self.read_only else ''})"

    # -- connection ---------------------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_conn"] = None
        state["_pid"] = -1
        return state

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        if self.read_only:
            conn = self._open_read_only()
            self._conn, self._pid = conn, os.getpid()
            return conn
        kind = network_filesystem(self.root)
        if kind is not None:
            logger.warning(
                "the feature cache %s is on a network file system (%s): SQLite's WAL mode is not safe there when "
                "processes on several nodes write to it. Give each node its own cache on local scratch "
                "(VLPROMPT_CACHE=$TMPDIR/vlprompt), or fill it with one job and open it read-only in the others "
                "(--cache-read-only); see docs/cluster.md", self.root, kind)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # Opening sets the journal mode and creates the schema; SQLite answers "database is locked" at once
            # (without waiting out the busy timeout) when two processes do that together, as the ranks of a
            # distributed job do, so the set-up is serialised by a lock file beside the database.
            with locks.acquire(f"{self.path}.lock", timeout=self.timeout, on_wait=self._say_waiting):
                conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, SCHEMA_VERSION):
                    conn.close()
                    raise FeatureCacheError(
                        f"the feature cache {self.path} has format version {version}, this vlprompt reads version "
                        f"{SCHEMA_VERSION}: delete {self.root} or point VLPROMPT_CACHE at another folder"
                    )
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(_SCHEMA)
                if version == 0:
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except locks.LockTimeout as exc:
            raise FeatureCacheError(
                f"the feature cache {self.path} stayed locked for {self.timeout:.0f} s by another process (pid "
                f"{exc.holder}); retry, run without the cache (--no-cache), or point VLPROMPT_CACHE at another folder"
            ) from None
        except (sqlite3.Error, OSError) as exc:
            raise FeatureCacheError(
                f"cannot use the feature cache {self.path}: {exc}. Check that the folder is writable and on a local "
                f"file system; if the file is damaged, delete {self.root} (it only holds recomputable features)"
            ) from None
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _say_waiting(self, holder: str | None = None, activity: str = "is setting up") -> None:
        """Say that (and for how long at most) this process waits for another one using the cache."""
        who = f"process {holder}" if holder else "another process"
        logger.warning("waiting up to %g s for the feature cache %s, which %s %s (--no-cache skips the cache)",
                       self.timeout, self.path, who, activity)

    def _open_read_only(self) -> sqlite3.Connection:
        """The database opened ``mode=ro&immutable=1``: no locks, no WAL or shared-memory files, no writes."""
        if not self.path.is_file():
            raise FeatureCacheError(f"the read-only feature cache {self.path} does not exist: fill it first with a "
                                    "job that opens it read-write, or drop --cache-read-only")
        try:
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro&immutable=1", uri=True,
                                   timeout=self.timeout, isolation_level=None)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise FeatureCacheError(f"cannot read the feature cache {self.path}: {exc}") from None
        if version != SCHEMA_VERSION:
            conn.close()
            raise FeatureCacheError(f"the feature cache {self.path} has format version {version}, this vlprompt reads "
                                    f"version {SCHEMA_VERSION}")
        return conn

    def close(self) -> None:
        """Close this process's connection (it reopens on next use)."""
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _begin(self, conn: sqlite3.Connection) -> None:
        """Start a write transaction; when another process is writing, say so before waiting for it."""
        conn.execute("PRAGMA busy_timeout=0")
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
        finally:
            conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        self._say_waiting(activity="is writing to")
        conn.execute("BEGIN IMMEDIATE")

    def _write(self, sql: str, rows: Sequence[tuple]) -> None:
        if not rows or self.read_only:
            return
        conn = self._connection()
        try:
            self._begin(conn)
            try:
                conn.executemany(sql, rows)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            hint = (f" (another process held it for {self.timeout:g} s); retry, or run without the cache (--no-cache)"
                    if "locked" in str(exc) else "")
            raise FeatureCacheError(f"cannot write to the feature cache {self.path}: {exc}{hint}") from None

    def _select(self, sql: str, keys: Sequence[str]) -> list[tuple]:
        conn = self._connection()
        rows: list[tuple] = []
        try:
            for start in range(0, len(keys), _SQL_CHUNK):
                chunk = keys[start:start + _SQL_CHUNK]
                rows += conn.execute(sql.format(",".join("?" * len(chunk))), chunk).fetchall()
        except sqlite3.Error as exc:
            raise FeatureCacheError(f"cannot read the feature cache {self.path}: {exc}") from None
        return rows

    # -- features -----------------------------------------------------------------------------------------------------
    def get_many(self, keys: Sequence[str], dim: int | None = None) -> dict[str, np.ndarray]:
        """The stored rows among ``keys`` as float32 vectors; missing and corrupt rows are left out.

        With ``dim`` given, a row of another dimension is corrupt too.
        """
        unique = list(dict.fromkeys(keys))
        found: dict[str, np.ndarray] = {}
        for key, row_dim, crc, data in self._select("SELECT key, dim, crc, data FROM features WHERE key IN ({})",
                                                    unique):
            data = bytes(data)
            if ((dim is not None and row_dim != dim) or len(data) != 4 * row_dim or row_dim <= 0
                    or zlib.crc32(data) != crc):
                self.corrupt += 1
                continue
            found[key] = np.frombuffer(data, dtype="<f4")
        self.hits += len(found)
        self.misses += len(unique) - len(found)
        return found

    def put_many(self, items: Iterable[tuple[str, Any]]) -> int:
        """Store ``(key, vector)`` pairs (anything :func:`numpy.asarray` turns into 1-D float32) in one transaction.

        Existing rows with the same keys are replaced. Returns the number of rows written (0 for a read-only cache,
        which counts them in :attr:`unstored`).
        """
        rows = []
        for key, vector in items:
            array = np.ascontiguousarray(np.asarray(vector, dtype="<f4"))
            if array.ndim != 1 or array.size == 0:
                raise ValueError(f"a cached feature must be a non-empty 1-D vector, got shape {array.shape}")
            data = array.tobytes()
            rows.append((key, array.size, zlib.crc32(data), data))
        if self.read_only:
            if rows and not self.unstored:
                logger.info("read-only feature cache %s: new rows are used but not stored", self.root)
            self.unstored += len(rows)
            return 0
        self._write("INSERT OR REPLACE INTO features (key, dim, crc, data) VALUES (?, ?, ?, ?)", rows)
        return len(rows)

    # -- content hashes -----------------------------------------------------------------------------------------------
    def file_digests(self, paths: Sequence[str | os.PathLike[str]], *, max_workers: int = 4
                     ) -> tuple[list[str | None], dict[int, str]]:
        """SHA-256 of each file's bytes, reusing remembered hashes of files whose stat is unchanged.

        Returns ``(digests, errors)``: ``digests[i]`` is None where file ``i`` cannot be read, and ``errors[i]`` says
        why. New hashes are computed on a thread pool (hashlib releases the GIL) and remembered.
        """
        names = [os.path.abspath(p) for p in paths]
        digests: list[str | None] = [None] * len(names)
        errors: dict[int, str] = {}
        stats: dict[int, os.stat_result] = {}
        for i, name in enumerate(names):
            try:
                stats[i] = os.stat(name)
            except OSError as exc:
                errors[i] = exc.strerror or str(exc)
        known = {row[0]: row[1:] for row in self._select(
            "SELECT path, size, mtime_ns, ctime_ns, ino, digest, hashed_at_ns FROM file_hashes WHERE path IN ({})",
            list(dict.fromkeys(names[i] for i in stats)))}
        todo = []
        for i, st in stats.items():
            row = known.get(names[i])
            if row is not None and row[:4] == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) \
                    and row[5] - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_MARGIN_NS:
                digests[i] = row[4]
            else:
                todo.append(i)
        if not todo:
            return digests, errors

        def hash_one(i: int) -> tuple[int, str | None, str | None, int]:
            started = time.time_ns()
            try:
                return i, file_digest(names[i]), None, started
            except OSError as exc:
                return i, None, exc.strerror or str(exc), started

        workers = max(1, min(max_workers, len(todo)))
        if workers == 1:
            results = [hash_one(i) for i in todo]
        else:
            with ThreadPoolExecutor(workers) as pool:
                results = list(pool.map(hash_one, todo))
        remember = []
        for i, digest, error, started in results:
            if digest is None:
                errors[i] = error or "unreadable"
                continue
            digests[i] = digest
            st = stats[i]
            remember.append((names[i], st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest, started))
        self._write("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?, ?, ?, ?)", remember)
        return digests, errors

    # -- maintenance --------------------------------------------------------------------------------------------------
    def stats(self) -> CacheStats:
        """Row counts and sizes of the cache, plus this object's hit / miss / corrupt counters."""
        conn = self._connection()
        try:
            rows, payload = conn.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM features").fetchone()
            hashed = conn.execute("SELECT COUNT(*) FROM file_hashes").fetchone()[0]
        except sqlite3.Error as exc:
            raise FeatureCacheError(f"cannot read the feature cache {self.path}: {exc}") from None
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return CacheStats(self.path, rows, payload, size, hashed, self.hits, self.misses, self.corrupt)

    def clear(self) -> int:
        """Delete every stored feature and file hash, then compact the file. Returns the number of features deleted."""
        if self.read_only:
            raise FeatureCacheError(f"the feature cache {self.path} is open read-only: it cannot be cleared")
        conn = self._connection()
        try:
            self._begin(conn)
            deleted = conn.execute("DELETE FROM features").rowcount
            conn.execute("DELETE FROM file_hashes")
            conn.execute("COMMIT")
            conn.execute("VACUUM")
        except sqlite3.Error as exc:
            raise FeatureCacheError(f"cannot clear the feature cache {self.path}: {exc}") from None
        return int(deleted)
