"""Several worker processes on one plan (``--jobs N``), each pinned to its own device.

Each worker is a fresh process (multiprocessing *spawn*: nothing inherited from the parent's torch or CUDA state)
running :func:`vlprompt.harness.bench.execute.work` over the same list of runs; runs are shared out through claims, so no
two workers ever run the same run. Worker ``i`` gets device ``devices[i]`` (``cuda:i % gpus`` when GPUs exist, see
:func:`worker_devices`) and, on CPU, ``cores // N`` threads. Workers report to the parent through a queue; only the
parent prints.

Ctrl-C: a terminal sends SIGINT to the whole process group, so every worker stops its run (resumable) and exits; the
parent waits for them, forwards the signal to any still running after a grace period, and reports what is left.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue as queue_module
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlprompt.errors import ConfigError

from vlprompt.harness.bench.execute import BenchResult, Log, Outcome, Runner, work

if TYPE_CHECKING:
    from vlprompt.harness.bench.plan import PlannedRun

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_GRACE_S = 5.0
_TERMINATE_AFTER_S = 60.0


def worker_devices(jobs: int, device: str, gpu_count: int) -> list[str]:
    """The device of each of ``jobs`` workers for the ``--device`` option ``device``.

    ``auto``: ``cuda:i % gpu_count`` when there are GPUs, else ``cpu``; ``cuda``: the same but GPUs are required;
    ``cpu`` or ``cuda:N``: every worker on that device.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if device in ("auto", "cuda"):
        if gpu_count > 0:
            return [f"cuda:{i % gpu_count}" for i in range(jobs)]
        if device == "cuda":
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
        return ["cpu"] * jobs
    return [device] * jobs


def threads_per_worker(jobs: int, cores: int | None = None) -> int:
    """CPU threads each of ``jobs`` workers may use: the machine's cores shared out, at least 1."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, jobs))


@dataclass(frozen=True)
class WorkerJob:
    """Everything a worker process needs (picklable)."""

    index: int
    runs: tuple[PlannedRun, ...]
    out: Path
    runner: Runner
    session: str
    device: str | None
    threads: int | None
    poll: float


def _limit_threads(threads: int | None) -> None:
    if threads is None:
        return
    for name in _THREAD_VARIABLES:
        os.environ[name] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:  # already imported (by the runner's module): set it directly
        torch.set_num_threads(threads)


def _worker_main(job: WorkerJob, messages: Any) -> None:
    """Entry point of a worker process: run the shared loop, report each outcome and how it ended."""
    _limit_threads(job.threads)
    try:
        work(job.runs, job.out, job.runner, session=job.session, worker=job.index, device=job.device,
             log=lambda line: messages.put(("log", job.index, line)), poll=job.poll,
             on_outcome=lambda outcome: messages.put(("outcome", job.index, dataclasses.asdict(outcome))))
    except KeyboardInterrupt:
        messages.put(("interrupted", job.index, None))
        return
    except BaseException:  # a bug in the loop itself: report it, the parent lists it
        messages.put(("crashed", job.index, traceback.format_exc()[-4000:]))
        return
    messages.put(("done", job.index, None))


def run_workers(runs: Sequence[PlannedRun], out: Path, runner: Runner, *, jobs: int,
                devices: Sequence[str | None] | None, threads: int | None, session: str, log: Log, poll: float,
                result: BenchResult, on_outcome: Callable[[Outcome], None] | None = None) -> None:
    """Run ``runs`` with ``jobs`` worker processes; outcomes and problems are added to ``result``."""
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    chosen = list(devices) if devices else [None] * jobs
    processes = []
    for index in range(jobs):
        job = WorkerJob(index, tuple(runs), Path(out), runner, session, chosen[index % len(chosen)], threads, poll)
        process = context.Process(target=_worker_main, args=(job, messages), name=f"vlprompt-bench-{index}")
        process.start()
        processes.append(process)
    ended: set[int] = set()

    def handle(kind: str, index: int, payload: Any) -> None:
        if kind == "log":
            log(f"[worker {index}] {payload}")
        elif kind == "outcome":
            result.outcomes.append(Outcome(**payload))
            if on_outcome is not None:
                on_outcome(result.outcomes[-1])
        elif kind == "interrupted":
            ended.add(index)
            result.interrupted = True
        elif kind == "crashed":
            ended.add(index)
            result.problems.append(f"worker {index} stopped on an internal error:\n{payload}")
        else:
            ended.add(index)

    def drain(timeout: float) -> bool:
        """Handle the messages that arrive within ``timeout``; False when none came."""
        try:
            handle(*messages.get(timeout=timeout))
        except queue_module.Empty:
            return False
        while True:
            try:
                handle(*messages.get_nowait())
            except queue_module.Empty:
                return True

    try:
        while len(ended) < jobs:
            if drain(0.5):
                continue
            for index, process in enumerate(processes):
                if index not in ended and not process.is_alive():
                    while drain(0.2):  # its last messages may still be in the pipe
                        pass
                    if index not in ended:
                        ended.add(index)
                        result.problems.append(f"worker {index} (pid {process.pid}) died with exit code "
                                               f"{process.exitcode}; its run is left resumable")
    except KeyboardInterrupt:
        result.interrupted = True
        _stop(processes)
    finally:
        for process in processes:
            process.join(timeout=_TERMINATE_AFTER_S)
            if process.is_alive():
                process.terminate()
                process.join()
        while drain(0.05):
            pass
        messages.close()


def _stop(processes: Sequence[Any]) -> None:
    """After Ctrl-C: give the workers a moment to stop their runs, then send them SIGINT themselves."""
    deadline = time.monotonic() + _GRACE_S
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive() and process.pid is not None:
            try:
                os.kill(process.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
