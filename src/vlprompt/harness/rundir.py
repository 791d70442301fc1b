"""Run folders: one locked folder per run holding its configuration, checkpoints, log and results.

This module owns the run folder: its file names, what makes a folder a run (:func:`is_run_folder`), the one
configuration comparison (:func:`config_differences`), the one reader of a saved configuration
(:func:`read_config`, :func:`read_run_config`), the evaluation spec and its file name (:class:`EvalSpec`), and the
one writer of result files (:func:`write_result`). The pipeline, the bench, prediction and the CLI ask it.

Layout of a run folder::

    .vlprompt-run       the marker only vlprompt writes: with a config.json it can parse, the folder is a run
    run.lock            lock held while a process works in the folder (exclusive: training, holds its pid;
                        shared: evaluations reading it)
    config.json         the effective configuration, written when the run is created
    log.txt             the log of every process that worked here (appended)
    params.safetensors  the learned parameters (method.state_dict()) after the last finished epoch
    optim.safetensors   optimiser tensors (momentum buffers) of that epoch
    state.json          epoch done, optimiser/scaler state, history, checksums of the two tensor files: the commit
                        marker (tensor files are written as *.next first and renamed once state.json is written)
    fewshot.json        the portable few-shot sample (methods that learn from a few shots), reused on resume
    prompt.safetensors  the learned state with its backbone's fingerprint, written once fitting is done
    results.json        metrics once evaluated: a finished run
    eval-<name>.json    one per further evaluation (:class:`EvalSpec`: cross-dataset, base-to-novel "new")
    tensorboard/        optional TensorBoard scalars
    previous/           an earlier run set aside by ``overwrite``, deleted once the new run writes results.json

Rules (:meth:`RunDir.create_or_open`): only an empty folder or a run folder is used (anything else is refused, and
``overwrite`` never touches it); a folder in use is refused; a different configuration is refused, listing the
differing keys, unless the run never finished anything (no checkpoint, prompt or results: a failed start is simply
started again with the corrected configuration); a finished run is only replaced with ``overwrite``, and then kept
in ``previous/`` until the new run finishes (a crash never loses finished work); an unfinished run continues only
with ``resume``. Every file is written atomically (:mod:`vlprompt.common.io`); temporary files a killed write left
behind are removed when the folder is opened.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from vlprompt import __version__
from vlprompt.common import locks
from vlprompt.common.io import atomic_write_bytes, atomic_write_json, safetensors_bytes, writing
from vlprompt.errors import CheckpointError, ConfigError, RunError
from vlprompt.harness.config import NON_IDENTITY_KEYS, RunConfig, with_former_values
from vlprompt.training.config import RESOLVED_KEYS
from vlprompt.common.vocab import SUBSETS

if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)

MARKER_FILE = ".vlprompt-run"
LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"
LOG_FILE = "log.txt"
PARAMS_FILE = "params.safetensors"
OPTIM_FILE = "optim.safetensors"
STATE_FILE = "state.json"
RESULTS_FILE = "results.json"
PROMPT_FILE = "prompt.safetensors"
FEWSHOT_FILE = "fewshot.json"
EVAL_PREFIX = "eval-"
TENSORBOARD_DIR = "tensorboard"
PREVIOUS_DIR = "previous"
_REPLACING_DIR = ".replacing"  # a set-aside in progress: its content plus what is still outside is the old run
_BOOKKEEPING = frozenset({MARKER_FILE, LOCK_FILE, PREVIOUS_DIR, _REPLACING_DIR})
_PENDING = ".next"  # suffix of checkpoint files written but not yet committed by state.json
_WRITE_LEFTOVER = re.compile(r"^\..+\.tmp$")  # the temporary file of an atomic write its process died in
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RESULT_SCHEMA = 1
"""Version of the result files' layout (docs/architecture.md "Results"); the report reads this version."""
DEFAULTED_KEYS: tuple[str, ...] = tuple(f"train.{key}" for key in RESOLVED_KEYS)
"""Keys a planned configuration may leave at None ("the method's default": epochs, batch size, optimiser); a run
folder saves them resolved."""

FolderState = Literal["absent", "partial", "finished"]


