"""DDP training with images through the towers: PromptSRC (prompts in both towers, self-regulation, Gaussian
aggregation) under torchrun with 2 CPU processes (gloo) against one process with the same global batch.

Run as a script under torchrun, this file is the worker (see :func:`_worker`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlprompt.common import dist
from vlprompt.data.types import Item
from vlprompt.harness.config import RunConfig
from vlprompt.harness.rundir import RunDir
from vlprompt.training.config import TrainConfig
from vlprompt.training.loop import train
from vlprompt.training.sources import ImageTrainSet

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG = TrainConfig(epochs=3, batch_size=4, lr=0.05, precision="fp32")
NAMES = ["banded", "dotted", "striped", "zigzagged"]


def _write_images(folder: Path) -> list[Item]:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    items = []
    for label in range(4):
        for index in range(3):
            pixels = (torch.rand(40, 44 + index, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{label}_{index}.png")
            items.append(Item(f"{label}_{index}.png", label))
    return items


def _train_set(folder: Path) -> ImageTrainSet:
    items = [Item(f"{label}_{index}.png", label) for label in range(4) for index in range(3)]
    return ImageTrainSet(folder, items, resolution=32, views=2, pool_seed=0, num_workers=0)


def _promptsrc(seed: int):
    from vlprompt.backbone.tiny import build_tiny_clip
    from vlprompt.methods.promptsrc import PromptSRC, PromptSRCConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PromptSRC(build_tiny_clip("vit", seed=0), NAMES,
                         PromptSRCConfig(prompt_depth_text=2, prompt_depth_vision=2, gpa_mean=2.0, gpa_std=1.0))


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    with dist.distributed("cpu") as env:
        method = _promptsrc(seed=env.rank)  # rank 1 starts elsewhere: DDP must use rank 0's initialisation
        config = RunConfig(method="promptsrc", dataset="dtd").to_dict()
        run = RunDir.create_or_open(out / "run", config) if env.rank == 0 else None
        train(method, _train_set(out / "images"), CONFIG, run_dir=run)
        if run is not None:
            run.close()
        save_file({k: v.contiguous() for k, v in method.state_dict().items()}, out / f"rank{env.rank}.safetensors")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_train_promptsrc_on_images_as_one(tmp_path):
    (tmp_path / "images").mkdir()
    _write_images(tmp_path / "images")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    single = _promptsrc(seed=0)
    reference = train(single, _train_set(tmp_path / "images"), CONFIG)
    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys() == single.state_dict().keys()
    start = _promptsrc(seed=0).state_dict()
    for key, value in single.state_dict().items():
        assert torch.equal(rank0[key], rank1[key]), key  # every rank ends with the same prompts and aggregate
        # one process does the same maths; the float32 sums are ordered differently (each rank sums its half of
        # the batch, gloo adds the halves): ~1e-7 relative per step over 9 steps; training moves the prompts ~1e-2
        torch.testing.assert_close(rank0[key], value, rtol=0, atol=1e-5, msg=key)
    assert (single.ctx.detach() - start["ctx"]).abs().max() > 1e-3
    history = json.loads((tmp_path / "run" / "state.json").read_text())["history"]
    assert [h["loss"] for h in history] == pytest.approx([s.loss for s in reference.history], rel=1e-5)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
