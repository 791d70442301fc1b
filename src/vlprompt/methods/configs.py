"""Configuration dataclasses of the methods, with the papers' defaults, and their training defaults.

Each method module re-exports its own config (``vlprompt.methods.coop.CoOpConfig`` is :class:`CoOpConfig`); they are
defined here, in a module that imports nothing heavy, so the command line can build its flags from the fields without
importing torch. Every field carries ``metadata["help"]`` (the flag's help text) and, where the values are a closed
set, ``metadata["choices"]``. Invalid values raise :class:`~vlprompt.errors.ConfigError` at construction.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from vlprompt.common.options import check_choice, option
from vlprompt.errors import ConfigError
from vlprompt.data.registry import key_of
from vlprompt.methods.templates import TEMPLATE_SETS, check_template, check_templates

CLASS_TOKEN_POSITIONS: tuple[str, ...] = ("end", "middle", "front")

def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _is_imagenet(dataset: str | None) -> bool:
    return dataset is not None and key_of(dataset) == "imagenet"


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
        check_choice("template_set", self.template_set, tuple(TEMPLATE_SETS))
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
        check_choice("class_token_position", self.class_token_position, CLASS_TOKEN_POSITIONS)
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
        check_choice("class_token_position", self.class_token_position, CLASS_TOKEN_POSITIONS)
        if not isinstance(self.ctx_init, str):
            raise ConfigError(f"ctx_init must be a string, got {self.ctx_init!r}")


# ----------------------------------------------------------------------------------------------------------------------
# training defaults (the reference's per-method recipe)


def no_train_defaults(shots: int | None = None, dataset: str | None = None) -> dict[str, Any]:
    """Methods without SGD training have no training defaults."""
    return {}


def coop_train_defaults(shots: int | None = None, dataset: str | None = None) -> dict[str, Any]:
    """CoOp's reference schedule: batch 32; epochs 50 (1 shot), 100 (2, 4 shots), 200 (8, 16 shots, or all data),
    50 on ImageNet whatever the shots; the rest of the recipe is :class:`~vlprompt.training.config.TrainConfig`'s
    defaults."""
    if _is_imagenet(dataset) or shots == 1:
        epochs = 50
    elif shots is not None and 1 < shots <= 4:
        epochs = 100
    else:
        epochs = 200
    return {"batch_size": 32, "epochs": epochs}


def cocoop_train_defaults(shots: int | None = None, dataset: str | None = None) -> dict[str, Any]:
    """CoCoOp's reference schedule: batch 1, 10 epochs; the rest of the recipe is
    :class:`~vlprompt.training.config.TrainConfig`'s defaults."""
    return {"batch_size": 1, "epochs": 10}