def folder_state(path: str | os.PathLike[str]) -> FolderState:
    """``absent`` (no run yet), ``partial`` (configured, not evaluated) or ``finished`` (results.json present)."""
    folder = Path(path)
    if (folder / RESULTS_FILE).is_file():
        return "finished"
    if (folder / CONFIG_FILE).is_file():
        return "partial"
    return "absent"


def has_progress(path: str | os.PathLike[str]) -> bool:
    """True when the run in ``path`` finished something worth keeping: a checkpoint, a learned prompt or results."""
    folder = Path(path)
    return any((folder / name).exists() for name in (STATE_FILE, PROMPT_FILE, RESULTS_FILE))


# ------------------------------------------------------------------------------------------- what is a run folder


def is_run_folder(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is positively a vlprompt run: the marker only vlprompt writes, and a ``config.json`` that
    parses as a run configuration. Nothing else is ever opened for writing, resumed or overwritten."""
    folder = Path(path)
    if not (folder / MARKER_FILE).is_file():
        return False
    try:
        read_run_config(folder)
    except RunError:
        return False
    return True


def write_leftovers(folder: Path) -> list[Path]:
    """Temporary files of atomic writes that a killed process left in ``folder`` (hidden ``.<name>.<random>.tmp``)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _WRITE_LEFTOVER.match(p.name) and p.is_file())


def foreign_entries(folder: Path) -> list[str]:
    """What ``folder`` holds besides run bookkeeping and write leftovers (names, sorted); [] when it does not exist.

    A folder with no foreign entries may become a run; one that holds anything else must be a run folder
    (:func:`is_run_folder`) to be used."""
    if not folder.is_dir():
        return []
    leftovers = set(write_leftovers(folder))
    return sorted(p.name for p in folder.iterdir() if p.name not in _BOOKKEEPING and p not in leftovers)


def not_a_run_reason(folder: Path) -> str | None:
    """Why ``folder`` may not be used as a run folder (one sentence), or None when it is empty or a run folder."""
    if folder.exists() and not folder.is_dir():
        return f"{folder} is a file, not a folder"
    if not foreign_entries(folder) and not (folder / _REPLACING_DIR).is_dir():
        return None
    if is_run_folder(folder):
        return None
    if (folder / MARKER_FILE).is_file():
        return f"{folder} has a vlprompt run marker but its {CONFIG_FILE} is missing or is not a run configuration"
    entries = foreign_entries(folder)
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    return f"{folder} is not a vlprompt run folder and is not empty ({shown})"


# ------------------------------------------------------------------------------------------------- configuration


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The saved ``config.json`` of ``folder`` as a dict (as written: :func:`config_differences` and
    :func:`read_run_config` read keys it lacks as vlprompt 0.1 did); None when there is none. RunError when it is
    unreadable or not a JSON object."""

    target = Path(folder) / CONFIG_FILE
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RunError(f"{target} is unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise RunError(f"{target} is not a JSON object")
    return data


def read_run_config(folder: str | os.PathLike[str]) -> RunConfig:
    """The :class:`~vlprompt.harness.config.RunConfig` recorded in ``folder/config.json`` (RunError when the folder
    or the file is missing, unreadable or not a run configuration)."""
    path = Path(folder)
    if not path.is_dir():
        raise RunError(f"run folder {path} does not exist; give the --out folder of a trained run")
    data = read_config(path)
    if data is None:
        raise RunError(f"{path} is not a run folder (no {CONFIG_FILE}); give the --out folder of a trained run")
    try:
        return RunConfig.from_dict(with_former_values(data))  # keys added since 0.1 read as 0.1 did
    except ConfigError as exc:
        raise RunError(f"{path / CONFIG_FILE} is not a vlprompt run configuration ({exc}); it was edited or damaged: "
                       "restore it as vlprompt wrote it, or train the run again into a new --out") from None


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; empty objects vanish (an empty mapping states nothing)."""
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def config_differences(saved: Mapping[str, Any], wanted: Mapping[str, Any], *,
                       ignore: Collection[str] = NON_IDENTITY_KEYS, stated_only: bool = False) -> list[str]:
    """The keys where two configurations (JSON objects) differ, one ``key: saved ..., now ...`` line each (empty:
    the same run).

    ``ignore``: dotted keys allowed to differ (paths and devices by default). ``stated_only``: compare only what
    ``wanted`` states, a key of :data:`DEFAULTED_KEYS` left at None matching any saved value (a planned
    configuration, whose method options the pipeline completes later). A key added since vlprompt 0.1 that a
    configuration lacks (``saved``; ``wanted`` too unless ``stated_only``) reads as what 0.1 did
    (:data:`vlprompt.harness.config.FORMER_VALUES`, the one compatibility rule).
    """
    old = _flatten(_normalise(with_former_values(saved)))
    new = _flatten(_normalise(wanted if stated_only else with_former_values(wanted)))
    keys = sorted(new) if stated_only else sorted(set(old) | set(new))
    differing = []
    for key in keys:
        if key in ignore or (stated_only and key in DEFAULTED_KEYS and new.get(key) is None):
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            differing.append(f"{key}: saved {old.get(key, '<absent>')!r}, now {new.get(key, '<absent>')!r}")
    return differing


