"""Speed benchmark of the "fast by construction" prompt-learning path against the plain (reference-equivalent) path.

Run from the repository root (CPU; prints a table, ``--json`` saves every number)::

    .venv/bin/python benchmarks/bench_speed.py --quick                 # a few minutes: K = 10, 102, short sections
    .venv/bin/python benchmarks/bench_speed.py --json bench.json       # full: K = 10, 102, 1000 (tens of minutes)
    .venv/bin/python benchmarks/bench_speed.py --classes 102 --sections steps --profile   # the targets only

What is measured, in one run, for a ViT-B/16-shaped CLIP with random weights (no pretrained weights are needed, the
cost does not depend on them):

* **Training steps** of CoOp (M = 16, unified context, class name at the end, batch 32) and CoCoOp (M = 4 from
  "a photo of a", batch 1) for each K:

  - ``plain``: the reference-equivalent step: the frozen image tower on the batch of 224 px images (fp32, no grad),
    the method with ``fast_text=False`` (all K prompts at 77 tokens, fp32), cross-entropy, backward, SGD step;
  - ``text plain fp32`` / ``text fast fp32`` (CoOp: both; CoCoOp: the fast one): the same step on cached image
    features, so the sources of the speed-up are visible one at a time (image tower, fast text, bf16);
  - ``ours``: cached image features (no image tower), ``fast_text=True`` (shortest length, shared prefix), bf16
    autocast on the CPU, cross-entropy, backward, SGD step (what :func:`vlprompt.training.loop.train` does per step).

  Repetitions of the paths of one group are interleaved (round robin, order rotated every round) and the median is
  reported, so the ratios are measured under the same machine load. The first call of each path is a warm-up; when it
  takes longer than ``--slow-s`` it counts as a timed run and the path gets ``--reps-slow`` runs in all.
  The plain path holds ~30-40 KB of activations per token and layer (K = 1000: ~27 GB), so above
  ``--plain-max-classes`` (or what fits in half the available memory) it is measured at a smaller class count K'
  (and K'/2 for memory) and extrapolated (exact in structure: every plain prompt is 77 tokens whatever its class
  name): time = image tower + (time(K') - image tower) * K / K', the image tower timed on its own; peak memory = the
  straight line through K'/2 and K' (allocation counts are exact). Such rows are marked ``~``.

* **Successor training steps** (section ``successors``): one row per method (KgCoOp, ProGrad, TCP with their official
  defaults, batch 32) and K: ``plain`` (image tower on 224 px images every step + the 77-token text path, fp32) vs
  ``ours`` (cached features, fast text, the chosen precision), each step as the training loop takes it (the
  method's loss terms, ProGrad's gradient alignment, TCP's Adam), measured interleaved; ratio = plain / ours. The
  plain path is not measured above ``--plain-max-classes``.

* **Floor**: FLOPs of the minimal computation of ours (see :func:`minimal_text_flops`) over the bf16 matrix-product
  rate measured in the same group (a square bf16 matmul timed between the steps); "x floor" = time / floor time.

* **Peak memory** of each step (its first call): the torch profiler's CPU memory accounting
  (``profile_memory=True``): the maximum over the step of the bytes allocated by torch's CPU allocator since the
  step began (tensors alive before the step, e.g. the weights and cached features, are not counted; memory that
  MKL/oneDNN allocate outside torch's allocator is not seen).

* **Evaluation** of CoOp on a 10,000-image test set of random features: text-encoder calls and time per path at two
  batch sizes (plain: re-encode the class prompts for every batch as the reference; ours: ``method.classifier()``
  once). Text-encoder calls are counted with a forward hook on ``clip.ln_final`` (every plain encoding passes it once; a shared-prefix encoding once per length bucket, at most 4).

* **A full 16-shot CoOp run** on 10 classes (160 synthetic JPEG images, 200 epochs, batch 32): ours end to end
  (feature extraction of the images with ``--views`` augmented views by :func:`vlprompt.features.extract.augmented_views`,
  then :func:`vlprompt.training.loop.train`), and the plain reference loop (decode + augment + image tower + 77-token text
  every step) timed for a few epochs and extrapolated (labelled).

* **Deep-prompt training steps** (section ``deep``) of MaPLe (2 tokens, depth 9) and PromptSRC (4 + 4 tokens,
  depth 9, self-regulation) at batch 4 for each K, images through the prompted towers every step:

  - ``plain``: the official code's step: the prompted text tower at 77 tokens (``fast_text=False``), fp32;
  - ``ours``: the fast text path (deep prompts inside the shared prefix, shortest lengths), ``--precision``;

  with peak memory, and the **data path**: images/s of the image-in-the-loop loader (synthetic 320x256 JPEGs decoded
  and augmented by ``--deep-workers`` DataLoader workers, nothing computed) against images/s of the prompted image
  tower alone (forward + backward at batch 4), and of whole training epochs (loader + steps) against the steps alone:
  decoding overlaps compute when the epoch rate is within 1.3x of the steps' own rate.

* **CLIP-LoRA training steps** (section ``lora``): one step of CLIP-LoRA (rank 2 on q, k, v of every block of both
  towers, dropout 0.25, AdamW, batch 32) for each K of ``--lora-classes``, images through both adapted towers:

  - ``plain``: the official code's step: the K prompts at 77 tokens, each update formed as the full ``B A`` product
    applied to the dropped input (loralib's ``LinearLoRA``), fp32;
  - ``ours``: the method's own step as the training loop takes it (shortest text length, ``(x A^T) B^T``),
    ``--precision``;

  ratio = plain / ours, with peak memory; plain is not measured above ``--plain-max-classes``.

* **Test-time prompt tuning** (section ``tpt``): TPT's cost per test image for each K (64 views, one AdamW step,
  the final prediction), as ratios in the same interleaved rounds against

  - ``zero-shot``: the plain path of one image: the image tower on it and the zero-shot classifier (text features
    computed once beforehand);
  - ``official``: the official code's computation per image: the 64 views through the image tower (fp32, no grad),
    the prompts at 77 tokens in fp32 with gradients to the context, the entropy of the 6 most confident views,
    backward, AdamW, the 77-token text again and the prediction of the original view;
  - ``ours``: the same through :meth:`vlprompt.methods.tpt.TPT.predict_views` (fast text, ``--precision``), the views
    in one image-tower call.

  The views are given as random pixels (decoding and augmenting happen in DataLoader workers beside the towers); the
  official path is not measured above ``--plain-max-classes``.

Threads: torch's intra-op thread count (``torch.get_num_threads()``, set with ``--threads``) is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vlprompt.backbone.model import CLIP, CLIPConfig
from vlprompt.backbone.tiny import tiny_config
from vlprompt.training.config import TrainConfig
from vlprompt.data.classnames import clean_classname
from vlprompt.data.splitfile import parse_split, read_shipped_json
from vlprompt.data.types import Item
from vlprompt.evaluation.metrics import autocast_for, evaluate
from vlprompt.methods.base import FrozenClipMethod, cosine_logits, logit_scale_of
from vlprompt.methods.cocoop import CoCoOp, CoCoOpConfig
from vlprompt.methods.coop import CoOp, CoOpConfig

CPU = torch.device("cpu")
GIB = 1024**3
MIB = 1024**2

MODELS: dict[str, CLIPConfig] = {
    "vit-b16": CLIPConfig(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                          vision_patch_size=16, transformer_width=512, transformer_heads=8, transformer_layers=12,
                          name="ViT-B/16 (random weights)"),
    "tiny": tiny_config("vit"),
}
"""Model shapes: ``vit-b16`` is the benchmark's; ``tiny`` (a 2-layer, 128-wide CLIP) is for the smoke test."""

NAMED_CLASS_SETS: dict[int, tuple[str, str]] = {
    10: ("EuroSAT", "split_zhou_EuroSAT.json"),
    37: ("OxfordPets", "split_zhou_OxfordPets.json"),
    47: ("DTD", "split_zhou_DescribableTextures.json"),
    100: ("Caltech101", "split_zhou_Caltech101.json"),
    101: ("UCF101", "split_zhou_UCF101.json"),
    102: ("Flowers102", "split_zhou_OxfordFlowers.json"),
    196: ("StanfordCars", "split_zhou_StanfordCars.json"),
}
"""Class counts served by a real dataset's class names (shipped split files); other counts use :func:`mixed_names`."""

ACTIVATION_FLOATS_PER_TOKEN_LAYER = 20
"""Upper estimate of the fp32 values per token and text layer that backward keeps (x, ln, q/k/v, attention out,
MLP 4w in/out of QuickGELU ...), in units of the width: used only to keep runs inside the machine's memory."""

MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "quick": {"classes": "10,102", "reps": 3, "reps_slow": 1, "slow_s": 4.0, "matmul_size": 2048,
              "eval_plain_max_batches": 3, "fullrun_ours_epochs": 10, "fullrun_plain_epochs": 1, "views": 1,
              "fullrun_measured_views": 2},
    "full": {"classes": "10,102,1000", "reps": 5, "reps_slow": 2, "slow_s": 20.0, "matmul_size": 4096,
             "eval_plain_max_batches": 0, "fullrun_ours_epochs": 0, "fullrun_plain_epochs": 2, "views": 2,
             "fullrun_measured_views": 0},
}
"""Defaults of ``--quick`` and of the full mode; every one can be overridden by its own option."""


# ----------------------------------------------------------------------------------------------------------------------
# class names


def shipped_classnames(file_name: str) -> list[str]:
    """Cleaned class names (label order) of a split file shipped with vlprompt."""
    splits = parse_split(read_shipped_json(file_name), file_name)
    return [clean_classname(name) for name in splits.raw_classnames]


def mixed_names(count: int) -> list[str]:
    """``count`` realistic class names: all shipped datasets' names interleaved round robin, repeated with a numeric
    suffix (" 2", " 3", ...) from the second round on (ImageNet's names are not shipped)."""
    lists = [shipped_classnames(file_name) for _, file_name in sorted(NAMED_CLASS_SETS.values())]
    pool: list[str] = []
    for index in range(max(len(names) for names in lists)):
        pool.extend(names[index] for names in lists if index < len(names))
    return [name if i < len(pool) else f"{name} {i // len(pool) + 1}"
            for i, name in ((i, pool[i % len(pool)]) for i in range(count))]


def class_names(count: int) -> tuple[list[str], str]:
    """Class names for K = ``count`` and where they come from."""
    if count in NAMED_CLASS_SETS:
        dataset, file_name = NAMED_CLASS_SETS[count]
        return shipped_classnames(file_name), dataset
    return mixed_names(count), "mix of all shipped datasets' names" + (" (repeated with a suffix)" if count > 593
                                                                        else "")


# ----------------------------------------------------------------------------------------------------------------------
# FLOP model


@dataclass(frozen=True)
class TextShape:
    """What the FLOP model needs of the text tower: width w, layers, output dim D, context length."""

    width: int
    layers: int
    embed_dim: int
    context_length: int

    @classmethod
    def of(cls, config: CLIPConfig) -> TextShape:
        return cls(config.transformer_width, config.transformer_layers, config.embed_dim, config.context_length)


def transformer_flops(shape: TextShape, tokens: float, keys: float, *, backward: bool) -> float:
    """FLOPs of the text blocks for ``tokens`` token-positions attending ``keys`` keys in all (summed over queries).

    Per layer and token (w = width, MLP 4w): QKV 2*w*3w + output projection 2*w*w + MLP 2*w*4w*2 = 24 w^2; attention
    scores q.k and weights.v: 4 w per (query, key) pair. Backward to the inputs only (CLIP is frozen: no weight
    gradients): a product with a frozen weight needs one product (dX), a product of two activations (attention) needs
    two (both operands get gradients): 24 w^2 per token + 8 w per pair. Elementwise ops (LayerNorm, QuickGELU,
    softmax, residuals) are ignored.
    """
    w = shape.width
    per_layer = 24 * tokens * w * w + (8 if backward else 4) * w * keys
    return shape.layers * per_layer


