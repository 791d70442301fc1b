"""A protocol's runs as one scheduler job array, through submitit (``--executor slurm`` / ``--executor local``).

Each array task runs exactly one planned run (:class:`ArrayTask`): which run is fixed by the task's own arguments,
i.e. by the scheduler's assignment, so no claim files are taken (``flock`` is unreliable across the nodes of NFS or
Lustre). Within its task the run goes through the same one-run step as local workers
(:func:`vlprompt.harness.bench.execute.execute_one`): error record on failure, resume from the last checkpoint.

``slurm`` submits through :class:`submitit.SlurmExecutor` (``sbatch --array=0-N%P``) and returns; ``local`` uses
:class:`submitit.LocalExecutor` (tasks are processes of this machine, at most ``array_parallelism`` at a time, 1 by
default) and waits for them: the same path on one machine, which is what the tests run.

Bookkeeping, beside the run folders under ``OUT/.bench/``:

- ``submitit/``: submitit's pickles and logs (``<job id>/``);
- ``submissions.json``: for each run key its latest task: ``job_id`` (``12345_7`` on Slurm, the controller's pid
  locally), ``executor``, ``host``, ``submitted`` (UTC), ``session``.

A re-invocation (or ``--status``) looks at each run: finished (its result files exist) -> collected; its latest task
still pending or running (Slurm: ``sacct`` through submitit; local: the controller process alive on this host) ->
left alone; anything else (never submitted, failed with an error record, killed, timed out, lost with its node) ->
submitted again, all of them in one new array. Nothing is lost (results are written atomically by the run itself)
and nothing runs twice at once (an active task is never resubmitted).

submitit is imported only when a job is submitted or its Slurm state is asked for (``pip install 'vlprompt[slurm]'``).
This module imports neither torch nor numpy.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vlprompt.common.io import atomic_write_json
from vlprompt.errors import ConfigError
from vlprompt.harness.bench.claims import BENCH_DIR
from vlprompt.harness.bench.execute import Log, Outcome, Runner, execute_one
from vlprompt.harness.bench.plan import PlannedRun
from vlprompt.harness.bench.status import PlannedRunStatus, RunState, inspect_run

EXECUTORS = ("slurm", "local")
SUBMITIT_DIR = "submitit"
SUBMISSIONS_FILE = "submissions.json"
ACTIVE_SLURM_STATES = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                                 "COMPLETING", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"})
"""Slurm job states of a task that may still produce its run (not resubmitted)."""
UNKNOWN_GRACE_S = 600.0
"""A task Slurm does not know (yet) counts as active for this long after its submission (sacct lags sbatch)."""
DEFAULT_TIME_MIN = 24 * 60


@dataclass(frozen=True)
class ArrayOptions:
    """How the array is submitted: executor, and the Slurm resources of each task.

    ``time_min``: the wall-clock limit of one task; ``array_parallelism``: tasks running at once (Slurm: the ``%P``
    of ``--array``, default all; local: default 1); ``extra``: further ``#SBATCH`` options (``--slurm-option
    account=abc`` -> ``#SBATCH --account=abc``).
    """

    executor: str = "slurm"
    partition: str | None = None
    gpus_per_task: int | None = None
    time_min: int = DEFAULT_TIME_MIN
    array_parallelism: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        for name in ("gpus_per_task", "array_parallelism"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"--slurm-{name.replace('_', '-')} must be a positive whole number, got {value!r}")
        if isinstance(self.time_min, bool) or not isinstance(self.time_min, int) or self.time_min < 1:
            raise ConfigError(f"--slurm-time must be at least one minute, got {self.time_min!r}")


_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


def parse_time(text: str) -> int:
    """A Slurm time limit in whole minutes (rounded up): ``90``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``."""
    match = _TIME.match(str(text).strip())
    if not match:
        raise ConfigError(f"--slurm-time takes a Slurm time limit (minutes, HH:MM:SS or D-HH:MM:SS), got {text!r}")
    days, a, b, c = (int(v) if v is not None else None for v in match.group("days", "a", "b", "c"))
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + (b or 0) * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # minutes
        seconds = a * 60
    if seconds <= 0:
        raise ConfigError(f"--slurm-time must be positive, got {text!r}")
    return -(-seconds // 60)


def parse_slurm_options(items: Sequence[str]) -> dict[str, Any]:
    """``["account=abc", "qos=high", "exclusive"]`` -> ``{"account": "abc", "qos": "high", "exclusive": True}``
    (``#SBATCH --account=abc`` ...; dashes and underscores in a key are the same)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not key or not re.match(r"^[a-z][a-z0-9_]*$", key):
            raise ConfigError(f"--slurm-option {item!r} must look like KEY=VALUE (an sbatch option), e.g. "
                              "account=abc or mem=32G")
        options[key] = value.strip() if sep else True
    return options


# ---------------------------------------------------------------------------------------------------- one task


@dataclass(frozen=True)
class ArrayTask:
    """What one array task runs: exactly ``run`` (picklable; submitit sends it to the task's process)."""

    run: PlannedRun
    out: Path
    runner: Runner
    session: str

    def __call__(self) -> dict[str, Any]:
        status = inspect_run(self.run, self.out, check_busy=False)
        if status.state is RunState.FINISHED:  # finished meanwhile (an earlier task that was thought lost)
            return {"key": self.run.key, "action": "skip", "ok": True}
        outcome = execute_one(self.run, status, self.out, self.runner, session=self.session, worker=0, device=None,
                              log=lambda line: print(line, flush=True))
        return {"key": outcome.key, "action": outcome.action, "ok": outcome.ok, "error": outcome.error}


def _call(task: ArrayTask) -> dict[str, Any]:
    return task()


# ------------------------------------------------------------------------------------------------- bookkeeping


def submissions_path(out: Path) -> Path:
    return Path(out) / BENCH_DIR / SUBMISSIONS_FILE


def read_submissions(out: Path) -> dict[str, dict[str, Any]]:
    """``{run key: latest submission}`` (empty when none or unreadable)."""
    try:
        data = json.loads(submissions_path(out).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def _record(out: Path, entries: Mapping[str, dict[str, Any]]) -> None:
    atomic_write_json(submissions_path(out), {**read_submissions(out), **entries})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def slurm_states(job_ids: Sequence[str]) -> dict[str, str]:
    """The Slurm state of each task id (``12345_7``), from one ``sacct`` call (parsed by submitit); {} when sacct
    cannot be run (then every task counts as active: nothing is resubmitted blindly)."""
    from submitit.slurm.slurm import SlurmInfoWatcher  # optional dependency ([slurm]): only after a submission

    arrays = sorted({job_id.split("_")[0] for job_id in job_ids})
    if not arrays:
        return {}
    command = ["sacct", "-o", "JobID,State,NodeList", "--parsable2"]
    for array in arrays:
        command += ["-j", array]
    try:
        output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    info = SlurmInfoWatcher(delay_s=0).read_info(output)
    return {job_id: str(info.get(job_id, {}).get("State") or "UNKNOWN") for job_id in job_ids}


def task_state(entry: Mapping[str, Any], slurm: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """``(active, scheduler state)`` of a recorded task (see the module docstring); ``slurm``: the states of
    :func:`slurm_states` (None: sacct could not be asked, so the task counts as active)."""
    job_id = str(entry.get("job_id", ""))
    if entry.get("executor") == "local":
        alive = entry.get("host") == socket.gethostname() and job_id.isdigit() and _pid_alive(int(job_id))
        return alive, "RUNNING" if alive else "ENDED"
    if not slurm:
        return True, "UNKNOWN (sacct gave no answer)"
    state = (slurm.get(job_id) or "UNKNOWN").split()[0].upper()  # "CANCELLED by 123" -> CANCELLED
    if state == "UNKNOWN":
        try:
            submitted = datetime.fromisoformat(str(entry.get("submitted"))).timestamp()
        except ValueError:
            submitted = 0.0
        return time.time() - submitted < UNKNOWN_GRACE_S, state
    return state in ACTIVE_SLURM_STATES, state


@dataclass(frozen=True)
class ArrayRunStatus:
    """A planned run's state on disk together with its latest task."""

    run: PlannedRun
    status: PlannedRunStatus
    job_id: str | None = None
    scheduler: str = ""  # the latest task's scheduler state ("" when never submitted)
    active: bool = False

    @property
    def label(self) -> str:
        if self.status.state is RunState.FINISHED:
            return "finished"
        if self.status.state is RunState.CONFLICT:
            return "conflict"
        if self.active:
            return "pending" if self.scheduler == "PENDING" else "running"
        if self.job_id is None:
            return "not submitted"
        if self.status.state is RunState.FAILED:
            return "failed"
        return "lost"  # its task ended without finishing it or recording an error: killed, timed out, node lost

    @property
    def to_submit(self) -> bool:
        return self.label in ("not submitted", "failed", "lost")


def array_statuses(runs: Sequence[PlannedRun], out: Path) -> list[ArrayRunStatus]:
    """Where every run of the plan stands, with its latest task's scheduler state."""
    submissions = read_submissions(out)
    found = [(run, inspect_run(run, out, check_busy=False), submissions.get(run.key)) for run in runs]
    asked = [str(entry["job_id"]) for _, status, entry in found if entry is not None and entry.get("executor") ==
             "slurm" and status.state not in (RunState.FINISHED, RunState.CONFLICT)]
    slurm = slurm_states(asked) if asked else {}
    statuses = []
    for run, status, entry in found:
        if status.state in (RunState.FINISHED, RunState.CONFLICT) or entry is None:
            statuses.append(ArrayRunStatus(run, status, entry.get("job_id") if entry else None))
            continue
        active, state = task_state(entry, slurm)
        statuses.append(ArrayRunStatus(run, status, str(entry.get("job_id")), state, active))
    return statuses


def status_lines(statuses: Sequence[ArrayRunStatus]) -> list[str]:
    """One line per run (state, folder, job id and scheduler state, detail) and the totals."""
    width = max((len(s.run.key) for s in statuses), default=0)
    lines = []
    for s in statuses:
        job = f"  job {s.job_id} ({s.scheduler or 'done'})" if s.job_id and s.label != "finished" else ""
        detail = f"  [{s.status.detail}]" if s.status.detail and s.label not in ("finished", "running") else ""
        lines.append(f"  {s.label:<14}{s.run.key:<{width}}{job}{detail}")
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s.label] = counts.get(s.label, 0) + 1
    lines.append("totals: " + ", ".join(f"{n} {label}" for label, n in counts.items()))
    return lines


# ---------------------------------------------------------------------------------------------------- submission


def make_executor(out: Path, options: ArrayOptions) -> Any:
    """The submitit executor of ``options`` writing under ``OUT/.bench/submitit``."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("--executor slurm / local needs submitit: pip install 'vlprompt[slurm]'") from None
    folder = Path(out) / BENCH_DIR / SUBMITIT_DIR / "%j"
    if options.executor == "slurm":
        try:
            executor = submitit.SlurmExecutor(folder=folder)
        except RuntimeError as exc:  # no srun here
            raise ConfigError(f"--executor slurm needs Slurm on this machine ({exc}); submit from a login node of "
                              "the cluster, or use --executor local") from None
        parameters: dict[str, Any] = {"time": options.time_min, "job_name": "vlprompt-bench", "ntasks_per_node": 1,
                                      "nodes": 1}
        if options.partition:
            parameters["partition"] = options.partition
        if options.gpus_per_task:
            parameters["gpus_per_task"] = options.gpus_per_task
        if options.array_parallelism:
            parameters["array_parallelism"] = options.array_parallelism
        if options.extra:
            parameters["additional_parameters"] = dict(options.extra)
        executor.update_parameters(**parameters)
        return executor
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=options.time_min, gpus_per_node=options.gpus_per_task or 0)
    return executor


def _entry(job: Any, options: ArrayOptions, session: str) -> dict[str, Any]:
    return {"job_id": str(job.job_id), "executor": options.executor, "host": socket.gethostname(),
            "submitted": _now(), "session": session}


@dataclass
class ArrayResult:
    """What one invocation submitted (and, locally, how the tasks ended)."""

    submitted: list[str] = field(default_factory=list)   # run keys submitted now
    job_ids: list[str] = field(default_factory=list)
    outcomes: list[dict[str, Any]] = field(default_factory=list)  # local: what each task returned or how it died


def submit_array(runs: Sequence[PlannedRun], out: Path, runner: Runner, options: ArrayOptions, *, session: str,
                 log: Log = print, poll: float = 1.0,
                 on_task_end: Callable[[dict[str, Any]], None] | None = None) -> ArrayResult:
    """Submit ``runs`` (each one task) and record their tasks; locally, run them and wait for the last one."""
    out = Path(out)
    result = ArrayResult(submitted=[run.key for run in runs])
    if not runs:
        return result
    executor = make_executor(out, options)
    tasks = [ArrayTask(run, out, runner, session) for run in runs]
    if options.executor == "slurm":
        jobs = executor.map_array(_call, tasks)
        _record(out, {task.run.key: _entry(job, options, session) for task, job in zip(tasks, jobs)})
        result.job_ids = [str(job.job_id) for job in jobs]
        return result
    # local: at most `array_parallelism` task processes at a time, each recorded as it starts
    parallel = options.array_parallelism or 1
    waiting, running = list(tasks), []
    while waiting or running:
        while waiting and len(running) < parallel:
            task = waiting.pop(0)
            job = executor.submit(_call, task)
            _record(out, {task.run.key: _entry(job, options, session)})
            result.job_ids.append(str(job.job_id))
            log(f"started {task.run.key} (local task {job.job_id})")
            running.append((task, job))
        still = []
        for task, job in running:
            if not job.done():
                still.append((task, job))
                continue
            try:
                outcome = job.result()
            except Exception as exc:  # noqa: BLE001 - the task process died (killed, timed out): report it
                reason = " ".join(str(exc).split())[:300]
                outcome = {"key": task.run.key, "action": "run", "ok": False,
                           "error": f"the task ended without finishing: {reason}"}
            result.outcomes.append(outcome)
            if on_task_end is not None:
                on_task_end(outcome)
        running = still
        if running:
            time.sleep(poll)
    return result


def outcome_of(entry: Mapping[str, Any]) -> Outcome:
    """A task's returned summary as an :class:`~vlprompt.harness.bench.execute.Outcome`."""
    return Outcome(str(entry["key"]), str(entry.get("action", "run")), bool(entry.get("ok")), 0.0,
                   error=entry.get("error"))
