"""Protocol runs as one job array through submitit: options, the Slurm submission's parameters, and the local
executor end to end: one task per run, a killed task is rerun alone by the next invocation, nothing lost or run
twice; `vlprompt bench --executor local` completes a --budget plan with the real pipeline."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("submitit")

from run_folders import fake_run_folder  # noqa: E402

from vlprompt.errors import ConfigError  # noqa: E402
from vlprompt.harness.bench.arrays import (  # noqa: E402
    ArrayOptions,
    array_statuses,
    make_executor,
    parse_slurm_options,
    parse_time,
    read_submissions,
    submit_array,
)
from vlprompt.harness.bench.execute import RunRequest  # noqa: E402
from vlprompt.harness.bench.protocols import ProtocolOptions, build_plan  # noqa: E402
from vlprompt.harness.bench.status import RunState, inspect_run  # noqa: E402

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS.parents[1] / "shared" / "fixtures" / "coop_data"


@pytest.fixture(autouse=True)
def importable_tests(monkeypatch):
    """Array tasks are new processes: they unpickle this module's runner, so they need this folder on their path."""
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(TESTS), path) if p))


def test_time_limits_and_options_are_parsed():
    assert [parse_time(t) for t in ("90", "30:30", "02:00:00", "1-00", "1-02:30", "0-00:00:30")] == \
        [90, 31, 120, 1440, 1590, 1]
    for bad in ("", "1h", "-5", "0", "1:2:3:4"):
        with pytest.raises(ConfigError, match="--slurm-time"):
            parse_time(bad)
    assert parse_slurm_options(["account=abc", "--qos=high", "cpus-per-task=8", "exclusive"]) == \
        {"account": "abc", "qos": "high", "cpus_per_task": "8", "exclusive": True}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_slurm_options(["=x"])
    with pytest.raises(ConfigError, match="--executor"):
        ArrayOptions(executor="pbs")
    with pytest.raises(ConfigError, match="--slurm-gpus-per-task"):
        ArrayOptions(gpus_per_task=0)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """srun, sbatch and sacct stand-ins on PATH: sbatch keeps the script it gets and answers job 4242; sacct prints
    the table in ``states.txt`` (``JobID|State|NodeList`` lines)."""
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {bin_dir}/submitted.sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "sacct").write_text(f"#!/bin/sh\necho 'JobID|State|NodeList'\ncat {bin_dir}/states.txt\n")
    (bin_dir / "states.txt").write_text("")
    for name in ("srun", "sbatch", "sacct"):
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_slurm_submits_one_array_with_the_requested_resources_and_resubmits_only_lost_tasks(tmp_path, fake_slurm):
    out = tmp_path / "out"
    runs = build_plan("fewshot", ProtocolOptions(out=out, datasets=("dtd",), shots=(1,), seeds=(1,),
                                                 model="tiny.pt", budget=True))
    options = ArrayOptions(executor="slurm", partition="gpu", gpus_per_task=1, time_min=90, array_parallelism=2,
                           extra={"account": "abc", "mem": "32G"})
    result = submit_array(runs, out, KillingRunner(tmp_path / "log"), options, session="s1")
    assert result.job_ids == ["4242_0", "4242_1", "4242_2"]
    script = (fake_slurm / "submitted.sh").read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-task=1", "#SBATCH --time=90",
                 "#SBATCH --account=abc", "#SBATCH --mem=32G", "#SBATCH --job-name=vlprompt-bench",
                 "#SBATCH --array=0-2%2"):
        assert line in script
    recorded = read_submissions(out)
    assert {entry["job_id"] for entry in recorded.values()} == set(result.job_ids)
    assert str(make_executor(out, options).folder).startswith(str(out / ".bench" / "submitit"))

    keys = {entry["job_id"]: key for key, entry in recorded.items()}
    (fake_slurm / "states.txt").write_text("4242_0|COMPLETED|n1\n4242_1|RUNNING|n2\n4242_2|TIMEOUT|n3\n")
    finished = next(run for run in runs if run.key == keys["4242_0"])
    fake_run_folder(finished.run_dir, finished.config.to_dict())
    (finished.run_dir / "results.json").write_text("{}")
    states = {s.run.key: s for s in array_statuses(runs, out)}
    assert states[keys["4242_0"]].label == "finished"
    assert states[keys["4242_1"]].label == "running" and not states[keys["4242_1"]].to_submit
    assert states[keys["4242_2"]].label == "lost" and states[keys["4242_2"]].scheduler == "TIMEOUT"
    todo = [s.run for s in states.values() if s.to_submit]
    again = submit_array(todo, out, KillingRunner(tmp_path / "log"), options, session="s2")
    assert again.submitted == [keys["4242_2"]] and again.job_ids == ["4242"]  # one task: submitit sends a plain job
    assert "#SBATCH --array" not in (fake_slurm / "submitted.sh").read_text()


