"""Running plans with an injected runner: skip / resume / rerun / evaluate, failures and Ctrl-C that stop nothing
else, claims, and several workers (threads and processes) that never run the same run twice."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from vlprompt.common.locks import recorded_holder as lock_holder
from vlprompt.harness.bench.claims import claim_path, error_path, read_error, try_claim
from vlprompt.harness.bench.execute import RunRequest, work
from vlprompt.harness.bench.launch import execute_plan
from vlprompt.harness.bench.protocols import ProtocolOptions, build_plan
from vlprompt.harness.bench.status import RunState, inspect_run
from run_folders import fake_run_folder
from vlprompt.harness.bench.workers import threads_per_worker, worker_devices
from vlprompt.errors import ConfigError


@dataclass(frozen=True)
class FakeRunner:
    """Writes what the pipeline would (config.json, results.json, eval files) and logs each call in ``log``.

    ``fail``: run keys that raise; ``interrupt_at``: the call number (1-based) that raises KeyboardInterrupt after
    creating the run folder, as Ctrl-C in the middle of training would; ``barrier``: a folder where each call leaves a
    marker and waits until ``barrier_size`` calls of different processes/threads have started.
    """

    log: Path
    fail: frozenset[str] = frozenset()
    interrupt_at: int | None = None
    barrier: Path | None = None
    barrier_size: int = 2

    def __call__(self, request: RunRequest) -> None:
        run = request.run
        line = json.dumps({"key": run.key, "train": request.train, "evals": [e.name for e in request.evals],
                           "pid": os.getpid(), "thread": threading.get_ident(), "device": request.device})
        with open(self.log, "a", encoding="utf-8") as handle:  # O_APPEND: one whole line per call
            handle.write(line + "\n")
        calls = len(self.log.read_text(encoding="utf-8").splitlines())
        if self.barrier is not None:
            self.barrier.mkdir(exist_ok=True)
            (self.barrier / f"{os.getpid()}-{threading.get_ident()}").touch()
            deadline = time.monotonic() + 30
            while len(list(self.barrier.iterdir())) < self.barrier_size:
                assert time.monotonic() < deadline, "the other worker never started a run"
                time.sleep(0.01)
        fake_run_folder(run.run_dir, run.config.to_dict())
        if self.interrupt_at == calls:
            raise KeyboardInterrupt
        if run.key in self.fail:
            raise RuntimeError(f"boom in {run.key}")
        if request.train:
            (run.run_dir / "results.json").write_text("{}", encoding="utf-8")
        for evaluation in request.evals:
            (run.run_dir / evaluation.filename).write_text("{}", encoding="utf-8")


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()] if log.exists() else []


def fewshot_plan(out: Path, **kwargs):
    options = dict(datasets=("dtd", "oxford_flowers"), shots=(1, 2), seeds=(1, 2), model="tiny.pt")
    options.update(kwargs)
    return build_plan("fewshot", ProtocolOptions(out=out, **options))


def quiet(line: str) -> None:
    pass


# ------------------------------------------------------------------------------------------------- sequential


def test_runs_everything_then_skips_everything(tmp_path):
    runs = fewshot_plan(tmp_path)
    runner = FakeRunner(tmp_path / "calls1.log")
    result = execute_plan(runs, tmp_path, runner, log=quiet)
    assert result.exit_code == 0 and result.unfinished == [] and result.skipped == []
    assert [c["key"] for c in calls(runner.log)] == [run.key for run in runs]  # plan order, each once
    assert all(c["train"] for c in calls(runner.log))
    assert [o.action for o in result.outcomes] == ["run"] * 18
    assert all(inspect_run(run, tmp_path).state is RunState.FINISHED for run in runs)

    again = FakeRunner(tmp_path / "calls2.log")
    second = execute_plan(runs, tmp_path, again, log=quiet)
    assert calls(again.log) == [] and second.skipped == [run.key for run in runs] and second.exit_code == 0


def test_a_failing_run_stops_nothing_and_is_rerun_next_time(tmp_path):
    runs = fewshot_plan(tmp_path)
    bad = runs[3].key
    lines: list[str] = []
    result = execute_plan(runs, tmp_path, FakeRunner(tmp_path / "calls1.log", fail=frozenset({bad})),
                          log=lines.append)
    assert result.exit_code == 1
    assert result.unfinished == [bad]
    assert [o.key for o in result.failed] == [bad]
    assert len(result.completed) == 17  # every other run went on
    record = read_error(tmp_path, bad)
    assert record is not None and record.error_type == "RuntimeError" and record.message == f"boom in {bad}"
    assert "Traceback" in record.traceback and "test_bench_execute.py" in record.traceback
    assert any(line.startswith(f"FAILED  {bad}") for line in lines)
    summary = "\n".join(result.lines())
    assert f"FAILED {bad}: RuntimeError: boom in {bad} (details: {error_path(tmp_path, bad)})" in summary
    assert "1 failed" in summary

    status = inspect_run(runs[3], tmp_path)
    assert (status.state, status.action) == (RunState.FAILED, "rerun")
    again = FakeRunner(tmp_path / "calls2.log")
    second = execute_plan(runs, tmp_path, again, log=quiet)
    assert [c["key"] for c in calls(again.log)] == [bad]  # only the failed one runs again
    assert [o.action for o in second.outcomes] == ["rerun"]
    assert second.exit_code == 0 and read_error(tmp_path, bad) is None  # the record goes once it succeeds


def test_interrupted_protocol_completes_only_what_is_missing(tmp_path):
    runs = fewshot_plan(tmp_path)
    first = FakeRunner(tmp_path / "calls1.log", interrupt_at=6)
    result = execute_plan(runs, tmp_path, first, log=quiet)
    assert result.interrupted and result.exit_code == 130
    assert len(calls(first.log)) == 6 and len(result.completed) == 5
    assert result.unfinished == [run.key for run in runs[5:]]
    assert inspect_run(runs[5], tmp_path).state is RunState.PARTIAL  # the interrupted run is resumable
    assert lock_holder(claim_path(tmp_path, runs[5].key)) is None  # and its claim was released
    assert "run the same command again to resume the rest" in result.lines()[-1]

    second = FakeRunner(tmp_path / "calls2.log")
    rest = execute_plan(runs, tmp_path, second, log=quiet)
    assert [c["key"] for c in calls(second.log)] == [run.key for run in runs[5:]]
    assert [o.action for o in rest.outcomes] == ["resume"] + ["run"] * 12
    assert rest.skipped == [run.key for run in runs[:5]] and rest.exit_code == 0


def test_trained_runs_are_only_evaluated_for_what_is_missing(tmp_path):
    cross = build_plan("crossdataset", ProtocolOptions(out=tmp_path, seeds=(1,), methods=("coop",),
                                                       targets=("dtd", "eurosat")))
    shift = build_plan("domainshift", ProtocolOptions(out=tmp_path, seeds=(1,), methods=("coop",)))
    first = FakeRunner(tmp_path / "calls1.log")
    assert execute_plan(cross, tmp_path, first, log=quiet).exit_code == 0
    assert calls(first.log)[0]["train"] and calls(first.log)[0]["evals"] == ["dtd", "eurosat"]

    (shift[0].run_dir / "eval-imagenetv2.json").write_text("{}", encoding="utf-8")  # one already there
    assert inspect_run(shift[0], tmp_path).state is RunState.EVALUATE
    second = FakeRunner(tmp_path / "calls2.log")
    result = execute_plan(shift, tmp_path, second, log=quiet)
    assert result.exit_code == 0 and [o.action for o in result.outcomes] == ["evaluate"]
    (call,) = calls(second.log)
    assert call["train"] is False  # the ImageNet run is reused, not trained again
    assert call["evals"] == ["imagenet-domainshift", "imagenet_sketch", "imagenet_a", "imagenet_r"]


def test_conflicting_and_busy_runs_are_reported_not_run(tmp_path):
    runs = fewshot_plan(tmp_path, datasets=("dtd",), shots=(1,), seeds=(1,), methods=("coop",), baselines=False)
    (run,) = runs
    run.run_dir.mkdir(parents=True)
    saved = run.config.to_dict() | {"shots": 8}
    fake_run_folder(run.run_dir, saved, progress=True)  # a run that finished an epoch: worth keeping
    status = inspect_run(run, tmp_path)
    assert (status.state, status.action) == (RunState.CONFLICT, "refuse")
    assert "shots: saved 8, now 1" in status.detail
    runner = FakeRunner(tmp_path / "calls.log")
    result = execute_plan(runs, tmp_path, runner, log=quiet)
    assert calls(runner.log) == [] and result.exit_code == 1
    assert "RunConflict" in result.failed[0].error and "move that folder away" in result.failed[0].error

    fake_run_folder(run.run_dir, run.config.to_dict())
    held = os.open(run.run_dir / "run.lock", os.O_RDWR | os.O_CREAT)  # another process works there (RunDir's lock)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(held, f"{os.getpid()}\n".encode())
    status = inspect_run(run, tmp_path)
    assert (status.state, status.action, status.detail) == (RunState.BUSY, "busy", f"in use by process {os.getpid()}")
    result = execute_plan(runs, tmp_path, runner, log=quiet)
    assert calls(runner.log) == []
    assert "RunBusy" in result.failed[0].error and f"pid {os.getpid()}" in result.failed[0].error
    os.ftruncate(held, 0)
    os.close(held)  # released
    assert execute_plan(runs, tmp_path, runner, log=quiet).exit_code == 0
    assert [c["key"] for c in calls(runner.log)] == [run.key]


def test_a_foreign_file_makes_a_conflict(tmp_path):
    (run,) = fewshot_plan(tmp_path, datasets=("dtd",), shots=(1,), seeds=(1,), methods=("coop",), baselines=False)
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "notes.txt").write_text("mine", encoding="utf-8")
    status = inspect_run(run, tmp_path)
    assert status.state is RunState.CONFLICT and "not a vlprompt run folder" in status.detail


def test_a_stale_pid_in_a_released_lock_is_not_busy(tmp_path):
    (run,) = fewshot_plan(tmp_path, datasets=("dtd",), shots=(1,), seeds=(1,), methods=("coop",), baselines=False)
    run.run_dir.mkdir(parents=True)
    fake_run_folder(run.run_dir, run.config.to_dict())
    (run.run_dir / "run.lock").write_text(f"{os.getpid()}\n", encoding="ascii")  # written, but nobody holds the lock
    runner = FakeRunner(tmp_path / "calls.log")
    assert execute_plan([run], tmp_path, runner, log=quiet).exit_code == 0  # the flock decides, not the text
    assert [c["key"] for c in calls(runner.log)] == [run.key]


def test_leftovers_of_a_killed_write_are_cleared_not_a_conflict(tmp_path):
    (run,) = fewshot_plan(tmp_path, datasets=("dtd",), shots=(1,), seeds=(1,), methods=("coop",), baselines=False)
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "run.lock").write_text("", encoding="ascii")
    leftover = run.run_dir / ".config.json.k2j4x9.tmp"  # SIGKILL while config.json was being written
    leftover.write_text('{"method": "co', encoding="utf-8")
    assert inspect_run(run, tmp_path).state is RunState.MISSING
    lines: list[str] = []
    runner = FakeRunner(tmp_path / "calls.log")
    assert execute_plan([run], tmp_path, runner, log=lines.append).exit_code == 0  # RunDir clears the leftover
    assert [c["key"] for c in calls(runner.log)] == [run.key]


def test_epochs_left_to_the_method_match_the_saved_resolved_value(tmp_path):
    (run,) = fewshot_plan(tmp_path, datasets=("dtd",), shots=(1,), seeds=(1,), methods=("coop",), baselines=False)
    saved = run.config.to_dict()
    saved["train"] = saved["train"] | {"epochs": 50, "batch_size": 32, "device": "cuda:1"}
    # what the pipeline records: the complete method config
    saved["root"] = "/elsewhere"
    fake_run_folder(run.run_dir, saved, progress=True)
    assert inspect_run(run, tmp_path).state is RunState.PARTIAL


# ----------------------------------------------------------------------------------------------------- claims


def _hold_claim(out: str, key: str, ready: multiprocessing.Event) -> None:
    claim = try_claim(Path(out), key)
    assert claim is not None
    ready.set()
    time.sleep(60)


def test_claims_are_exclusive_and_die_with_their_holder(tmp_path):
    first = try_claim(tmp_path, "a/b")
    assert first is not None and try_claim(tmp_path, "a/b") is None
    assert lock_holder(claim_path(tmp_path, "a/b")) == os.getpid()
    assert try_claim(tmp_path, "a/c") is not None  # other runs are free
    (run,) = fewshot_plan(tmp_path, datasets=("dtd",), shots=(1,), seeds=(1,), methods=("coop",), baselines=False)
    with try_claim(tmp_path, run.key):
        status = inspect_run(run, tmp_path)
        assert (status.state, status.detail) == (RunState.BUSY, f"being run by bench process {os.getpid()}")
    assert inspect_run(run, tmp_path).state is RunState.MISSING
    first.release()
    assert lock_holder(claim_path(tmp_path, "a/b")) is None
    again = try_claim(tmp_path, "a/b")
    assert again is not None
    again.release()

    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    holder = context.Process(target=_hold_claim, args=(str(tmp_path), "x/y", ready))
    holder.start()
    try:
        assert ready.wait(60)
        assert try_claim(tmp_path, "x/y") is None
        assert lock_holder(claim_path(tmp_path, "x/y")) == holder.pid
    finally:
        holder.kill()
        holder.join()
    taken = try_claim(tmp_path, "x/y")  # a killed worker's claim is free at once (no stale claims)
    assert taken is not None
    taken.release()


# ---------------------------------------------------------------------------------------------------- workers


def test_two_threads_on_the_same_folder_never_run_the_same_run(tmp_path):
    runs = fewshot_plan(tmp_path)
    runner = FakeRunner(tmp_path / "calls.log", barrier=tmp_path / "barrier")
    results: list = []

    def invocation() -> None:
        results.append(execute_plan(runs, tmp_path, runner, log=quiet, poll=0.02))

    threads = [threading.Thread(target=invocation) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    done = calls(runner.log)
    assert sorted(c["key"] for c in done) == sorted(run.key for run in runs)  # each run exactly once
    assert len({c["thread"] for c in done}) == 2  # both took runs (the barrier made them overlap)
    assert sum(len(r.completed) for r in results) == len(runs)
    assert all(r.exit_code == 0 and r.unfinished == [] for r in results)


def test_two_worker_processes_never_run_the_same_run(tmp_path):
    runs = fewshot_plan(tmp_path)
    bad = runs[7].key
    runner = FakeRunner(tmp_path / "calls.log", barrier=tmp_path / "barrier", fail=frozenset({bad}))
    lines: list[str] = []
    result = execute_plan(runs, tmp_path, runner, jobs=2, devices=["cpu", "cpu"], threads=1, log=lines.append,
                          poll=0.05)
    done = calls(runner.log)
    assert sorted(c["key"] for c in done) == sorted(run.key for run in runs)  # each exactly once, the failed too
    pids = {c["pid"] for c in done}
    assert len(pids) == 2 and os.getpid() not in pids
    assert {c["device"] for c in done} == {"cpu"}
    assert sorted(o.key for o in result.outcomes) == sorted(run.key for run in runs)
    assert {o.worker for o in result.outcomes} == {0, 1}
    assert result.unfinished == [bad] and [o.key for o in result.failed] == [bad] and result.exit_code == 1
    assert any(line.startswith("[worker ") and "FAILED" in line for line in lines)


def test_a_stopped_worker_leaves_its_run_resumable_to_the_others(tmp_path):
    runs = fewshot_plan(tmp_path)
    runner = FakeRunner(tmp_path / "calls.log", interrupt_at=1)  # whichever worker starts first is stopped at once
    result = execute_plan(runs, tmp_path, runner, jobs=2, devices=["cpu", "cpu"], threads=1, log=quiet, poll=0.02)
    assert result.interrupted and result.exit_code == 130
    done = calls(runner.log)
    stopped = done[0]
    assert [c["key"] for c in done if c["pid"] == stopped["pid"]] == [stopped["key"]]  # that worker ended there
    assert sorted(c["key"] for c in done[1:]) == sorted(run.key for run in runs)  # the other one did every run ...
    resumed = [o for o in result.outcomes if o.key == stopped["key"]]
    assert [o.action for o in resumed] == ["resume"]  # ... continuing the stopped one once its claim was free
    assert result.unfinished == []


def test_the_worker_loop_waits_for_runs_held_by_others(tmp_path):
    runs = fewshot_plan(tmp_path, datasets=("dtd",), shots=(1,), seeds=(1, 2), methods=("coop",), baselines=False)
    held = try_claim(tmp_path, runs[0].key)
    runner = FakeRunner(tmp_path / "calls.log")

    def finish_held_run() -> None:
        time.sleep(0.3)
        runs[0].run_dir.mkdir(parents=True)
        fake_run_folder(runs[0].run_dir, runs[0].config.to_dict())
        (runs[0].run_dir / "results.json").write_text("{}", encoding="utf-8")
        held.release()

    other = threading.Thread(target=finish_held_run)
    other.start()
    outcomes = work(runs, tmp_path, runner, session="s1", log=quiet, poll=0.02)
    other.join()
    assert [o.key for o in outcomes] == [runs[1].key]  # the held run was left to its holder, then seen finished
    assert [c["key"] for c in calls(runner.log)] == [runs[1].key]


def test_worker_devices_and_threads():
    assert worker_devices(3, "auto", 2) == ["cuda:0", "cuda:1", "cuda:0"]
    assert worker_devices(2, "auto", 0) == ["cpu", "cpu"]
    assert worker_devices(2, "cuda:1", 4) == ["cuda:1", "cuda:1"]
    assert worker_devices(2, "cpu", 4) == ["cpu", "cpu"]
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        worker_devices(2, "cuda", 0)
    assert threads_per_worker(2, cores=16) == 8
    assert threads_per_worker(4, cores=2) == 1
