"""`vlprompt train` under torchrun (2 gloo processes on the CPU) writes the same run as one process.

Only rank 0 opens the run folder and writes files; both ranks share feature extraction and training. The learned
context equals the single-process run's up to the order of float32 sums (see tests/test_dist.py for the bound).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from support import FIXTURES, free_port, needs_fixtures

from vlprompt.harness.cli.main import main
from vlprompt.harness.rundir import load_params

pytestmark = needs_fixtures


@pytest.mark.slow
@pytest.mark.parametrize(("method", "options"), [
    ("coop", ["--n-ctx", "2"]),
    ("prograd", ["--n-ctx", "6"]),  # the guide gradient is averaged over ranks before the projection
    ("tcp", ["--class-token-layer", "1"]),  # regulariser on every rank, Adam
])
def test_torchrun_training_matches_one_process(tmp_path, monkeypatch, tiny_model_file, method, options):
    model = tiny_model_file
    args = ["train", "--method", method, "--dataset", "dtd", "--root", str(FIXTURES), "--shots", "2", "--epochs", "3",
            "--lr", "0.05", *options, "--model", str(model), "--device", "cpu", "--precision", "fp32", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "VLPROMPT_CACHE": str(tmp_path / "cache")}
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "vlprompt.harness.cli.main", *args,
               "--out", str(tmp_path / "ddp")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("test accuracy") == 1  # only rank 0 reports

    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "cache"))
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    ddp, single = load_params(tmp_path / "ddp"), load_params(tmp_path / "single")
    assert ddp.keys() == single.keys()
    for key in ddp:
        torch.testing.assert_close(ddp[key], single[key], rtol=0.0, atol=1e-5)
    config = json.loads((tmp_path / "ddp" / "config.json").read_text(encoding="utf-8"))
    assert config == json.loads((tmp_path / "single" / "config.json").read_text(encoding="utf-8"))
    assert (tmp_path / "ddp" / "fewshot.json").read_bytes() == (tmp_path / "single" / "fewshot.json").read_bytes()
