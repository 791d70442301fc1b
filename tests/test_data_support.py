"""Helpers for the data tests (no tests here): fixture locations and tiny synthetic images and layouts."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).parents[2] / "shared"
FIXTURES = SHARED / "fixtures" / "coop_data"
SHARED_SPLITS = SHARED / "splits"

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"test fixtures absent ({FIXTURES})")
needs_shared_splits = pytest.mark.skipif(not SHARED_SPLITS.is_dir(),
                                         reason=f"shared split files absent ({SHARED_SPLITS})")


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


def truncated_jpeg(path: Path) -> Path:
    """A real 64x64 noise JPEG cut in half (Pillow refuses it when decoding)."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=95)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path
