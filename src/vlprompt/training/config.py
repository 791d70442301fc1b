"""The typed training recipe (:class:`TrainConfig`) with the papers' defaults, and the method's defaults filled in.

:class:`TrainConfig` holds the reference recipe of CoOp/CoCoOp (Dassl engine): SGD lr 0.002, momentum 0.9, weight
decay 5e-4, one constant warm-up epoch at 1e-5 then cosine decay. ``epochs`` and ``batch_size`` left at ``None`` mean
"the method's default" (each MethodSpec's ``train_defaults``: CoOp batch 32 and 50 / 100 / 100 / 200 / 200 epochs for
1 / 2 / 4 / 8 / 16 shots, ImageNet 50; CoCoOp batch 1, 10 epochs); :func:`resolve_train_config` fills them in, and the
resolved values are what a run folder saves. :class:`RunConfig` describes a whole run (method, data, backbone, seed, training) and has a stable
:meth:`RunConfig.config_hash`.

Options are declared the project's one way (:func:`vlprompt.common.options.option`), which also generates their
command-line flags.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from vlprompt.common.options import check_choice, check_int, check_number, known_fields, option
from vlprompt.common.vocab import PRECISION_CHOICES, PrecisionChoice
from vlprompt.errors import ConfigError
from vlprompt.methods import get_method
from vlprompt.methods.recipe import RecipeContext

Optimizer = Literal["sgd", "adam", "adamw"]
OPTIMIZERS: tuple[str, ...] = typing.get_args(Optimizer)

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


# ------------------------------------------------------------------------------------------------------- TrainConfig


@dataclass(frozen=True)
class TrainConfig:
    """How a gradient-trained method (CoOp, CoCoOp, ...) is optimised; defaults are the reference recipe.

    Fields left at None (:data:`RESOLVED_KEYS`: ``epochs`` / ``steps``, ``batch_size``, ``lr``,
    ``weight_decay``, ``views``, ``crop_scale_min``, ``optimizer``, ``adam_eps``, ``warmup_epochs``, ``min_lr``)
    stand for the method's defaults (:func:`resolve_train_config`); a length given (epochs or steps) replaces
    the method's length, whichever unit the method uses.
    """

    lr: float | None = option(None, "base learning rate of SGD; default: the method's (CoOp family 0.002, CLAP 0.1, "
                                    "IVLP and PromptSRC 0.0025, MaPLe 0.0035)")
    momentum: float = option(0.9, "SGD momentum (dampening 0, no Nesterov)")
    weight_decay: float | None = option(None, "weight decay (L2, added to the gradient) on the learned parameters; "
                                              "default: the method's (CoOp family 5e-4, CLAP 0)")
    optimizer: Optimizer | None = option(None, "optimiser: sgd, adam (betas 0.9, 0.999, as Dassl; L2 weight decay) or "
                                               "adamw (betas 0.9, 0.999; decoupled weight decay); default: the "
                                               "method's (SGD, but Adam for TCP, AdamW for CLIP-LoRA)")
    adam_eps: float | None = option(None, "Adam's / AdamW's epsilon; default: the method's (TCP 1e-3, as its official "
                                          "code), else PyTorch's 1e-8")
    epochs: int | None = option(None, "training epochs; default: the method's (CoOp 50/100/100/200/200 for "
                                    "1/2/4/8/16 shots, ImageNet 50; CoCoOp 10); give either epochs or steps")
    steps: int | None = option(None, "training length in optimiser steps instead of epochs: the epochs these steps "
                                     "need are run, the last one cut short, and the learning rate follows the "
                                     "schedule per step; default: the method's (CLIP-LoRA 500 x shots)")
    batch_size: int | None = option(None, "training batch size (the global batch under torchrun); "
                                        "default: the method's (CoOp 32, CoCoOp 1)")
    warmup_epochs: int | None = option(None, "epochs at the constant warm-up learning rate before the cosine "
                                             "schedule; default: the method's (1 for the Dassl recipes, CLIP-LoRA 0)")
    warmup_lr: float = option(1e-5, "constant learning rate of the warm-up epochs")
    min_lr: float | None = option(None, "the learning rate the cosine schedule decays towards (its eta_min); "
                                        "default: the method's (0 for the Dassl recipes, CLIP-LoRA 1e-6)")
    precision: PrecisionChoice = option("auto", "compute precision of feature extraction and training: auto = "
                                                "bf16 autocast where a one-time measurement on this machine finds "
                                                "it faster than fp32 (CUDA: where the GPU supports bf16), else fp32; "
                                                "fp32 = exact; bf16 / fp16 = autocast (learned parameters stay fp32; "
                                                "fp16 uses loss scaling). The precision used is recorded in "
                                                "results.json and log.txt")
    device: str = option("auto", "auto (CUDA when available), cpu, cuda or cuda:N")
    seed: int = option(1, "the one seed of a run: few-shot sampling, initialisation, augmentation, data order")
    views: int | Literal["epochs"] | None = option(None, "augmented views of each training image, a pool shared by "
                                                         "all runs and cached (epoch e shows image i its view "
                                                         "(e + offset_i) % V, offsets drawn from the seed); 'epochs' "
                                                         "= a fresh augmentation every epoch as in the reference; "
                                                         "fewer views extract faster; 0 = no augmentation; default: "
                                                         "the method's ('epochs' for the CoOp family; CLAP 20, "
                                                         "Tip-Adapter 10, Tip-Adapter-F 20, LP++ 1)")
    crop_scale_min: float | None = option(None, "smallest area fraction of the training views' random resized crop "
                                                "(the largest is 1); default: the method's (CoOp family and CLAP "
                                                "0.08; Tip-Adapter(-F) and LP++ 0.5)")
    num_workers: int | Literal["auto"] = option("auto", "image decoding / augmentation worker processes of feature "
                                                        "extraction, overlapped with the image tower; auto = chosen "
                                                        "from the machine (CPU: 1 when there are 2+ cores, CUDA: "
                                                        "up to 8), 0 = decode in the main process; also the "
                                                        "image-in-the-loop training data path")
    activation_checkpointing: bool = option(False, "recompute the towers' activations in backward (image-in-the-loop "
                                                   "methods): less memory, same results, about a third more compute")
    tensorboard: bool = option(False, "also write TensorBoard scalars into the run folder")

    def __post_init__(self) -> None:
        if self.lr is not None:
            check_number("lr", self.lr, minimum=0.0, strict=True, prefix="train.")
        check_number("momentum", self.momentum, minimum=0.0, maximum=1.0, maximum_open=True, prefix="train.")
        if self.optimizer is not None:
            check_choice("optimizer", self.optimizer, OPTIMIZERS, prefix="train.")
        if self.adam_eps is not None:
            check_number("adam_eps", self.adam_eps, minimum=0.0, strict=True, prefix="train.")
        if self.weight_decay is not None:
            check_number("weight_decay", self.weight_decay, minimum=0.0, prefix="train.")
        if self.crop_scale_min is not None:
            check_number("crop_scale_min", self.crop_scale_min, minimum=0.0, maximum=1.0, strict=True,
                         prefix="train.")
        check_int("epochs", self.epochs, minimum=1, optional=True, prefix="train.")
        check_int("steps", self.steps, minimum=1, optional=True, prefix="train.")
        if self.epochs is not None and self.steps is not None:
            raise ConfigError(f"give train.epochs ({self.epochs}) or train.steps ({self.steps}), not both: "
                              "they are two ways to say how long to train")
        if self.min_lr is not None:
            check_number("min_lr", self.min_lr, minimum=0.0, prefix="train.")
        check_int("batch_size", self.batch_size, minimum=1, optional=True, prefix="train.")
        check_int("warmup_epochs", self.warmup_epochs, minimum=0, optional=True, prefix="train.")
        check_number("warmup_lr", self.warmup_lr, minimum=0.0, strict=True, prefix="train.")
        check_choice("precision", self.precision, PRECISION_CHOICES, prefix="train.")
        if not isinstance(self.device, str) or not _DEVICE_PATTERN.match(self.device):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        check_int("seed", self.seed, minimum=0, prefix="train.")
        if self.views is not None and self.views != "epochs":
            if isinstance(self.views, str):
                raise ConfigError(f"train.views must be a non-negative integer or 'epochs', got {self.views!r}")
            check_int("views", self.views, minimum=0, prefix="train.")
        if self.num_workers != "auto":
            if isinstance(self.num_workers, str):
                raise ConfigError(f"train.num_workers must be a non-negative integer or 'auto', got "
                                  f"{self.num_workers!r}")
            check_int("num_workers", self.num_workers, minimum=0, prefix="train.")
        if not isinstance(self.activation_checkpointing, bool):
            raise ConfigError(f"train.activation_checkpointing must be true or false, got "
                              f"{self.activation_checkpointing!r}")
        if not isinstance(self.tensorboard, bool):
            raise ConfigError(f"train.tensorboard must be true or false, got {self.tensorboard!r}")
        if self.epochs is not None and self.warmup_epochs is not None and self.warmup_epochs >= self.epochs:
            raise ConfigError(f"train.warmup_epochs ({self.warmup_epochs}) must be smaller than train.epochs "
                              f"({self.epochs}); lower --warmup-epochs or raise --epochs")

    @property
    def is_resolved(self) -> bool:
        """True once the length (``epochs`` or ``steps``) and ``batch_size`` are concrete numbers."""
        return (self.epochs is not None or self.steps is not None) and self.batch_size is not None

    def steps_per_epoch(self, num_items: int) -> int:
        """Optimiser steps of one epoch over ``num_items`` training items: full batches only when there is at least
        one (the last incomplete batch is dropped, as Dassl's loader), else one smaller batch."""
        if self.batch_size is None:
            raise ConfigError("train.batch_size is not set: resolve the configuration first")
        return max(1, num_items // self.batch_size)

    def planned_epochs(self, num_items: int) -> int:
        """The epochs a run over ``num_items`` training items takes: ``epochs``, or with ``steps`` the epochs
        those steps need (``ceil(steps / steps_per_epoch)``, the last one cut short)."""
        if self.epochs is not None:
            return self.epochs
        if self.steps is None:
            raise ConfigError("train.epochs / train.steps is not set: resolve the configuration first")
        return -(-self.steps // self.steps_per_epoch(num_items))

    def completed(self) -> TrainConfig:
        """This config with the fields still left to the method's default (:data:`RESOLVED_KEYS` other than epochs and
        batch size) set to the reference recipe (:data:`REFERENCE_RECIPE`): what the loop runs when called with a
        bare config."""
        missing = {key: value for key, value in REFERENCE_RECIPE.items() if getattr(self, key) is None}
        return dataclasses.replace(self, **missing) if missing else self

    def num_views(self, num_items: int | None = None) -> int:
        """The number of augmented views to extract for ``num_items`` training items (``views`` with 'epochs'
        resolved to :meth:`planned_epochs`; unset = 'epochs'); 'epochs' needs ``epochs``, or ``steps`` and
        ``num_items``."""
        views = self.completed().views
        if views != "epochs":
            return int(views)  # type: ignore[arg-type]
        if self.epochs is None and (self.steps is None or num_items is None):
            raise ConfigError("train.views='epochs' needs train.epochs (or train.steps and the training set): "
                              "resolve the configuration first")
        return self.planned_epochs(num_items or 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys are an error."""
        return cls(**known_fields(cls, data, "train"))


# ---------------------------------------------------------------------------------------------- method defaults


RESOLVED_KEYS: tuple[str, ...] = ("epochs", "steps", "batch_size", "lr", "weight_decay", "views", "crop_scale_min",
                                  "optimizer", "adam_eps", "warmup_epochs", "min_lr")
"""The TrainConfig fields whose None means "the method's default" (:func:`resolve_train_config`); ``optimizer`` /
``adam_eps`` left at None mean SGD (the loop's default) / PyTorch's epsilon."""

DEFAULT_ADAM_EPS = 1e-8
"""PyTorch's Adam epsilon, used when neither the options nor the method set one."""

REFERENCE_RECIPE: Mapping[str, Any] = types.MappingProxyType({
    "lr": 0.002, "weight_decay": 5e-4, "views": "epochs", "crop_scale_min": 0.08, "warmup_epochs": 1, "min_lr": 0.0,
})
"""What the resolved keys other than the length / batch size fall back to when the method names no default: CoOp's
Dassl recipe (SGD lr 0.002, weight decay 5e-4, a fresh view every epoch, random resized crop scale 0.08-1, one
constant warm-up epoch, a cosine decaying towards 0)."""


def method_train_defaults(method: str, shots: int | None, dataset: str | None, subset: str = "all",
                          protocol: str | None = None) -> dict[str, Any]:
    """The method's official values of the :data:`RESOLVED_KEYS` in the setting of ``shots``, ``dataset``,
    ``subset`` and ``protocol`` (its MethodSpec's ``train_defaults`` of that
    :class:`~vlprompt.methods.recipe.RecipeContext`: the protocol's recipe; without a protocol base-to-novel for a
    class subset, else few-shot).

    CoOp: batch 32, epochs 50 / 100 / 100 / 200 / 200 for 1 / 2 / 4 / 8 / 16 shots, ImageNet 50; CoCoOp: batch 1,
    10 epochs; CLAP: lr 0.1, weight decay 0, batch 256, 300 epochs, 20 views; Tip-Adapter(-F) and LP++: their views
    and crop scale; TCP: Adam with epsilon 1e-3; KgCoOp / ProGrad: their base-to-novel schedules; MaPLe / PromptSRC:
    their cross-dataset / few-shot schedules. Empty for methods without training images.
    """
    context = RecipeContext(shots=shots, dataset=dataset, subset=subset, protocol=protocol)
    defaults = get_method(method).train_defaults(context)
    return {key: defaults[key] for key in RESOLVED_KEYS if key in defaults}


def resolve_train_config(train: TrainConfig, *, method: str, shots: int | None, dataset: str | None,
                         subset: str = "all", protocol: str | None = None) -> TrainConfig:
    """``train`` with the :data:`RESOLVED_KEYS` left at None replaced by the method's defaults in that setting
    (:func:`method_train_defaults`), then by the reference recipe (:data:`REFERENCE_RECIPE`); values set in
    ``train`` always win.

    ``epochs`` / ``batch_size`` of methods without SGD training (no defaults) stay None.
    """
    defaults = method_train_defaults(method, shots, dataset, subset, protocol)
    if train.epochs is not None or train.steps is not None:  # the length given is the length: one or the other
        defaults = {key: value for key, value in defaults.items() if key not in ("epochs", "steps")}
    values = {key: getattr(train, key) if getattr(train, key) is not None else defaults.get(key)
              for key in RESOLVED_KEYS}
    if values["optimizer"] in ("adam", "adamw") and values["adam_eps"] is None:
        values["adam_eps"] = DEFAULT_ADAM_EPS
    epochs = values["epochs"]
    warmup = values["warmup_epochs"] if values["warmup_epochs"] is not None else REFERENCE_RECIPE["warmup_epochs"]
    if epochs is not None and warmup >= epochs:
        raise ConfigError(f"train.warmup_epochs ({warmup}) must be smaller than the {epochs} epochs of "
                          f"{method}; lower --warmup-epochs or raise --epochs")
    return dataclasses.replace(train, **values).completed()


TRAIN_NON_IDENTITY_FIELDS: tuple[str, ...] = ("device", "num_workers", "tensorboard", "activation_checkpointing")
"""TrainConfig fields that do not change the learned parameters (where and how fast, and logging)."""


def stable_hash(data: Mapping[str, Any]) -> str:
    """16-hex-digit SHA-256 of ``data`` as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:16]


def train_identity(train: TrainConfig) -> dict[str, Any]:
    """The training options that change the learned parameters (device, workers and logging left out, and the
    options added later while they hold the behaviour of before: :data:`LATER_DEFAULTS`)."""
    return drop_later_defaults({key: value for key, value in json.loads(json.dumps(train.to_dict())).items()
                                if key not in TRAIN_NON_IDENTITY_FIELDS})


LATER_DEFAULTS: Mapping[str, tuple[Any, ...]] = types.MappingProxyType({
    "optimizer": (None, "sgd"),  # 0.1 trained with SGD only
    "adam_eps": (None,),
    "steps": (None,),  # 0.1: the length in epochs only
    "min_lr": (None, 0.0),  # 0.1: cosine to 0
    "crop_scale_min": (0.08,),  # 0.1's training views: random resized crop of scale (0.08, 1), fixed
})
"""Training options added after vlprompt 0.1, with the values that mean what 0.1 did: left out of the identity so
that the configuration hashes and checkpoints of 0.1 runs stay valid (a 0.1 ``config.json`` lacks these keys:
:data:`vlprompt.harness.config.FORMER_VALUES` reads them as these values)."""


def drop_later_defaults(train: Mapping[str, Any]) -> dict[str, Any]:
    """``train`` (a TrainConfig as a dict) without the :data:`LATER_DEFAULTS` entries that hold their old meaning."""
    return {key: value for key, value in train.items()
            if not (key in LATER_DEFAULTS and value in LATER_DEFAULTS[key])}


