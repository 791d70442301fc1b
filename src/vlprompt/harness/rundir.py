"""Run folders: one locked folder per run holding its configuration, checkpoints, log and results.

Layout of a run folder::

    run.lock            fcntl lock held while a process works in the folder (holds that process's pid)
    config.json         the effective configuration, written when the run is created
    log.txt             the log of every process that worked here (appended)
    params.safetensors  the learned parameters (method.state_dict()) after the last finished epoch
    optim.safetensors   optimiser tensors (momentum buffers) of that epoch
    state.json          epoch done, optimiser/scaler state, history, checksums of the two tensor files: the commit
                        marker (tensor files are written as *.next first and renamed once state.json is written)
    results.json        metrics once evaluated: a finished run (``eval-<dataset>.json`` for other test sets)
    tensorboard/        optional TensorBoard scalars
    previous/           an earlier run set aside by ``overwrite``, deleted once the new run writes results.json

Rules (:meth:`RunDir.create_or_open`): a folder in use is refused; a different configuration is refused, listing the
differing keys; a finished run is only replaced with ``overwrite``, and then kept in ``previous/`` until the new run
finishes (a crash never loses finished work); an unfinished run continues only with ``resume``. Every file is written
atomically (:mod:`vlprompt.common.io`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from vlprompt.errors import CheckpointError, ConfigError, RunError
from vlprompt.common.io import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    import torch

    from vlprompt.training.config import RunConfig

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"
LOG_FILE = "log.txt"
PARAMS_FILE = "params.safetensors"
OPTIM_FILE = "optim.safetensors"
STATE_FILE = "state.json"
RESULTS_FILE = "results.json"
TENSORBOARD_DIR = "tensorboard"
PREVIOUS_DIR = "previous"
_REPLACING_DIR = ".replacing"  # a set-aside in progress: its content plus what is still outside is the old run
_BOOKKEEPING = frozenset({LOCK_FILE, PREVIOUS_DIR, _REPLACING_DIR})
_PENDING = ".next"  # suffix of checkpoint files written but not yet committed by state.json
_RESULT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RESULT_SCHEMA = 1

RunStatus = Literal["absent", "partial", "finished"]


def run_status(path: str | os.PathLike[str]) -> RunStatus:
    """``absent`` (no run yet), ``partial`` (configured, not evaluated) or ``finished`` (results.json present)."""
    folder = Path(path)
    if (folder / RESULTS_FILE).is_file():
        return "finished"
    if (folder / CONFIG_FILE).is_file():
        return "partial"
    return "absent"


@dataclass
class Checkpoint:
    """What :meth:`RunDir.save_checkpoint` wrote: learned parameters, optimiser tensors and the JSON state."""

    params: dict[str, torch.Tensor]
    optim: dict[str, torch.Tensor]
    state: dict[str, Any]


class RunDir:
    """An open, locked run folder. Use :meth:`create_or_open`; close it (or use ``with``) to release the lock."""

    def __init__(self, path: Path, lock_fd: int, config: dict[str, Any], resumed: bool) -> None:
        self.path = path
        self.config = config
        self.resumed = resumed
        self._lock_fd: int | None = lock_fd
        self._log_handler: logging.Handler | None = None

    # ------------------------------------------------------------------------------------------------- opening
    @classmethod
    def create_or_open(cls, path: str | os.PathLike[str], config: Mapping[str, Any], *, resume: bool = False,
                       overwrite: bool = False, ignore_keys: Collection[str] = ()) -> RunDir:
        """Lock ``path`` and start a new run there, or continue the unfinished run with the same configuration.

        ``config`` is the effective configuration (JSON-ready); ``ignore_keys`` are dotted keys (``train.device``)
        allowed to differ from the saved one (the saved file is then updated). ``resume`` continues an unfinished
        run (a missing one is started); ``overwrite`` replaces any run, keeping the old one in ``previous/`` until
        the new one finishes. Raises RunError for a folder in use, a different configuration, a finished run
        without ``overwrite``, an unfinished run without ``resume``.
        """
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other: resume continues the run, overwrite "
                              "starts it again")
        folder = Path(path)
        wanted = _normalise(config)
        _refuse_foreign_folder(folder)
        folder.mkdir(parents=True, exist_ok=True)
        fd = _acquire_lock(folder)
        try:
            _finish_interrupted_set_aside(folder)
            saved = _read_config(folder, allow_corrupt=overwrite)
            resumed = False
            write_config = saved != wanted
            if saved is not None and overwrite:
                write_config = True
                _set_aside(folder)
            elif saved is not None:
                _check_same_config(folder, saved, wanted, ignore_keys)
                status = run_status(folder)
                if status == "finished":
                    raise RunError(f"run folder {folder} holds a finished run (results.json); choose a new --out, or "
                                   f"pass --overwrite to train it again (the old run is kept in {PREVIOUS_DIR}/ "
                                   "until the new one finishes)")
                if not resume:
                    raise RunError(f"run folder {folder} holds an unfinished run with this configuration; pass "
                                   "--resume to continue it, or --overwrite to start it again")
                resumed = True
            elif resume:
                logger.info("nothing to resume in %s: starting a new run", folder)
            if write_config:
                atomic_write_json(folder / CONFIG_FILE, wanted)
        except BaseException:
            _release_lock(fd)
            raise
        if (folder / PREVIOUS_DIR).exists():
            logger.warning("an earlier run is kept in %s until this run writes results.json",
                           folder / PREVIOUS_DIR)
        return cls(folder, fd, wanted, resumed)

    def close(self) -> None:
        """Release the lock and close the log file. Idempotent."""
        if self._log_handler is not None:
            self._log_handler.close()
            self._log_handler = None
        if self._lock_fd is not None:
            _release_lock(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, resumed={self.resumed})"

    @property
    def status(self) -> RunStatus:
        return run_status(self.path)

    # ---------------------------------------------------------------------------------------------- checkpoints
    def has_checkpoint(self) -> bool:
        return (self.path / STATE_FILE).is_file()

    def save_checkpoint(self, params: Mapping[str, torch.Tensor], optim: Mapping[str, torch.Tensor],
                        state: Mapping[str, Any]) -> None:
        """Write a checkpoint so that a crash at any point leaves a complete one (this or the previous).

        The tensor files are first written as ``*.next``; then ``state.json`` (with their SHA-256) commits them;
        then they are renamed into place. :meth:`load_checkpoint` finishes the renames after a crash. Every write is
        atomic.
        """
        from safetensors.torch import save

        epoch = str(state.get("epoch", ""))
        blobs = {OPTIM_FILE: save(_cpu_tensors(optim), metadata={"epoch": epoch}),
                 PARAMS_FILE: save(_cpu_tensors(params), metadata={"epoch": epoch})}
        for name, blob in blobs.items():
            atomic_write_bytes(self.path / (name + _PENDING), blob)
        checksums = {name: hashlib.sha256(blob).hexdigest() for name, blob in blobs.items()}
        atomic_write_json(self.path / STATE_FILE, {**state, "files": checksums})  # the commit point
        for name in blobs:
            os.replace(self.path / (name + _PENDING), self.path / name)

    def load_checkpoint(self) -> Checkpoint | None:
        """The last committed checkpoint, or None when there is none. CheckpointError when it is damaged."""
        from safetensors.torch import load

        state_path = self.path / STATE_FILE
        if not state_path.is_file():
            return None
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
            checksums = state.pop("files")
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise CheckpointError(f"{state_path} is unreadable ({exc}); start the run again with --overwrite") from exc
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for name in (PARAMS_FILE, OPTIM_FILE):
            expected = checksums.get(name)
            pending = self.path / (name + _PENDING)
            if pending.is_file() and _sha256(pending) == expected:
                os.replace(pending, self.path / name)  # committed but not yet renamed when the run stopped
            try:
                blob = (self.path / name).read_bytes()
            except OSError as exc:
                raise CheckpointError(f"checkpoint file {self.path / name} is missing ({exc}); start the run again "
                                      "with --overwrite") from exc
            if hashlib.sha256(blob).hexdigest() != expected:
                raise CheckpointError(f"checkpoint file {self.path / name} does not match state.json (epoch "
                                      f"{state.get('epoch')}): it was modified or damaged. Start the run again "
                                      "with --overwrite")
            tensors[name] = load(blob)
        return Checkpoint(params=tensors[PARAMS_FILE], optim=tensors[OPTIM_FILE], state=state)

    # -------------------------------------------------------------------------------------------------- results
    def write_result(self, name: str, payload: Mapping[str, Any]) -> Path:
        """Write ``<name>.json`` atomically. Writing ``results`` marks the run finished and drops ``previous/``."""
        stem = name[:-5] if name.endswith(".json") else name
        if not _RESULT_NAME.match(stem) or stem in ("config", "state"):
            raise ConfigError(f"invalid result name {name!r}: use letters, digits, '_', '-', '.' (not config/state)")
        target = atomic_write_json(self.path / f"{stem}.json", _normalise(payload))
        if stem + ".json" == RESULTS_FILE and (self.path / PREVIOUS_DIR).exists():
            shutil.rmtree(self.path / PREVIOUS_DIR)
            logger.info("run finished: removed the earlier run kept in %s", self.path / PREVIOUS_DIR)
        return target

    def read_result(self, name: str) -> dict[str, Any] | None:
        """The content of ``<name>.json``, or None when it does not exist."""
        target = self.path / (name if name.endswith(".json") else f"{name}.json")
        if not target.is_file():
            return None
        return json.loads(target.read_text(encoding="utf-8"))

    # -------------------------------------------------------------------------------------------------- logging
    def log_handler(self) -> logging.Handler:
        """A logging handler appending to ``log.txt`` (one per RunDir, closed by :meth:`close`)."""
        if self._log_handler is None:
            handler = logging.FileHandler(self.path / LOG_FILE, mode="a", encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            self._log_handler = handler
        return self._log_handler

    @contextmanager
    def capture_logs(self, logger_name: str = "vlprompt", level: int = logging.INFO) -> Iterator[None]:
        """Send ``logger_name``'s records of ``level`` and above to ``log.txt`` inside the block (nesting is fine)."""
        target = logging.getLogger(logger_name)
        handler = self.log_handler()
        added = handler not in target.handlers
        old_level = target.level
        if added:
            target.addHandler(handler)
        if target.getEffectiveLevel() > level:
            target.setLevel(level)
        try:
            yield
        finally:
            if added:
                target.removeHandler(handler)
            target.setLevel(old_level)
            handler.flush()

    def tensorboard(self) -> Any:
        """A ``torch.utils.tensorboard.SummaryWriter`` writing into ``tensorboard/`` (caller closes it)."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError("TensorBoard logging needs the tensorboard package: pip install 'vlprompt[tensorboard]' "
                              f"or leave out --tensorboard ({exc})") from exc
        return SummaryWriter(log_dir=str(self.path / TENSORBOARD_DIR))


def load_params(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The learned parameters saved in run folder ``path`` (its last finished epoch), checked against state.json.

    Read-only (no lock needed): use it to evaluate or predict with a trained run.
    """
    from safetensors.torch import load

    folder = Path(path)
    try:
        checksums = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{folder} holds no trained parameters (no {STATE_FILE}); train the run first") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder / STATE_FILE} is unreadable ({exc})") from exc
    for candidate in (folder / (PARAMS_FILE + _PENDING), folder / PARAMS_FILE):
        if candidate.is_file():
            blob = candidate.read_bytes()
            if hashlib.sha256(blob).hexdigest() == checksums.get(PARAMS_FILE):
                return load(blob)
    raise CheckpointError(f"{folder / PARAMS_FILE} is missing or does not match {STATE_FILE}; train the run again")