def describe_differences(differences: Sequence[str], limit: int = 10) -> str:
    """The first ``limit`` differences joined by '; ' (and how many more)."""
    more = f" (and {len(differences) - limit} more)" if len(differences) > limit else ""
    return "; ".join(differences[:limit]) + more


# ----------------------------------------------------------------------------------------------------- evaluations


def eval_name(dataset: str, subset: str = "all") -> str:
    """The stem of an evaluation file: ``<dataset>`` for all classes, ``<dataset>-base`` / ``<dataset>-new`` for a
    subset; characters unsafe in a file name become ``_``."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", dataset).lstrip("._-") or "dataset"
    return stem if subset == "all" else f"{stem}-{subset}"


def check_eval_name(name: str) -> str:
    """``name`` if it can name ``eval-<name>.json`` (letters, digits, ``_ . -``), else ConfigError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"invalid evaluation name {name!r}: use letters, digits, '_', '.', '-' (starting with a "
                          "letter or digit)")
    return name


@dataclass(frozen=True)
class EvalSpec:
    """One more evaluation of a run's method: the test split of ``dataset`` restricted to ``subset``, written as
    ``eval-<name>.json`` in the run folder.

    ``dataset`` is a registry key or custom spec (as ``RunConfig.dataset``), read under the run's data root.
    ``name`` defaults to :func:`eval_name` of the loaded dataset's name (``eval-oxford_flowers.json``,
    ``eval-dtd-new.json``). ``protocol`` labels the result file with another protocol than the run's (domain
    generalisation evaluated on runs trained for cross-dataset transfer).
    """

    dataset: str
    subset: str = "all"
    name: str | None = None
    protocol: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise ConfigError(f"an evaluation needs a dataset name, got {self.dataset!r}")
        if self.subset not in SUBSETS:
            raise ConfigError(f"evaluation subset must be one of {', '.join(SUBSETS)}, got {self.subset!r}")
        if self.name is not None:
            check_eval_name(self.name)

    def named(self, dataset_name: str) -> EvalSpec:
        """This spec with its name set (the default from the loaded dataset's ``dataset_name``)."""
        return self if self.name is not None else dataclasses.replace(self, name=eval_name(dataset_name, self.subset))

    @property
    def filename(self) -> str:
        """``eval-<name>.json`` (the name must be set: :meth:`named`)."""
        if self.name is None:
            raise ConfigError(f"evaluation of {self.dataset} has no name yet")
        return eval_file(self.name)


def eval_file(name: str) -> str:
    """The file name of evaluation ``name``: ``eval-<name>.json``."""
    return f"{EVAL_PREFIX}{name}.json"


