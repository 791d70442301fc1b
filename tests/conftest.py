"""Fixtures shared by the test files (plain helpers, paths and skip markers: tests/support.py; checkpoint formats:
tests/clip_formats.py; a local HTTP file server and synthetic dataset archives: tests/download_support.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="module")
def clip():
    """The tiny random ViT CLIP (seed 0) most tests use, built once per test module (tests may monkeypatch it)."""
    from vlprompt.backbone.tiny import build_tiny_clip

    return build_tiny_clip("vit", seed=0)


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    """A feature cache of this test's own (VLPROMPT_CACHE), so that no test reads or fills the user's cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv("VLPROMPT_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory) -> Path:
    """The tiny ViT CLIP (seed 0) saved once as an OpenAI state dict, for commands that take ``--model PATH``."""
    from clip_formats import save_openai_state_dict

    from vlprompt.backbone.tiny import build_tiny_clip

    return save_openai_state_dict(build_tiny_clip("vit", seed=0), tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory, tiny_model_file) -> Iterator[dict[str, Any]]:
    """A test module's command-line set-up: a private cache (``VLPROMPT_CACHE``) and the fixture photographs as the
    data root (``VLPROMPT_DATA_ROOT``) in the environment, a folder of its own (``base``) and the tiny CLIP file
    (``model``). The environment is restored after the module."""
    from support import FIXTURES

    base = tmp_path_factory.mktemp("cli")
    patch = pytest.MonkeyPatch()
    patch.setenv("VLPROMPT_CACHE", str(base / "cache"))
    patch.setenv("VLPROMPT_DATA_ROOT", str(FIXTURES))
    yield {"base": base, "model": str(tiny_model_file)}
    patch.undo()


@pytest.fixture(scope="module")
def single_thread():
    """Torch on one thread for a module: tiny tensors run fastest so (several threads on a busy machine cost 10x),
    and tests comparing with worker processes that run on one thread take the same kernel path. Restored after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def features(clip):
    """Five random image features of ``clip``'s embedding width (seed 0; a module may override ``clip``)."""
    from support import random_features

    return random_features(clip, 5)