# ------------------------------------------------------------------------------------------------------ result JSON


def software_versions() -> dict[str, str]:
    """Versions recorded with results: vlprompt, torch, python (and CUDA when torch has it)."""
    import torch

    from vlprompt import __version__

    versions = {"vlprompt": __version__, "torch": torch.__version__, "python": sys.version.split()[0]}
    if torch.version.cuda:
        versions["cuda"] = str(torch.version.cuda)
    return versions


def result_payload(config: RunConfig, metrics: Mapping[str, Any], *, eval_dataset: str | None = None,
                   subset: str | None = None, timing: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The result JSON of docs/architecture.md "Results" for ``config`` and ``metrics`` (from ``evaluate``)."""
    payload: dict[str, Any] = {
        "schema": RESULT_SCHEMA,
        "method": config.method,
        "dataset": config.dataset,
        "eval_dataset": eval_dataset or config.dataset,
        "subset": subset or config.subset,
        "shots": config.shots,
        "seed": config.seed,
        "model": config.model,
        "budget": config.budget,
    }
    if config.protocol is not None:
        payload["protocol"] = config.protocol
    payload.update({"metrics": dict(metrics), "config": config.to_dict(), "versions": software_versions(),
                    "timing": {key: float(value) for key, value in (timing or {}).items()}})
    return payload


# ---------------------------------------------------------------------------------------------------------- helpers


def _normalise(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` through JSON (tuples -> lists), so saved and fresh configurations compare equal."""
    try:
        return json.loads(json.dumps(dict(data), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"configuration is not JSON-serialisable: {exc}") from exc


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in tensors.items()}


def _refuse_foreign_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise RunError(f"run folder {folder} is a file; choose a folder path with --out")
    if folder.is_dir() and not (folder / CONFIG_FILE).exists() and not (folder / _REPLACING_DIR).is_dir():
        # leftovers of an atomic write killed mid-way (".<name>.<random>.tmp") are ours, not foreign
        foreign = sorted(p.name for p in folder.iterdir()
                         if p.name not in _BOOKKEEPING and not (p.name.startswith(".") and p.name.endswith(".tmp")))
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise RunError(f"{folder} is not a run folder (no {CONFIG_FILE}) and is not empty ({shown}); choose a "
                           "new or empty folder with --out")


def _acquire_lock(folder: Path) -> int:
    """Open ``run.lock``, take an exclusive non-blocking flock and write our pid into it (POSIX; without fcntl,
    as on Windows, the folder is not locked and a warning says so)."""
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        logger.warning("file locking is unavailable on this platform: %s is not protected against a second run",
                       folder)
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise RunError(f"run folder {folder} is in use by another process (pid {holder}); wait for it to end, or "
                       "choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def _release_lock(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _read_config(folder: Path, *, allow_corrupt: bool) -> dict[str, Any] | None:
    target = folder / CONFIG_FILE
    if not target.is_file():
        return None
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, ValueError) as exc:
        if allow_corrupt:
            return {}
        raise RunError(f"{target} is unreadable ({exc}); pass --overwrite to start the run again") from exc


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def _check_same_config(folder: Path, saved: dict[str, Any], wanted: dict[str, Any],
                       ignore_keys: Collection[str]) -> None:
    old, new = _flatten(saved), _flatten(wanted)
    differing = [key for key in sorted(set(old) | set(new))
                 if key not in ignore_keys and old.get(key, "<absent>") != new.get(key, "<absent>")]
    if differing:
        lines = "; ".join(f"{key}: saved {old.get(key, '<absent>')!r}, now {new.get(key, '<absent>')!r}"
                          for key in differing[:10])
        more = f" (and {len(differing) - 10} more)" if len(differing) > 10 else ""
        raise RunError(f"run folder {folder} holds a run with a different configuration ({lines}{more}); choose a "
                       "new --out for this configuration, or pass --overwrite to replace that run")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _set_aside(folder: Path) -> None:
    """Move the run in ``folder`` to ``previous/`` (kept until the next results.json)."""
    previous = folder / PREVIOUS_DIR
    current = [p for p in folder.iterdir() if p.name not in _BOOKKEEPING]
    if previous.exists():
        previous_finished = (previous / RESULTS_FILE).is_file()
        current_finished = (folder / RESULTS_FILE).is_file()
        if previous_finished and current_finished:
            raise RunError(f"{previous} holds an earlier finished run and {folder} another one; move or delete "
                           f"{previous} before overwriting")
        if previous_finished:
            # an earlier overwrite never finished: keep the finished run, drop the failed attempt
            logger.warning("dropping the unfinished run in %s; the finished run in %s is kept", folder, previous)
            for entry in current:
                _remove(entry)
            return
        shutil.rmtree(previous)
    replacing = folder / _REPLACING_DIR
    replacing.mkdir(exist_ok=True)
    for entry in current:
        os.replace(entry, replacing / entry.name)
    os.replace(replacing, previous)
    logger.warning("overwrite: the earlier run in %s was moved to %s until this run finishes", folder, previous)


def _finish_interrupted_set_aside(folder: Path) -> None:
    """Complete a :func:`_set_aside` that a crash interrupted (the old run is split between two places)."""
    replacing = folder / _REPLACING_DIR
    if not replacing.is_dir():
        return
    for entry in [p for p in folder.iterdir() if p.name not in _BOOKKEEPING]:
        os.replace(entry, replacing / entry.name)
    if (folder / PREVIOUS_DIR).exists():
        shutil.rmtree(folder / PREVIOUS_DIR)
    os.replace(replacing, folder / PREVIOUS_DIR)
    logger.warning("completed an interrupted overwrite: the earlier run is in %s", folder / PREVIOUS_DIR)
