"""Run folders: locking, configuration checks, finished runs, overwrite without losing work, checkpoints, results."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vlprompt.harness.config import RunConfig
from vlprompt.errors import CheckpointError, ConfigError, RunError
from vlprompt.harness.rundir import RunDir, folder_state, load_params, result_payload

CONFIG = {"method": "coop", "dataset": "dtd", "train": {"lr": 0.002, "device": "cpu"}, "shots": 16}
"""A run configuration (partial: RunConfig fills in the defaults when it reads it)."""


def _finish(run: RunDir, accuracy: float = 50.0) -> None:
    run.write_result("results", {"metrics": {"accuracy": accuracy}})


def _snapshot(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("run.lock", ".vlprompt-run")}


def test_new_run_writes_config_and_statuses(tmp_path):
    path = tmp_path / "runs" / "a"
    assert folder_state(path) == "absent"
    with RunDir.create_or_open(path, CONFIG) as run:
        assert json.loads((path / "config.json").read_text()) == CONFIG
        assert not run.resumed and run.state == "partial"
        _finish(run)
        assert run.state == "finished"
    assert folder_state(path) == "finished"


def test_folder_in_use_is_refused_naming_the_pid(tmp_path):
    with RunDir.create_or_open(tmp_path / "a", CONFIG):
        before = _snapshot(tmp_path / "a")
        with pytest.raises(RunError, match=rf"run folder .*a is in use by another process \(pid {os.getpid()}\)"):
            RunDir.create_or_open(tmp_path / "a", CONFIG, resume=True)
        assert _snapshot(tmp_path / "a") == before
    with RunDir.create_or_open(tmp_path / "a", CONFIG, resume=True) as run:  # released on close
        assert not run.resumed  # nothing was finished there: the run starts afresh


def test_lock_held_by_another_process(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from vlprompt.harness.rundir import RunDir
        run = RunDir.create_or_open({str(tmp_path / "a")!r}, {{"method": "coop", "dataset": "dtd"}})
        print("locked", flush=True)
        sys.stdin.readline()
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=rf"in use by another process \(pid {holder.pid}\)"):
            RunDir.create_or_open(tmp_path / "a", CONFIG, resume=True)
    finally:
        holder.communicate("\n", timeout=30)
    with RunDir.create_or_open(tmp_path / "a", CONFIG, resume=True):  # the holder ended: free again
        pass


def test_different_configuration_is_refused_listing_keys(tmp_path):
    with RunDir.create_or_open(tmp_path / "a", CONFIG) as run:
        _finish(run)
    before = _snapshot(tmp_path / "a")
    changed = {**CONFIG, "shots": 4, "train": {"lr": 0.01, "device": "cpu"}}
    with pytest.raises(RunError) as caught:
        RunDir.create_or_open(tmp_path / "a", changed, resume=True)
    message = str(caught.value)
    assert "different configuration" in message
    assert "shots: saved 16, now 4" in message and "train.lr: saved 0.002, now 0.01" in message
    assert "new --out" in message and "--overwrite" in message
    assert _snapshot(tmp_path / "a") == before


def test_finished_run_is_refused_and_kept(tmp_path):
    with RunDir.create_or_open(tmp_path / "a", CONFIG) as run:
        _finish(run)
    before = _snapshot(tmp_path / "a")
    for kwargs in ({}, {"resume": True}):
        with pytest.raises(RunError, match="holds a finished run.*--overwrite"):
            RunDir.create_or_open(tmp_path / "a", CONFIG, **kwargs)
    assert _snapshot(tmp_path / "a") == before


def test_unfinished_run_needs_resume(tmp_path):
    with RunDir.create_or_open(tmp_path / "a", CONFIG) as run:
        run.save_checkpoint({}, {}, {"epoch": 1})  # an epoch finished: worth resuming, not restarting
    with pytest.raises(RunError, match="unfinished run with this configuration; pass --resume"):
        RunDir.create_or_open(tmp_path / "a", CONFIG)
    with pytest.raises(ConfigError, match="exclude each other"):
        RunDir.create_or_open(tmp_path / "a", CONFIG, resume=True, overwrite=True)


def test_resume_tolerates_ignored_keys_and_records_them(tmp_path):
    with RunDir.create_or_open(tmp_path / "a", CONFIG) as run:
        run.save_checkpoint({}, {}, {"epoch": 1})
    moved = {**CONFIG, "train": {"lr": 0.002, "device": "cuda"}}
    with pytest.raises(RunError, match="train.device"):
        RunDir.create_or_open(tmp_path / "a", moved, resume=True)
    with RunDir.create_or_open(tmp_path / "a", moved, resume=True, ignore_keys=("train.device",)) as run:
        assert run.resumed
    assert json.loads((tmp_path / "a" / "config.json").read_text())["train"]["device"] == "cuda"


def test_resume_without_a_run_starts_one(tmp_path):
    with RunDir.create_or_open(tmp_path / "a", CONFIG, resume=True) as run:
        assert not run.resumed and run.state == "partial"


def test_foreign_folders_and_files_are_refused(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("keep me")
    with pytest.raises(RunError, match=r"not a vlprompt run folder and is not empty \(thesis.tex\)"):
        RunDir.create_or_open(tmp_path / "docs", CONFIG)
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["thesis.tex"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="is a file"):
        RunDir.create_or_open(tmp_path / "file", CONFIG)


def test_overwrite_keeps_the_old_run_until_the_new_one_finishes(tmp_path):
    path = tmp_path / "a"
    with RunDir.create_or_open(path, CONFIG) as run:
        run.save_checkpoint({"w": torch.ones(2)}, {}, {"epoch": 1})
        _finish(run, accuracy=61.0)
    old = _snapshot(path)
    changed = {**CONFIG, "shots": 8}

    # the new run crashes before finishing: the old one is intact in previous/
    with RunDir.create_or_open(path, changed, overwrite=True) as run:
        assert run.state == "partial"
        run.save_checkpoint({"w": torch.zeros(2)}, {}, {"epoch": 1})
    assert {k[len("previous/"):]: v for k, v in _snapshot(path).items() if k.startswith("previous/")} == old

    # overwriting again drops the failed attempt, still keeps the finished old run
    with RunDir.create_or_open(path, changed, overwrite=True) as run:
        assert not (path / "state.json").exists()
        assert {k[len("previous/"):]: v for k, v in _snapshot(path).items() if k.startswith("previous/")} == old
        _finish(run, accuracy=70.0)  # success: the old run goes
    assert not (path / "previous").exists()
    assert json.loads((path / "results.json").read_text())["metrics"]["accuracy"] == 70.0
    assert json.loads((path / "config.json").read_text())["shots"] == 8


def test_interrupted_set_aside_is_completed(tmp_path):
    path = tmp_path / "a"
    with RunDir.create_or_open(path, CONFIG) as run:
        _finish(run)
    old = _snapshot(path)
    # simulate a crash half-way through moving the old run aside: results.json moved, config.json not yet
    (path / ".replacing").mkdir()
    os.replace(path / "results.json", path / ".replacing" / "results.json")
    with RunDir.create_or_open(path, CONFIG, overwrite=True):
        pass
    assert {k[len("previous/"):]: v for k, v in _snapshot(path).items() if k.startswith("previous/")} == old
    assert not (path / ".replacing").exists()


def test_checkpoint_round_trip_and_damage(tmp_path):
    params = {"ctx": torch.randn(4, 8), "scale": torch.tensor(2.0)}
    optim = {"0.momentum_buffer": torch.randn(4, 8)}
    with RunDir.create_or_open(tmp_path / "a", CONFIG) as run:
        assert run.load_checkpoint() is None
        run.save_checkpoint(params, optim, {"epoch": 3, "history": [1, 2, 3]})
        checkpoint = run.load_checkpoint()
        assert checkpoint.state == {"epoch": 3, "history": [1, 2, 3]}
        assert all(torch.equal(checkpoint.params[k], v) for k, v in params.items())
        assert torch.equal(checkpoint.optim["0.momentum_buffer"], optim["0.momentum_buffer"])
        assert torch.equal(load_params(run.path)["ctx"], params["ctx"])
        assert not list(run.path.glob("*.next"))
        with open(run.path / "params.safetensors", "r+b") as handle:  # flip one byte of the tensor data
            handle.seek(-1, os.SEEK_END)
            last = handle.read(1)
            handle.seek(-1, os.SEEK_END)
            handle.write(bytes([last[0] ^ 0xFF]))
        with pytest.raises(CheckpointError, match="does not match state.json"):
            run.load_checkpoint()
        with pytest.raises(CheckpointError, match="does not match"):
            load_params(run.path)
    with pytest.raises(CheckpointError, match="train the run first"):
        load_params(tmp_path / "nothing")


def test_crash_while_saving_a_checkpoint_leaves_a_complete_one(tmp_path, monkeypatch):
    import vlprompt.harness.rundir as runs

    first = ({"w": torch.ones(3)}, {"0.m": torch.full((3,), 0.5)}, {"epoch": 1})
    second = ({"w": torch.full((3,), 2.0)}, {"0.m": torch.full((3,), 0.25)}, {"epoch": 2})
    with RunDir.create_or_open(tmp_path / "a", CONFIG) as run:
        run.save_checkpoint(*first)

        # crash before the commit (state.json not written): the first checkpoint is what loads
        real_write_json = runs.atomic_write_json
        monkeypatch.setattr(runs, "atomic_write_json", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            run.save_checkpoint(*second)
        monkeypatch.setattr(runs, "atomic_write_json", real_write_json)
        loaded = run.load_checkpoint()
        assert loaded.state["epoch"] == 1 and torch.equal(loaded.params["w"], first[0]["w"])

        # crash after the commit, before the renames: the second checkpoint is what loads
        real_replace = os.replace

        def crash_on_rename_into_place(source, target):
            if str(source).endswith(".next"):
                raise KeyboardInterrupt
            real_replace(source, target)

        monkeypatch.setattr(os, "replace", crash_on_rename_into_place)
        with pytest.raises(KeyboardInterrupt):
            run.save_checkpoint(*second)
        monkeypatch.setattr(os, "replace", real_replace)
        assert json.loads((run.path / "state.json").read_text())["epoch"] == 2  # committed
        assert sorted(p.name for p in run.path.glob("*.next")) == ["optim.safetensors.next", "params.safetensors.next"]
        assert torch.equal(load_params(run.path)["w"], second[0]["w"])  # read-only view sees it too
        loaded = run.load_checkpoint()
        assert loaded.state["epoch"] == 2 and torch.equal(loaded.params["w"], second[0]["w"])
        assert torch.equal(loaded.optim["0.m"], second[1]["0.m"])
        assert not list(run.path.glob("*.next"))


def test_results_and_logs(tmp_path):
    config = RunConfig(method="coop", dataset="dtd", shots=4, seed=2, protocol="fewshot")
    metrics = {"accuracy": 63.25, "macro_f1": 61.0, "num_samples": 8}
    with RunDir.create_or_open(tmp_path / "a", config.to_dict()) as run:
        payload = result_payload(config, metrics, timing={"train_s": 1.5, "eval_s": 0.25})
        run.write_result("results", payload)
        with pytest.raises(ConfigError, match="invalid result name"):
            run.write_result("../escape", {})
        with pytest.raises(ConfigError, match="invalid result name"):
            run.write_result("config", {})
        run.write_result("eval-eurosat", result_payload(config, metrics, eval_dataset="eurosat"))
        with run.capture_logs():
            logging.getLogger("vlprompt.test").info("hello from the run")
        logging.getLogger("vlprompt.test").info("not captured")
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert {k: saved[k] for k in ("schema", "method", "dataset", "eval_dataset", "subset", "shots", "seed", "model",
                                  "budget", "protocol")} == {
        "schema": 1, "method": "coop", "dataset": "dtd", "eval_dataset": "dtd", "subset": "all", "shots": 4,
        "seed": 2, "model": "ViT-B/16", "budget": False, "protocol": "fewshot"}
    assert saved["metrics"] == metrics and saved["timing"] == {"train_s": 1.5, "eval_s": 0.25}
    assert saved["config"] == config.to_dict()
    assert saved["versions"]["torch"] == torch.__version__
    assert json.loads((tmp_path / "a" / "eval-eurosat.json").read_text())["eval_dataset"] == "eurosat"
    log = (tmp_path / "a" / "log.txt").read_text()
    assert "hello from the run" in log and "not captured" not in log


def test_leftover_temp_file_of_a_killed_write_does_not_block_the_folder(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".config.json.abc123.tmp").write_text("{half")  # a write killed before its rename
    with RunDir.create_or_open(folder, {"a": 1}) as run:
        assert (run.path / "config.json").exists()
