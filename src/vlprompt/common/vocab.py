"""The project's small vocabulary, each word defined once: precision names, class subsets, the default prompt
template and backbone, folder-name slugs, and the derivation of independent random streams from a run's seed.

This module imports neither torch nor numpy (:func:`seeded_torch` imports torch when used).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import typing
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Precision = Literal["fp32", "bf16", "fp16"]
"""Compute precisions: fp32, or bf16 / fp16 autocast (weights and learned parameters stay fp32)."""
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
PrecisionChoice = Literal["auto", "fp32", "bf16", "fp16"]
"""What a user may ask for: a compute precision, or ``auto`` (measured per machine:
:func:`vlprompt.common.precision.resolve_precision`)."""
PRECISION_CHOICES: tuple[str, ...] = typing.get_args(PrecisionChoice)

Subset = Literal["all", "base", "new"]
"""Class subsets of the base-to-novel protocol: all classes, the first half (base) or the second half (new)."""
SUBSETS: tuple[str, ...] = typing.get_args(Subset)

Recipe = Literal["fewshot", "base2novel", "crossdataset"]
"""The settings whose official training recipes differ: K-shot on all classes, base-to-novel (train on the base
half), cross-dataset transfer (ImageNet source; also the runs domain generalisation evaluates)."""
RECIPES: tuple[str, ...] = typing.get_args(Recipe)
PROTOCOL_RECIPES: Mapping[str, str] = MappingProxyType({
    "fewshot": "fewshot", "base2novel": "base2novel", "crossdataset": "crossdataset", "domainshift": "crossdataset"})
"""Every protocol name (``vlprompt bench PROTOCOL``: the harness's PROTOCOLS registry has exactly these;
``RunConfig.protocol``) -> the recipe its runs train with (domain generalisation evaluates the cross-dataset source
runs)."""

DEFAULT_TEMPLATE = "a photo of a {}."
"""CLIP's generic prompt template, for class lists that come without a dataset's own template."""

DEFAULT_MODEL = "ViT-B/16"
"""The backbone of the papers' main tables."""


def slug(text: str) -> str:
    """A lower-case folder-name-safe form: ``"ViT-B/16"`` -> ``"vit-b-16"`` ("x" when nothing is left)."""
    value = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return value or "x"


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed for the independent random stream of a run named by ``keys`` (e.g. "init", or "order" and the
    epoch): SHA-256 of them, so streams do not depend on what else drew random numbers before."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded_torch(device: torch.device, seed: int | None, *keys: object) -> Iterator[None]:
    """Run a block on a fork of torch's global RNG (CPU and ``device``'s CUDA generator), seeded from
    :func:`derive_seed` of ``seed`` and ``keys`` (``seed=None``: left as it is, for a throw-away draw), and restore
    the caller's RNG state afterwards."""
    import torch

    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(derive_seed(seed, *keys))
        yield
