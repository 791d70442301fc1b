"""Distributed helpers, and DDP training of CoOp with 2 CPU processes (gloo) against one process with the same global
batch.

Run as a script under torchrun, this file is the worker (see :func:`_worker`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import free_port
from test_train_standins import Interrupt, LinearHead, clustered_features, interrupt_after

from vlprompt.common import dist
from vlprompt.training.config import TrainConfig
from vlprompt.errors import ConfigError, RunError
from vlprompt.harness.rundir import RunDir
from vlprompt.training.loop import train

pytestmark = pytest.mark.usefixtures("single_thread")

DDP_CONFIG = TrainConfig(epochs=4, batch_size=8, lr=0.01, precision="fp32")
CLASSNAMES = ["banded", "dotted", "striped", "zigzagged", "woven"]


def _coop(seed: int):
    """The real CoOp (4 context vectors) on a tiny CLIP, counting the image features its training path sees."""
    from vlprompt.backbone.tiny import build_tiny_clip
    from vlprompt.methods import METHODS

    spec = METHODS["coop"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        method = spec.build(build_tiny_clip("vit", seed=0), CLASSNAMES, spec.config_cls(n_ctx=4))
    method.rows_seen = 0

    def count(module, args):
        if module.training:  # the training path only (the trainer's finite-logits check runs in eval mode)
            module.rows_seen += args[0].shape[0]

    method.register_forward_pre_hook(count)
    return method


# ------------------------------------------------------------------------------------------ single-process helpers


def test_env_from_torchrun_variables():
    assert dist.env_from_torchrun({}) == dist.DistEnv(rank=0, world_size=1, local_rank=0)
    env = dist.env_from_torchrun({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.is_distributed) == (3, 4, 1, True)
    with pytest.raises(RunError, match="inconsistent torchrun environment RANK=4 WORLD_SIZE=4"):
        dist.env_from_torchrun({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    with pytest.raises(RunError, match="malformed torchrun environment"):
        dist.env_from_torchrun({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_single_process_answers(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert dist.init_from_env("cpu") == dist.DistEnv() and not dist.is_initialized()
    assert (dist.rank(), dist.world_size(), dist.local_rank(), dist.is_main_process()) == (0, 1, 0, True)
    payload = {"a": torch.ones(2)}
    assert dist.broadcast_object(payload) is payload
    tensor = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_sum(tensor) is tensor and tensor.tolist() == [1.0, 2.0]
    dist.barrier()
    with dist.main_process_first():
        pass


def test_devices():
    assert dist.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        dist.resolve_device("tpu")
    if torch.cuda.is_available():
        assert dist.resolve_device("auto").type == "cuda"
    else:
        assert dist.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            dist.resolve_device("cuda:0")


def test_batch_must_be_shareable_by_all_processes(monkeypatch):
    monkeypatch.setattr(dist, "world_size", lambda: 4)
    feats = clustered_features(per_class=2)
    with pytest.raises(ConfigError, match="a batch of 2 cannot be shared by 4 processes"):
        train(LinearHead(64, 5), feats, TrainConfig(epochs=2, batch_size=2, precision="fp32"))


# ----------------------------------------------------------------------------------------------------- 2 processes


def _worker(out: Path) -> None:
    """Under torchrun: an uninterrupted DDP run, and one interrupted after epoch 2 and resumed."""
    torch.set_num_threads(1)
    with dist.distributed("cpu") as env:
        feats = clustered_features()
        main = env.rank == 0
        # rank 1 starts from another initialisation: DDP must use rank 0's
        straight = _coop(seed=env.rank)
        run = RunDir.create_or_open(out / "straight", {"method": "coop", "dataset": "dtd", "protocol": "ddp"}) if main else None
        train(straight, feats, DDP_CONFIG, run_dir=run)
        if run is not None:
            run.close()
        save_file({"ctx": straight.ctx.detach(), "rows_seen": torch.tensor(straight.rows_seen)},
                  out / f"straight-rank{env.rank}.safetensors")

        run = RunDir.create_or_open(out / "resumed", {"method": "coop", "dataset": "dtd", "protocol": "ddp"}) if main else None
        try:
            train(_coop(seed=env.rank), feats, DDP_CONFIG, run_dir=run, on_epoch_end=interrupt_after(2))
        except Interrupt:
            pass
        if run is not None:
            run.close()
        run = RunDir.create_or_open(out / "resumed", {"method": "coop", "dataset": "dtd", "protocol": "ddp"},
                                    resume=True) if main else None
        resumed = _coop(seed=10 + env.rank)  # both ranks must take the checkpoint (incl. momentum) of rank 0
        train(resumed, feats, DDP_CONFIG, run_dir=run)
        if run is not None:
            run.close()
        save_file({"ctx": resumed.ctx.detach()}, out / f"resumed-rank{env.rank}.safetensors")


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    single = _coop(seed=0)
    reference = train(single, clustered_features(), DDP_CONFIG)
    rank0, rank1 = (load_file(tmp_path / f"straight-rank{r}.safetensors") for r in (0, 1))
    ddp = rank0["ctx"]
    # each rank computed its half of every batch: 4 epochs x 40 images / 2
    assert int(rank0["rows_seen"]) == int(rank1["rows_seen"]) == 80 and single.rows_seen == 160
    # every rank ends with the same parameters, and resuming under DDP changes nothing (bit for bit)
    assert torch.equal(rank1["ctx"], ddp)
    assert torch.equal(load_file(tmp_path / "resumed-rank0.safetensors")["ctx"], ddp)
    assert torch.equal(load_file(tmp_path / "resumed-rank1.safetensors")["ctx"], ddp)
    # One process with the same global batch does the same maths; only the order of the float32 sums differs (each
    # rank sums half of the batch, then gloo adds the halves): ~1e-7 relative per step, compounded over 20 momentum
    # steps through the logit scale of 100: measured 6.5e-7 at most. A real difference (gradient scale, data order)
    # shows on the scale of the training movement, 0.86 here; atol 1e-5 sits far from both.
    moved = (single.ctx.detach() - _coop(seed=0).ctx.detach()).abs().max().item()
    assert moved > 0.1
    torch.testing.assert_close(ddp, single.ctx.detach(), rtol=0.0, atol=1e-5)
    history = json.loads((tmp_path / "straight" / "state.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert [h["accuracy"] for h in history] == [s.accuracy for s in reference.history]
    assert [h["loss"] for h in history] == pytest.approx([s.loss for s in reference.history], rel=1e-5)
    # rank 0 alone wrote the run folder: one log, with rank 0's lines only once per epoch
    log = (tmp_path / "straight" / "log.txt").read_text()
    assert log.count("epoch 4/4: loss") == 1 and "2 processes" in log


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
