"""The one training loop of gradient-trained methods (CoOp, CoCoOp, IVLP, MaPLe, PromptSRC, CLIP-LoRA), following the
reference (Dassl) recipe.

One flat function, :func:`train`, plus small pure helpers. The loop takes its inputs from a source
(:mod:`vlprompt.training.sources`): cached features for methods declared ``Training.FEATURES``, images decoded and
augmented on the fly by DataLoader workers for ``Training.IMAGES`` (an :class:`~vlprompt.training.sources.
ImageTrainSet`; the image tower then runs forward and backward through the method's prompts each step). Everything
below holds for both:

- SGD (momentum 0.9, dampening 0, no Nesterov, weight decay 5e-4) over ``method.parameters()`` only, or Adam
  (betas 0.9 / 0.999, L2 weight decay, ``adam_eps``) when ``config.optimizer`` says so (TCP's recipe).
- Learning rate per epoch (:func:`lr_at_epoch`): ``warmup_lr`` for the warm-up epochs, then
  ``lr * 0.5 * (1 + cos(pi * (e - warmup_epochs) / epochs))``. This is what Dassl's ``ConstantWarmupScheduler``
  around ``CosineAnnealingLR(T_max=epochs)`` yields when stepped once per epoch: the wrapper does not step the cosine
  during the warm-up, so epoch ``warmup_epochs`` runs at the full ``lr`` and the cosine never reaches zero.
  ``min_lr`` (the cosine's floor, 0 in Dassl's recipe) is added as ``min_lr + (lr - min_lr) * ...``.
- Or a length in optimiser steps (``config.steps``, CLIP-LoRA's 500 x shots): the epochs those steps need run,
  the last one cut short, and the learning rate is set before every step (:func:`lr_at_step`: the same warm-up and
  cosine counted in steps, i.e. ``CosineAnnealingLR(T_max=steps, eta_min=min_lr)`` stepped after each update
  when there is no warm-up). Checkpoints stay per epoch.
- AdamW (decoupled weight decay, betas 0.9 / 0.999) when ``config.optimizer`` is "adamw" (CLIP-LoRA's recipe).
- Each epoch visits the training set in a random order drawn from a generator seeded by (seed, epoch), in batches of
  ``batch_size`` with the last incomplete batch dropped when the set holds at least one full batch (else one smaller
  batch), as Dassl's loader. In epoch ``e`` image ``i`` uses view ``(e + offset_i) % V`` (of the cached features
  [V, N, D], or of the same pool of augmentations drawn from the images), the offsets drawn from the seed
  (:func:`epoch_view_indices`). Randomness inside the method's
  forward (if any) is seeded per (seed, epoch) too, so a resumed run needs no RNG replay.
- Cross-entropy on the logits; the last epoch is the final model. A method may add a term to the objective:
  ``method.regularizer()`` (optional) returns a scalar added to the batch-mean cross-entropy of each step, computed
  from the learned state or from the training forward just run (CLAP's class-wise penalty; KgCoOp's and TCP's
  knowledge-guided term); the logged loss is the cross-entropy. A method may reshape the gradient:
  ``method.guide_loss(features, logits)`` with ``method.align_gradients(grads, guides)`` (optional: a second loss
  whose gradient, taken with ``torch.autograd.grad`` and averaged over ranks, reshapes the cross-entropy gradient
  before the step: ProGrad). A method may also define
  ``method.prepare(train_set)`` (optional), called once before the first epoch of every session with the training
  features (CLAP's multipliers from the zero-shot predictions); it must not depend on the learned state, so a resumed
  run prepares exactly as an uninterrupted one.
- A method's forward may also return a :class:`TrainOutput`: its batch-dependent regulariser (PromptSRC) joins the
  summed cross-entropy; after each epoch the method's ``finish_epoch(epoch, epochs)`` runs if it has one (PromptSRC's
  prompt aggregation, whose state is part of the method's state dict and so of every checkpoint); the method at the end of
  the last epoch is the final model. ``activation_checkpointing`` calls the method's
  ``use_activation_checkpointing(True)`` (image-in-the-loop methods).
- Precision: fp32, or autocast bf16 / fp16 (fp16 with gradient scaling); learned parameters and optimiser state stay
  fp32. ``auto`` is resolved by :func:`vlprompt.common.precision.resolve_precision` (measured once per machine); the
  concrete precision is logged, kept in each checkpoint, and a resumed ``auto`` run continues in its checkpoint's
  precision. A non-finite loss raises :class:`TrainingDiverged` before the update, non-finite learned parameters after
  an update, and non-finite logits (on one batch) after an epoch, before its checkpoint: naming epoch, step and lr.
- A checkpoint after every epoch (rank 0 only) in the run folder; with a checkpoint present, training continues from
  it and ends with the parameters an uninterrupted run has (bit-identical on CPU).
- Under torchrun, DistributedDataParallel: every rank draws the same global batch and takes its share; losses are
  scaled so the averaged gradient is that of the global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.common import dist
from vlprompt.training.config import DEFAULT_ADAM_EPS, TrainConfig, stable_hash, train_identity
from vlprompt.errors import CheckpointError, ConfigError, DatasetError, NonFiniteError, RunError
from vlprompt.common.precision import autocast_for, resolve_precision
from vlprompt.common.progress import progress as make_progress
from vlprompt.common.vocab import PRECISIONS, derive_seed, seeded_torch
from vlprompt.features.extract import epoch_view_indices
from vlprompt.methods.base import TrainOutput
from vlprompt.training.sources import ImageTrainSet, batch_source

logger = logging.getLogger(__name__)


class CheckpointStore(Protocol):
    """Where :func:`train` keeps its checkpoints and log (the harness's run folder, ``harness.rundir.RunDir``)."""

    path: Path

    def save_checkpoint(self, params: Mapping[str, torch.Tensor], optim: Mapping[str, torch.Tensor],
                        state: Mapping[str, Any]) -> None: ...

    def load_checkpoint(self) -> Any: ...

    def capture_logs(self) -> contextlib.AbstractContextManager[Any]: ...

    def tensorboard(self) -> Any: ...

CHECKPOINT_FORMAT = 1


class TrainingDiverged(RunError, NonFiniteError):
    """The loss, the learned parameters or the logits became NaN or infinite; the run stopped without saving."""


class FeatureData(Protocol):
    """What :func:`train` reads from a FeatureSet: ``features`` [N, D] or [V, N, D] and ``labels`` [N]."""

    features: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class EpochStats:
    """Summary of one finished epoch (``epoch`` counts from 1)."""

    epoch: int
    lr: float
    loss: float
    accuracy: float
    seconds: float


@dataclass
class TrainResult:
    """What :func:`train` did: the per-epoch history (earlier sessions of a resumed run included)."""

    history: list[EpochStats] = field(default_factory=list)
    start_epoch: int = 0  # epochs already done when this call started (non-zero when resumed)
    precision: str = "fp32"  # the concrete precision the epochs of this call ran in (``auto`` resolved)

    @property
    def train_s(self) -> float:
        """Training time over all sessions, in seconds."""
        return sum(stats.seconds for stats in self.history)


# -------------------------------------------------------------------------------------------------- pure helpers


def lr_at_epoch(epoch: int, config: TrainConfig) -> float:
    """Learning rate of epoch ``epoch`` (0-based): constant warm-up, then cosine over ``config.epochs`` from ``lr``
    towards ``min_lr``."""
    if config.epochs is None:
        raise ConfigError("train.epochs is not set: resolve the configuration (resolve_train_config) first")
    return _warmup_cosine(epoch, config.epochs, config.completed().warmup_epochs, config)  # type: ignore[arg-type]


def lr_at_step(step: int, config: TrainConfig, steps_per_epoch: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based, counted over the whole run) of a run measured in
    ``config.steps``: the warm-up's steps (``warmup_epochs`` epochs of ``steps_per_epoch``) at ``warmup_lr``,
    then the cosine stepped once per step over ``steps`` from ``lr`` towards ``min_lr``. Without warm-up this
    is PyTorch's ``CosineAnnealingLR(T_max=steps, eta_min=min_lr)`` stepped after every update (CLIP-LoRA)."""
    if config.steps is None:
        raise ConfigError("train.steps is not set: the schedule per step needs it")
    warmup = config.completed().warmup_epochs
    assert warmup is not None
    return _warmup_cosine(step, config.steps, warmup * steps_per_epoch, config)


def _warmup_cosine(t: int, length: int, warmup: int, config: TrainConfig) -> float:
    if t < warmup:
        return config.warmup_lr
    completed = config.completed()
    lr, floor = completed.lr, completed.min_lr
    assert lr is not None and floor is not None
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / length))


