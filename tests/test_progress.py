"""Progress lines of long steps: at a steady interval (a fake clock), on a non-terminal stderr and in log.txt;
left off the console while a terminal bar shows the same thing; used by training, extraction and evaluation."""

from __future__ import annotations

import pytest
from test_train_standins import LinearHead, clustered_features

from vlprompt.common.progress import Progress, format_duration, format_rate, progress
from vlprompt.harness.cli.common import console_logging
from vlprompt.harness.config import RunConfig
from vlprompt.harness.rundir import RunDir
from vlprompt.training.config import TrainConfig
from vlprompt.training.loop import train


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_every_interval_and_at_each_tenth_with_a_minimum_gap():
    clock, lines = Clock(), []
    with Progress(100, "image features", "img", clock=clock, emit=lines.append) as shown:
        for _ in range(9):  # 9 % done over 27 s: no line yet
            clock.now += 3.0
            shown.update(1)
        assert lines == []
        clock.now += 3.0
        shown.update(1)  # 10 % done, 30 s since the start: one line
        assert lines == ["image features: 10/100 img (10%), 3.0 s/img, ETA 4m30s"]
        clock.now += 1.0
        shown.update(10)  # 20 %, but only 1 s after the last line: held back
        assert len(lines) == 1
        clock.now += 5.0
        shown.update(1)  # past the 20 % mark and 6 s since the last line
        assert lines[-1] == "image features: 21/100 img (21%), 1.7 s/img, ETA 2m15s"
        clock.now += 30.0
        shown.update(1)  # 30 s since the last line: a line whatever the fraction
        assert len(lines) == 3 and lines[-1].startswith("image features: 22/100 img (22%)")
        shown.update(78)
        assert len(lines) == 3  # the end is reported once, on close
    assert lines[-1] == "image features: 100/100 img in 1m06s, 1.5 img/s"
    assert len(lines) == 4


def test_rates_and_durations_read_well():
    assert format_rate(52, 10.0, "img") == "5.2 img/s"
    assert format_rate(3, 36.9, "epoch") == "12.3 s/epoch"
    assert format_duration(42.4) == "42s" and format_duration(381) == "6m21s" and format_duration(7500) == "2h05m"
    assert format_duration(float("inf")) == "?"


def test_a_resumed_step_counts_its_rate_from_what_it_did():
    clock, lines = Clock(), []
    with Progress(10, "train", "epoch", initial=6, clock=clock, emit=lines.append) as shown:
        clock.now += 40.0
        shown.update(1)
        assert lines == ["train: 7/10 epoch (70%), 40.0 s/epoch, ETA 2m00s"]
        shown.set_postfix(loss="0.4132")
        clock.now += 40.0
        shown.update(3)
    assert lines[-1] == "train: 10/10 epoch in 1m20s, 20.0 s/epoch, loss 0.4132"


def test_lines_reach_a_non_terminal_stderr_and_log_txt(tmp_path, capsys):
    clock = Clock()
    with RunDir.create_or_open(tmp_path / "run", RunConfig(method="coop", dataset="dtd").to_dict()) as run, console_logging(quiet=False), \
            run.capture_logs():
        with progress(4, "evaluate", "img", clock=clock) as shown:  # show=None: stderr here is not a terminal
            assert shown._bar is None
            for _ in range(3):
                clock.now += 31.0
                shown.update(1)
    err = capsys.readouterr().err.splitlines()
    log = (tmp_path / "run" / "log.txt").read_text()
    expected = ["evaluate: 1/4 img (25%), 31.0 s/img, ETA 1m33s", "evaluate: 2/4 img (50%), 31.0 s/img, ETA 1m02s",
                "evaluate: 3/4 img (75%), 31.0 s/img, ETA 31s", "evaluate: 3/4 img in 1m33s, 31.0 s/img"]
    assert [line for line in err if line.startswith("evaluate:")] == expected
    for line in expected:
        assert f"vlprompt.progress: {line}" in log


def test_beside_a_terminal_bar_lines_go_to_log_txt_only(tmp_path, capsys):
    clock = Clock()
    with RunDir.create_or_open(tmp_path / "run", RunConfig(method="coop", dataset="dtd").to_dict()) as run, console_logging(quiet=False), \
            run.capture_logs():
        with progress(2, "train", "epoch", show=True, clock=clock) as shown:
            clock.now += 31.0
            shown.update(1)
    err = capsys.readouterr().err
    assert "train: 1/2 epoch (50%)" not in err  # the bar (tqdm, on stderr) says it
    assert "train: 1/2 epoch (50%), 31.0 s/epoch" in (tmp_path / "run" / "log.txt").read_text()


def test_no_lines_from_other_ranks():
    lines: list[str] = []
    with Progress(2, "train", "epoch", lines=False, emit=lines.append) as shown:
        shown.update(2)
    assert lines == []


@pytest.mark.parametrize("epochs", [2])
def test_training_writes_its_progress_into_log_txt(tmp_path, epochs):
    feats = clustered_features(per_class=2)
    with RunDir.create_or_open(tmp_path / "run", RunConfig(method="coop", dataset="dtd").to_dict()) as run:
        train(LinearHead(64, 5), feats, TrainConfig(epochs=epochs, batch_size=8, precision="fp32"), run_dir=run,
              progress=False)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert f"vlprompt.progress: train: {epochs}/{epochs} epoch in " in log
    assert "s/epoch, loss " in log or "epoch/s, loss " in log
