"""Running a plan: each run claimed, executed by a runner, its failure recorded; nothing stops the others.

A *runner* does one run: ``runner(request)`` trains the run (when ``request.train``) and writes its result files;
the default one calls the pipeline (:class:`vlprompt.harness.bench.runner.PipelineRunner`), tests inject their own.

:func:`work` is one worker's loop, the same in the main process (sequential, the default) and in each worker
process (:mod:`vlprompt.harness.bench.workers`):

1. for each run of the plan not finished yet, claim it (:func:`~vlprompt.harness.bench.claims.try_claim`; a run claimed by
   another worker is put aside and revisited once the others are done, so two workers never run the same run);
2. under the claim, look at it again (another worker may have finished it meanwhile) and do what its state asks:
   run, resume (continue from the last checkpoint), rerun (a failure of an earlier invocation) or evaluate (only the
   missing ``eval-*.json``);
3. an exception is written to the run's error record and the loop goes on; a run that failed in this invocation
   (``session``) is not tried again by another worker. Ctrl-C (KeyboardInterrupt) ends the loop at once: the claim
   is released and the interrupted run stays resumable.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from vlprompt.common import locks
from vlprompt.harness.bench.claims import ErrorRecord, clear_error, error_path, try_claim, write_error
from vlprompt.harness.bench.plan import PlannedRun
from vlprompt.harness.bench.status import PlannedRunStatus, RunState, inspect_run
from vlprompt.harness.rundir import LOCK_FILE, RESULTS_FILE, EvalSpec

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunRequest:
    """What a runner must do for one run.

    ``train``: the run's own training and ``results.json`` are still needed (resume from a checkpoint if there is
    one); otherwise the run is trained and only ``evals`` are missing. ``evals``: the evaluations to write now.
    ``device``: the device a worker is pinned to (None: the run's own setting).
    """

    run: PlannedRun
    evals: tuple[EvalSpec, ...]
    train: bool
    device: str | None = None


class Runner(Protocol):
    """Does one run; raises on failure. Must be picklable to be used by worker processes."""

    def __call__(self, request: RunRequest) -> None: ...


@dataclass(frozen=True)
class Outcome:
    """What a worker did with one run. ``action``: run, resume, rerun or evaluate; ``error``: one line when not ok."""

    key: str
    action: str
    ok: bool
    seconds: float
    worker: int = 0
    error: str | None = None
    error_file: str | None = None


def new_session() -> str:
    """A fresh id for one bench invocation (stored in error records written during it)."""
    return uuid.uuid4().hex[:12]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _record_failure(out: Path, run: PlannedRun, session: str, exc: BaseException | None, message: str,
                    error_type: str) -> ErrorRecord:
    trace = "".join(traceback.format_exception(exc)) if exc is not None else ""
    record = ErrorRecord(key=run.key, session=session, error_type=error_type, message=message,
                         traceback=trace[-20_000:], time=_now(), pid=os.getpid())
    write_error(out, record)
    return record


def _request_for(run: PlannedRun, status: PlannedRunStatus, device: str | None) -> RunRequest:
    if status.trained:
        return RunRequest(run, status.missing_evals, train=False, device=device)
    return RunRequest(run, run.evals, train=True, device=device)


def execute_one(run: PlannedRun, status: PlannedRunStatus, out: Path, runner: Runner, *, session: str, worker: int,
                device: str | None, log: Log) -> Outcome:
    """Run ``run`` (claimed by this worker, or assigned to this array task) and record how it went."""
    action = status.action
    if status.state is RunState.CONFLICT:
        message = (f"{run.run_dir} {status.detail}; move that folder away (or choose another --out) to run this "
                   "plan's configuration there")
        record = _record_failure(out, run, session, None, message, "RunConflict")
        log(f"FAILED  {run.key}: {message}")
        return Outcome(run.key, action, False, 0.0, worker, record.summary(), str(error_path(out, run.key)))
    holder = locks.probe(run.run_dir / LOCK_FILE)  # e.g. `vlprompt train` or an evaluation working there
    if holder is not None:
        message = f"{run.run_dir} is in use by another process (pid {holder}); run the protocol again once it ends"
        record = _record_failure(out, run, session, None, message, "RunBusy")
        log(f"BUSY    {run.key}: {message}")
        return Outcome(run.key, action, False, 0.0, worker, record.summary(), str(error_path(out, run.key)))
    request = _request_for(run, status, device)
    log(f"{action:<8}{run.key} ({run.describe()})" + (f" on {device}" if device else ""))
    start = time.monotonic()
    try:
        runner(request)
        after = inspect_run(run, out, check_busy=False)
        if after.state is not RunState.FINISHED:
            missing = ", ".join(e.filename for e in after.missing_evals) or RESULTS_FILE
            raise RuntimeError(f"the runner returned without writing {missing}")
    except Exception as exc:  # a failing run never stops the others
        seconds = time.monotonic() - start
        record = _record_failure(out, run, session, exc, str(exc), type(exc).__name__)
        log(f"FAILED  {run.key} after {seconds:.1f}s: {record.summary()}")
        return Outcome(run.key, action, False, seconds, worker, record.summary(), str(error_path(out, run.key)))
    seconds = time.monotonic() - start
    clear_error(out, run.key)
    log(f"done    {run.key} in {seconds:.1f}s")
    return Outcome(run.key, action, True, seconds, worker)


def _settled(status: PlannedRunStatus, session: str) -> bool:
    """Nothing left for this invocation: finished, or already failed during it."""
    if status.state is RunState.FINISHED:
        return True
    return status.state is RunState.FAILED and status.error is not None and status.error.session == session


def work(runs: Sequence[PlannedRun], out: Path, runner: Runner, *, session: str, worker: int = 0,
         device: str | None = None, log: Log = print, poll: float = 1.0,
         on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """One worker's loop over ``runs`` (see the module docstring); returns what this worker did."""
    out = Path(out)
    outcomes: list[Outcome] = []
    todo = list(runs)
    while todo:
        waiting: list[PlannedRun] = []
        for run in todo:
            if _settled(inspect_run(run, out, check_busy=False), session):
                continue
            claim = try_claim(out, run.key)
            if claim is None:
                waiting.append(run)
                continue
            with claim:
                status = inspect_run(run, out, check_busy=False)
                if _settled(status, session):
                    continue
                outcome = execute_one(run, status, out, runner, session=session, worker=worker, device=device,
                                      log=log)
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
        if len(waiting) == len(todo):
            time.sleep(poll)  # every run left is being run by another worker
        todo = waiting
    return outcomes


# ------------------------------------------------------------------------------------------------------- the result


@dataclass
class BenchResult:
    """How a protocol invocation went: the plan's runs, what was done, and what is still not finished."""

    runs: tuple[PlannedRun, ...]
    skipped: list[str] = field(default_factory=list)        # finished before this invocation
    outcomes: list[Outcome] = field(default_factory=list)   # what the workers did
    unfinished: list[str] = field(default_factory=list)     # not finished at the end (failed, interrupted, busy)
    problems: list[str] = field(default_factory=list)       # worker processes that died, and the like
    interrupted: bool = False

    @property
    def failed(self) -> list[Outcome]:
        """The last failed attempt of each run that is still not finished."""
        last: dict[str, Outcome] = {}
        for outcome in self.outcomes:
            last[outcome.key] = outcome
        return [o for key, o in last.items() if not o.ok and key in self.unfinished]

    @property
    def completed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.ok]

    @property
    def exit_code(self) -> int:
        """0 when every run is finished; 130 after Ctrl-C; 1 otherwise (failures listed)."""
        if self.interrupted:
            return 130
        return 1 if (self.unfinished or self.problems) else 0

    def lines(self) -> list[str]:
        """The end-of-invocation summary."""
        total = len(self.runs)
        lines = [f"{total} run(s): {len(self.skipped)} already finished, {len(self.completed)} done now, "
                 f"{len(self.failed)} failed, {len(self.unfinished)} not finished"]
        for outcome in self.failed:
            lines.append(f"  FAILED {outcome.key}: {outcome.error} (details: {outcome.error_file})")
        others = [key for key in self.unfinished if key not in {o.key for o in self.failed}]
        for key in others:
            lines.append(f"  not finished: {key}")
        lines += [f"  problem: {p}" for p in self.problems]
        if self.interrupted:
            lines.append("interrupted: finished runs are kept; run the same command again to resume the rest")
        elif self.unfinished:
            lines.append("run the same command again to rerun the failed runs and resume the others")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record of the invocation."""
        return {
            "runs": [run.key for run in self.runs],
            "skipped": self.skipped,
            "outcomes": [dataclasses.asdict(o) for o in self.outcomes],
            "unfinished": self.unfinished,
            "problems": self.problems,
            "interrupted": self.interrupted,
        }
