"""Where each planned run stands on disk, and what running the protocol would do with it.

=============  ==============================================================  =========
state          meaning                                                         action
=============  ==============================================================  =========
finished       ``results.json`` and every planned ``eval-<name>.json`` exist      skip
evaluate       trained and evaluated on its own test split; evaluations missing  evaluate
partial        started (``config.json``), not finished: continues from its        resume
               last checkpoint
failed         the last attempt wrote an error record (``.bench/errors``)          rerun
missing        nothing there yet                                                run
conflict       the folder holds a run with another configuration                refuse
busy           another process works in the run folder (a bench worker: waited  busy
               for; anything else: reported, the run is left for next time)
=============  ==============================================================  =========

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from vlprompt.harness.bench.claims import ErrorRecord, claim_path, lock_holder, read_error
from vlprompt.harness.bench.plan import RESULTS_NAME, PlannedEval, PlannedRun
from vlprompt.training.config import NON_IDENTITY_KEYS, RunConfig

CONFIG_NAME = "config.json"
LOCK_NAME = "run.lock"
_RUN_BOOKKEEPING = frozenset({LOCK_NAME, "previous", ".replacing"})  # what runs.py may leave in an empty run folder
_WRITE_LEFTOVER = re.compile(r"^\..+\.tmp$")  # the temporary file of an atomic write the process died in


class RunState(str, Enum):
    """Where a planned run stands (see the module docstring)."""

    FINISHED = "finished"
    EVALUATE = "evaluate"
    PARTIAL = "partial"
    FAILED = "failed"
    MISSING = "missing"
    CONFLICT = "conflict"
    BUSY = "busy"


ACTIONS: Mapping[RunState, str] = {
    RunState.FINISHED: "skip",
    RunState.EVALUATE: "evaluate",
    RunState.PARTIAL: "resume",
    RunState.FAILED: "rerun",
    RunState.MISSING: "run",
    RunState.CONFLICT: "refuse",
    RunState.BUSY: "busy",
}


@dataclass(frozen=True)
class RunStatus:
    """A run's state, whether it is trained (its own ``results.json`` exists), the evaluations it still owes, its
    last error and a human-readable detail."""

    state: RunState
    trained: bool = False
    missing_evals: tuple[PlannedEval, ...] = ()
    error: ErrorRecord | None = None
    detail: str = ""

    @property
    def action(self) -> str:
        """What running the protocol does with the run: skip, evaluate, resume, rerun, run, refuse or busy."""
        return ACTIONS[self.state]


_DEFAULTED_KEYS = ("train.epochs", "train.batch_size")  # None in a plan: "the method's default", saved resolved


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; empty objects vanish."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def config_differences(saved: Mapping[str, Any], planned: RunConfig) -> list[str]:
    """The keys where a saved ``config.json`` contradicts the planned configuration (empty: the same run).

    Lenient by design, so a run is never refused by mistake: only what the plan states is compared (options the
    pipeline fills in, such as the rest of the method's config, are not), paths and devices may differ
    (:data:`~vlprompt.training.config.NON_IDENTITY_KEYS`), and epochs / batch size left to the method's default match any
    saved value. The pipeline's own check still refuses any other difference when the run is opened.
    """
    old = _flatten(dict(saved))
    wanted = _flatten(planned.to_dict())
    differing = []
    for key, value in sorted(wanted.items()):
        if key in NON_IDENTITY_KEYS or (key in _DEFAULTED_KEYS and value is None):
            continue
        if old.get(key, "<absent>") != value:
            differing.append(f"{key}: saved {old.get(key, '<absent>')!r}, planned {value!r}")
    return differing


def _read_saved_config(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_leftovers(folder: Path) -> list[Path]:
    """Temporary files of atomic writes that a killed process left in ``folder`` (hidden ``.<name>.<random>.tmp``)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _WRITE_LEFTOVER.match(p.name) and p.is_file())


def foreign_entries(folder: Path) -> list[str]:
    """What ``folder`` holds besides run bookkeeping and write leftovers (names, sorted); [] when it does not exist."""
    if not folder.is_dir():
        return []
    leftovers = set(write_leftovers(folder))
    return sorted(p.name for p in folder.iterdir() if p.name not in _RUN_BOOKKEEPING and p not in leftovers)


def inspect_run(run: PlannedRun, out: Path, *, check_busy: bool = True) -> RunStatus:
    """The state of ``run`` (whose bookkeeping lives under output folder ``out``)."""
    folder = run.run_dir
    trained = (folder / RESULTS_NAME).is_file()
    missing = tuple(e for e in run.evals if not (folder / e.filename).is_file())
    if trained and not missing:
        return RunStatus(RunState.FINISHED, True)
    saved = _read_saved_config(folder)
    if saved is not None:
        differences = config_differences(saved, run.config) if saved else ["config.json is unreadable"]
        if differences:
            shown = "; ".join(differences[:4]) + (f" (and {len(differences) - 4} more)" if len(differences) > 4
                                                  else "")
            return RunStatus(RunState.CONFLICT, trained, missing, detail=f"holds a different run: {shown}")
    elif foreign := foreign_entries(folder):
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        return RunStatus(RunState.CONFLICT, trained, missing,
                         detail=f"not a run folder (no config.json) and not empty ({shown})")
    if check_busy:
        worker = lock_holder(claim_path(out, run.key))
        if worker is not None:
            return RunStatus(RunState.BUSY, trained, missing, detail=f"being run by bench process {worker}")
        holder = lock_holder(folder / LOCK_NAME)
        if holder is not None:
            return RunStatus(RunState.BUSY, trained, missing, detail=f"in use by process {holder}")
    error = read_error(out, run.key)
    progress = "trained, evaluations missing" if trained else ("started" if saved is not None else "not started")
    if error is not None:
        return RunStatus(RunState.FAILED, trained, missing, error, detail=f"{progress}; last error: {error.summary()}")
    if trained:
        return RunStatus(RunState.EVALUATE, True, missing, detail=f"missing {', '.join(e.filename for e in missing)}")
    if saved is not None:
        return RunStatus(RunState.PARTIAL, False, missing, detail=progress)
    return RunStatus(RunState.MISSING, False, missing)


def count_states(statuses: Iterable[RunStatus]) -> dict[str, int]:
    """``{state: count}`` in :class:`RunState` order, states with no run left out."""
    counts = Counter(s.state for s in statuses)
    return {state.value: counts[state] for state in RunState if counts[state]}
