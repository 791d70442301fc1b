"""The frozen image tower computed once: feature extraction with an on-disk cache, augmented views, ranks.

Every method works on image features (``clip.encode_image``, float32, not normalised), so pixels are decoded and
encoded once and the features reused:

* :func:`extract_features`: evaluation features ``[N, D]`` (deterministic transform, one row per image).
* :func:`augmented_views`: training features ``[V, N, D]``; view ``v`` of image ``i`` is drawn with a generator seeded
  from (seed, v, the item's relative path) alone, so it does not depend on batching, worker count, rank or which other
  views are computed. Each image is decoded once for all of its views. Which view an image shows in a training epoch
  is the trainer's choice (:func:`epoch_view_indices`: ``(e + offset_i) % V`` with offsets
  drawn from the run's seed); ``views = epochs`` gives a fresh augmentation every epoch, as the reference.

With a :class:`~vlprompt.features.cache.FeatureCache`, rows found in the cache are served from it and only the missing
images are decoded and encoded; new rows are stored as soon as each batch is encoded (an interrupted run keeps its
progress). Keys cover the backbone's weights, the precision, the device kind, the transform, the view and the image
file's content, so a stale row is never served.

Decoding runs in DataLoader workers (:class:`~vlprompt.data.images.ImageDataset`). Unreadable images either stop the
call with a :class:`DatasetError` listing them (``on_error="raise"``, default; the remaining images are still decoded,
not encoded, to list every bad file at once) or are left out and listed in :attr:`FeatureSet.skipped`
(``on_error="skip"``).

Under torch.distributed (a process group initialised), item ``i`` belongs to rank ``i % world``: each rank looks up,
decodes and encodes its share, writes its own new rows to the cache (SQLite serialises the writers), and the full
result is gathered in item order on every rank. Every rank must call with the same arguments.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from vlprompt.common import dist as dist_helpers
from vlprompt.backbone.model import CLIP
from vlprompt.backbone.transforms import EvalTransform, TrainTransform, view_generator
from vlprompt.data.images import ON_ERROR_CHOICES, SKIP_HINT, BadImage, ImageDataset, OnError
from vlprompt.data.listing import format_offenders
from vlprompt.data.types import Item
from vlprompt.errors import ConfigError, DatasetError, RunError
from vlprompt.common.precision import autocast_for, check_precision, resolve_precision
from vlprompt.common.vocab import derive_seed
from vlprompt.common.progress import Progress, progress as make_progress
from vlprompt.features.cache import FeatureCache, FeatureKeyer

logger = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    """Image features with their labels and item paths, in item order.

    ``features`` is float32 on the CPU, not normalised: ``[N, D]``, or ``[V, N, D]`` for ``V`` augmented views.
    ``skipped`` lists the relative paths of unreadable images left out (``on_error="skip"``).
    """

    features: Tensor
    labels: Tensor
    paths: list[str]
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.features.ndim not in (2, 3):
            raise ValueError(f"features must be [N, D] or [V, N, D], got shape {tuple(self.features.shape)}")
        n = self.features.shape[-2]
        if self.labels.shape != (n,) or len(self.paths) != n:
            raise ValueError(f"{n} feature rows but labels of shape {tuple(self.labels.shape)} and "
                             f"{len(self.paths)} paths")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.features.shape[-1])

    @property
    def num_views(self) -> int:
        """V for ``[V, N, D]`` features, 1 for ``[N, D]``."""
        return int(self.features.shape[0]) if self.features.ndim == 3 else 1

    def subset(self, indices: Sequence[int] | Tensor) -> FeatureSet:
        """The items at ``indices`` (in that order), all views kept."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        return FeatureSet(self.features.index_select(-2, index), self.labels[index],
                          [self.paths[i] for i in index.tolist()], list(self.skipped))

    def view(self, v: int) -> FeatureSet:
        """View ``v`` as an ``[N, D]`` set (``view(0)`` of an ``[N, D]`` set is the set itself)."""
        if not 0 <= v < self.num_views:
            raise IndexError(f"view {v} out of range for a feature set of {self.num_views} view(s)")
        if self.features.ndim == 2:
            return self
        return FeatureSet(self.features[v], self.labels, self.paths, list(self.skipped))