def blocks_forward_backward(shape: TextShape, tokens: float, keys: float) -> float:
    """Forward plus backward-to-input FLOPs of the text blocks (see :func:`transformer_flops`)."""
    forward = transformer_flops(shape, tokens, keys, backward=False)
    return forward + transformer_flops(shape, tokens, keys, backward=True)


def head_flops(shape: TextShape, prompts: float, images: int, classes: int) -> float:
    """Forward + backward of the end: ``ln_final`` + text projection at the EOT of every prompt (2 w D each way)
    and the cosine logits (2 D per (image, class) pair each way; image features are constants)."""
    return 2 * (2 * prompts * shape.width * shape.embed_dim) + 2 * (2 * images * classes * shape.embed_dim)


def minimal_text_flops(shape: TextShape, prefix_len: int, eot_index: Sequence[int], prefixes: int,
                       images: int) -> float:
    """The floor's FLOPs: forward + backward-to-input of the minimal computation of a fast prompt-learning step.

    The shared prefix (P positions: SOT + context before the name) runs once per prefix (``prefixes`` = 1 for CoOp,
    one per image for CoCoOp); each class k runs only its own suffix s_k = eot_k - P + 1 positions (no padding to
    the longest class), attending causally to the prefix and to its own earlier positions:

        tokens = prefixes * (P + sum_k s_k)
        keys   = prefixes * (P (P + 1) / 2 + sum_k (s_k P + s_k (s_k + 1) / 2))
        FLOPs  = layers * (24 w^2 tokens + 4 w keys)          (forward)
               + layers * (24 w^2 tokens + 8 w keys)          (backward to the inputs, no weight gradients)
               + head (ln_final + projection at every EOT, cosine logits; forward and backward)
    """
    suffix = [int(e) - prefix_len + 1 for e in eot_index]
    tokens = prefixes * (prefix_len + sum(suffix))
    keys = prefixes * (prefix_len * (prefix_len + 1) / 2 + sum(s * prefix_len + s * (s + 1) / 2 for s in suffix))
    return blocks_forward_backward(shape, tokens, keys) + head_flops(shape, prefixes * len(suffix), images,
                                                                      len(suffix))


def fast_text_flops(shape: TextShape, prefix_len: int, eot_index: Sequence[int], prefixes: int,
                    images: int) -> float:
    """FLOPs the fast path executes: as :func:`minimal_text_flops`, but the classes run in the length buckets of
    :func:`vlprompt.backbone.fast_text.plan_buckets`, each class padded to its bucket's suffix length S_b, and its
    queries score all P + S_b keys (the causal mask is applied, not skipped)."""
    from vlprompt.backbone.fast_text import plan_buckets

    needed = [int(e) - prefix_len + 1 for e in eot_index]
    limits = plan_buckets(needed).limits
    padded = [next(limit for limit in limits if limit >= n) for n in needed]
    tokens = prefixes * (prefix_len + sum(padded))
    keys = prefixes * (prefix_len * (prefix_len + 1) / 2 + sum(s * (prefix_len + s) for s in padded))
    return blocks_forward_backward(shape, tokens, keys) + head_flops(shape, prefixes * len(needed), images,
                                                                      len(needed))


def plain_text_flops(shape: TextShape, prompts: int, images: int, classes: int) -> float:
    """FLOPs of the plain path's text side: every prompt at the full context length, causal attention."""
    length = shape.context_length
    tokens = prompts * length
    keys = prompts * length * (length + 1) / 2
    return blocks_forward_backward(shape, tokens, keys) + head_flops(shape, prompts, images, classes)


def image_tower_flops(config: CLIPConfig, images: int) -> float:
    """Forward FLOPs of the ViT image tower: patch embedding, blocks (24 w^2 per token, 4 w per attention pair),
    projection. (The benchmark's models are ViTs.)"""
    if not config.is_vit:
        return float("nan")
    patch = int(config.vision_patch_size or 0)
    grid = config.image_resolution // patch
    tokens = grid * grid + 1
    w = config.vision_width
    layers = int(config.vision_layers)  # type: ignore[arg-type]
    per_image = (2 * (tokens - 1) * w * 3 * patch * patch + layers * (24 * tokens * w * w + 4 * w * tokens * tokens)
                 + 2 * w * config.embed_dim)
    return images * per_image


# ----------------------------------------------------------------------------------------------------------------------
# measurement helpers


def available_memory(device: torch.device = CPU) -> int:
    """Free memory of ``device`` in bytes: the GPU's free memory on CUDA, else MemAvailable of /proc/meminfo (a large
    number where it cannot be read)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 50


def activation_bytes(shape: TextShape, tokens: int) -> int:
    """Upper estimate of the text activations kept for backward (fp32) for ``tokens`` token positions."""
    return tokens * shape.layers * ACTIVATION_FLOATS_PER_TOKEN_LAYER * shape.width * 4


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously; a CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_step_memory(fn: Callable[[], None], device: torch.device = CPU) -> int:
    """Run ``fn`` once and return the peak bytes allocated during the call, counted from its start: on a CPU the torch
    profiler's running "Total Allocated" (``profile_memory=True``) of torch's CPU allocator; on CUDA the allocator's
    peak (``torch.cuda.max_memory_allocated``) minus what was allocated before."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    totals = [int(e["args"].get("Total Allocated", 0)) for e in events
              if e.get("name") == "[memory]" and int(e.get("args", {}).get("Device Type", 0)) == 0]
    return max([0, *totals])


