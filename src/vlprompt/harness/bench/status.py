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

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from vlprompt.common import locks
from vlprompt.errors import RunError
from vlprompt.harness.bench.claims import ErrorRecord, claim_path, read_error
from vlprompt.harness.bench.plan import PlannedRun
from vlprompt.harness.rundir import (
    LOCK_FILE,
    RESULTS_FILE,
    EvalSpec,
    config_differences,
    describe_differences,
    has_progress,
    not_a_run_reason,
    read_config,
)


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
class PlannedRunStatus:
    """A planned run's state, whether it is trained (its own ``results.json`` exists), the evaluations it still owes, its
    last error and a human-readable detail."""

    state: RunState
    trained: bool = False
    missing_evals: tuple[EvalSpec, ...] = ()
    error: ErrorRecord | None = None
    detail: str = ""

    @property
    def action(self) -> str:
        """What running the protocol does with the run: skip, evaluate, resume, rerun, run, refuse or busy."""
        return ACTIONS[self.state]


def inspect_run(run: PlannedRun, out: Path, *, check_busy: bool = True) -> PlannedRunStatus:
    """The state of ``run`` (whose bookkeeping lives under output folder ``out``)."""
    folder = run.run_dir
    trained = (folder / RESULTS_FILE).is_file()
    missing = tuple(e for e in run.evals if not (folder / e.filename).is_file())
    if trained and not missing:
        return PlannedRunStatus(RunState.FINISHED, True)
    reason = not_a_run_reason(folder)
    if reason is not None:
        return PlannedRunStatus(RunState.CONFLICT, trained, missing, detail=reason)
    try:
        saved = read_config(folder)
    except RunError as exc:
        return PlannedRunStatus(RunState.CONFLICT, trained, missing, detail=str(exc))
    if saved is not None and has_progress(folder):
        # a run that never finished anything is started again by the pipeline with the planned configuration
        differences = config_differences(saved, run.config.to_dict(), stated_only=True)
        if differences:
            return PlannedRunStatus(RunState.CONFLICT, trained, missing,
                                    detail=f"holds a different run: {describe_differences(differences, 4)}")
    if check_busy:
        worker = locks.recorded_holder(claim_path(out, run.key))
        if worker is not None:
            return PlannedRunStatus(RunState.BUSY, trained, missing, detail=f"being run by bench process {worker}")
        holder = locks.recorded_holder(folder / LOCK_FILE)
        if holder is not None:
            return PlannedRunStatus(RunState.BUSY, trained, missing, detail=f"in use by process {holder}")
    error = read_error(out, run.key)
    progress = "trained, evaluations missing" if trained else ("started" if saved is not None else "not started")
    if error is not None:
        return PlannedRunStatus(RunState.FAILED, trained, missing, error,
                                detail=f"{progress}; last error: {error.summary()}")
    if trained:
        return PlannedRunStatus(RunState.EVALUATE, True, missing,
                                detail=f"missing {', '.join(e.filename for e in missing)}")
    if saved is not None:
        return PlannedRunStatus(RunState.PARTIAL, False, missing, detail=progress)
    return PlannedRunStatus(RunState.MISSING, False, missing)


def count_states(statuses: Iterable[PlannedRunStatus]) -> dict[str, int]:
    """``{state: count}`` in :class:`RunState` order, states with no run left out."""
    counts = Counter(s.state for s in statuses)
    return {state.value: counts[state] for state in RunState if counts[state]}