# ----------------------------------------------------------------------------------------------------------------------
# public entry points


def epoch_view_indices(num_views: int, num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """Which augmented view [N] each image uses in ``epoch``: ``(epoch + offset_i) % V``.

    The pool of ``V`` views per image is shared by every run (so the feature cache serves it across seeds and
    methods); the run's seed draws each image's offset, so two seeds see different view sequences, and over ``V``
    consecutive epochs every image visits each of its views exactly once (``views="epochs"`` therefore gives a fresh
    augmentation every epoch, as the reference).
    """
    if num_views == 1:
        return torch.zeros(num_items, dtype=torch.long)
    generator = torch.Generator().manual_seed(derive_seed(seed, "views"))
    offsets = torch.randint(num_views, (num_items,), generator=generator)
    return (offsets + epoch) % num_views



def extract_features(
    clip: CLIP,
    image_dir: str | os.PathLike[str],
    items: Sequence[Item],
    *,
    transform: Callable[[Any], Tensor] | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    batch_size: int = 64,
    num_workers: int | str = "auto",
    cache: FeatureCache | None = None,
    on_error: OnError = "raise",
    progress: bool | None = None,
    distributed: bool | None = None,
    encoder: Callable[[Tensor], Tensor] | None = None,
) -> FeatureSet:
    """Evaluation features ``[N, D]`` of ``items`` (paths relative to ``image_dir``), in item order.

    ``transform`` maps an RGB PIL image to ``[3, R, R]`` (default: CLIP's eval transform at the model's resolution;
    it needs ``describe()`` when a cache is used). ``device`` defaults to the model's (the model is not moved).
    ``precision`` "bf16"/"fp16" runs the tower under autocast, "auto" resolves by
    :func:`~vlprompt.common.precision.resolve_precision` (the cache keys hold the concrete precision, so features of
    different precisions are never confused). ``batch_size``: images per tower call (every call but the last is
    full, whatever the views per image). ``num_workers``: DataLoader processes decoding and augmenting while the
    tower runs; "auto" = :func:`default_num_workers`. ``progress``: a tqdm bar on stderr, by default only when stderr
    is a terminal; progress lines go to the ``vlprompt.progress`` logger either way
    (:mod:`vlprompt.common.progress`). ``distributed``: split the work over the ranks of the initialised process
    group (default: whenever one is initialised).
    ``encoder``: the image tower to run instead of ``clip.encode_image`` (an image-in-the-loop method's prompted
    tower, ``method.encode_images``); its features depend on learned prompts, so they are never cached (``cache``
    must be None).
    """
    if encoder is not None and cache is not None:
        raise ConfigError("features of a method's own (prompted) image tower are not cached: pass cache=None")
    transform = transform if transform is not None else EvalTransform(clip.config.image_resolution)
    return _extract(clip, image_dir, items, transform=transform, views=None, seed=0, device=device,
                    precision=precision, batch_size=batch_size, num_workers=num_workers, cache=cache,
                    on_error=on_error, progress=progress, distributed=distributed, encoder=encoder)


def augmented_views(
    clip: CLIP,
    image_dir: str | os.PathLike[str],
    items: Sequence[Item],
    *,
    views: int | Sequence[int],
    seed: int,
    transform: Callable[[Any, torch.Generator], Tensor] | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    batch_size: int = 64,
    num_workers: int | str = "auto",
    cache: FeatureCache | None = None,
    on_error: OnError = "raise",
    progress: bool | None = None,
    distributed: bool | None = None,
    original: Callable[[Any], Tensor] | None = None,
) -> FeatureSet:
    """Training features ``[V, N, D]``: ``V`` augmented views of every item, each image decoded once.

    ``views`` is a count (views ``0..V-1``) or explicit view numbers (``features[k]`` is view ``views[k]``, so a
    trainer can compute epochs' views in chunks). ``transform(image, generator)`` draws one random view (default:
    CoOp's random resized crop + flip at the model's resolution); view ``v`` of an item uses the generator
    :func:`~vlprompt.backbone.transforms.view_generator` seeded with (``seed``, the item's path, ``v``). Other
    arguments as :func:`extract_features`.
    ``original``: view number 0 is ``original(image)`` (the unaugmented image, e.g. the evaluation transform) and
    the other views are drawn (a test-time method's views: TPT); not cached (``cache`` must be None).
    """
    if original is not None and cache is not None:
        raise ConfigError("views with an unaugmented original are not cached: pass cache=None")
    numbers = list(range(views)) if isinstance(views, int) else [int(v) for v in views]
    if not numbers or any(v < 0 for v in numbers) or len(set(numbers)) != len(numbers):
        raise ConfigError(f"views must be a positive count or distinct non-negative view numbers, got {views!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    transform = transform if transform is not None else TrainTransform(clip.config.image_resolution)
    return _extract(clip, image_dir, items, transform=transform, views=numbers, seed=seed, device=device,
                    precision=precision, batch_size=batch_size, num_workers=num_workers, cache=cache,
                    on_error=on_error, progress=progress, distributed=distributed, encoder=None, original=original)


# ----------------------------------------------------------------------------------------------------------------------
# decoding


class _DecodeDataset(ImageDataset):
    """Decodes each image once and returns all the rows it must yield: ``[k, 3, R, R]`` (k = views to draw, or 1).

    Relies on :class:`ImageDataset` for loading and bad-file handling (``on_error="skip"``: bad files come back as
    :class:`BadImage` and the caller applies its own policy after seeing all of them).
    """

    def __init__(self, items: Sequence[Item], image_dir: Path, transform: Callable[..., Tensor],
                 views: Sequence[tuple[int, ...]] | None, seed: int,
                 original: Callable[[Any], Tensor] | None = None) -> None:
        super().__init__(items, image_dir, transform=None, on_error="skip")
        self.draw = transform
        self.views = views
        self.seed = seed
        self.original = original

    def __getitem__(self, index: int) -> tuple[Tensor, int, int] | BadImage:
        sample = super().__getitem__(index)
        if isinstance(sample, BadImage):
            return sample
        image, label, _ = sample
        if self.views is None:
            return self.draw(image).unsqueeze(0), label, index
        path = self.items[index].path
        rows = [self.original(image) if v == 0 and self.original is not None
                else self.draw(image, view_generator(self.seed, path, v)) for v in self.views[index]]  # type: ignore[index]
        return torch.stack(rows), label, index


@dataclass
class _Batch:
    pixels: Tensor          # [rows, 3, R, R]
    jobs: Tensor            # [rows] job number of each row
    slots: Tensor           # [rows] position of each row among the job's rows to compute
    bad: list[BadImage]


def _collate(samples: Sequence[tuple[Tensor, int, int] | BadImage]) -> _Batch:
    """Concatenate the rows of the good samples; list the bad ones."""
    good = [s for s in samples if not isinstance(s, BadImage)]
    bad = [s for s in samples if isinstance(s, BadImage)]
    if not good:
        return _Batch(torch.empty(0), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), bad)
    counts = torch.tensor([s[0].shape[0] for s in good])
    jobs = torch.repeat_interleave(torch.tensor([s[2] for s in good]), counts)
    starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    slots = torch.arange(int(counts.sum())) - starts
    return _Batch(torch.cat([s[0] for s in good]), jobs, slots, bad)


# ----------------------------------------------------------------------------------------------------------------------
# the pipeline


def _extract(clip: CLIP, image_dir: str | os.PathLike[str], items: Sequence[Item], *, transform: Callable[..., Tensor],
             views: list[int] | None, seed: int, device: str | torch.device | None, precision: str, batch_size: int,
             num_workers: int | str, cache: FeatureCache | None, on_error: str, progress: bool | None,
             distributed: bool | None, encoder: Callable[[Tensor], Tensor] | None,
             original: Callable[[Any], Tensor] | None = None) -> FeatureSet:
    _check_options(precision, batch_size, num_workers, on_error)
    target = _resolve_device(clip, device)
    precision = resolve_precision(precision, target)
    items = list(items)
    image_dir = Path(image_dir)
    rank, world = _rank_world(distributed)
    num_views = len(views) if views is not None else 1
    dim = int(clip.config.embed_dim)
    local = items[rank::world]

    failure: BaseException | None = None
    rows = torch.zeros(num_views, len(local), dim)
    bad: dict[int, str] = {}
    try:
        keys = _local_keys(clip, image_dir, local, transform, views, seed, precision, target, cache, bad)
        todo = _fill_from_cache(rows, keys, cache, dim, bad)
        served = (len(local) - len(bad)) * num_views - sum(len(slots) for _, slots in todo)
        encoded = _compute(clip, image_dir, local, todo, rows, keys, cache, transform=transform, views=views,
                           seed=seed, device=target, precision=precision, batch_size=batch_size,
                           num_workers=num_workers, bad=bad, stop_encoding_on_error=on_error == "raise",
                           progress=progress, rank=rank, encoder=encoder, original=original)
        logger.info("image features (rank %d of %d): %d images x %d view(s), %d rows from the cache, %d encoded "
                    "(%s)", rank, world, len(local), num_views, served, encoded, precision)
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks learn of it
        if world == 1:
            raise
        failure = exc
    if world > 1:
        rows, bad = _gather(rows, bad, len(items), rank, world, failure)
    reasons = [bad[i] for i in sorted(bad)]
    if bad and on_error == "raise":
        raise DatasetError(
            f"{len(bad)} of {len(items)} images could not be read: {format_offenders(reasons)}. Remove or replace "
            f"them (`vlprompt data check` lists every unreadable file), {SKIP_HINT}."
        )
    keep = [i for i in range(len(items)) if i not in bad]
    if bad:
        logger.warning("skipped %d of %d unreadable images: %s", len(bad), len(items), format_offenders(reasons))
        rows = rows[:, keep]
    features = rows if views is not None else rows[0]
    labels = torch.tensor([items[i].label for i in keep], dtype=torch.int64)
    return FeatureSet(features.contiguous(), labels, [items[i].path for i in keep], [items[i].path for i in sorted(bad)])


def _check_options(precision: str, batch_size: int, num_workers: int | str, on_error: str) -> None:
    check_precision(precision)
    if on_error not in ON_ERROR_CHOICES:
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    if num_workers != "auto" and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                  or num_workers < 0):
        raise ConfigError(f"num_workers must be an int >= 0 or 'auto', got {num_workers!r}")