def timed(fn: Callable[[], None], device: torch.device = CPU) -> float:
    """Wall seconds of one call (the device's queued work included)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def matmul_probe(size: int, dtype: torch.dtype, device: torch.device = CPU) -> tuple[Callable[[], None], float]:
    """A ``[size x size] @ [size x size]`` product in ``dtype`` on ``device`` and its FLOPs (2 size^3)."""
    generator = torch.Generator().manual_seed(size)
    a = torch.randn(size, size, generator=generator).to(device, dtype)
    b = torch.randn(size, size, generator=generator).to(device, dtype)
    out = torch.empty(size, size, dtype=dtype, device=device)

    def run() -> None:
        torch.mm(a, b, out=out)

    return run, 2.0 * size**3


@dataclass
class Measured:
    """One measured path of a group: what it runs and its result."""

    key: str
    label: str
    run: Callable[[], None] | None
    flops: float = 0.0                     # FLOPs the path executes (for the achieved rate); 0 = not counted
    memory: bool = True                    # measure peak memory on the first call
    timed: bool = True                     # False: the first call only (memory), no timed runs
    times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None


def measure(paths: Sequence[Measured], reps: int, reps_slow: int, slow_s: float, log: Callable[[str], None],
            device: torch.device = CPU) -> None:
    """First call of every path (peak memory, warm-up), then interleaved timed rounds (order rotated each round).

    A path whose first call exceeds ``slow_s`` keeps that call as a timed run and gets ``reps_slow`` runs in all.
    """
    wanted: dict[str, int] = {}
    for path in paths:
        assert path.run is not None
        synchronize(device)
        start = time.perf_counter()
        if path.memory:
            path.peak_bytes = peak_step_memory(path.run, device)
        else:
            path.run()
        synchronize(device)
        first = time.perf_counter() - start
        if not path.timed:
            wanted[path.key] = 0
        elif first > slow_s:
            path.times.append(first)
            wanted[path.key] = max(1, reps_slow) - 1
            path.note = (path.note + "; " if path.note else "") + f"slow: {max(1, reps_slow)} run(s)"
        else:
            wanted[path.key] = reps
        log(f"    first call of {path.label}: {first:.2f} s")
    rounds = max(wanted.values(), default=0)
    for r in range(rounds):
        order = list(paths[r % len(paths):]) + list(paths[: r % len(paths)])
        for path in order:
            if wanted[path.key] > 0:
                path.times.append(timed(path.run, device))  # type: ignore[arg-type]
                wanted[path.key] -= 1


# ----------------------------------------------------------------------------------------------------------------------
# training steps


def make_step(clip: CLIP, method: FrozenClipMethod, *, images: Tensor | None, features: Tensor, labels: Tensor,
              precision: str, device: torch.device = CPU) -> Callable[[], None]:
    """One SGD step of ``method`` (the reference recipe's SGD; learned parameters fp32).

    ``images`` given: the frozen image tower runs on them first (fp32, no grad) as in the reference; else the cached
    ``features`` are used. The method's forward runs under ``precision`` autocast, as :func:`vlprompt.training.loop.train`.
    Every tensor is moved to ``device`` (the model's) first.
    """
    images = images.to(device) if images is not None else None
    features, labels = features.to(device), labels.to(device)
    recipe = TrainConfig().completed()
    optimizer = torch.optim.SGD(method.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    regularizer = getattr(method, "regularizer", None)  # as the training loop: CLAP's penalty

    def step() -> None:
        if images is not None:
            with torch.no_grad():
                batch_features = clip.encode_image(images).float()
        else:
            batch_features = features
        with autocast_for(device, precision):
            logits = method(batch_features)
        loss = F.cross_entropy(logits.float(), labels)
        if regularizer is not None:
            loss = loss + regularizer()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


SUCCESSORS: tuple[str, ...] = ("kgcoop", "prograd", "tcp")
"""The CoOp successors of the ``successors`` section (one training-step row each per K)."""


def build_successor(name: str, clip: CLIP, names: list[str], fast: bool) -> FrozenClipMethod:
    """KgCoOp / ProGrad / TCP with their official defaults (TCP's tokens at layer 8, or the last block of a smaller
    text tower), fast or plain text path."""
    from vlprompt.methods import METHODS

    spec = METHODS[name]
    options: dict[str, Any] = {"fast_text": fast}
    if name == "tcp":
        options["class_token_layer"] = min(8, clip.config.transformer_layers - 1)
    return spec.build(clip, names, spec.config_cls(**options))


def make_successor_step(clip: CLIP, method: FrozenClipMethod, name: str, *, images: Tensor | None,
                        features: Tensor, labels: Tensor, precision: str) -> Callable[[], None]:
    """One training step of a successor exactly as :func:`vlprompt.training.loop.train` takes it: the method's
    recipe optimiser (TCP: Adam), cross-entropy plus the method's regulariser (KgCoOp, TCP), ProGrad's gradient
    alignment (:func:`~vlprompt.training.loop.step_objective`, :func:`~vlprompt.training.loop.apply_update`).

    ``images`` given: the frozen image tower runs on them first (fp32, no grad); the reference ProGrad runs a second,
    fp32, image tower for its zero-shot teacher, which the plain path here leaves out (so its plain time is a lower
    bound of the reference's)."""
    from vlprompt.training.config import resolve_train_config
    from vlprompt.training.loop import apply_update, build_optimizer, step_objective

    device = clip.device
    images = images.to(device) if images is not None else None
    features, labels = features.to(device), labels.to(device)
    recipe = resolve_train_config(TrainConfig(), method=name, shots=16, dataset="bench")
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, recipe)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    method.train()

    def step() -> None:
        if images is not None:
            with torch.no_grad():
                batch_features = clip.encode_image(images).float()
        else:
            batch_features = features
        with autocast_for(device, precision):
            logits = method(batch_features)
        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        scale = 1.0 / labels.numel()
        objective, _ = step_objective(method, loss_sum, scale)
        apply_update(method, params, optimizer, scaler, batch_features, logits, objective, scale, 1)

    return step


def bench_successors(clip: CLIP, args: argparse.Namespace, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One training-step row per successor and K: plain (image tower + 77-token text, fp32) vs ours (cached features,
    fast text, ``args.precision``), batch 32 (their few-shot recipes), measured interleaved."""
    rows = []
    batch = 32
    resolution = clip.config.image_resolution
    for name in SUCCESSORS:
        for classes in args.classes:
            names, source = class_names(classes)
            generator = torch.Generator().manual_seed(classes)
            features = torch.randn(batch, clip.config.embed_dim, generator=generator)
            labels = torch.randint(0, classes, (batch,), generator=generator)
            images = torch.randn(batch, 3, resolution, resolution, generator=generator)
            plain = make_successor_step(clip, build_successor(name, clip, names, fast=False), name, images=images,
                                        features=features, labels=labels, precision="fp32")
            ours = make_successor_step(clip, build_successor(name, clip, names, fast=True), name, images=None,
                                       features=features, labels=labels, precision=args.precision)
            paths = [Measured("plain", "plain", plain), Measured("ours", f"ours ({args.precision})", ours)]
            if classes > args.plain_max_classes:  # 77 tokens x K prompts of backward activations do not fit
                paths[0].note = f"plain not measured above --plain-max-classes {args.plain_max_classes}"
                paths = paths[1:]
            log(f"  {name} K={classes} ({source})")
            measure(paths, args.reps, args.reps_slow, args.slow_s, log, clip.device)
            by_key = {p.key: p for p in paths}
            plain_s = by_key["plain"].median if "plain" in by_key else None
            ours_s = by_key["ours"].median
            rows.append({"method": name, "classes": classes, "names_from": source, "batch": batch,
                         "plain_s": plain_s, "ours_s": ours_s,
                         "speedup": plain_s / ours_s if plain_s and ours_s else None,
                         "plain_peak_bytes": by_key["plain"].peak_bytes if "plain" in by_key else None,
                         "ours_peak_bytes": by_key["ours"].peak_bytes,
                         "note": "; ".join(p.note for p in paths if p.note) or ("" if "plain" in by_key else
                                                                                 "plain not measured")})
            gc.collect()
    return rows


@dataclass
class GroupResult:
    """The measured paths of one (method, K) group and its floor."""

    method: str
    classes: int
    names_from: str
    batch: int
    prefix_len: int
    padded_suffix: int
    mean_suffix: float
    floor_flops: float
    bf16_rate: float
    fp32_rate: float
    paths: list[Measured]

    @property
    def floor_s(self) -> float:
        return self.floor_flops / self.bf16_rate

    def path(self, key: str) -> Measured | None:
        return next((p for p in self.paths if p.key == key), None)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "paths"}
        data["floor_s"] = self.floor_s
        data["paths"] = {p.key: {"label": p.label, "times_s": p.times, "median_s": p.median, "flops": p.flops,
                                 "peak_bytes": p.peak_bytes, "note": p.note,
                                 "x_floor": (p.median / self.floor_s) if p.median else None}
                         for p in self.paths}
        return data


def build_method(kind: str, clip: CLIP, names: list[str], fast: bool) -> FrozenClipMethod:
    """CoOp (M=16, unified, end, random init) or CoCoOp (M=4 from "a photo of a"), fast or plain text path."""
    if kind == "coop":
        return CoOp(clip, names, CoOpConfig(fast_text=fast))
    return CoCoOp(clip, names, CoCoOpConfig(fast_text=fast))


def extrapolate(points: list[tuple[int, float]], target: int) -> float:
    """Affine fit y = a + b K through the first and last measured (K, y) points, evaluated at ``target``.

    Used for the plain path's peak memory (exact allocation counts, so the fit is not noisy). The plain path's time
    is instead scaled from the larger class count: text cost is proportional to K (every prompt is 77 tokens),
    the image tower is fixed and measured on its own.
    """
    (k1, y1), (k2, y2) = points[0], points[-1]
    slope = (y2 - y1) / (k2 - k1)
    return y1 + slope * (target - k1)


def bench_group(kind: str, clip: CLIP, classes: int, args: argparse.Namespace,
                log: Callable[[str], None]) -> GroupResult:
    """Measure one (method, K) group: plain, the text-only variants, ours, and the matmul rates between them."""
    shape = TextShape.of(clip.config)
    batch = 32 if kind == "coop" else 1
    names, source = class_names(classes)
    generator = torch.Generator().manual_seed(classes)
    features = torch.randn(batch, clip.config.embed_dim, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    resolution = clip.config.image_resolution
    images = torch.randn(batch, 3, resolution, resolution, generator=generator)
    fast = build_method(kind, clip, names, fast=True)
    layout = fast.layout  # type: ignore[attr-defined]
    prefix_len = layout.shared_length
    eot = [int(e) for e in layout.eot_index.tolist()]
    padded = layout.trimmed_length - prefix_len
    prefixes = 1 if kind == "coop" else batch
    floor_flops = minimal_text_flops(shape, prefix_len, eot, prefixes, batch)
    fast_flops = fast_text_flops(shape, prefix_len, eot, prefixes, batch)
    device = args.device
    budget = available_memory(device) // 2
    fast_tokens = prefixes * (prefix_len + classes * padded)
    if activation_bytes(shape, fast_tokens) > budget:
        raise MemoryError(f"{kind} K={classes}: the fast path needs ~{activation_bytes(shape, fast_tokens) / GIB:.1f}"
                          f" GiB, more than half the available memory; use fewer classes")

    # the plain path: at K itself, or at two smaller class counts when K would not fit (or is above the cap)
    plain_cap = args.plain_max_classes
    while plain_cap > 2 and activation_bytes(shape, prefixes * plain_cap * shape.context_length) > budget * 0.8:
        plain_cap //= 2
    plain_ks = [classes] if classes <= plain_cap else [max(1, plain_cap // 2), plain_cap]
    mm_bf16, mm_flops = matmul_probe(args.matmul_size, torch.bfloat16, device)
    mm_fp32, _ = matmul_probe(args.matmul_size, torch.float32, device)
    on_device = images.to(device)

    paths: list[Measured] = []
    plain_runs: dict[int, list[Measured]] = {}
    if len(plain_ks) > 1:  # the fixed part of the plain step, for scaling its time to K

        def tower() -> None:
            with torch.no_grad():
                clip.encode_image(on_device)

        paths.append(Measured("image_tower", f"image tower only (fp32, {batch} images)", tower,
                              flops=image_tower_flops(clip.config, batch), memory=False))
    for k in plain_ks:
        sub_names = names[:k]
        plain = build_method(kind, clip, sub_names, fast=False)
        sub_labels = labels % k
        suffix = "" if k == classes else f"@K={k}"
        img_flops = image_tower_flops(clip.config, batch)
        text_flops = plain_text_flops(shape, prefixes * k, batch, k)
        runs = [Measured(f"plain{suffix}", f"plain (image tower + 77-token text, fp32){suffix}",
                      make_step(clip, plain, images=images, features=features, labels=sub_labels, precision="fp32",
                                device=device),
                      flops=img_flops + text_flops)]
        if kind == "coop":
            runs.append(Measured(f"text_plain_fp32{suffix}", f"text only: plain 77 tokens fp32{suffix}",
                              make_step(clip, plain, images=None, features=features, labels=sub_labels,
                                        precision="fp32", device=device), flops=text_flops))
        if k != plain_ks[-1]:  # the smaller class count serves the memory fit only
            for run in runs:
                run.timed = False
        plain_runs[k] = runs
        paths.extend(runs)
    paths.append(Measured("text_fast_fp32", "text only: fast fp32",
                       make_step(clip, fast, images=None, features=features, labels=labels, precision="fp32",
                                 device=device), flops=fast_flops))
    paths.append(Measured("ours", f"ours: cached features + fast text, {args.precision}",
                       make_step(clip, fast, images=None, features=features, labels=labels, precision=args.precision,
                                 device=device), flops=fast_flops))
    paths.append(Measured("matmul_bf16", f"matmul bf16 {args.matmul_size}^2", mm_bf16, flops=mm_flops, memory=False))
    paths.append(Measured("matmul_fp32", f"matmul fp32 {args.matmul_size}^2", mm_fp32, flops=mm_flops, memory=False))

    log(f"  {kind} K={classes} ({source}): prefix {prefix_len}, padded suffix {padded}, "
        f"plain measured at K={plain_ks}")
    measure(paths, args.reps, args.reps_slow, args.slow_s, log, device)

    if len(plain_ks) > 1:  # extrapolate the plain rows to K (see scale_plain)
        tower_s = next(p for p in paths if p.key == "image_tower").median or 0.0
        small, large = plain_ks
        for template in plain_runs[large]:
            base = template.key.split("@")[0]
            series = [next(p for p in plain_runs[k] if p.key.split("@")[0] == base) for k in plain_ks]
            fixed_s = tower_s if base == "plain" else 0.0
            median = fixed_s + ((template.median or 0.0) - fixed_s) * classes / large
            peak = extrapolate([(k, float(p.peak_bytes or 0)) for k, p in zip(plain_ks, series)], classes)
            flops = (image_tower_flops(clip.config, batch) if base == "plain" else 0.0) + plain_text_flops(
                shape, prefixes * classes, batch, classes)
            note = (f"~ extrapolated: time of K={large} scaled by K (image tower fixed); memory: line through "
                    f"K={small},{large}")
            paths.append(Measured(base, template.label.split("@")[0], None, flops=flops, times=[median],
                                  peak_bytes=int(peak), note=note))
    rate = {p.key: p.flops / p.median for p in paths if p.key.startswith("matmul") and p.median}
    return GroupResult(kind, classes, source, batch, prefix_len, padded,
                       sum(e - prefix_len + 1 for e in eot) / len(eot), floor_flops,
                       rate.get("matmul_bf16", float("nan")), rate.get("matmul_fp32", float("nan")), paths)


# ----------------------------------------------------------------------------------------------------------------------
# feature methods: CLIP-Adapter, Tip-Adapter-F, LP++, CLAP


def bench_adapters(clip: CLIP, args: argparse.Namespace, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One training step of each method that learns on cached features, K = ``--adapter-classes`` classes,
    ``--shots`` images per class, each at its official batch (CLIP-Adapter 32, CLAP and Tip-Adapter-F 256, LP++ the
    full set). plain = what the official code computes per step: the frozen image tower on the step's images (fp32)
    and, for CLIP-Adapter, the K class prompts through the 77-token text tower (its forward encodes them every
    step); ours = the same step on cached features with the class text features computed once. LP++'s official
    code also caches its features (one augmented pass), so its plain row is the image-tower-every-step variant for
    comparison only. Tip-Adapter itself has no training step (a cache and a grid search)."""
    from vlprompt.backbone.fast_text import encode_full
    from vlprompt.backbone.tokenizer import get_tokenizer
    from vlprompt.methods.clap import CLAP, CLAPConfig
    from vlprompt.methods.clip_adapter import CLIPAdapter, CLIPAdapterConfig, blend
    from vlprompt.methods.lp_plus_plus import LPPlusPlus, LPPlusPlusConfig, lp_plus_plus_logits
    from vlprompt.methods.tip_adapter import tip_logits

    classes, shots = args.adapter_classes, args.shots
    names, source = class_names(classes)
    dim, resolution = clip.config.embed_dim, clip.config.image_resolution
    generator = torch.Generator().manual_seed(classes)
    scale = logit_scale_of(clip)
    rows: list[dict[str, Any]] = []

    device = clip.device

    def batch_of(size: int) -> tuple[Tensor, Tensor, Tensor]:
        return (torch.randn(size, dim, generator=generator).to(device),
                torch.randint(0, classes, (size,), generator=generator).to(device),
                torch.randn(size, 3, resolution, resolution, generator=generator).to(device))

    def tower(images: Tensor) -> Tensor:
        with torch.no_grad():
            return clip.encode_image(images).float()

    # CLIP-Adapter: SGD, batch 32; the official forward re-encodes the K prompts (77 tokens) every step
    ca_features, ca_labels, ca_images = batch_of(32)  # own names: the closure below must not see later batches
    adapter = CLIPAdapter(clip, names, CLIPAdapterConfig(templates=("a photo of a {}.",)))
    ids = get_tokenizer()([f"a photo of a {n}." for n in names], context_length=clip.context_length).to(device)
    plain_opt = torch.optim.SGD(adapter.parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)

    def clip_adapter_plain() -> None:
        with torch.no_grad():
            text = encode_full(clip, clip.token_embedding(ids), ids.argmax(dim=-1)).float()
        logits = cosine_logits(blend(adapter.visual, tower(ca_images), 0.2), text, scale)
        plain_opt.zero_grad(set_to_none=True)
        F.cross_entropy(logits, ca_labels).backward()
        plain_opt.step()

    groups = [("clip_adapter", 32, clip_adapter_plain,
               make_step(clip, adapter, images=None, features=ca_features, labels=ca_labels, precision=args.precision,
                         device=device))]

    # CLAP: SGD with its penalty, batch 256
    features, labels, images = batch_of(256)
    clap = CLAP(clip, names, CLAPConfig(templates=("a photo of a {}.",)))
    clap.prepare(type("Views", (), {"features": features, "labels": labels})())
    groups.append(("clap", 256, make_step(clip, clap, images=images, features=features, labels=labels,
                                          precision="fp32", device=device),
                   make_step(clip, clap, images=None, features=features, labels=labels, precision=args.precision,
                             device=device)))

    # Tip-Adapter-F: AdamW on the cache keys (N = K x shots), batch 256
    n = classes * shots
    keys = F.normalize(torch.randn(n, dim, generator=generator), dim=-1).to(device).requires_grad_(True)
    values = F.one_hot(torch.arange(n) % classes, classes).float().to(device)
    text = F.normalize(torch.randn(classes, dim, generator=generator), dim=-1).to(device)
    tip_opt = torch.optim.AdamW([keys], lr=0.001, eps=1e-4)
    tip_features, tip_labels, tip_images = batch_of(256)

    def tip_step(image_features: Tensor) -> None:
        logits = tip_logits(F.normalize(image_features, dim=-1), text, keys, values, 1.0, 1.0, scale)
        tip_opt.zero_grad(set_to_none=True)
        F.cross_entropy(logits, tip_labels).backward()
        tip_opt.step()

    groups.append(("tip_adapter_f", 256, lambda: tip_step(tower(tip_images)), lambda: tip_step(tip_features)))

    # LP++: one full-batch iteration on all N features
    lp = LPPlusPlus(clip, names, LPPlusPlusConfig(templates=("a photo of a {}.",)))
    lp_features, lp_labels, lp_images = batch_of(n)
    lp_text = lp.zero_shot_features()
    weight = torch.zeros(classes, dim, device=device, requires_grad=True)
    alpha = torch.ones(classes, device=device, requires_grad=True)

    def lp_step(image_features: Tensor) -> None:
        image = F.normalize(image_features, dim=-1)
        loss = F.cross_entropy(lp_plus_plus_logits(image, weight, alpha, lp_text), lp_labels)
        grad_w, grad_alpha = torch.autograd.grad(loss, (weight, alpha))
        with torch.no_grad():
            weight.sub_(0.1 * grad_w)
            alpha.sub_(0.1 * grad_alpha)

    groups.append(("lp_plus_plus", n, lambda: lp_step(tower(lp_images)), lambda: lp_step(lp_features)))

    for method, batch, plain_step, ours_step in groups:
        if method not in args.adapter_methods:
            continue
        paths = [Measured("plain", f"{method} plain (image tower every step, fp32)", plain_step, memory=False),
                 Measured("ours", f"{method} ours (cached features, {args.precision})", ours_step, memory=False)]
        log(f"  {method} K={classes} ({source}), batch {batch}")
        measure(paths, args.reps, args.reps_slow, args.slow_s, log, device)
        plain_s, ours_s = paths[0].median, paths[1].median
        rows.append({"method": method, "classes": classes, "batch": batch, "plain_s": plain_s, "ours_s": ours_s,
                     "speedup": plain_s / ours_s if plain_s and ours_s else None})
        gc.collect()
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# deep-prompt methods: images through the prompted towers


DEEP_BATCH = 4
"""Batch of the deep-prompt methods' official recipes (MaPLe, PromptSRC)."""


def build_deep_method(kind: str, clip: CLIP, names: list[str], fast: bool) -> FrozenClipMethod:
    """MaPLe or PromptSRC with the official defaults (depth 9), fast or plain (77-token) text path."""
    from vlprompt.methods.maple import MaPLe, MaPLeConfig
    from vlprompt.methods.promptsrc import PromptSRC, PromptSRCConfig

    depth = min(9, clip.config.transformer_layers, int(clip.config.vision_layers))  # the tiny smoke model: 2
    if kind == "maple":
        return MaPLe(clip, names, MaPLeConfig(prompt_depth=depth, fast_text=fast))
    return PromptSRC(clip, names, PromptSRCConfig(prompt_depth_text=depth, prompt_depth_vision=depth, fast_text=fast))


def make_image_step(method: FrozenClipMethod, images: Tensor, labels: Tensor, precision: str,
                    lr: float) -> Callable[[], None]:
    """One SGD step of an image-in-the-loop method as :func:`vlprompt.training.loop.train` takes it (the
    regulariser of a :class:`~vlprompt.methods.base.TrainOutput` weighted by the batch)."""
    from vlprompt.methods.base import TrainOutput

    device = method.clip.device
    images, labels = images.to(device), labels.to(device)
    recipe = TrainConfig().completed()
    optimizer = torch.optim.SGD(method.parameters(), lr=lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    method.train()

    def step() -> None:
        with autocast_for(device, precision):
            output = method(images)
        logits, extra = (output.logits, output.regularizer) if isinstance(output, TrainOutput) else (output, None)
        loss = F.cross_entropy(logits.float(), labels)
        if extra is not None:
            loss = loss + extra.float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def bench_deep_group(kind: str, clip: CLIP, classes: int, args: argparse.Namespace,
                     log: Callable[[str], None]) -> GroupResult:
    """One (MaPLe or PromptSRC, K) group: plain (77-token prompted text, fp32) and ours (fast text, --precision)."""
    from vlprompt.methods.configs import maple_train_defaults, promptsrc_train_defaults

    shape = TextShape.of(clip.config)
    names, source = class_names(classes)
    generator = torch.Generator().manual_seed(classes)
    resolution = clip.config.image_resolution
    images = torch.randn(DEEP_BATCH, 3, resolution, resolution, generator=generator)
    labels = torch.randint(0, classes, (DEEP_BATCH,), generator=generator)
    lr = (maple_train_defaults if kind == "maple" else promptsrc_train_defaults)()["lr"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fast = build_deep_method(kind, clip, names, fast=True)
        plain = build_deep_method(kind, clip, names, fast=False)
    for method in (fast, plain):  # PromptSRC's frozen text targets: computed once per training (official: at init),
        if hasattr(method, "text_targets"):  # so not part of a step
            method.text_targets()
    layout = fast.layout  # type: ignore[attr-defined]
    prefix_len = layout.shared_length
    eot = [int(e) for e in layout.eot_index.tolist()]
    padded = layout.trimmed_length - prefix_len
    towers = 2 if kind == "promptsrc" else 1  # PromptSRC also runs the frozen image tower (no grad)
    img_flops = image_tower_flops(clip.config, DEEP_BATCH) * (3 + towers - 1)  # forward + backward (2x) + frozen
    paths = [
        Measured("plain", "plain: prompted towers, 77-token text, fp32 (the official step)",
                 make_image_step(plain, images, labels, "fp32", lr),
                 flops=img_flops + plain_text_flops(shape, classes, DEEP_BATCH, classes)),
        Measured("ours", f"ours: prompted towers, fast text, {args.precision}",
                 make_image_step(fast, images, labels, args.precision, lr),
                 flops=img_flops + fast_text_flops(shape, prefix_len, eot, 1, DEEP_BATCH)),
    ]
    mm_bf16, mm_flops = matmul_probe(args.matmul_size, torch.bfloat16, clip.device)
    mm_fp32, _ = matmul_probe(args.matmul_size, torch.float32, clip.device)
    paths.append(Measured("matmul_bf16", f"matmul bf16 {args.matmul_size}^2", mm_bf16, flops=mm_flops, memory=False))
    paths.append(Measured("matmul_fp32", f"matmul fp32 {args.matmul_size}^2", mm_fp32, flops=mm_flops, memory=False))
    log(f"  {kind} K={classes} ({source}): prefix {prefix_len}, padded suffix {padded}")
    measure(paths, args.reps, args.reps_slow, args.slow_s, log, clip.device)
    rate = {p.key: p.flops / p.median for p in paths if p.key.startswith("matmul") and p.median}
    floor = img_flops + minimal_text_flops(shape, prefix_len, eot, 1, DEEP_BATCH)
    return GroupResult(kind, classes, source, DEEP_BATCH, prefix_len, padded,
                       sum(e - prefix_len + 1 for e in eot) / len(eot), floor,
                       rate.get("matmul_bf16", float("nan")), rate.get("matmul_fp32", float("nan")), paths)


def bench_data_path(clip: CLIP, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Images/s of the image-in-the-loop data path (decode + augment in workers) against the prompted image tower
    alone (forward + backward), and of whole training epochs against their steps alone."""
    from vlprompt.features.extract import default_num_workers, epoch_view_indices
    from vlprompt.training.loop import epoch_batches, train
    from vlprompt.training.sources import ImageBatches, ImageTrainSet

    names, _ = class_names(args.fullrun_classes)
    device = clip.device
    with tempfile.TemporaryDirectory(prefix="vlprompt-bench-") as tmp:
        root = Path(tmp)
        items = write_images(root, len(names), args.shots)
        workers = default_num_workers(device, len(items)) if args.deep_workers is None else args.deep_workers
        result: dict[str, Any] = {"workers": workers, "batch": DEEP_BATCH, "precision": args.precision}
        train_set = ImageTrainSet(root, items, resolution=clip.config.image_resolution, views=args.deep_epochs,
                                  pool_seed=0, num_workers=workers)
        source = ImageBatches(train_set)
        batches = epoch_batches(len(items), DEEP_BATCH, 1, 0)
        views = epoch_view_indices(train_set.num_views, len(items), 1, 0)
        start = time.perf_counter()
        seen = sum(pixels.shape[0] for pixels in source.epoch(views, batches, device))
        synchronize(device)
        loader_s = time.perf_counter() - start
        result["loader_images_per_s"] = seen / loader_s

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            method = build_deep_method("maple", clip, names, fast=True)
        pixels = torch.randn(DEEP_BATCH, 3, clip.config.image_resolution, clip.config.image_resolution).to(device)
        prompts = method.prompts  # type: ignore[attr-defined]

        def tower() -> None:
            with autocast_for(device, args.precision):
                features = method.image_features(pixels, prompts())  # type: ignore[attr-defined]
            features.float().sum().backward()

        tower_s = statistics.median(timed(tower, device) for _ in range(max(1, args.reps)))
        result["tower_images_per_s"] = DEEP_BATCH / tower_s
        step = make_image_step(method, pixels, torch.zeros(DEEP_BATCH, dtype=torch.long, device=device),
                               args.precision, 0.0035)
        step_s = statistics.median(timed(step, device) for _ in range(max(1, args.reps)))
        result["steps_images_per_s"] = DEEP_BATCH / step_s
        config = TrainConfig(epochs=args.deep_epochs, batch_size=DEEP_BATCH, precision=args.precision,
                             device=str(device), num_workers=workers, warmup_epochs=min(1, args.deep_epochs - 1))
        synchronize(device)
        start = time.perf_counter()
        train(method, train_set, config, device=str(device), progress=False)
        synchronize(device)
        loop_s = time.perf_counter() - start
        result["epochs_images_per_s"] = len(batches) * DEEP_BATCH * args.deep_epochs / loop_s
        result["steps_over_epochs"] = result["steps_images_per_s"] / result["epochs_images_per_s"]
        log(f"  data path: loader {result['loader_images_per_s']:.1f} img/s, tower {result['tower_images_per_s']:.1f}"
            f" img/s, epochs {result['epochs_images_per_s']:.1f} img/s")
    return result


# ----------------------------------------------------------------------------------------------------------------------
# evaluation


@contextlib.contextmanager
def count_text_encodings(clip: CLIP) -> Iterator[list[int]]:
    """Count text encodings: every plain or trimmed one passes ``clip.ln_final`` once, a shared-prefix one once per length bucket."""
    counter = [0]
    handle = clip.ln_final.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    try:
        yield counter
    finally:
        handle.remove()


def bench_eval(clip: CLIP, args: argparse.Namespace, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """CoOp evaluation on ``--eval-images`` random features: text encodings per path and batch size."""
    names, source = class_names(args.eval_classes)
    generator = torch.Generator().manual_seed(7)
    total = args.eval_images
    features = torch.randn(total, clip.config.embed_dim, generator=generator)
    labels = torch.randint(0, len(names), (total,), generator=generator)
    device = args.device
    plain = build_method("coop", clip, names, fast=False)
    fast = build_method("coop", clip, names, fast=True)
    fast.load_state_dict(plain.state_dict())
    scale = logit_scale_of(clip)
    rows: list[dict[str, Any]] = []
    for batch_size in args.eval_batch_sizes:
        batches = math.ceil(total / batch_size)
        # ours: text features once, then the cached classifier for every batch
        with count_text_encodings(clip) as calls:
            start = time.perf_counter()
            with torch.no_grad(), autocast_for(device, args.precision):
                classifier = fast.classifier()
            synchronize(device)
            text_s = time.perf_counter() - start
            evaluate(classifier, features, labels, names, batch_size=batch_size, device=device,
                     precision=args.precision, progress=False)
            eval_s = time.perf_counter() - start
        rows.append({"path": "ours", "batch_size": batch_size, "batches": batches, "text_encodings": calls[0],
                     "text_s": text_s, "eval_s": eval_s, "note": ""})
        # plain: the reference re-encodes the class prompts (77 tokens, fp32) for every batch
        cap = args.eval_plain_max_batches
        run_batches = batches if cap <= 0 else min(batches, cap)
        text_time = [0.0]

        def plain_classifier(image_features: Tensor) -> Tensor:
            start_text = time.perf_counter()
            text = plain.text_features()  # type: ignore[operator]
            synchronize(device)
            text_time[0] += time.perf_counter() - start_text
            return cosine_logits(image_features, text, scale)

        subset = min(total, run_batches * batch_size)
        with count_text_encodings(clip) as calls:
            start = time.perf_counter()
            evaluate(plain_classifier, features[:subset], labels[:subset], names, batch_size=batch_size,
                     device=device, progress=False)
            eval_s = time.perf_counter() - start
        factor = batches / run_batches
        rows.append({"path": "plain", "batch_size": batch_size, "batches": batches,
                     "text_encodings": round(calls[0] * factor), "text_s": text_time[0] * factor,
                     "eval_s": eval_s * factor,
                     "note": "" if run_batches == batches else f"~ extrapolated from {run_batches} batches"})
        log(f"  evaluation, batch {batch_size}: done")
    for row in rows:
        row["classes"] = len(names)
        row["names_from"] = source
        row["images"] = total
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# full 16-shot run


def write_images(folder: Path, classes: int, shots: int, seed: int = 0) -> list[Item]:
    """``classes x shots`` synthetic JPEGs (smooth random colour fields plus noise, 320x256) and their items."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    items = []
    for label in range(classes):
        (folder / f"class{label:03d}").mkdir(parents=True, exist_ok=True)
        for shot in range(shots):
            coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((320, 256),
                                                                                            Image.Resampling.BICUBIC)
            pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-20, 21, (256, 320, 3))
            relative = f"class{label:03d}/img{shot:03d}.jpg"
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / relative, quality=90)
            items.append(Item(relative, label))
    return items


def _best(fn: Callable[[], None], reps: int, device: torch.device) -> float:
    """Fastest of ``reps`` timed calls after one warm-up call."""
    fn()
    return min(timed(fn, device) for _ in range(max(1, reps)))


def bench_components(clip: CLIP, root: Path, items: list[Item], args: argparse.Namespace,
                     log: Callable[[str], None]) -> dict[str, Any]:
    """Seconds per unit of each part of feature extraction, measured alone: decoding an image, drawing one augmented
    view, the image tower per view (at the extraction batch size, with its GFLOP/s against the matmul rate in the same
    precision), and a cache write per row."""
    from vlprompt.backbone.transforms import TrainTransform, load_image, view_generator
    from vlprompt.features.cache import FeatureCache

    device, reps = args.device, max(1, args.reps)
    sample = items[: min(len(items), 16)]
    start = time.perf_counter()
    decoded = [load_image(root / item.path) for item in sample]
    decode_s = (time.perf_counter() - start) / len(sample)
    transform = TrainTransform(clip.config.image_resolution)
    start = time.perf_counter()
    for i, image in enumerate(decoded):
        transform(image, view_generator(0, sample[i].path, 0))
    augment_s = (time.perf_counter() - start) / len(decoded)

    batch = args.feature_batch
    resolution = clip.config.image_resolution
    pixels = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(1)).to(device)

    def tower() -> None:
        with torch.inference_mode(), autocast_for(device, args.precision):
            clip.encode_image(pixels)

    tower_s = _best(tower, reps, device)
    tower_flops = image_tower_flops(clip.config, batch)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float16 if args.precision == "fp16" else torch.float32
    matmul, matmul_flops = matmul_probe(args.matmul_size, dtype, device)
    matmul_rate = matmul_flops / _best(matmul, reps, device)

    rows = np.random.default_rng(0).standard_normal((batch, clip.config.embed_dim)).astype("float32")
    with tempfile.TemporaryDirectory(prefix="vlprompt-bench-cache-") as folder:
        cache = FeatureCache(folder)
        counter = iter(range(1 << 30))

        def write() -> None:
            base = next(counter) * batch
            cache.put_many((f"k{base + i}", row) for i, row in enumerate(rows))

        write_s = _best(write, reps, CPU) / batch
        cache.close()
    result = {"decode_s_per_image": decode_s, "augment_s_per_view": augment_s, "tower_s_per_view": tower_s / batch,
              "tower_batch": batch, "tower_gflops": tower_flops / tower_s / 1e9,
              "matmul_gflops": matmul_rate / 1e9, "matmul_dtype": str(dtype).replace("torch.", ""),
              "tower_vs_matmul": (tower_flops / tower_s) / matmul_rate, "cache_write_s_per_row": write_s}
    log(f"  components: decode {decode_s * 1e3:.1f} ms/image, augment {augment_s * 1e3:.1f} ms/view, tower "
        f"{tower_s / batch * 1e3:.1f} ms/view ({result['tower_gflops']:.0f} GFLOP/s), cache write "
        f"{write_s * 1e6:.0f} us/row")
    return result


def bench_full_run(clip: CLIP, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """A full few-shot CoOp run: the default recipe (``--views epochs``: one augmented view per image and epoch) and
    ``--views N``, each as extraction + training, against the plain reference loop; with where the time goes.

    Extraction is measured end to end (:func:`augmented_views` into a fresh feature cache, decoding workers as the
    pipeline chooses them) on ``--fullrun-measured-views`` views (0 = every view the recipe needs); a recipe needing
    more views is extrapolated at that measured rate (rows per second; labelled ``~``). Training is measured for
    ``--fullrun-ours-epochs`` epochs and scaled to all (the per-epoch cost does not depend on the number of views).
    The components (decode, augment, tower, cache write) are measured alone, so "overlap / other" is what the end to
    end time differs from their sum (negative: decoding overlapped with the tower in the workers)."""
    from vlprompt.features.extract import augmented_views
    from vlprompt.backbone.transforms import TrainTransform, load_image
    from vlprompt.features.cache import FeatureCache
    from vlprompt.training.loop import epoch_batches, train

    device = args.device
    names, source = class_names(args.fullrun_classes)
    epochs, batch_size = args.fullrun_epochs, 32
    recipes = {"default (--views epochs)": epochs, f"--views {args.views}": args.views}
    result: dict[str, Any] = {"classes": len(names), "names_from": source, "shots": args.shots, "epochs": epochs,
                              "batch_size": batch_size, "views": args.views, "precision": args.precision,
                              "feature_batch": args.feature_batch, "device": str(device)}
    with tempfile.TemporaryDirectory(prefix="vlprompt-bench-") as tmp:
        root = Path(tmp) / "images"
        items = write_images(root, len(names), args.shots)
        images = len(items)
        result["images"] = images
        steps_per_epoch = len(epoch_batches(images, batch_size, 1, 0))
        result["steps"] = steps_per_epoch * epochs
        parts = bench_components(clip, root, items, args, log)
        result["components"] = parts

        # extraction end to end for each recipe, each into a fresh cache (its writes included)
        extractions: dict[str, dict[str, Any]] = {}
        train_set = None
        for label, views in recipes.items():
            measured = views if args.fullrun_measured_views <= 0 else min(views, args.fullrun_measured_views)
            cache = FeatureCache(Path(tmp) / f"cache-{len(extractions)}")
            synchronize(device)
            start = time.perf_counter()
            pool = augmented_views(clip, root, items, views=measured, seed=1, precision=args.precision,
                                   batch_size=args.feature_batch, cache=cache, progress=False)
            synchronize(device)
            seconds = time.perf_counter() - start
            cache.close()
            train_set = train_set or pool
            rate = images * measured / seconds
            extractions[label] = {"views": measured, "rows": images * measured, "seconds": seconds,
                                  "views_per_s": rate, "vs_bare_tower": (1.0 / rate) / parts["tower_s_per_view"]}
            log(f"  extraction ({label}): {measured} view(s) x {images} images in {seconds:.1f} s ({rate:.1f} "
                f"views/s, {extractions[label]['vs_bare_tower']:.2f}x the bare tower's time)")
        result["extraction"] = extractions

        # training on the cached features (the epoch cost does not depend on the pool size)
        ours_epochs = epochs if args.fullrun_ours_epochs <= 0 else min(epochs, max(2, args.fullrun_ours_epochs))
        method = build_method("coop", clip, names, fast=True)
        config = TrainConfig(epochs=ours_epochs, batch_size=batch_size, precision=args.precision,
                             device=str(device), seed=1)
        synchronize(device)
        start = time.perf_counter()
        train(method, train_set, config, device=device, progress=False)
        synchronize(device)
        train_s = (time.perf_counter() - start) * epochs / ours_epochs
        log(f"  training: {ours_epochs} epochs in {train_s * ours_epochs / epochs:.1f} s")
        result["training"] = {"measured_epochs": ours_epochs, "seconds": train_s,
                              "note": "" if ours_epochs == epochs else f"~ scaled from {ours_epochs} epochs"}

        result["recipes"] = {}
        for label, views in recipes.items():
            measured = extractions[label]
            rows = images * views
            extraction = measured["seconds"] * views / measured["views"]
            components = {"decode_s": images * parts["decode_s_per_image"],  # each image decoded once
                          "augment_s": rows * parts["augment_s_per_view"],
                          "tower_s": rows * parts["tower_s_per_view"],
                          "cache_write_s": rows * parts["cache_write_s_per_row"]}
            components["overlap_other_s"] = extraction - sum(components.values())
            notes = [] if views == measured["views"] else [
                f"~ extraction scaled from {measured['views']} measured view(s)"]
            if result["training"]["note"]:
                notes.append(result["training"]["note"])
            result["recipes"][label] = {"views": views, "extract_s": extraction, "train_s": train_s,
                                        "total_s": extraction + train_s, "where": components,
                                        "note": "; ".join(notes)}

        # plain: the reference loop (decode + augment + image tower + 77-token text, fp32), a few epochs
        plain = build_method("coop", clip, names, fast=False)
        recipe = TrainConfig().completed()
        optimizer = torch.optim.SGD(plain.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                    weight_decay=recipe.weight_decay)
        transform = TrainTransform(clip.config.image_resolution)
        labels = torch.tensor([item.label for item in items], device=device)
        plain_epochs = min(epochs, max(1, args.fullrun_plain_epochs))
        plain_steps = steps_per_epoch * plain_epochs
        if args.fullrun_plain_steps:  # every plain step costs the same (full batches: images % 32 == 0 here)
            plain_steps = min(plain_steps, args.fullrun_plain_steps)
        done = 0
        synchronize(device)
        start = time.perf_counter()
        for epoch in range(plain_epochs):
            for step, batch in enumerate(epoch_batches(len(items), batch_size, 1, epoch)):
                if done == plain_steps:
                    break
                generator = torch.Generator().manual_seed(epoch * 1000 + step)
                pixels = torch.stack([transform(load_image(root / items[i].path), generator)
                                      for i in batch.tolist()]).to(device)
                with torch.no_grad():
                    image_features = clip.encode_image(pixels).float()
                loss = F.cross_entropy(plain(image_features).float(), labels[batch.to(device)])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                done += 1
        synchronize(device)
        plain_s = time.perf_counter() - start
        total_steps = steps_per_epoch * epochs
        log(f"  full run, plain: {done} step(s) ({done / steps_per_epoch:.2f} epoch(s)) {plain_s:.1f} s")
        result["plain"] = {"total_s": plain_s * total_steps / done, "measured_steps": done,
                           "measured_epochs": done / steps_per_epoch,
                           "note": f"~ extrapolated from {done} step(s)" if done < total_steps else ""}
    for entry in result["recipes"].values():
        entry["speedup"] = result["plain"]["total_s"] / entry["total_s"]
    return result


# ----------------------------------------------------------------------------------------------------------------------
# profile


PROFILE_CATEGORIES: dict[str, tuple[str, ...]] = {
    "matmul (mm/addmm/bmm)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul"),
    "attention (sdpa)": ("aten::_scaled_dot_product", "aten::_flash_attention"),
    "casts/copies": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous"),
    "cat/index": ("aten::cat", "aten::index", "aten::take_along_dim", "aten::gather", "aten::scatter"),
    "layernorm": ("aten::native_layer_norm",),
    "softmax": ("aten::_softmax",),
    "elementwise": ("aten::mul", "aten::add", "aten::sigmoid", "aten::masked_fill", "aten::div", "aten::sub",
                    "aten::where", "aten::threshold", "aten::neg", "aten::exp", "aten::sum", "aten::fill_",
                    "aten::zero_"),
}


def profile_step(fn: Callable[[], None], rows: int = 15) -> dict[str, Any]:
    """Profile one call: self CPU time by category, and the top ops by self time grouped by input shapes."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    categories: dict[str, float] = {}
    for event in averages:
        name = next((cat for cat, prefixes in PROFILE_CATEGORIES.items()
                     if any(event.key.startswith(p) for p in prefixes)), "other")
        categories[name] = categories.get(name, 0.0) + event.self_cpu_time_total
    table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows,
                                                               max_name_column_width=34, max_shapes_column_width=60)
    return {"total_ms": total / 1000, "categories_ms": {k: v / 1000 for k, v in sorted(categories.items(),
                                                                                        key=lambda kv: -kv[1])},
            "table": table}


# ----------------------------------------------------------------------------------------------------------------------
# report


def fmt_s(value: float | None) -> str:
    """Seconds with their unit: "512 s", "12.34 s", "85.1 ms"."""
    if value is None or not math.isfinite(value):
        return "-"
    if value < 0:
        return "-" + fmt_s(-value)
    if value >= 100:
        return f"{value:.0f} s"
    if value >= 1:
        return f"{value:.2f} s"
    return f"{value * 1000:.1f} ms"


def fmt_x(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.1f}x" if value < 100 else f"{value:.0f}x"


def fmt_mib(value: int | float | None) -> str:
    return "-" if value is None else f"{value / MIB:,.0f}"


def print_group(group: GroupResult, out: Callable[[str], None]) -> None:
    """The table of one (method, K) group."""
    plain = group.path("plain")
    header = (f"\n{group.method.upper()}  K={group.classes} ({group.names_from}), batch {group.batch}; prefix P="
              f"{group.prefix_len}, suffix padded S={group.padded_suffix} (mean needed {group.mean_suffix:.1f}); "
              f"matmul fp32 {group.fp32_rate / 1e9:.0f} / bf16 {group.bf16_rate / 1e9:.0f} GFLOP/s")
    out(header)
    ours = group.path("ours")
    if ours and ours.flops:
        out(f"  the fast path executes {ours.flops / 1e9:.1f} GFLOP = {ours.flops / group.floor_flops:.2f}x the "
            f"minimal {group.floor_flops / 1e9:.1f} GFLOP (suffixes padded within their length buckets)")
    out(f"  {'path':<48} {'median':>9} {'runs':>4} {'speed-up':>9} {'x floor':>8} {'GFLOP':>8} "
        f"{'GFLOP/s':>8} {'peak MiB':>9}  note")
    order = ["plain", "text_plain_fp32", "text_fast_fp32", "ours"]
    for p in sorted((p for p in group.paths if p.key in order), key=lambda p: order.index(p.key)):
        speedup = (plain.median / p.median) if plain and plain.median and p.median else None
        rate = p.flops / p.median / 1e9 if p.flops and p.median else None
        out(f"  {p.label:<48} {fmt_s(p.median):>9} {len(p.times) if p.run else '~':>4} {fmt_x(speedup):>9} "
            f"{fmt_x(p.median / group.floor_s if p.median else None):>8} {p.flops / 1e9:>8.1f} "
            f"{(f'{rate:.0f}' if rate else '-'):>8} {fmt_mib(p.peak_bytes):>9}  {p.note}")
    out(f"  {'floor: minimal FLOPs / bf16 matmul rate':<48} {fmt_s(group.floor_s):>9} {'':>4} {'':>9} "
        f"{'1.0x':>8} {group.floor_flops / 1e9:>8.1f}")
    sources = []
    text_plain, text_fast = group.path("text_plain_fp32"), group.path("text_fast_fp32")
    if plain and text_plain and plain.median and text_plain.median:
        sources.append(f"no image tower {plain.median / text_plain.median:.2f}x")
    if text_plain and text_fast and text_plain.median and text_fast.median:
        sources.append(f"fast text {text_plain.median / text_fast.median:.2f}x")
    elif plain and text_fast and plain.median and text_fast.median:
        sources.append(f"no image tower + fast text {plain.median / text_fast.median:.2f}x")
    if text_fast and ours and text_fast.median and ours.median:
        sources.append(f"bf16 vs fp32 {text_fast.median / ours.median:.2f}x")
    if sources:
        out("  sources of the speed-up: " + ", ".join(sources))


def targets(groups: list[GroupResult], evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, checked on whatever this run measured."""
    found: list[dict[str, Any]] = []

    def group(method: str, k: int) -> GroupResult | None:
        return next((g for g in groups if g.method == method and g.classes == k), None)

    def ratio(g: GroupResult, a: str, b: str) -> float | None:
        pa, pb = g.path(a), g.path(b)
        return pa.median / pb.median if pa and pb and pa.median and pb.median else None

    coop102 = group("coop", 102)
    if coop102:
        speedup = ratio(coop102, "plain", "ours")
        ours = coop102.path("ours")
        floor_x = ours.median / coop102.floor_s if ours and ours.median else None
        fast32 = coop102.path("text_fast_fp32")
        found.append({"target": "CoOp step K=102: >= 20x faster than plain", "value": speedup,
                      "met": speedup is not None and speedup >= 20,
                      "with_fast_fp32": ratio(coop102, "plain", "text_fast_fp32")})
        found.append({"target": "CoOp step K=102: within 5x of the floor", "value": floor_x,
                      "met": floor_x is not None and floor_x <= 5,
                      "with_fast_fp32": fast32.median / coop102.floor_s if fast32 and fast32.median else None})
    for g in groups:
        if g.method == "cocoop":
            speedup = ratio(g, "plain", "ours")
            found.append({"target": f"CoCoOp per-image step K={g.classes}: >= 10x faster than plain",
                          "value": speedup, "met": speedup is not None and speedup >= 10,
                          "with_fast_fp32": ratio(g, "plain", "text_fast_fp32")})
    ours_eval = [row for row in evals if row["path"] == "ours"]
    if len(ours_eval) >= 2:
        calls = {row["text_encodings"] for row in ours_eval}
        batches = sorted({row["batches"] for row in ours_eval})
        # one encoding of the class prompts (ln_final runs once per length bucket of it, at most 4), the same count
        # whatever the number of batches
        found.append({"target": "CoOp evaluation: text encoding independent of the number of batches",
                      "value": f"{sorted(calls)} ln_final call(s) for {batches} batches",
                      "met": len(calls) == 1 and min(calls) <= 4 and len(batches) > 1})
    coop1000 = group("coop", 1000)
    if coop1000:
        plain, ours = coop1000.path("plain"), coop1000.path("ours")
        share = (ours.peak_bytes / plain.peak_bytes) if plain and ours and plain.peak_bytes and ours.peak_bytes \
            else None
        found.append({"target": "CoOp step K=1000: peak memory < 1/4 of plain", "value": share,
                      "met": share is not None and share < 0.25})
    return found


# ----------------------------------------------------------------------------------------------------------------------
# main


# ----------------------------------------------------------------------------------------------------------------------
# test-time prompt tuning


TPT_VIEWS = 64
"""Views per test image of TPT's official recipe (63 augmented + the original)."""


def bench_tpt(clip: CLIP, args: argparse.Namespace, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """TPT's cost per test image for each K: zero-shot prediction of one image, the official-equivalent computation
    (77-token text in fp32) and ours (:meth:`TPT.predict_views`), measured interleaved."""
    from vlprompt.methods.tpt import TPT, TPTConfig
    from vlprompt.methods.zeroshot import ZeroShot, ZeroShotConfig

    device = args.device
    rows = []
    resolution = clip.config.image_resolution
    for classes in args.classes:
        names, source = class_names(classes)
        generator = torch.Generator().manual_seed(classes)
        views = torch.randn(TPT_VIEWS, 3, resolution, resolution, generator=generator).to(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            ours_method = TPT(clip, names, TPTConfig())
            official_method = TPT(clip, names, TPTConfig(fast_text=False))
        zero_classifier = ZeroShot(clip, names, ZeroShotConfig(template="a photo of a {}.")).classifier()
        ours_classifier, official_classifier = ours_method.classifier(), official_method.classifier()

        def zero_shot() -> None:
            with torch.inference_mode(), autocast_for(device, "fp32"):
                zero_classifier(clip.encode_image(views[:1]).float())

        def per_image(classifier: Callable[[Tensor], Tensor], precision: str) -> Callable[[], None]:
            def run() -> None:
                with torch.inference_mode(), autocast_for(device, precision):
                    classifier(clip.encode_image(views).float()[:, None])  # all views in one tower call
            return run

        paths = [Measured("zeroshot", "zero-shot prediction of one image (fp32)", zero_shot, memory=False),
                 Measured("ours", f"TPT ours (fast text, {args.precision})", per_image(ours_classifier,
                                                                                     args.precision))]
        if classes <= args.plain_max_classes:
            paths.append(Measured("official", "TPT official-equivalent (77-token text, fp32)",
                                  per_image(official_classifier, "fp32")))
        log(f"  tpt K={classes} ({source}), {TPT_VIEWS} views")
        measure(paths, args.reps, args.reps_slow, args.slow_s, log, device)
        times = {p.key: p.median for p in paths}
        zero_s, ours_s, official_s = times["zeroshot"], times["ours"], times.get("official")
        rows.append({"classes": classes, "views": TPT_VIEWS, "zeroshot_s": zero_s, "ours_s": ours_s,
                     "official_s": official_s,
                     "ours_vs_zeroshot": ours_s / zero_s if ours_s and zero_s else None,
                     "speedup": official_s / ours_s if official_s and ours_s else None,
                     "peak_mib_ours": _mib(paths[1].peak_bytes),
                     "peak_mib_official": _mib(paths[2].peak_bytes) if len(paths) > 2 else None,
                     "note": "" if official_s else f"official not measured above K={args.plain_max_classes}"})
        gc.collect()
    return rows


def _mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (a few minutes): K=10,102, fewer repetitions, "
                                                             "shortened sections (extrapolations are labelled)")
    parser.add_argument("--model", choices=sorted(MODELS), default="vit-b16", help="model shape (tiny: smoke test)")
    parser.add_argument("--classes", help="comma-separated K values of the step benchmark (quick: 10,102; "
                                          "full: 10,102,1000)")
    parser.add_argument("--methods", default="coop,cocoop", help="comma-separated: coop, cocoop")
    parser.add_argument("--deep-methods", default="maple,promptsrc",
                        help="comma-separated methods of the deep section: maple, promptsrc")
    parser.add_argument("--sections", default="steps,successors,adapters,eval,fullrun,deep,lora,tpt",
                        help="comma-separated: steps, successors (KgCoOp, ProGrad, TCP steps), adapters (CLIP-Adapter, "
                             "CLAP, Tip-Adapter-F, LP++), eval, fullrun, deep (MaPLe, PromptSRC), lora (CLIP-LoRA), "
                             "tpt (TPT's cost per test image)")
    parser.add_argument("--adapter-methods", default="clip_adapter,clap,tip_adapter_f,lp_plus_plus",
                        help="comma-separated methods of the adapters section")
    parser.add_argument("--lora-classes", default="10,102", help="comma-separated K values of the lora section")
    parser.add_argument("--adapter-classes", type=int, default=10, help="classes of the adapters section (with "
                                                                        "--shots images each)")
    parser.add_argument("--deep-workers", type=int,
                        help="decoding workers of the deep data path (default: what num_workers auto picks)")
    parser.add_argument("--deep-epochs", type=int, default=2, help="epochs of the deep data-path measurement")
    parser.add_argument("--reps", type=int, help="timed runs per path (median reported); quick 3, full 5")
    parser.add_argument("--reps-slow", type=int, help="runs in all for a path whose first call exceeds --slow-s "
                                                      "(quick 1, full 2)")
    parser.add_argument("--slow-s", type=float, help="seconds above which a path is 'slow' (quick 4, full 20)")
    parser.add_argument("--plain-max-classes", type=int, default=128,
                        help="above this K the plain path is measured at K/2 and K of this cap and extrapolated "
                             "linearly (it needs ~40 KB per token and layer); default 128")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="precision of 'ours'; auto: what vlprompt's --precision auto picks on this machine (bf16 "
                             "where a cached matmul probe finds it faster, CUDA: where supported; else fp32)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--feature-batch", type=int, help="images per image-tower call in the full run's extraction "
                                                          "(default: the pipeline's, 64 on a CPU, 256 on CUDA)")
    parser.add_argument("--matmul-size", type=int, help="square matmul of the rate probe (quick 2048, full 4096)")
    parser.add_argument("--eval-classes", type=int, default=10, help="classes of the evaluation section")
    parser.add_argument("--eval-images", type=int, default=10_000, help="test-set size of the evaluation section")
    parser.add_argument("--eval-batch-sizes", default="100,1000", help="comma-separated evaluation batch sizes")
    parser.add_argument("--eval-plain-max-batches", type=int,
                        help="plain evaluation runs at most this many batches and extrapolates (0 = all; quick 3)")
    parser.add_argument("--fullrun-classes", type=int, default=10, help="classes of the full run")
    parser.add_argument("--shots", type=int, default=16, help="images per class of the full run")
    parser.add_argument("--fullrun-epochs", type=int, default=200, help="epochs of the full run")
    parser.add_argument("--fullrun-ours-epochs", type=int,
                        help="epochs ours really trains (0 = all; fewer = extrapolated; quick 10)")
    parser.add_argument("--fullrun-plain-epochs", type=int, help="epochs the plain loop runs before extrapolating "
                                                                 "(quick 1, full 2)")
    parser.add_argument("--fullrun-plain-steps", type=int, default=0,
                        help="steps the plain loop runs at most (0 = the --fullrun-plain-epochs); fewer = extrapolated "
                             "per step (every plain step costs the same)")
    parser.add_argument("--views", type=int, help="the --views N recipe of the full run, measured beside the default "
                                                  "--views epochs (quick 1, full 2)")
    parser.add_argument("--fullrun-measured-views", type=int,
                        help="views the full run's extraction really computes; recipes needing more are "
                             "extrapolated at that rate (0 = all; quick 2, full 0)")
    parser.add_argument("--profile", action="store_true", help="profile ours' CoOp step at the target K (102, or the "
                                                               "first K) and print where the time goes")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    defaults = MODE_DEFAULTS["quick" if args.quick else "full"]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    from vlprompt.common.precision import resolve_precision
    from vlprompt.stages import FEATURE_BATCH_SIZE, FEATURE_BATCH_SIZE_CUDA

    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"unknown device {args.device!r}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch")
    args.precision = resolve_precision(args.precision, args.device)
    if args.feature_batch is None:
        args.feature_batch = FEATURE_BATCH_SIZE_CUDA if args.device.type == "cuda" else FEATURE_BATCH_SIZE
    args.classes = [int(k) for k in str(args.classes).split(",") if k.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.lora_classes = [int(k) for k in str(args.lora_classes).split(",") if k.strip()]
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    args.eval_batch_sizes = [int(b) for b in args.eval_batch_sizes.split(",") if b.strip()]
    for name in args.methods:
        if name not in ("coop", "cocoop"):
            parser.error(f"unknown method {name!r}")
    args.deep_methods = [m.strip() for m in args.deep_methods.split(",") if m.strip()]
    args.adapter_methods = [m.strip() for m in args.adapter_methods.split(",") if m.strip()]
    for name in args.adapter_methods:
        if name not in ("clip_adapter", "clap", "tip_adapter_f", "lp_plus_plus"):
            parser.error(f"unknown adapters-section method {name!r}")
    for name in args.deep_methods:
        if name not in ("maple", "promptsrc"):
            parser.error(f"unknown deep-prompt method {name!r}")
    for name in args.sections:
        if name not in ("steps", "successors", "adapters", "eval", "fullrun", "deep", "lora", "tpt"):
            parser.error(f"unknown section {name!r}")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# CLIP-LoRA: images through both adapted towers


LORA_BATCH = 32
"""Batch of CLIP-LoRA's official recipe."""


def official_lora_extension(method: Any, factors: Any) -> Any:
    """The towers' q/k/v updates as the official code computes them: per projection, the dropped input times the
    full ``(s B A)^T`` (loralib ``LinearLoRA.forward``: ``x @ merge_BA().T * scaling``)."""
    from vlprompt.backbone.extension import TowerExtension

    def delta(layer: int, x: Tensor) -> Tensor:
        block = factors[str(layer)]
        pieces = []
        for i in range(block.a.shape[0]):
            dropped = F.dropout(x, method.config.dropout, training=True)
            pieces.append(dropped @ (block.b[i] @ block.a[i]).t().to(x.dtype) * method.scale)
        return torch.cat(pieces, dim=-1)

    return TowerExtension(qkv_delta=delta)


def make_lora_step(method: Any, images: Tensor, labels: Tensor, precision: str, official: bool) -> Callable[[], None]:
    """One CLIP-LoRA step with its recipe optimiser (AdamW): ``official`` = 77-token text and full-product updates in
    fp32; else the method's forward under ``precision`` autocast, as :func:`vlprompt.training.loop.train` takes it."""
    from vlprompt.backbone.fast_text import encode_full
    from vlprompt.training.config import resolve_train_config
    from vlprompt.training.loop import apply_update, build_optimizer, step_objective

    recipe = resolve_train_config(TrainConfig(), method="clip_lora", shots=16, dataset="bench")
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, recipe)
    clip = method.clip
    device = clip.device
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    images, labels = images.to(device), labels.to(device)
    ids = method._token_ids
    padded = torch.zeros(ids.shape[0], clip.context_length, dtype=ids.dtype)
    padded[:, : ids.shape[1]] = ids  # clip.tokenize's 77 positions (pad 0 < EOT, so argmax still finds the EOT)
    padded = padded.to(device)
    method.train()

    def step() -> None:
        if official:
            text = encode_full(clip, clip.token_embedding(padded), padded.argmax(dim=-1),
                               official_lora_extension(method, method.text))
            image = clip.encode_image(images, official_lora_extension(method, method.vision))
            logits = cosine_logits(image, text, logit_scale_of(clip))
        else:
            with autocast_for(device, precision):
                logits = method(images)
        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        scale = 1.0 / labels.numel()
        objective, _ = step_objective(method, loss_sum, scale)
        apply_update(method, params, optimizer, scaler, images, logits, objective, scale, 1)

    return step


def bench_lora(clip: CLIP, args: argparse.Namespace, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One CLIP-LoRA training-step row per K: plain (the official step, fp32) vs ours (``args.precision``), batch 32,
    measured interleaved."""
    from vlprompt.methods.clip_lora import CLIPLoRA

    rows = []
    resolution = clip.config.image_resolution
    for classes in args.lora_classes:
        names, source = class_names(classes)
        generator = torch.Generator().manual_seed(classes)
        images = torch.randn(LORA_BATCH, 3, resolution, resolution, generator=generator)
        labels = torch.randint(0, classes, (LORA_BATCH,), generator=generator)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            plain_method, ours_method = CLIPLoRA(clip, names), CLIPLoRA(clip, names)
        paths = [Measured("plain", "plain: 77-token text, full B A products, fp32 (the official step)",
                          make_lora_step(plain_method, images, labels, "fp32", official=True)),
                 Measured("ours", f"ours: shortest text, low-rank products, {args.precision}",
                          make_lora_step(ours_method, images, labels, args.precision, official=False))]
        if classes > args.plain_max_classes:
            paths[0].note = f"plain not measured above --plain-max-classes {args.plain_max_classes}"
            paths = paths[1:]
        log(f"  clip_lora K={classes} ({source})")
        measure(paths, args.reps, args.reps_slow, args.slow_s, log, device=clip.device)
        by_key = {p.key: p for p in paths}
        plain_s = by_key["plain"].median if "plain" in by_key else None
        ours_s = by_key["ours"].median
        rows.append({"method": "clip_lora", "classes": classes, "names_from": source, "batch": LORA_BATCH,
                     "plain_s": plain_s, "ours_s": ours_s, "speedup": plain_s / ours_s if plain_s and ours_s else None,
                     "plain_peak_bytes": by_key["plain"].peak_bytes if "plain" in by_key else None,
                     "ours_peak_bytes": by_key["ours"].peak_bytes,
                     "note": "; ".join(p.note for p in paths if p.note)})
        gc.collect()
    return rows


def cpu_description() -> str:
    """CPU model and the ISA features that matter for bf16 (AMX, AVX-512 BF16)."""
    model, flags = platform.processor() or "cpu", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("cpu", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    isa = [f for f in ("amx_bf16", "avx512_bf16", "avx512f") if f in flags]
    return f"{model} [{', '.join(isa) or 'no AVX-512'}{'' if 'amx_bf16' in flags else ', no AMX'}]"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the tables; return (and with ``--json`` save) the numbers."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    out = print
    config = MODELS[args.model]
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    gpu = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else None
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_description(), "gpu": gpu,
           "device": str(args.device),
           "loadavg_start": list(load), "model": config.name, "mode": "quick" if args.quick else "full",
           "precision_ours": args.precision, "reps": args.reps, "reps_slow": args.reps_slow, "slow_s": args.slow_s}
    out(f"vlprompt speed benchmark: {config.name}, {env['mode']} mode")
    out(f"torch {torch.__version__}, {env['threads']} threads, {env['cpu']}, load average {load[0]:.1f} at start")
    if gpu:
        out(f"device {args.device}: {gpu}")
    out("times are medians of interleaved runs; ratios compare paths measured in the same rounds")
    cores = os.cpu_count() or 1
    if env["threads"] > 1 and load[0] > cores - env["threads"] + 0.5:
        out(f"note: load average {load[0]:.1f} on {cores} cores: other processes compete for the cores, and with "
            f"{env['threads']} threads every parallel op waits for a descheduled thread (several ms per op), which "
            "penalises paths made of many small ops; --threads 1 gives fairer ratios on a shared machine")
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = CLIP(config).eval()
    clip.requires_grad_(False)
    clip.to(args.device)
    log(f"model built in {time.perf_counter() - start:.1f} s")
    results: dict[str, Any] = {"env": env, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                    for k, v in vars(args).items()}}

    groups: list[GroupResult] = []
    if "steps" in args.sections:
        out("\n== Training steps (median seconds per step) ==")
        out("plain = image tower (fp32) + 77-token text (fp32) every step; ours = cached image features + fast text "
            f"({args.precision}); speed-up = plain / path; x floor = time / floor; ~ = extrapolated")
        for kind in args.methods:
            for classes in args.classes:
                group = bench_group(kind, clip, classes, args, log)
                groups.append(group)
                print_group(group, out)
                gc.collect()
        results["steps"] = [g.to_json() for g in groups]

    if args.profile and "coop" in args.methods:
        target_k = 102 if 102 in args.classes else args.classes[0]
        names, _ = class_names(target_k)
        method = build_method("coop", clip, names, fast=True)
        step = make_step(clip, method, images=None, features=torch.randn(32, clip.config.embed_dim),
                         labels=torch.randint(0, target_k, (32,)), precision=args.precision, device=args.device)
        profiled = profile_step(step)
        out(f"\n== Profile of ours' CoOp step, K={target_k} ({args.precision}), self CPU time "
            f"{profiled['total_ms']:.0f} ms (profiled, so slower than the timed runs) ==")
        for name, ms in profiled["categories_ms"].items():
            out(f"  {name:<24} {ms:8.1f} ms  {100 * ms / profiled['total_ms']:5.1f}%")
        out(profiled["table"])
        results["profile"] = {k: v for k, v in profiled.items()}

    if "successors" in args.sections:
        out("\n== Training steps of the CoOp successors, batch 32 (median seconds per step) ==")
        out("plain = image tower (fp32) + 77-token text (fp32) every step; ours = cached image features + fast text "
            f"({args.precision}); each with the method's loss terms, gradient rule and recipe optimiser")
        successors = bench_successors(clip, args, log)
        out(f"  {'method':<8} {'K':>5} {'plain s':>9} {'ours s':>9} {'speed-up':>9}  note")
        for row in successors:
            out(f"  {row['method']:<8} {row['classes']:>5} {fmt_s(row['plain_s']):>9} {fmt_s(row['ours_s']):>9} "
                f"{fmt_x(row['speedup']):>9}  {row['note']}")
        results["successors"] = successors

    if "adapters" in args.sections:
        out(f"\n== Training steps of the feature methods (median seconds per step), K={args.adapter_classes}, "
            f"{args.shots} shots ==")
        out("plain = the official step: image tower (fp32) on the step's images (CLIP-Adapter: + the K prompts "
            "through the 77-token text tower); ours = cached image features, text features computed once")
        adapters = bench_adapters(clip, args, log)
        out(f"  {'method':<14} {'batch':>6} {'plain s':>9} {'ours s':>9} {'speed-up':>9}")
        for row in adapters:
            out(f"  {row['method']:<14} {row['batch']:>6} {fmt_s(row['plain_s']):>9} {fmt_s(row['ours_s']):>9} "
                f"{fmt_x(row['speedup']):>9}")
        results["adapters"] = adapters

    evals: list[dict[str, Any]] = []
    if "eval" in args.sections:
        out(f"\n== CoOp evaluation: {args.eval_images:,} test images (random features), K={args.eval_classes} ==")
        evals = bench_eval(clip, args, log)
        out(f"  {'path':<6} {'batch':>6} {'batches':>8} {'text encodings':>15} {'text s':>9} {'eval s':>9}  note")
        for row in evals:
            out(f"  {row['path']:<6} {row['batch_size']:>6} {row['batches']:>8} {row['text_encodings']:>15} "
                f"{fmt_s(row['text_s']):>9} {fmt_s(row['eval_s']):>9}  {row['note']}")
        results["eval"] = evals

    if "fullrun" in args.sections:
        out(f"\n== Full {args.shots}-shot CoOp run: {args.fullrun_classes} classes, {args.fullrun_epochs} epochs, "
            f"batch 32 ==")
        full = bench_full_run(clip, args, log)
        parts = full["components"]
        out(f"  {full['images']} images, {full['steps']} steps, device {full['device']}, {full['precision']}, tower "
            f"batch {full['feature_batch']}")
        out(f"  image tower: {parts['tower_gflops']:.1f} GFLOP/s = {parts['tower_vs_matmul']:.2f} of the "
            f"{parts['matmul_dtype']} matmul rate ({parts['matmul_gflops']:.1f} GFLOP/s); "
            f"{1.0 / parts['tower_s_per_view']:.1f} views/s bare")
        for label, extraction in full["extraction"].items():
            out(f"  extraction end to end, {label}: {extraction['views_per_s']:.1f} views/s = "
                f"{extraction['vs_bare_tower']:.2f}x the bare tower's time ({extraction['views']} view(s) measured)")
        out(f"  {'recipe':<26} {'views':>6} {'extract':>9} {'train':>9} {'total':>9} {'vs plain':>9}  where the "
            "extraction time goes (decode / augment / tower / cache writes / overlap+other)")
        for label, entry in full["recipes"].items():
            where = entry["where"]
            out(f"  {label:<26} {entry['views']:>6} {fmt_s(entry['extract_s']):>9} {fmt_s(entry['train_s']):>9} "
                f"{fmt_s(entry['total_s']):>9} {fmt_x(entry['speedup']):>9}  "
                + " / ".join(fmt_s(where[k]) for k in ("decode_s", "augment_s", "tower_s", "cache_write_s",
                                                       "overlap_other_s")) + (f"  {entry['note']}" if entry["note"]
                                                                              else ""))
        out(f"  plain reference loop: {fmt_s(full['plain']['total_s'])}  {full['plain']['note']}")
        results["fullrun"] = full

    if "deep" in args.sections:
        out("\n== Deep-prompt training steps, images through the prompted towers (median seconds per step, batch "
            f"{DEEP_BATCH}) ==")
        out(f"plain = prompted towers with the 77-token text path, fp32 (the official step); ours = fast text, "
            f"{args.precision}")
        deep_groups = []
        for kind in args.deep_methods:
            for classes in args.classes:
                group = bench_deep_group(kind, clip, classes, args, log)
                deep_groups.append(group)
                print_group(group, out)
                gc.collect()
        results["deep"] = [g.to_json() for g in deep_groups]
        data = bench_data_path(clip, args, log)
        out(f"  data path ({data['workers']} workers): loader {data['loader_images_per_s']:.1f} img/s, prompted image "
            f"tower alone {data['tower_images_per_s']:.1f} img/s; training epochs {data['epochs_images_per_s']:.1f} "
            f"img/s vs steps alone {data['steps_images_per_s']:.1f} img/s "
            f"({data['steps_over_epochs']:.2f}x; target <= 1.3x)")
        results["deep_data_path"] = data

    if "lora" in args.sections:
        out(f"\n== CLIP-LoRA training steps, images through both adapted towers (median seconds per step, batch "
            f"{LORA_BATCH}) ==")
        out("plain = 77-token text, each update as the full B A product (the official step), fp32; ours = the "
            f"method's step (shortest text, (x A^T) B^T), {args.precision}; both AdamW")
        lora = bench_lora(clip, args, log)
        out(f"  {'method':<10} {'K':>5} {'plain s':>9} {'ours s':>9} {'speed-up':>9} {'plain MiB':>10} "
            f"{'ours MiB':>9}  note")
        for row in lora:
            out(f"  {row['method']:<10} {row['classes']:>5} {fmt_s(row['plain_s']):>9} {fmt_s(row['ours_s']):>9} "
                f"{fmt_x(row['speedup']):>9} {fmt_mib(row['plain_peak_bytes']):>10} "
                f"{fmt_mib(row['ours_peak_bytes']):>9}  {row['note']}")
        results["lora"] = lora

    if "tpt" in args.sections:
        out(f"\n== TPT per test image ({TPT_VIEWS} views, one step, the final prediction; median seconds) ==")
        out("zero-shot = the plain prediction of one image; official = views through the tower + 77-token text in "
            f"fp32; ours = views in one tower call + fast text ({args.precision})")
        tpt_rows = bench_tpt(clip, args, log)
        out(f"  {'K':>5} {'zero-shot s':>12} {'official s':>11} {'ours s':>9} {'ours/zero-shot':>15} "
            f"{'speed-up':>9}  note")
        for row in tpt_rows:
            out(f"  {row['classes']:>5} {fmt_s(row['zeroshot_s']):>12} {fmt_s(row['official_s']):>11} "
                f"{fmt_s(row['ours_s']):>9} {fmt_x(row['ours_vs_zeroshot']):>15} {fmt_x(row['speedup']):>9}  "
                f"{row['note']}")
        results["tpt"] = tpt_rows

    checks = targets(groups, evals)
    if checks:
        out("\n== Targets ==")
        for check in checks:
            value = check["value"]
            shown = value if isinstance(value, str) else fmt_x(value) if value is not None else "-"
            if "memory" in check["target"] and isinstance(value, float):
                shown = f"{value:.3f} of plain"
            alternative = check.get("with_fast_fp32")
            extra = f"  (same step with fast text in fp32: {fmt_x(alternative)})" if alternative else ""
            out(f"  [{'met' if check['met'] else 'NOT met'}] {check['target']}: {shown}{extra}")
    results["targets"] = checks
    results["env"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else []
    results["env"]["wall_s"] = time.perf_counter() - start
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
        out(f"\nnumbers saved to {args.json}")
    return results


if __name__ == "__main__":
    main()