def test_without_sacct_answers_nothing_is_resubmitted(tmp_path, fake_slurm):
    out = tmp_path / "out"
    runs = build_plan("fewshot", ProtocolOptions(out=out, datasets=("dtd",), shots=(1,), seeds=(1,),
                                                 model="tiny.pt", methods=("coop",), baselines=False))
    submit_array(runs, out, KillingRunner(tmp_path / "log"), ArrayOptions(executor="slurm"), session="s")
    (fake_slurm / "sacct").write_text("#!/bin/sh\nexit 1\n")
    (status,) = array_statuses(runs, out)
    assert status.active and not status.to_submit and "UNKNOWN" in status.scheduler


def test_slurm_needs_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    with pytest.raises(ConfigError, match="login node"):
        make_executor(tmp_path, ArrayOptions(executor="slurm"))


# ------------------------------------------------------------------------------------------- local executor


@dataclass(frozen=True)
class KillingRunner:
    """Writes what the pipeline would and logs each call; the first call for ``kill`` dies by SIGKILL midway (after
    creating the run folder, as a task killed by the scheduler during training would)."""

    log: Path
    kill: str = ""

    def __call__(self, request: RunRequest) -> None:
        run = request.run
        with open(self.log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"key": run.key, "pid": os.getpid()}) + "\n")
        fake_run_folder(run.run_dir, run.config.to_dict(), progress=True)  # a run that finished an epoch
        marker = self.log.with_suffix(".killed")
        if run.key == self.kill and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        (run.run_dir / "results.json").write_text("{}", encoding="utf-8")
        for evaluation in request.evals:
            (run.run_dir / evaluation.filename).write_text("{}", encoding="utf-8")


def calls(log: Path) -> list[str]:
    return [json.loads(line)["key"] for line in log.read_text(encoding="utf-8").splitlines()] if log.exists() else []