def eval_files(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """``{name: path}`` of the evaluation files in a run folder, sorted by name."""
    return {path.name[len(EVAL_PREFIX):-5]: path for path in sorted(Path(folder).glob(f"{EVAL_PREFIX}*.json"))}


# ---------------------------------------------------------------------------------------------------------- results


def write_result(folder: str | os.PathLike[str], name: str, payload: Mapping[str, Any]) -> Path:
    """Write result file ``<name>.json`` (``results`` or ``eval-<...>``) into a run folder, atomically."""
    stem = name[:-5] if name.endswith(".json") else name
    if not _NAME.match(stem) or stem in ("config", "state"):
        raise ConfigError(f"invalid result name {name!r}: use letters, digits, '_', '-', '.' (not config/state)")
    return atomic_write_json(Path(folder) / f"{stem}.json", _normalise(payload))


def read_result(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A result file's JSON object (RunError when missing or unreadable)."""
    target = Path(path)
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{target} is missing") from None
    except (OSError, ValueError) as exc:
        raise RunError(f"{target} is unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise RunError(f"{target} is not a JSON object")
    return data


@contextmanager
def reading_lock(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold a shared lock on the run folder's ``run.lock`` (if it has one) while reading it.

    Readers share the lock; a process training in the folder holds it exclusively, so reading is refused (RunError)
    while it trains, and training is refused while anyone reads.
    """
    path = Path(folder)
    try:
        held = locks.acquire(path / LOCK_FILE, shared=True, create=False)
    except OSError:  # no lock file: nobody ever trained here (a copied run folder), nothing to exclude
        yield
        return
    if held is None:
        holder = locks.recorded_holder(path / LOCK_FILE) or "unknown"
        raise RunError(f"run folder {path} is in use by another process (pid {holder}) that is training in it; wait "
                       "for it to end")
    with held:
        yield


@dataclass
class Checkpoint:
    """What :meth:`RunDir.save_checkpoint` wrote: learned parameters, optimiser tensors and the JSON state."""

    params: dict[str, torch.Tensor]
    optim: dict[str, torch.Tensor]
    state: dict[str, Any]


class RunDir:
    """An open, locked run folder. Use :meth:`create_or_open`; close it (or use ``with``) to release the lock."""

    def __init__(self, path: Path, lock: locks.FileLock, config: dict[str, Any], resumed: bool) -> None:
        self.path = path
        self.config = config
        self.resumed = resumed
        self._lock = lock
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
        reason = not_a_run_reason(folder)
        if reason is not None:
            raise RunError(f"{reason}; vlprompt only uses an empty folder or one of its own run folders (never "
                           "overwriting anything else): choose a new or empty folder with --out")
        with writing(folder):  # a read-only or full place: say so (the lock file is the first thing written)
            folder.mkdir(parents=True, exist_ok=True)
            lock = locks.acquire(folder / LOCK_FILE)
        if lock is None:
            holder = locks.recorded_holder(folder / LOCK_FILE) or "unknown"
            raise RunError(f"run folder {folder} is in use by another process (pid {holder}); wait for it to end, or "
                           "choose another --out")
        try:
            for leftover in write_leftovers(folder):  # a killed write's temporary file: ours, and worthless
                leftover.unlink(missing_ok=True)
            _finish_interrupted_set_aside(folder)
            resumed = _settle_existing(folder, wanted, resume=resume, overwrite=overwrite, ignore=ignore_keys)
            if not (folder / MARKER_FILE).is_file():  # first: a folder holding only the marker counts as empty
                atomic_write_json(folder / MARKER_FILE, {"vlprompt_run": 1})
            if read_config(folder) != wanted:
                atomic_write_json(folder / CONFIG_FILE, wanted)
        except BaseException:
            lock.release()
            raise
        if (folder / PREVIOUS_DIR).exists():
            logger.warning("an earlier run is kept in %s until this run writes results.json",
                           folder / PREVIOUS_DIR)
        return cls(folder, lock, wanted, resumed)

    def close(self) -> None:
        """Release the lock and close the log file. Idempotent."""
        if self._log_handler is not None:
            self._log_handler.close()
            self._log_handler = None
        self._lock.release()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, resumed={self.resumed})"

    @property
    def state(self) -> FolderState:
        return folder_state(self.path)

    # ---------------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, params: Mapping[str, torch.Tensor], optim: Mapping[str, torch.Tensor],
                        state: Mapping[str, Any]) -> None:
        """Write a checkpoint so that a crash at any point leaves a complete one (this or the previous).

        The tensor files are first written as ``*.next``; then ``state.json`` (with their SHA-256) commits them;
        then they are renamed into place. :meth:`load_checkpoint` finishes the renames after a crash. Every write is
        atomic.
        """
        epoch = str(state.get("epoch", ""))
        blobs = {OPTIM_FILE: safetensors_bytes(_cpu_tensors(optim), {"epoch": epoch}),
                 PARAMS_FILE: safetensors_bytes(_cpu_tensors(params), {"epoch": epoch})}
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
        """Write ``<name>.json`` (:func:`write_result`). Writing ``results`` marks the run finished and drops
        ``previous/``."""
        target = write_result(self.path, name, payload)
        if target.name == RESULTS_FILE and (self.path / PREVIOUS_DIR).exists():
            shutil.rmtree(self.path / PREVIOUS_DIR)
            logger.info("run finished: removed the earlier run kept in %s", self.path / PREVIOUS_DIR)
        return target

    # -------------------------------------------------------------------------------------------------- logging
    def log_handler(self) -> logging.Handler:
        """A logging handler appending to ``log.txt`` (one per RunDir, closed by :meth:`close`)."""
        if self._log_handler is None:
            with writing(self.path / LOG_FILE):
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

    versions = {"vlprompt": __version__, "torch": torch.__version__, "python": sys.version.split()[0]}
    if torch.version.cuda:
        versions["cuda"] = str(torch.version.cuda)
    return versions


def result_payload(config: RunConfig, metrics: Mapping[str, Any], *, eval_dataset: str | None = None,
                   subset: str | None = None, timing: Mapping[str, float] | None = None,
                   backbone: str | None = None) -> dict[str, Any]:
    """The result JSON of docs/architecture.md "Results" for ``config`` and ``metrics`` (from ``evaluate``).

    ``backbone`` is the loaded CLIP's short name (``clip.config.name``: "ViT-B/16", or the checkpoint's folder or file
    name), which reports use instead of ``model`` (what was given: possibly a long path)."""
    payload: dict[str, Any] = {
        "schema": RESULT_SCHEMA,
        "method": config.method,
        "dataset": config.dataset,
        "eval_dataset": eval_dataset or config.dataset,
        "subset": subset or config.subset,
        "shots": config.shots,
        "seed": config.seed,
        "model": config.model,
        **({"backbone": backbone} if backbone else {}),
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


def _settle_existing(folder: Path, wanted: dict[str, Any], *, resume: bool, overwrite: bool,
                     ignore: Collection[str]) -> bool:
    """Decide what happens to a run already in ``folder`` (locked by us); True when it is resumed."""
    try:
        saved = read_config(folder)
    except RunError as exc:
        if not overwrite:
            raise RunError(f"{exc}; pass --overwrite to start the run again") from None
        saved = {}
    if saved is None:
        if resume:
            logger.info("nothing to resume in %s: starting a new run", folder)
        return False
    if overwrite:
        _set_aside(folder)
        return False
    differing = config_differences(saved, wanted, ignore=ignore)
    if differing and not has_progress(folder):
        # a run that failed before finishing anything (bad images, an option error): the corrected command restarts it
        logger.warning("%s held a run that never finished an epoch (%s); starting it again with this configuration",
                       folder, describe_differences(differing, 3))
        _clear_unfinished(folder)
        return False
    if differing:
        hint = ""
        if any(d.startswith("train.precision:") for d in differing) and wanted.get("train", {}).get("precision") == \
                "auto" and saved.get("train", {}).get("precision") != "auto":
            # runs of vlprompt 0.1 recorded its default, fp32; auto is today's
            hint = f" (to resume it, give --precision {saved['train'].get('precision')} as it was trained)"
        raise RunError(f"run folder {folder} holds a run with a different configuration "
                       f"({describe_differences(differing)}){hint}; choose a new --out for this configuration, or pass "
                       "--overwrite to replace that run")
    if folder_state(folder) == "finished":
        raise RunError(f"run folder {folder} holds a finished run (results.json); choose a new --out, or pass "
                       f"--overwrite to train it again (the old run is kept in {PREVIOUS_DIR}/ until the new one "
                       "finishes)")
    if not resume and has_progress(folder):
        raise RunError(f"run folder {folder} holds an unfinished run with this configuration; pass --resume to "
                       "continue it, or --overwrite to start it again")
    return has_progress(folder)


def _clear_unfinished(folder: Path) -> None:
    """Remove what a run that never finished an epoch left (its config, few-shot file, log stay useful: kept)."""
    for name in (PARAMS_FILE, OPTIM_FILE, PARAMS_FILE + _PENDING, OPTIM_FILE + _PENDING, FEWSHOT_FILE):
        (folder / name).unlink(missing_ok=True)


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