def lr_schedule(config: TrainConfig) -> list[float]:
    """The learning rate of every epoch."""
    return [lr_at_epoch(epoch, config) for epoch in range(config.epochs or 0)]


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Index batches of one epoch: a seeded permutation, cut into ``batch_size`` pieces; the last incomplete piece
    is dropped when at least one full batch exists (Dassl's ``drop_last``), else the single smaller batch is kept."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
    order = torch.randperm(num_items, generator=generator)
    batches = list(order.split(batch_size))
    if num_items >= batch_size and batches[-1].numel() < batch_size:
        batches.pop()
    return batches


# --------------------------------------------------------------------------------------------------------- train


def train(method: nn.Module, train_set: FeatureData | ImageTrainSet, config: TrainConfig, *,
          run_dir: CheckpointStore | None = None,
          device: str | torch.device | None = None, on_epoch_end: Callable[[EpochStats], None] | None = None,
          progress: bool | None = None) -> TrainResult:
    """Train ``method``'s parameters on ``train_set`` (SGD or Adam, see the module docstring); checkpoint into
    ``run_dir`` after every epoch.

    ``config`` must be resolved (``epochs``/``batch_size`` set). ``device``: None follows ``config.device``, where
    "auto" keeps the method where its parameters are. A checkpoint in ``run_dir`` (opened with ``resume``) is continued.
    Under torchrun (process group started, see :mod:`vlprompt.common.dist`), pass ``run_dir`` on rank 0 only.
    ``on_epoch_end`` runs after each epoch's checkpoint. The method is left in eval mode.
    """
    if not config.is_resolved:
        raise ConfigError("train.epochs (or train.steps) and train.batch_size must be set: call "
                          "resolve_train_config() or set them")
    assert config.batch_size is not None
    config = config.completed()  # lr / weight decay left to the method's default: the reference recipe
    source = batch_source(train_set)
    labels = source.labels
    epochs = config.planned_epochs(labels.numel())  # with steps: the epochs they need, the last cut short
    steps_per_epoch = config.steps_per_epoch(labels.numel())
    params = _learned_parameters(method)
    target = _training_device(method, config, device)
    method.to(target)
    prepare = getattr(method, "prepare", None)
    if prepare is not None:
        prepare(train_set)
    rank, world = dist.rank(), dist.world_size()
    is_main = rank == 0
    smallest_batch = min(config.batch_size, labels.numel())
    if smallest_batch < world:
        raise ConfigError(f"a batch of {smallest_batch} cannot be shared by {world} processes: raise --batch-size "
                          f"to at least {world} or use fewer processes")
    optimizer = build_optimizer(params, config)
    train_hash = stable_hash(train_identity(config))
    writer = run_dir if is_main else None

    max_label = int(labels.max())
    if config.activation_checkpointing:
        enable = getattr(method, "use_activation_checkpointing", None)
        if enable is None:
            raise ConfigError(f"{type(method).__name__} does not run the towers in training (it learns from cached "
                              "features): activation checkpointing does not apply; leave it off")
        enable(True)
    finish_epoch = getattr(method, "finish_epoch", None)
    with contextlib.ExitStack() as stack:
        if writer is not None:
            stack.enter_context(writer.capture_logs())
        checkpoint = dist.broadcast_object(run_dir.load_checkpoint() if run_dir is not None else None)
        precision = dist.broadcast_object(_run_precision(config, target, checkpoint))  # every rank as rank 0
        scaler = _grad_scaler(target, precision)
        result = TrainResult(precision=precision)
        if checkpoint is not None:
            result = _restore(checkpoint, method, optimizer, scaler, train_hash, epochs)
            result.precision = precision
            logger.info("resuming after epoch %d of %d", result.start_epoch, epochs)
        model: nn.Module = method
        if world > 1:
            model = nn.parallel.DistributedDataParallel(method,
                                                        device_ids=[target] if target.type == "cuda" else None)
        board = writer.tensorboard() if writer is not None and config.tensorboard else None
        if board is not None:
            stack.callback(board.close)
        bar = stack.enter_context(make_progress(epochs, "train", "epoch", show=progress if is_main else False,
                                                lines=is_main, initial=result.start_epoch))
        logger.info("training %d learned tensor(s) (%d values) on %s, %d epochs%s, batch %d, "
                    "precision %s%s, %s%s", len(params), sum(p.numel() for p in params), source.describe(),
                    epochs, f" ({config.steps} steps)" if config.steps is not None else "",
                    config.batch_size, precision,
                    " (auto)" if config.precision == "auto" else "", target,
                    f", {world} processes" if world > 1 else "")
        method.train()
        for epoch in range(result.start_epoch, epochs):
            started = time.perf_counter()
            views = epoch_view_indices(source.num_views, labels.numel(), config.seed, epoch)
            batches = epoch_batches(labels.numel(), config.batch_size, config.seed, epoch)
            step_lr: Callable[[int], float] | None = None
            if config.steps is None:  # the schedule per epoch (Dassl)
                lr = lr_at_epoch(epoch, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
            else:  # per step, over the run's steps; the last epoch stops at the last step
                first_step = epoch * steps_per_epoch
                batches = batches[:config.steps - first_step]
                lr = lr_at_step(first_step, config, steps_per_epoch)
                step_lr = lambda step, first=first_step: lr_at_step(first + step, config, steps_per_epoch)  # noqa: E731
            shares = [batch.tensor_split(world)[rank] for batch in batches]
            try:
                with seeded_torch(target, config.seed, "forward", epoch):
                    totals = _train_epoch(model, method, params, optimizer, scaler,
                                          source.epoch(views, shares, target), labels, batches, shares, target,
                                          precision, max_label, step_lr)
            except _NonFinite as bad:
                raise _diverged(bad.what, epoch, epochs, bad.step, len(batches), lr, precision, run_dir,
                                applied=bad.applied) from None
            if finish_epoch is not None:  # end-of-epoch state of the method (PromptSRC's prompt aggregation)
                finish_epoch(epoch, epochs)
            with seeded_torch(target, config.seed, "forward", epoch):
                first = next(iter(source.epoch(views, [batches[0]], target)))
                finite = _finite_logits(method, first, target, precision)
            if not finite:
                raise _diverged("the logits are non-finite after the epoch's last update", epoch, epochs,
                                len(batches) - 1, len(batches), lr, precision, run_dir, applied=True)
            stats = EpochStats(epoch=epoch + 1, lr=lr, loss=float(totals[0] / totals[2]),
                               accuracy=float(100.0 * totals[1] / totals[2]),
                               seconds=time.perf_counter() - started)
            result.history.append(stats)
            if writer is not None:
                writer.save_checkpoint(method.state_dict(), *_optimizer_tensors(optimizer, scaler, stats, result,
                                                                                train_hash, config, epochs, world,
                                                                                precision))
            if board is not None:
                for name in ("loss", "accuracy", "lr"):
                    board.add_scalar(f"train/{name}", getattr(stats, name), stats.epoch)
            logger.info("epoch %d/%d: loss %.4f, accuracy %.2f%%, lr %.3g, %.2fs", stats.epoch, epochs,
                        stats.loss, stats.accuracy, lr, stats.seconds)
            bar.set_postfix(loss=f"{stats.loss:.4f}", acc=f"{stats.accuracy:.1f}", lr=f"{lr:.2e}")
            bar.update(1)
            if on_epoch_end is not None:
                on_epoch_end(stats)
    method.eval()
    return result


# ------------------------------------------------------------------------------------------------ loop helpers


class _NonFinite(Exception):
    """A non-finite loss (before the update of ``step``) or learned parameter (after it)."""

    def __init__(self, step: int, what: str, applied: bool) -> None:
        super().__init__(step, what, applied)
        self.step, self.what, self.applied = step, what, applied


def _train_epoch(model: nn.Module, method: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, inputs: Iterator[torch.Tensor], labels: torch.Tensor,
                 batches: list[torch.Tensor], shares: list[torch.Tensor], device: torch.device, precision: str,
                 max_label: int, step_lr: Callable[[int], float] | None = None) -> torch.Tensor:
    """One pass over ``batches``; returns the global (loss sum, correct, count). Each rank takes its share of every
    batch (``shares``, whose inputs ``inputs`` yields in order); a non-finite loss raises :class:`_NonFinite` on
    every rank before that step's update, non-finite parameters after it.

    ``model`` is ``method`` or its DDP wrapper. The method returns logits, or a :class:`TrainOutput` whose
    ``regularizer`` (a mean over its batch) joins the summed cross-entropy weighted by the batch size; the method's
    optional hooks (``regularizer()``, ``guide_loss`` / ``align_gradients``: module docstring) are read from
    ``method`` (:func:`step_objective`, :func:`apply_update`). ``step_lr(step)``: the learning rate of each step
    (a schedule per step), else the epoch's, already set."""
    world = dist.world_size()
    totals = torch.zeros(3, dtype=torch.float64)
    for step, (batch, local, x) in enumerate(zip(batches, shares, inputs, strict=True)):
        if step_lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = step_lr(step)
        y = labels[local].to(device, non_blocking=True)
        with autocast_for(device, precision):
            output = model(x)
        logits, batch_term = (output.logits, output.regularizer) if isinstance(output, TrainOutput) else \
            (output, None)
        if logits.ndim != 2 or logits.shape[0] != local.numel() or logits.shape[1] <= max_label:
            raise DatasetError(f"the method returned logits of shape {tuple(logits.shape)} for a batch of "
                               f"{local.numel()} with labels up to {max_label}: do the training labels belong to "
                               "the method's classes?")
        loss_sum = F.cross_entropy(logits.float(), y, reduction="sum")
        if batch_term is not None:
            loss_sum = loss_sum + batch_term.float() * local.numel()
        correct = (logits.argmax(dim=1) == y).sum().to(loss_sum.dtype)
        count = torch.full((), float(local.numel()), device=device)
        step_totals = dist.all_reduce_sum(torch.stack([loss_sum.detach(), correct, count]).double()).cpu()
        # DDP averages gradients over ranks; this scale makes the result the mean over the whole global batch
        scale = world / batch.numel()
        objective, extra = step_objective(method, loss_sum, scale)
        if not math.isfinite(extra):
            raise _NonFinite(step, f"the method's regularizer is {extra}", applied=False)
        if not math.isfinite(float(step_totals[0])):
            raise _NonFinite(step, f"the loss is {float(step_totals[0])}", applied=False)
        totals += step_totals
        apply_update(method, params, optimizer, scaler, x, logits, objective, scale, world)
        if not _finite_parameters(optimizer):
            raise _NonFinite(step, "the learned parameters are non-finite", applied=True)
    return totals


def _finite_parameters(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every learned parameter is finite after an update (the same on every rank: DDP keeps them equal).

    A float64 sum is finite exactly when every element is (it cannot overflow), so no full-size mask is built.
    """
    sums = [p.detach().sum(dtype=torch.float64) for group in optimizer.param_groups for p in group["params"]]
    return bool(torch.stack(sums).isfinite().all())


def _finite_logits(method: nn.Module, inputs: torch.Tensor, device: torch.device, precision: str) -> bool:
    """Whether the method's logits on one training batch are finite after the epoch: parameters can stay finite yet
    grow so large that the text tower overflows (a divergence in the last update shows here, not in any loss)."""
    was_training = method.training
    method.eval()
    try:
        with torch.no_grad(), autocast_for(device, precision):
            logits = method(inputs.to(device))
        return bool(logits.float().isfinite().all())
    finally:
        method.train(was_training)


def step_objective(method: nn.Module, loss_sum: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """``(objective, regulariser value)`` of one step: this rank's share ``loss_sum * scale`` of the batch-mean
    cross-entropy, plus ``method.regularizer()`` if the method has one (the same batch-independent term on every
    rank: DDP's average keeps it; 0.0 without one)."""
    regularizer = getattr(method, "regularizer", None)
    objective = loss_sum * scale
    if regularizer is None:
        return objective, 0.0
    extra = regularizer()
    return objective + extra, extra.item()


def apply_update(method: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, features: torch.Tensor, logits: torch.Tensor,
                 objective: torch.Tensor, scale: float, world: int) -> None:
    """Backward and optimiser step of one batch: the gradient of ``objective``, reshaped first by the method's
    ``align_gradients`` against the gradient of its ``guide_loss(features, logits)`` (same share ``scale``) when it
    has one (ProGrad), then the (scaled) optimiser step. One step of :func:`train` (also timed by the speed
    benchmark)."""
    guide_loss = getattr(method, "guide_loss", None)
    optimizer.zero_grad(set_to_none=True)
    guides = None
    if guide_loss is not None:
        guides = _guide_gradients(scaler.scale(guide_loss(features, logits) * scale), params, world)
    scaler.scale(objective).backward()
    if guides is not None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for param, grad in zip(params, method.align_gradients(grads, guides), strict=True):
            param.grad = grad
    scaler.step(optimizer)
    scaler.update()


def _guide_gradients(loss: torch.Tensor, params: list[nn.Parameter], world: int) -> list[torch.Tensor]:
    """Gradients of this rank's share of a guide loss w.r.t. ``params``, averaged over ranks (the global batch mean).

    ``torch.autograd.grad`` leaves ``.grad`` and DDP's gradient hooks alone; the graph is kept for the main backward.
    """
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    out = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    if world > 1:
        out = [dist.all_reduce_sum(g.contiguous()) / world for g in out]
    return out


def build_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimiser over ``params``: SGD (default), Adam (betas 0.9 / 0.999 as Dassl, L2 weight decay) or
    AdamW (betas 0.9 / 0.999, decoupled weight decay: CLIP-LoRA's)."""
    if config.optimizer in ("adam", "adamw"):
        eps = config.adam_eps if config.adam_eps is not None else DEFAULT_ADAM_EPS
        kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        return kind(params, lr=config.lr, betas=(0.9, 0.999), eps=eps, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, dampening=0.0,
                           weight_decay=config.weight_decay, nesterov=False)


def _learned_parameters(method: nn.Module) -> list[nn.Parameter]:
    if not isinstance(method, nn.Module):
        raise ConfigError(f"train() needs an nn.Module method, got {type(method).__name__}")
    params = [p for p in method.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"{type(method).__name__} has no trainable parameters: it is not trained by SGD "
                          "(fixed or closed-form methods are fitted without train())")
    wrong = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
    if wrong:
        raise ConfigError(f"{type(method).__name__} has learned parameters in {', '.join(wrong)}; learned parameters "
                          "must be float32 (mixed precision comes from --precision autocast)")
    return params


def _training_device(method: nn.Module, config: TrainConfig, device: str | torch.device | None) -> torch.device:
    spec = str(device) if device is not None else config.device
    if spec == "auto":
        where = next(method.parameters()).device
        if dist.world_size() > 1 and where.type == "cuda":
            return dist.resolve_device("cuda")
        return where if where.type != "meta" else dist.resolve_device("auto")
    return dist.resolve_device(spec)


def _grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    enabled = precision == "fp16"
    if enabled and device.type == "cpu":
        warnings.warn("fp16 autocast on the CPU is slow and rarely helps; prefer --precision bf16 or fp32",
                      stacklevel=3)
    return torch.amp.GradScaler(device.type, enabled=enabled)


def _run_precision(config: TrainConfig, device: torch.device, checkpoint: Any) -> str:
    """The concrete precision of this training: ``config.precision``, with ``auto`` resolved, except that a resumed
    ``auto`` run keeps the precision its checkpoint was written in (a run continues as it began)."""
    if config.precision == "auto" and checkpoint is not None:
        saved = checkpoint.state.get("precision")
        if saved in PRECISIONS:
            return str(saved)
    return resolve_precision(config.precision, device)


def _diverged(what: str, epoch: int, epochs: int, step: int, steps: int, lr: float, precision: str,
              run_dir: CheckpointStore | None, *, applied: bool = False) -> TrainingDiverged:
    where = (f"the last good checkpoint (epoch {epoch}) is in {run_dir.path}" if run_dir is not None and epoch > 0
             else "no checkpoint was written")
    update = "nothing of this epoch was saved" if applied else "the update was not applied"
    return TrainingDiverged(
        f"training diverged: {what} at epoch {epoch + 1}/{epochs}, step {step + 1}/{steps} (lr {lr:g}, "
        f"precision {precision}); {update}, no prompt or result was written and {where}. Lower --lr"
        f"{'' if precision == 'fp32' else ' (or use --precision fp32: mixed precision may have overflowed)'} "
        "and start the run again with --overwrite")


# ------------------------------------------------------------------------------------------------ checkpoint state


def _optimizer_tensors(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, stats: EpochStats,
                       result: TrainResult, train_hash: str, config: TrainConfig, epochs: int, world: int,
                       precision: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(optimiser tensors, JSON state)`` of the epoch just finished, for :meth:`RunDir.save_checkpoint`."""
    saved = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    state = {
        "format": CHECKPOINT_FORMAT,
        "epoch": stats.epoch,
        "epochs": epochs,
        "train_config_hash": train_hash,
        "train_config": train_identity(config),
        "world_size": world,
        "precision": precision,
        "optimizer": {"param_groups": saved["param_groups"], "state": scalars},
        "scaler": scaler.state_dict(),
        "history": [dataclasses.asdict(s) for s in result.history],
    }
    return tensors, state


def _restore(checkpoint: Any, method: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             train_hash: str, epochs: int) -> TrainResult:
    """Load a checkpoint into method, optimiser and scaler; the history so far."""
    state = checkpoint.state
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint format {state.get('format')!r} is not supported (expected "
                              f"{CHECKPOINT_FORMAT}); start the run again with --overwrite")
    if state.get("train_config_hash") != train_hash:
        raise CheckpointError("the checkpoint was written with different training options "
                              f"({state.get('train_config')}); resume with the same options, or --overwrite")
    try:
        method.load_state_dict(checkpoint.params)
        per_param: dict[int, dict[str, Any]] = {}
        for name, tensor in checkpoint.optim.items():
            index, key = name.split(".", 1)
            per_param.setdefault(int(index), {})[key] = tensor
        for index, values in state["optimizer"]["state"].items():
            per_param.setdefault(int(index), {}).update(values)
        optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history = [EpochStats(**entry) for entry in state["history"]]
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"the checkpoint does not fit this method ({exc}); start the run again with "
                              "--overwrite") from exc
    if state["epoch"] != len(history) or state["epoch"] > epochs:
        raise CheckpointError(f"the checkpoint says epoch {state['epoch']} of {state.get('epochs')} with "
                              f"{len(history)} epochs of history; start the run again with --overwrite")
    return TrainResult(history=history, start_epoch=state["epoch"])