AUTO_WORKERS_MIN_IMAGES = 32
"""Below this many images to decode, ``num_workers="auto"`` decodes in the main process (starting a worker costs
more than it saves)."""


def default_num_workers(device: torch.device | str, images: int, cores: int | None = None) -> int:
    """Decoding workers for ``num_workers="auto"``: 0 for fewer than :data:`AUTO_WORKERS_MIN_IMAGES` images or a
    single core; on CUDA ``min(8, cores - 1)`` (the GPU encodes far faster than one core decodes); on a CPU 1 (the
    tower needs the cores: decoding and augmenting one image takes a few ms against ~150 ms of ViT-B/16 tower, so one
    worker keeps ahead of it, and more would only take threads from the tower)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if images < AUTO_WORKERS_MIN_IMAGES or cores < 2:
        return 0
    if torch.device(device).type == "cuda":
        return min(8, cores - 1)
    return 1


def _resolve_device(clip: CLIP, device: str | torch.device | None) -> torch.device:
    here = clip.device
    if device is None:
        return here
    target = torch.device(device)
    if target.type != here.type or (target.index is not None and here.index is not None and target.index != here.index):
        raise ConfigError(f"the model is on {here} but features were asked for on {target}: move the model first "
                          f"(clip.to({str(target)!r})) or leave device unset")
    return here


def _rank_world(distributed: bool | None) -> tuple[int, int]:
    running = dist_helpers.is_initialized()
    if distributed and not running:
        raise ConfigError("distributed feature extraction needs an initialised torch.distributed process group "
                          "(launch with torchrun)")
    if distributed is False or not running:
        return 0, 1
    return dist_helpers.rank(), dist_helpers.world_size()


def _local_keys(clip: CLIP, image_dir: Path, local: list[Item], transform: Any, views: list[int] | None, seed: int,
                precision: str, device: torch.device, cache: FeatureCache | None,
                bad: dict[int, str]) -> list[list[str]] | None:
    """Cache keys ``keys[k][j]`` of view slot ``k`` of local item ``j`` (None without a cache); unreadable files
    found while hashing go to ``bad``."""
    if cache is None:
        return None
    describe = getattr(transform, "describe", None)
    if not callable(describe):
        raise ConfigError(f"a cached transform needs a describe() method naming it and its parameters; "
                          f"{type(transform).__name__} has none (pass cache=None or add describe())")
    keyer = FeatureKeyer(clip.fingerprint(), precision, device.type, str(describe()))
    digests, errors = cache.file_digests([image_dir / item.path for item in local])
    for j, reason in errors.items():
        bad[j] = f"image file {str(image_dir / local[j].path)!r}: {reason}"
    if views is None:
        return [[keyer.eval_key(d) if d else "" for d in digests]]
    return [[keyer.view_key(d, seed=seed, view=v, path=item.path) if d else "" for d, item in zip(digests, local)]
            for v in views]


def _fill_from_cache(rows: Tensor, keys: list[list[str]] | None, cache: FeatureCache | None, dim: int,
                     bad: dict[int, str]) -> list[tuple[int, tuple[int, ...]]]:
    """Copy cached rows into ``rows``; return the work left: (local item, view slots to compute) per image."""
    num_views, count = rows.shape[0], rows.shape[1]
    if keys is None or cache is None:
        return [(j, tuple(range(num_views))) for j in range(count) if j not in bad]
    wanted = [key for slot in keys for key in slot if key]
    found = cache.get_many(wanted, dim=dim)
    missing: dict[int, list[int]] = {}
    hit_slot, hit_item, hit_rows = [], [], []
    for k, slot in enumerate(keys):
        for j, key in enumerate(slot):
            if j in bad:
                continue
            vector = found.get(key)
            if vector is None:
                missing.setdefault(j, []).append(k)
            else:
                hit_slot.append(k)
                hit_item.append(j)
                hit_rows.append(vector)
    if hit_rows:
        rows[hit_slot, hit_item] = torch.from_numpy(np.stack(hit_rows))
    return [(j, tuple(slots)) for j, slots in sorted(missing.items())]


def _compute(clip: CLIP, image_dir: Path, local: list[Item], todo: list[tuple[int, tuple[int, ...]]], rows: Tensor,
             keys: list[list[str]] | None, cache: FeatureCache | None, *, transform: Callable[..., Tensor],
             views: list[int] | None, seed: int, device: torch.device, precision: str, batch_size: int,
             num_workers: int | str, bad: dict[int, str], stop_encoding_on_error: bool, progress: bool | None,
             rank: int, encoder: Callable[[Tensor], Tensor] | None = None,
             original: Callable[[Any], Tensor] | None = None) -> int:
    """Decode and encode the images of ``todo`` into ``rows`` (and the cache); bad files go to ``bad``.

    Decoded rows are gathered into tower batches of exactly ``batch_size`` (the last one excepted), whatever the views
    per image, so the tower always runs at its full-batch rate. Returns the number of rows encoded."""
    if not todo:
        return 0
    num_views = rows.shape[0]
    job_items = torch.tensor([j for j, _ in todo])
    slot_table = torch.zeros(len(todo), num_views, dtype=torch.int64)  # [job, n-th row of the job] -> view slot
    for n, (_, slots) in enumerate(todo):
        slot_table[n, :len(slots)] = torch.tensor(slots)
    dataset = _DecodeDataset([local[j] for j, _ in todo], image_dir, transform,
                             None if views is None else [tuple(views[k] for k in slots) for _, slots in todo], seed,
                             original)
    workers = default_num_workers(device, len(todo)) if num_workers == "auto" else int(num_workers)
    loader = torch.utils.data.DataLoader(dataset, batch_size=max(1, batch_size // num_views), shuffle=False,
                                         num_workers=workers, collate_fn=_collate,
                                         pin_memory=device.type == "cuda")
    total_rows = sum(len(slots) for _, slots in todo)
    unit = "view" if views is not None else "img"
    batched = _BatchedEncoder(encoder or clip.encode_image, rows, keys, cache, device=device, precision=precision,
                              batch_size=batch_size)
    with make_progress(total_rows, "image features", unit, show=progress if rank == 0 else False,
                       lines=rank == 0) as shown, _eval_mode(clip), torch.inference_mode():
        batched.progress = shown
        for batch in loader:
            for b in batch.bad:
                bad[int(job_items[b.index])] = b.reason
            if bad and stop_encoding_on_error:
                batched.drop()  # nothing more is encoded: the call fails once every bad file is listed
                continue
            if batch.pixels.shape[0]:
                batched.add(batch.pixels, slot_table[batch.jobs, batch.slots], job_items[batch.jobs])
        if not (bad and stop_encoding_on_error):
            batched.flush()
    return batched.encoded


class _BatchedEncoder:
    """Collects decoded rows and encodes them ``batch_size`` at a time into ``rows`` and the cache."""

    def __init__(self, encode: Callable[[Tensor], Tensor], rows: Tensor, keys: list[list[str]] | None,
                 cache: FeatureCache | None, *,
                 device: torch.device, precision: str, batch_size: int) -> None:
        self.encode, self.rows, self.keys, self.cache = encode, rows, keys, cache
        self.device, self.precision, self.batch_size = device, precision, batch_size
        self.pending: list[tuple[Tensor, Tensor, Tensor]] = []  # (pixels, view slots, local items)
        self.count = 0
        self.encoded = 0
        self.progress: Progress | None = None

    def add(self, pixels: Tensor, slots: Tensor, items: Tensor) -> None:
        self.pending.append((pixels, slots, items))
        self.count += pixels.shape[0]
        while self.count >= self.batch_size:
            self._encode(self.batch_size)

    def flush(self) -> None:
        if self.count:
            self._encode(self.count)

    def drop(self) -> None:
        self.pending, self.count = [], 0

    def _encode(self, size: int) -> None:
        if len(self.pending) == 1 and self.pending[0][0].shape[0] == size:
            (pixels, slots, items), self.pending = self.pending[0], []
        else:
            pixels, slots, items = (torch.cat(parts) for parts in zip(*self.pending))
            self.pending = [] if pixels.shape[0] == size else [(pixels[size:], slots[size:], items[size:])]
            pixels, slots, items = pixels[:size], slots[:size], items[:size]
        self.count -= size
        features = _encode(self.encode, pixels, self.device, self.precision)
        self.rows[slots, items] = features
        self.encoded += size
        if self.cache is not None and self.keys is not None:
            self.cache.put_many((self.keys[int(k)][int(j)], f) for k, j, f in zip(slots, items, features.numpy()))
        if self.progress is not None:
            self.progress.update(size)


def _encode(encode: Callable[[Tensor], Tensor], pixels: Tensor, device: torch.device, precision: str) -> Tensor:
    """``encode`` (``clip.encode_image``, or a method's prompted tower) of one batch under the requested autocast;
    float32 on the CPU."""
    pixels = pixels.to(device, non_blocking=device.type == "cuda")
    with autocast_for(device, precision):
        features = encode(pixels)
    return features.float().cpu()


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the block (BatchNorm statistics of ResNet towers), previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------------------
# ranks


def _gather(rows: Tensor, bad: dict[int, str], total: int, rank: int, world: int,
            failure: BaseException | None) -> tuple[Tensor, dict[int, str]]:
    """All ranks' rows ``[V, n_rank, D]`` reassembled in item order (item ``i`` = local ``i // world`` of rank
    ``i % world``), with the bad files keyed by global index. Raises on every rank if any rank failed."""
    status: list[Any] = [None] * world
    dist.all_gather_object(status, (None if failure is None else f"{type(failure).__name__}: {failure}",
                                    {j * world + rank: reason for j, reason in bad.items()}))
    if failure is not None:
        raise failure
    for r, (error, _) in enumerate(status):
        if error is not None:
            raise RunError(f"feature extraction failed on rank {r}: {error}")
    every_bad = {i: reason for _, part in status for i, reason in part.items()}

    per_rank = -(-total // world)  # rank 0 holds the most items
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros(rows.shape[0], per_rank, rows.shape[2], device=comm)
    padded[:, :rows.shape[1]] = rows.to(comm)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    # [world, V, per_rank, D] -> [V, per_rank, world, D]: position (j, r) is item j * world + r; padding falls past N
    stacked = torch.stack(gathered).permute(1, 2, 0, 3).reshape(rows.shape[0], per_rank * world, rows.shape[2])
    return stacked[:, :total].cpu().contiguous(), every_bad