@pytest.mark.slow
def test_a_killed_task_is_rerun_alone_and_nothing_is_lost_or_duplicated(tmp_path):
    out = tmp_path / "out"
    runs = build_plan("fewshot", ProtocolOptions(out=out, datasets=("dtd",), shots=(1,), seeds=(1, 2),
                                                 model="tiny.pt", budget=True))
    keys = [run.key for run in runs]
    assert len(keys) == 5  # zeroshot; linear_probe and coop for seeds 1, 2
    victim = next(key for key in keys if key.endswith("coop/shots1/seed1"))
    log = tmp_path / "calls.log"
    options = ArrayOptions(executor="local", array_parallelism=2, time_min=10)
    runner = KillingRunner(log, kill=victim)

    first = submit_array(runs, out, runner, options, session="s1", log=lambda line: None, poll=0.1)
    assert sorted(first.submitted) == sorted(keys) and len(first.job_ids) == len(keys)
    died = [o for o in first.outcomes if not o["ok"]]
    assert [o["key"] for o in died] == [victim] and "ended without finishing" in died[0]["error"]
    assert sorted(calls(log)) == sorted(keys)  # one task per run: each run ran once
    states = {s.run.key: s for s in array_statuses(runs, out)}
    assert states[victim].label == "lost" and states[victim].to_submit
    assert inspect_run(next(r for r in runs if r.key == victim), out).state is RunState.PARTIAL
    assert all(states[key].label == "finished" for key in keys if key != victim)
    recorded = read_submissions(out)
    assert set(recorded) == set(keys) and all(entry["executor"] == "local" for entry in recorded.values())

    todo = [s.run for s in states.values() if s.to_submit]
    second = submit_array(todo, out, runner, options, session="s2", log=lambda line: None, poll=0.1)
    assert second.submitted == [victim] and all(o["ok"] for o in second.outcomes)
    assert sorted(calls(log)) == sorted(keys + [victim])  # only the killed run ran again
    assert all(s.label == "finished" for s in array_statuses(runs, out))
    assert read_submissions(out)[victim]["session"] == "s2"
    for run in runs:  # every result present once, nothing left half-written
        assert (run.run_dir / "results.json").is_file()
        assert not list(run.run_dir.glob(".*.tmp"))


def test_a_running_task_is_never_submitted_again(tmp_path):
    from vlprompt.harness.bench import arrays

    out = tmp_path / "out"
    runs = build_plan("fewshot", ProtocolOptions(out=out, datasets=("dtd",), shots=(1,), seeds=(1,),
                                                 model="tiny.pt", methods=("coop",), baselines=False))
    (run,) = runs
    arrays._record(out, {run.key: {"job_id": str(os.getpid()), "executor": "local",
                                   "host": arrays.socket.gethostname(), "submitted": arrays._now(), "session": "x"}})
    (status,) = array_statuses(runs, out)
    assert status.active and status.label == "running" and not status.to_submit
    arrays._record(out, {run.key: {"job_id": "999999999", "executor": "local",
                                   "host": arrays.socket.gethostname(), "submitted": arrays._now(), "session": "x"}})
    (status,) = array_statuses(runs, out)
    assert not status.active and status.label == "lost"  # recorded, its process gone, no result
    assert status.to_submit


@pytest.mark.slow
@pytest.mark.skipif(not FIXTURES.is_dir(), reason="fixtures (../shared) absent")
def test_bench_executor_local_runs_a_budget_plan_end_to_end(tmp_path, monkeypatch, capsys):
    from clip_formats import save_openai_state_dict

    from vlprompt.backbone.tiny import build_tiny_clip
    from vlprompt.harness.cli.main import main

    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "cache"))
    model = save_openai_state_dict(build_tiny_clip("vit"), tmp_path / "tiny.pt")
    out = tmp_path / "out"
    args = ["bench", "fewshot", "--out", str(out), "--root", str(FIXTURES), "--model", str(model), "--datasets",
            "dtd", "--shots", "1", "--seeds", "1", "--budget", "--precision", "fp32", "--device", "cpu",
            "--executor", "local", "--slurm-array-parallelism", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "3 to submit (local)" in printed and "totals: 3 finished" in printed
    found = [json.loads(p.read_text()) for p in out.rglob("results.json")]
    assert sorted(r["method"] for r in found) == ["coop", "linear_probe", "zeroshot"]
    assert all(r["budget"] is True and r["precision"] == "fp32" for r in found)
    summary = json.loads((out / "bench-fewshot-budget.json").read_text())
    assert summary["executor"] == "local" and summary["unfinished"] == [] and len(summary["job_ids"]) == 3
    assert main(args) == 0  # again: nothing to submit
    assert "3 finished, 0 pending or running, 0 to submit" in capsys.readouterr().out
    assert main([*args[:-4], "--status"]) == 0
    assert "totals: 3 finished" in capsys.readouterr().out
