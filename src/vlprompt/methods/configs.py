"""Configuration dataclasses of the methods, with the papers' defaults, and their training defaults.

Each method module re-exports its own config (``vlprompt.methods.coop.CoOpConfig`` is :class:`CoOpConfig`); they are
defined here, in a module that imports nothing heavy, so the command line can build its flags from the fields without
importing torch. Every field carries ``metadata["help"]`` (the flag's help text) and, where the values are a closed
set, ``metadata["choices"]``. Invalid values raise :class:`~vlprompt.errors.ConfigError` at construction.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from vlprompt.errors import ConfigError
from vlprompt.methods.templates import TEMPLATE_SETS, check_template, check_templates, dataset_key

CLASS_TOKEN_POSITIONS: tuple[str, ...] = ("end", "middle", "front")

SGD_RECIPE: Mapping[str, Any] = MappingProxyType({
    "optimizer": "sgd",
    "lr": 0.002,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "lr_scheduler": "cosine",
    "warmup_epochs": 1,
    "warmup_type": "constant",
    "warmup_lr": 1e-5,
})
"""The reference optimisation recipe shared by CoOp and CoCoOp (SGD, cosine decay, 1 constant warm-up epoch)."""


def option(default: Any, help: str, *, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field with its command-line help (and closed set of values) in ``metadata``."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _is_imagenet(dataset: str | None) -> bool:
    return dataset is not None and dataset_key(dataset) == "imagenet"


# ----------------------------------------------------------------------------------------------------------------------
# fixed methods


@dataclass(frozen=True)
class ZeroShotConfig:
    """Zero-shot CLIP with one hand-crafted template."""

    template: str = option(
        "",
        "prompt template with one '{}' where the class name goes; empty = the dataset's hand-crafted template "
        "('a photo of a {}.' when no dataset is given)",
    )

    def __post_init__(self) -> None:
        if self.template:
            check_template(self.template)

    def for_dataset(self, dataset: str | None, template: str) -> ZeroShotConfig:
        """This config with an empty ``template`` filled with the dataset's hand-crafted ``template``."""
        return self if self.template else dataclasses.replace(self, template=template)


@dataclass(frozen=True)
class EnsembleConfig:
    """Prompt ensembling: the mean of the normalised text features of several templates."""

    template_set: str = option(
        "coop7",
        "named template set: 'coop7' (the 7 ImageNet templates CoOp's baseline uses) or 'clip80' (CLIP's 80 "
        "ImageNet templates)",
        choices=tuple(TEMPLATE_SETS),
    )
    templates: tuple[str, ...] = option(
        (), "your own templates (each with one '{}'); when given they replace the template set"
    )
    template: str = option(
        "",
        "the dataset's own template, added to the set (filled from the dataset as the reference does: for every "
        "dataset but ImageNet); empty = none",
    )

    def __post_init__(self) -> None:
        _check_choice("template_set", self.template_set, tuple(TEMPLATE_SETS))
        if isinstance(self.templates, str):
            raise ConfigError("templates must be a sequence of template strings, not one string")
        object.__setattr__(self, "templates", tuple(self.templates))
        if self.templates:
            check_templates(self.templates)
        if self.template:
            check_template(self.template)

    def for_dataset(self, dataset: str | None, template: str) -> EnsembleConfig:
        """Add the dataset's template unless one is set, the user gave their own templates, or it is ImageNet."""
        if self.template or self.templates or _is_imagenet(dataset):
            return self
        return dataclasses.replace(self, template=template)


# ----------------------------------------------------------------------------------------------------------------------
# linear probe

COARSE_C_GRID: tuple[float, ...] = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)


@dataclass(frozen=True)
class LinearProbeConfig:
    """Linear probe: L2-regularised multinomial logistic regression on frozen image features (sklearn, lbfgs)."""

    c: float | None = option(
        None,
        "inverse regularisation strength C; unset = search it on the validation split as the reference does "
        "(coarse sweep over c_grid, then search_steps log-space bisection steps)",
    )
    c_grid: tuple[float, ...] = option(COARSE_C_GRID, "coarse sweep of C values (reference: 1e6 .. 1e-6, x100 apart)")
    search_steps: int = option(8, "bisection steps in log10(C) after the coarse sweep (reference: 8)")
    max_iter: int = option(1000, "lbfgs iterations per fit (reference: 1000)")
    normalize: bool = option(
        False,
        "L2-normalise image features before the regression (the reference's lpclip uses the image tower's raw "
        "output, so off by default)",
    )

    def __post_init__(self) -> None:
        if self.c is not None and not (isinstance(self.c, int | float) and math.isfinite(self.c) and self.c > 0):
            raise ConfigError(f"c must be a positive number, got {self.c!r}")
        object.__setattr__(self, "c_grid", tuple(float(value) for value in self.c_grid))
        if not self.c_grid or any(not (math.isfinite(value) and value > 0) for value in self.c_grid):
            raise ConfigError(f"c_grid must hold positive numbers, got {self.c_grid!r}")
        if isinstance(self.search_steps, bool) or not isinstance(self.search_steps, int) or self.search_steps < 0:
            raise ConfigError(f"search_steps must be an integer >= 0, got {self.search_steps!r}")
        _check_positive_int("max_iter", self.max_iter)


