"""Plain helpers the tests import (no tests here; pytest fixtures live in conftest.py): where the shared fixtures
are and the markers that skip without them, tiny synthetic images and layouts, a free local port, and the two
comparisons of float outputs (bit for bit where the implementation promises it, else a float32 tolerance).

Import as ``from support import FIXTURES, needs_fixtures, ...`` (pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

SHARED = Path(__file__).parents[2] / "shared"
FIXTURES = SHARED / "fixtures" / "coop_data"
SHARED_SPLITS = SHARED / "splits"

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"fixtures (../shared) absent ({FIXTURES})")
needs_shared_splits = pytest.mark.skipif(not SHARED_SPLITS.is_dir(),
                                         reason=f"shared split files absent ({SHARED_SPLITS})")


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """``vlprompt ARGS`` in this process: exit code, stdout and stderr (``capsys``: pytest's capture fixture)."""
    from vlprompt.harness.cli.main import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_json(path: Path):
    """A JSON file's content (UTF-8)."""
    return json.loads(path.read_text(encoding="utf-8"))


def per_class(items) -> Counter:
    """How many of ``items`` carry each label."""
    return Counter(item.label for item in items)


def write_image(path: Path, value: int = 0, size: tuple[int, int] = (6, 4)) -> Path:
    """A tiny solid-colour image, format from the suffix (JPEG for .jpg/.JPEG); ``value`` sets the colour."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = (value * 37 % 256, value * 91 % 256, value * 53 % 256)
    Image.new("RGB", size, colour).save(path)
    return path


def class_folders(base: Path, counts: Mapping[str, int], suffix: str = ".jpg") -> dict[str, list[str]]:
    """``base/<class>/img<i><suffix>`` for each class; returns the relative paths per class."""
    made: dict[str, list[str]] = {}
    for number, (name, count) in enumerate(counts.items()):
        made[name] = []
        for i in range(count):
            write_image(base / name / f"img{i:03d}{suffix}", number * 10 + i)
            made[name].append(f"{name}/img{i:03d}{suffix}")
    return made


def noise_image(height: int, width: int, rng: np.random.Generator | int = 0) -> Image.Image:
    """An RGB image of uniform random pixels (a seed or a generator to draw from)."""
    rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def truncated_jpeg(path: Path) -> Path:
    """A real 64x64 noise JPEG cut in half (Pillow refuses it when decoding)."""
    buffer = io.BytesIO()
    noise_image(64, 64).save(buffer, "JPEG", quality=95)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a gloo rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def random_features(clip, rows: int) -> torch.Tensor:
    """``rows`` random image features of the model's embedding width, always the same (seed 0)."""
    return torch.randn(rows, clip.config.embed_dim, generator=torch.Generator().manual_seed(0))


# Float outputs of the same maths computed on another CPU kernel path. A model loaded from a file may hold its weights
# in other memory (safetensors and assign=True loading keep the file's 8-byte offsets, not the allocator's 64-byte
# alignment); another batch shape or thread count also changes how a vectorised kernel blocks its sums. Each float32
# dot product or reduction is then rounded in another order: about one ulp per reduction (measured 6e-8 on image
# features of magnitude 0.39, tiny ResNet loaded from safetensors on an AMD EPYC with AVX-512, i.e. ~1.3 eps). The
# tiny CLIPs are a few layers deep with reductions over <= 256 terms, so the bound used is 1e-5 of the output's
# largest magnitude (~80 eps, far above rounding) plus rtol 1e-6: a real difference (another activation, a missing
# layer, other weights) moves the outputs by 1e-3 or more.
FP32_RTOL = 1e-6
FP32_ATOL_OF_MAX = 1e-5


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The same float32 computation reached by another kernel path (see above): equal up to rounding order."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=FP32_RTOL, atol=FP32_ATOL_OF_MAX * scale)


def assert_same_state(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    """What loading promises: the same names and bit-identical values (state dicts, whatever their memory layout)."""
    state, expected = loaded.state_dict(), original.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


CLI_LAUNCHER = "import sys; from vlprompt.harness.cli.main import main; sys.exit(main(sys.argv[1:]))"


def kill_and_resume(args: list[str], environ: Mapping[str, str], tmp_path: Path, kill_after: str) -> None:
    """Run ``vlprompt *args`` to the end in ``tmp_path/straight``; run it again in ``tmp_path/killed``, SIGKILL it
    (no clean-up at all) when a stdout line contains ``kill_after``, resume it with ``--resume``; then assert that the
    resumed run saved the same learned tensors, bit for bit, and the same metrics as the uninterrupted one."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    command = [sys.executable, "-c", CLI_LAUNCHER, *args, "--out"]
    done = subprocess.run([*command, str(straight)], env=dict(environ), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    process = subprocess.Popen([*command, str(killed)], env=dict(environ), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if kill_after in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "results.json").exists()
    resumed = subprocess.run([*command, str(killed), "--resume"], env=dict(environ), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((killed / "results.json").read_text())
    assert results["fit"]["resumed_after_epoch"] >= 2
    want, got = load_file(straight / "prompt.safetensors"), load_file(killed / "prompt.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        assert (want[key] == got[key]).all(), key
    assert results["metrics"] == json.loads((straight / "results.json").read_text())["metrics"]
