"""Feature extraction split over 2 gloo ranks on the CPU gives exactly what one process gives.

Bit equality holds because every path computes the same thing the same way: batch size 1 everywhere (no batch shape
changes a kernel), a freshly built model in each process, and one thread in the ranks and in this module (the
single_thread fixture), so no kernel splits its sums differently."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from support import free_port, noise_image

from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.data.types import Item
from vlprompt.errors import DatasetError
from vlprompt.features.cache import FeatureCache
from vlprompt.features.extract import augmented_views, extract_features

WORLD = 2
pytestmark = pytest.mark.usefixtures("single_thread")


def _rank_main(rank: int, port: int, root: Path, items: list[Item], cache_dir: Path, out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        clip = build_tiny_clip("vit", seed=0)
        evaluation = extract_features(clip, root, items, batch_size=1, cache=FeatureCache(cache_dir), on_error="skip")
        views = augmented_views(clip, root, items, views=2, seed=5, batch_size=1, on_error="skip")
        try:
            extract_features(clip, root, items, batch_size=1)
            raised = ""
        except DatasetError as exc:
            raised = str(exc)
        torch.save({"eval": evaluation, "views": views, "raised": raised}, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture
def images(tmp_path) -> tuple[Path, list[Item]]:
    """Six random images and one broken file: 7 items, so the ranks get 4 and 3 (padding is exercised)."""
    rng = np.random.default_rng(1)
    root = tmp_path / "images"
    root.mkdir()
    items = []
    for i in range(6):
        noise_image(40 + 7 * i, 48, rng).save(root / f"{i}.png")
        items.append(Item(f"{i}.png", i % 3))
    (root / "broken.png").write_bytes(b"not a png")
    items.insert(3, Item("broken.png", 0))
    return root, items


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(images, tmp_path, monkeypatch):
    root, items = images
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cache_dir = tmp_path / "cache"
    context = mp.spawn(_rank_main, args=(free_port(), root, items, cache_dir, out_dir), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 180
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not finish within 180 s (a collective is probably waiting forever)")

    # one process, same batch composition (batch size 1), one thread like the ranks: bit-identical features
    clip = build_tiny_clip("vit", seed=0)
    alone = extract_features(clip, root, items, batch_size=1, on_error="skip")
    alone_views = augmented_views(clip, root, items, views=2, seed=5, batch_size=1, on_error="skip")
    for rank in range(WORLD):
        result = torch.load(out_dir / f"rank{rank}.pt", weights_only=False)
        assert torch.equal(result["eval"].features, alone.features)
        assert result["eval"].paths == alone.paths and result["eval"].labels.tolist() == alone.labels.tolist()
        assert result["eval"].skipped == ["broken.png"]
        assert torch.equal(result["views"].features, alone_views.features)
        assert "1 of 7 images" in result["raised"] and "broken.png" in result["raised"]

    # both ranks wrote their rows: a single process now finds every good image in the cache
    calls = []
    real = clip.encode_image
    monkeypatch.setattr(clip, "encode_image", lambda x: calls.append(x.shape[0]) or real(x))
    cached = extract_features(clip, root, items, batch_size=1, cache=FeatureCache(cache_dir), on_error="skip")
    assert calls == [] and torch.equal(cached.features, alone.features)