# ----------------------------------------------------------------------------------------------------------------------
# prompt learners


@dataclass(frozen=True)
class CoOpConfig:
    """CoOp: M learnable context vectors before (or around) the class name; CLIP stays frozen."""

    n_ctx: int = option(16, "number of context vectors M (ignored with ctx_init: M = the phrase's token count)")
    ctx_init: str = option(
        "",
        "initialise the context from this phrase's word embeddings (e.g. 'a photo of a'); empty = random "
        "N(0, 0.02^2)",
    )
    csc: bool = option(False, "class-specific context: one set of M vectors per class instead of one unified set")
    class_token_position: str = option(
        "end", "where the class name goes: 'end', 'middle' (after M/2 vectors) or 'front'",
        choices=CLASS_TOKEN_POSITIONS,
    )
    fast_text: bool = option(
        True,
        "exact fast text encoding (shortest length, shared prefix computed once); off = the plain 77-token path",
    )

    def __post_init__(self) -> None:
        _check_positive_int("n_ctx", self.n_ctx)
        _check_choice("class_token_position", self.class_token_position, CLASS_TOKEN_POSITIONS)
        if not isinstance(self.ctx_init, str):
            raise ConfigError(f"ctx_init must be a string, got {self.ctx_init!r}")


@dataclass(frozen=True)
class CoCoOpConfig:
    """CoCoOp: CoOp's unified context plus a meta-net token computed from each image, added to every vector."""

    n_ctx: int = option(4, "number of context vectors M (ignored with ctx_init: M = the phrase's token count)")
    ctx_init: str = option(
        "a photo of a",
        "initialise the context from this phrase's word embeddings; empty = random N(0, 0.02^2)",
    )
    class_token_position: str = option(
        "end", "where the class name goes: 'end' (the paper's), 'middle' or 'front'", choices=CLASS_TOKEN_POSITIONS
    )
    meta_net_reduction: int = option(16, "meta-net hidden width = image feature width / this (paper: 16)")
    fast_text: bool = option(
        True,
        "exact fast text encoding (shortest length, shared prefix computed once per image); off = the plain "
        "77-token path",
    )

    def __post_init__(self) -> None:
        _check_positive_int("n_ctx", self.n_ctx)
        _check_positive_int("meta_net_reduction", self.meta_net_reduction)
        _check_choice("class_token_position", self.class_token_position, CLASS_TOKEN_POSITIONS)
        if not isinstance(self.ctx_init, str):
            raise ConfigError(f"ctx_init must be a string, got {self.ctx_init!r}")


# ----------------------------------------------------------------------------------------------------------------------
# training defaults (the reference's per-method recipe)


def no_train_defaults(shots: int | None = None, dataset: str | None = None) -> dict[str, Any]:
    """Methods without SGD training have no training defaults."""
    return {}


def coop_train_defaults(shots: int | None = None, dataset: str | None = None) -> dict[str, Any]:
    """CoOp's reference schedule: batch 32; epochs 50 (1 shot), 100 (2, 4 shots), 200 (8, 16 shots, or all data),
    50 on ImageNet whatever the shots; the shared SGD recipe (:data:`SGD_RECIPE`)."""
    if _is_imagenet(dataset) or shots == 1:
        epochs = 50
    elif shots is not None and 1 < shots <= 4:
        epochs = 100
    else:
        epochs = 200
    return {"batch_size": 32, "epochs": epochs, **SGD_RECIPE}


def cocoop_train_defaults(shots: int | None = None, dataset: str | None = None) -> dict[str, Any]:
    """CoCoOp's reference schedule: batch 1, 10 epochs, the shared SGD recipe (:data:`SGD_RECIPE`)."""
    return {"batch_size": 1, "epochs": 10, **SGD_RECIPE}


# ----------------------------------------------------------------------------------------------------------------------
# (de)serialisation

ConfigT = TypeVar("ConfigT")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config's fields as JSON-ready values (tuples become lists)."""
    data: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        data[f.name] = list(value) if isinstance(value, tuple) else value
    return data


def config_from_dict(config_cls: type[ConfigT], data: Mapping[str, Any]) -> ConfigT:
    """Rebuild a config from :func:`config_to_dict`'s output (lists back to tuples); unknown keys are an error."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a {config_cls.__name__} must be given as a mapping of fields, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown {config_cls.__name__} field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    hints = typing.get_type_hints(config_cls)
    values = {}
    for key, value in data.items():
        if isinstance(value, list) and _is_tuple_type(hints.get(key)):
            value = tuple(value)
        values[key] = value
    try:
        return config_cls(**values)
    except TypeError as exc:
        raise ConfigError(f"invalid {config_cls.__name__}: {exc}") from exc


def _is_tuple_type(hint: Any) -> bool:
    if hint is None:
        return False
    origin = typing.get_origin(hint)
    if origin is tuple:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple_type(arg) for arg in typing.get_args(hint))
    return False
