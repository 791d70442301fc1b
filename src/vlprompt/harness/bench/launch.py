"""Run a plan on this machine: in this process (``--jobs 1``) or in several worker processes (``--jobs N``).

:func:`execute_plan` skips what is finished, hands the rest to :func:`vlprompt.harness.bench.execute.work` (one
process) or :func:`vlprompt.harness.bench.workers.run_workers` (several), and sums up. It sits above both, so neither
imports the other's caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vlprompt.common.progress import Progress
from vlprompt.harness.bench.execute import BenchResult, Log, Outcome, Runner, new_session, work
from vlprompt.harness.bench.plan import PlannedRun
from vlprompt.harness.bench.status import RunState, inspect_run
from vlprompt.harness.bench.workers import run_workers


def execute_plan(runs: Sequence[PlannedRun], out: Path, runner: Runner, *, jobs: int = 1,
                 devices: Sequence[str | None] | None = None, threads: int | None = None, log: Log = print,
                 poll: float = 1.0, session: str | None = None) -> BenchResult:
    """Run every unfinished run of the plan with ``jobs`` workers (1: in this process) and sum up.

    ``devices[i]`` is worker i's device (None: the run's setting); ``threads`` caps each worker process's CPU
    threads. Ctrl-C is caught: the result says ``interrupted`` and lists what is not finished.
    """
    out = Path(out)
    session = session or new_session()
    runs = tuple(runs)
    result = BenchResult(runs=runs)
    pending = []
    for run in runs:
        if inspect_run(run, out, check_busy=False).state is RunState.FINISHED:
            result.skipped.append(run.key)
        else:
            pending.append(run)
    if pending:
        with Progress(len(pending), "bench", "run", emit=log) as shown:  # a line per 30 s / 10 % of the runs
            if jobs <= 1:
                device = devices[0] if devices else None

                def done(outcome: Outcome) -> None:
                    result.outcomes.append(outcome)
                    shown.update(1)

                try:
                    work(pending, out, runner, session=session, device=device, log=log, poll=poll, on_outcome=done)
                except KeyboardInterrupt:
                    result.interrupted = True
            else:
                run_workers(pending, out, runner, jobs=min(jobs, len(pending)), devices=devices, threads=threads,
                            session=session, log=log, poll=poll, result=result, on_outcome=lambda _: shown.update(1))
    result.unfinished = [run.key for run in runs
                         if inspect_run(run, out, check_busy=False).state is not RunState.FINISHED]
    return result
