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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vlprompt.common.options import check_choice, option
from vlprompt.errors import ConfigError
from vlprompt.data.registry import key_of
from vlprompt.methods.recipe import RecipeContext
from vlprompt.methods.templates import (
    KGCOOP_TEMPLATES,
    PROGRAD_TEMPLATES,
    TCP_PROMPT_TEMPLATES,
    TCP_TEMPLATES,
    TEMPLATE_SETS,
    check_template,
    check_templates,
    method_template,
    template_set,
)

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


def _check_weight(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_optional_template(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    if value:
        check_template(value)


@dataclass(frozen=True)
class KgCoOpConfig(CoOpConfig):
    """KgCoOp: CoOp plus a loss term keeping each class's learned text feature close to its hand-crafted one."""

    n_ctx: int = option(  # official scripts/base2new_train.sh NCTX=4
        4, "number of context vectors M (ignored with ctx_init: M = the phrase's token count)")
    ctx_init: str = option(
        "a photo of a",  # official kgcoop.py: CTX_INIT=True always initialises from "a photo of a"
        "initialise the context from this phrase's word embeddings; empty = random N(0, 0.02^2)",
    )
    kg_weight: float = option(
        8.0,  # official scripts/run.sh and README: base2new_train.sh <dataset> 8.0 (TRAINER.COOP.W)
        "weight lambda of the knowledge-guided term 1 - mean_k cos(learned text feature k, hand-crafted feature k)",
    )
    template: str = option(
        "",
        "hand-crafted template of the knowledge-guided term; empty = KgCoOp's template of the dataset (CoOp's, "
        "but 'a photo of a {}, a type of texture.' for DTD), or the dataset's own for other datasets",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_weight("kg_weight", self.kg_weight)
        _check_optional_template("template", self.template)

    def for_dataset(self, dataset: str | None, template: str) -> KgCoOpConfig:
        if self.template:
            return self
        return dataclasses.replace(self, template=method_template(KGCOOP_TEMPLATES, dataset, template))


@dataclass(frozen=True)
class ProGradConfig(CoOpConfig):
    """ProGrad: CoOp whose cross-entropy gradient is projected to not conflict with the KL-to-zero-shot gradient."""

    n_ctx: int = option(16, "number of context vectors M (official scripts: 16)")  # scripts/prograd.sh NCTX
    ctx_init: str = option(
        "",
        "initialise the last context vectors from this phrase (zeros before it); empty = the zero-shot template's "
        "words before the class name when it ends with '{}.' (official CTX_INIT=True), else random N(0, 0.02^2)",
    )
    prograd_lambda: float = option(
        1.0,  # official scripts/prograd.sh LOSS.LAMBDA=1.0 (README: 0.8 for 8/16 shots on Flowers102, DTD, EuroSAT)
        "lambda of the projection g - lambda (g . u) u of a conflicting cross-entropy gradient g (u: the unit "
        "KL gradient); official 1.0 (the paper's 8- and 16-shot Flowers102 / DTD / EuroSAT results use 0.8)",
    )
    temperature: float = option(1.0, "temperature T of the KL term to the zero-shot prediction (official LOSS.T: 1.0)")
    template: str = option(
        "",
        "zero-shot template of the KL term's teacher; empty = ProGrad's template of the dataset (class name last, "
        "e.g. 'a type of pet, a photo of a {}.'), or the dataset's own for other datasets",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_weight("prograd_lambda", self.prograd_lambda)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float) \
                or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ConfigError(f"temperature must be a number > 0, got {self.temperature!r}")
        _check_optional_template("template", self.template)

    def for_dataset(self, dataset: str | None, template: str) -> ProGradConfig:
        if self.template:
            return self
        return dataclasses.replace(self, template=method_template(PROGRAD_TEMPLATES, dataset, template))


@dataclass(frozen=True)
class TCPConfig:
    """TCP: class-aware tokens generated from the hand-crafted class embeddings replace the context vectors' hidden
    states at one text layer; CoOp's unified context (class name at the end) plus KgCoOp's loss term."""

    n_ctx: int = option(4, "number of context vectors M and of class-aware tokens (official: 4)")  # base2new_train.sh
    ctx_init: str = option(
        "",  # official configs/trainers/TCP/vit_b16_ep100_ctxv1.yaml: CTX_INIT False
        "initialise the context from this phrase's word embeddings; empty = random N(0, 0.02^2) (official)",
    )
    class_token_layer: int = option(
        8,  # official clip_text/model.py ResidualAttentionBlock_MaPLe: layers=[8]
        "text block (0-based) at whose input the class-aware tokens replace the context positions (official: 8 of "
        "ViT-B/16's 12)",
    )
    reduction: int = option(4, "class-token generator hidden width = feature width / this (official: 4)")  # tcp.py
    kg_weight: float = option(
        8.0,  # official trainers/tcp.py CustomCLIP.forward: loss = CE + 8.0 * score
        "weight lambda of the knowledge-guided term 1 - mean_k cos(learned text feature k, hand-crafted feature k)",
    )
    template: str = option(
        "",
        "hand-crafted template of the class embeddings (class-aware tokens, knowledge term); empty = TCP's template "
        "of the dataset, or the dataset's own for other datasets",
    )
    prompt_template: str = option(
        "",
        "the prompt text after the context, with '{}' for the class name; empty = TCP's for the dataset (e.g. "
        "'{}, a type of pet.'), '{}.' for other datasets",
    )
    fast_text: bool = option(
        True, "exact fast text encoding (positions up to the last end token only); off = the plain 77-token path"
    )

    def __post_init__(self) -> None:
        _check_positive_int("n_ctx", self.n_ctx)
        _check_positive_int("reduction", self.reduction)
        if isinstance(self.class_token_layer, bool) or not isinstance(self.class_token_layer, int) \
                or self.class_token_layer < 0:
            raise ConfigError(f"class_token_layer must be an integer >= 0, got {self.class_token_layer!r}")
        if not isinstance(self.ctx_init, str):
            raise ConfigError(f"ctx_init must be a string, got {self.ctx_init!r}")
        _check_weight("kg_weight", self.kg_weight)
        _check_optional_template("template", self.template)
        _check_optional_template("prompt_template", self.prompt_template)

    def for_dataset(self, dataset: str | None, template: str) -> TCPConfig:
        return dataclasses.replace(
            self,
            template=self.template or method_template(TCP_TEMPLATES, dataset, template),
            prompt_template=self.prompt_template or method_template(TCP_PROMPT_TEMPLATES, dataset, "{}."),
        )


# ----------------------------------------------------------------------------------------------------------------------
# feature adapters and linear probes on the zero-shot classifier (issue 10): CLIP-Adapter, Tip-Adapter(-F), LP++, CLAP

FEATURE_BRANCHES: tuple[str, ...] = ("visual", "text", "both")
CLAP_CONSTRAINTS: tuple[str, ...] = ("l2", "none")

# Tip-Adapter's official per-dataset search grid [beta max, alpha max] and initial alpha (gaopengcuhk/Tip-Adapter
# configs/<dataset>.yaml: search_scale, init_alpha; init_beta is 1 and search_step [200, 20] in every file)
TIP_GRID_SCALE: Mapping[str, tuple[float, float]] = types.MappingProxyType({
    "caltech101": (12.0, 5.0), "dtd": (13.0, 13.0), "eurosat": (12.0, 10.0), "fgvc_aircraft": (30.0, 30.0),
    "food101": (10.0, 10.0), "imagenet": (7.0, 3.0), "oxford_flowers": (50.0, 50.0), "oxford_pets": (7.0, 3.0),
    "stanford_cars": (20.0, 10.0), "sun397": (12.0, 10.0), "ucf101": (7.0, 3.0),
})
TIP_INIT_ALPHA: Mapping[str, float] = types.MappingProxyType({
    "caltech101": 3.0, "dtd": 2.0, "eurosat": 2.0, "fgvc_aircraft": 5.0, "food101": 1.17, "imagenet": 1.17,
    "oxford_flowers": 10.0, "oxford_pets": 1.17, "stanford_cars": 3.0, "sun397": 1.17, "ucf101": 3.0,
})
# datasets without an official Tip-Adapter config: the dataset-independent grid and init of LP++'s reimplementation
# (FereshteShakeri/FewShot-CLIP-Strong-Baseline configs/base.yaml: search_scale [50, 50], init_alpha 1)
TIP_FALLBACK_GRID_SCALE: tuple[float, float] = (50.0, 50.0)
TIP_FALLBACK_INIT_ALPHA = 1.0


def _dataset_templates(templates: tuple[str, ...], dataset: str | None, template: str, *,
                       imagenet: tuple[str, ...]) -> tuple[str, ...]:
    """``templates`` if given, else ImageNet's set (``imagenet``, when not empty) or the dataset's own template."""
    if templates:
        return templates
    if imagenet and _is_imagenet(dataset):
        return imagenet
    return (template,)


def _check_templates_field(config: Any) -> None:
    if isinstance(config.templates, str):
        raise ConfigError("templates must be a sequence of template strings, not one string")
    object.__setattr__(config, "templates", tuple(config.templates))
    if config.templates:
        check_templates(config.templates)


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_positive(name: str, value: Any, *, zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero):
        raise ConfigError(f"{name} must be a {'non-negative' if zero else 'positive'} number, got {value!r}")


TEMPLATES_HELP = ("hand-crafted templates of the frozen zero-shot classifier (each with one '{}'; their normalised "
                  "text features are averaged per class); empty = the dataset's template, as the official code (for "
                  "ImageNet Tip-Adapter and LP++ use CoOp's 7 selected templates, CLIP-Adapter the one template)")


@dataclass(frozen=True)
class CLIPAdapterConfig:
    """CLIP-Adapter: a residual bottleneck MLP on the frozen image feature (and/or the class text features)."""

    templates: tuple[str, ...] = option((), TEMPLATES_HELP)
    ratio: float = option(0.2, "residual ratio alpha: adapted = ratio * MLP(x) + (1 - ratio) * x "
                               "(official clip_adapter.py: 0.2)")
    reduction: int = option(4, "bottleneck width = feature width / this (official Adapter(c_in, reduction=4))")
    branch: str = option("visual", "where the adapter goes: 'visual' (image feature, the paper's default and the "
                                   "official code), 'text' (class text features) or 'both'", choices=FEATURE_BRANCHES)

    def __post_init__(self) -> None:
        _check_templates_field(self)
        _check_fraction("ratio", self.ratio)
        _check_positive_int("reduction", self.reduction)
        check_choice("branch", self.branch, FEATURE_BRANCHES)

    def for_dataset(self, dataset: str | None, template: str) -> CLIPAdapterConfig:
        """The dataset's hand-crafted template where no templates are set (ImageNet too, as the official code)."""
        return dataclasses.replace(self, templates=_dataset_templates(self.templates, dataset, template, imagenet=()))


@dataclass(frozen=True)
class TipAdapterConfig:
    """Tip-Adapter: a key-value cache of the few-shot training features added to zero-shot CLIP, training-free.

    ``alpha`` / ``beta`` are the values used when ``search`` is off and where a search starts; with ``search`` they
    are chosen on the validation split (never on the test split, unlike the official code for ImageNet).
    """

    templates: tuple[str, ...] = option((), TEMPLATES_HELP)
    cache_views: int = option(10, "augmented views averaged into each cache key (official augment_epoch: 10)")
    alpha: float | None = option(None, "residual ratio alpha of the cache logits; default: the dataset's official "
                                       "init_alpha (configs/<dataset>.yaml), 1 for other datasets")
    beta: float = option(1.0, "sharpness beta of the affinity exp(-beta (1 - f K^T)) (official init_beta: 1)")
    search: bool = option(True, "search alpha and beta on the validation split (official search_hp: True)")
    grid_scale: tuple[float, ...] = option(
        (), "largest beta and alpha of the search grid; default: the dataset's official search_scale, (50, 50) for "
            "other datasets (LP++'s reimplementation)")
    grid_steps: tuple[int, ...] = option((200, 20), "grid points for beta and alpha: value_i = i * (max - 0.1) / "
                                                      "steps + 0.1, i < steps (official search_step: [200, 20])")

    def __post_init__(self) -> None:
        _check_templates_field(self)
        _check_positive_int("cache_views", self.cache_views)
        if self.alpha is not None:
            _check_positive("alpha", self.alpha, zero=True)
        _check_positive("beta", self.beta, zero=True)
        if not isinstance(self.search, bool):
            raise ConfigError(f"search must be true or false, got {self.search!r}")
        object.__setattr__(self, "grid_scale", tuple(float(v) for v in self.grid_scale))
        if len(self.grid_scale) not in (0, 2) or any(not (math.isfinite(v) and v > 0.1)
                                                       for v in self.grid_scale):
            raise ConfigError(f"grid_scale must be two numbers above 0.1 (beta max, alpha max), got "
                              f"{self.grid_scale!r}")
        object.__setattr__(self, "grid_steps", tuple(self.grid_steps))
        if len(self.grid_steps) != 2:
            raise ConfigError(f"grid_steps must be two positive integers (beta, alpha), got {self.grid_steps!r}")
        for steps in self.grid_steps:
            _check_positive_int("grid_steps", steps)

    def for_dataset(self, dataset: str | None, template: str) -> TipAdapterConfig:
        """Templates, initial alpha and search grid from the dataset's official Tip-Adapter config."""
        key = key_of(dataset) if dataset else ""
        return dataclasses.replace(
            self,
            templates=_dataset_templates(self.templates, dataset, template, imagenet=template_set("coop7")),
            alpha=self.alpha if self.alpha is not None else TIP_INIT_ALPHA.get(key, TIP_FALLBACK_INIT_ALPHA),
            grid_scale=self.grid_scale or TIP_GRID_SCALE.get(key, TIP_FALLBACK_GRID_SCALE),
        )


@dataclass(frozen=True)
class TipAdapterFConfig(TipAdapterConfig):
    """Tip-Adapter-F: Tip-Adapter whose cache keys are fine-tuned (AdamW, cosine per step); the epoch and then alpha
    and beta are chosen on the validation split."""

    finetune_epochs: int | None = option(None, "fine-tuning epochs; default: the official train_epoch (20; "
                                               "EuroSAT 100); 0 = no fine-tuning (Tip-Adapter)")
    finetune_lr: float = option(0.001, "AdamW learning rate of the keys (official lr: 0.001), cosine-annealed to 0 "
                                       "over all steps")
    finetune_batch_size: int = option(256, "fine-tuning batch size (official loader: 256, last batch kept)")
    finetune_eps: float = option(1e-4, "AdamW epsilon (official: 1e-4)")
    finetune_weight_decay: float = option(0.01, "AdamW weight decay (the official code keeps PyTorch's 0.01)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.finetune_epochs is not None and (isinstance(self.finetune_epochs, bool) or
                                                 not isinstance(self.finetune_epochs, int) or self.finetune_epochs < 0):
            raise ConfigError(f"finetune_epochs must be an integer >= 0, got {self.finetune_epochs!r}")
        _check_positive("finetune_lr", self.finetune_lr)
        _check_positive_int("finetune_batch_size", self.finetune_batch_size)
        _check_positive("finetune_eps", self.finetune_eps)
        _check_positive("finetune_weight_decay", self.finetune_weight_decay, zero=True)

    def for_dataset(self, dataset: str | None, template: str) -> TipAdapterFConfig:
        base = super().for_dataset(dataset, template)
        epochs = self.finetune_epochs if self.finetune_epochs is not None else _tip_f_epochs(dataset)
        return dataclasses.replace(base, finetune_epochs=epochs)  # type: ignore[return-value]


def _tip_f_epochs(dataset: str | None) -> int:
    """Tip-Adapter-F's official train_epoch: 100 for EuroSAT (configs/eurosat.yaml), 20 for every other dataset."""
    return 100 if dataset is not None and key_of(dataset) == "eurosat" else 20


@dataclass(frozen=True)
class LPPlusPlusConfig:
    """LP++: a linear probe whose class weights blend a visual prototype and the class text feature,
    ``l_ik = f_i . (w_k + alpha_k t_k)``, fitted full-batch with data-driven step sizes (no validation)."""

    templates: tuple[str, ...] = option((), TEMPLATES_HELP)
    iterations: int = option(300, "full-batch iterations (official train_epoch: 300)")
    alpha_every: int = option(10, "update the blending multipliers every this many iterations (official: 10)")
    alpha_init_scale: float = option(250.0, "alpha_0 = this * mean over classes of the mean text similarity of the "
                                            "class's samples (official constant: 250)")
    prototype_momentum: float = option(0.9, "momentum of the visual prototypes' gradient steps (official SGD: 0.9)")

    def __post_init__(self) -> None:
        _check_templates_field(self)
        _check_positive_int("iterations", self.iterations)
        _check_positive_int("alpha_every", self.alpha_every)
        _check_positive("alpha_init_scale", self.alpha_init_scale)
        momentum = self.prototype_momentum
        if isinstance(momentum, bool) or not isinstance(momentum, int | float) or not 0.0 <= momentum < 1.0:
            raise ConfigError(f"prototype_momentum must be in [0, 1), got {momentum!r}")

    def for_dataset(self, dataset: str | None, template: str) -> LPPlusPlusConfig:
        return dataclasses.replace(
            self, templates=_dataset_templates(self.templates, dataset, template, imagenet=template_set("coop7")))


@dataclass(frozen=True)
class CLAPConfig:
    """CLAP: a linear probe on normalised features initialised with the zero-shot prototypes, plus a class-wise
    penalty keeping each prototype near its zero-shot one (multipliers from the zero-shot confidence)."""

    templates: tuple[str, ...] = option((), "hand-crafted templates of the zero-shot prototypes (the UNnormalised "
                                            "text features are averaged, as the official code); empty = the "
                                            "dataset's template (ImageNet: CoOp's 7 selected templates plus it)")
    constraint: str = option("l2", "'l2': CLAP's class-adaptive penalty mean_k lambda_k ||w_k - t_k||^2; 'none': the "
                                   "zero-shot-initialised linear probe ZS-LP (official TRAINER.ADAPTER.CONSTRAINT)",
                             choices=CLAP_CONSTRAINTS)

    def __post_init__(self) -> None:
        _check_templates_field(self)
        check_choice("constraint", self.constraint, CLAP_CONSTRAINTS)

    def for_dataset(self, dataset: str | None, template: str) -> CLAPConfig:
        imagenet = (*template_set("coop7"), template)
        return dataclasses.replace(
            self, templates=_dataset_templates(self.templates, dataset, template, imagenet=imagenet))


# ----------------------------------------------------------------------------------------------------------------------
# deep prompts in both towers (trained with images through the towers)
# Sources: MaPLe repository (github.com/muzairkhattak/multimodal-prompt-learning) configs/trainers/MaPLe/
# vit_b16_c2_ep5_batch4_2ctx.yaml; PromptSRC repository (github.com/muzairkhattak/PromptSRC) configs/trainers/
# {IVLP,PromptSRC}/vit_b16_c2_ep20_batch4_4+4ctx.yaml and trainers/promptsrc.py. The fields that differ between the
# official settings (prompt depth, PromptSRC's aggregation) default to None: the recipe of the run's setting
# (maple_recipe, promptsrc_recipe below; for_recipe fills them).


FAST_DEEP_TEXT_HELP = ("exact fast text encoding (shared prefix with the deep prompts computed once); off = the "
                       "plain 77-token path")


def _check_ctx_init(value: Any) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"ctx_init must be a string, got {value!r}")


def _check_non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")


def _check_weight(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class IndependentPromptOptions:
    """The deep-prompt options IVLP and PromptSRC share (PromptSRC trains IVLP's prompts): their fields come first in
    both configs, so each keeps its flags and config keys. Not a method's config itself."""

    n_ctx_text: int = option(4, "text tokens per layer (official IVLP and PromptSRC 4+4 configs: N_CTX_TEXT 4)")
    n_ctx_vision: int = option(4, "vision tokens per layer, 0 = no vision prompts (official: N_CTX_VISION 4)")
    ctx_init: str = option(
        "a photo of a",
        "the prompts are '<ctx_init> <class>.'; the first n_ctx_text of its words start the first-layer text "
        "context (official CTX_INIT); empty = random N(0, 0.02^2) context and 'X X ..' placeholders",
    )
    prompt_depth_text: int | None = option(None, "text layers that get prompts, 1 = the input only; default: the "
                                                 "recipe's (official: 9; PromptSRC's cross-dataset config: 3)")
    prompt_depth_vision: int | None = option(None, "image layers that get prompts, 0 = none; default: the recipe's "
                                                   "(official: 9; PromptSRC's cross-dataset config: 3)")

    def __post_init__(self) -> None:
        _check_positive_int("n_ctx_text", self.n_ctx_text)
        _check_non_negative_int("n_ctx_vision", self.n_ctx_vision)
        if self.prompt_depth_text is not None:
            _check_positive_int("prompt_depth_text", self.prompt_depth_text)
        if self.prompt_depth_vision is not None:
            _check_non_negative_int("prompt_depth_vision", self.prompt_depth_vision)
        _check_ctx_init(self.ctx_init)


@dataclass(frozen=True)
class IVLPConfig(IndependentPromptOptions):
    """IVLP: independent deep prompts in the text and image towers (the PromptSRC repository's IVLP baseline)."""

    fast_text: bool = option(True, FAST_DEEP_TEXT_HELP)

    def for_recipe(self, context: RecipeContext) -> IVLPConfig:
        """The depths left at None set to IVLP's one official config (9 and 9, whatever the setting: the PromptSRC
        repository has only configs/trainers/IVLP/vit_b16_c2_ep20_batch4_4+4ctx.yaml, PROMPT_DEPTH_TEXT /
        PROMPT_DEPTH_VISION 9)."""
        return _fill_none(self, {"prompt_depth_text": 9, "prompt_depth_vision": 9})


@dataclass(frozen=True)
class MaPLeConfig:
    """MaPLe: text prompts and vision prompts made from them by learned linear couplings, in the first layers."""

    n_ctx: int = option(2, "prompt tokens per layer, in both towers (official MaPLe config: N_CTX 2)")
    ctx_init: str = option(
        "a photo of a",
        "the prompts are '<ctx_init> <class>.'; its first n_ctx words start the first-layer context (official "
        "CTX_INIT; MaPLe learns 'a photo' and keeps 'of a'); empty = random N(0, 0.02^2)",
    )
    prompt_depth: int | None = option(None, "layers of both towers that get prompts; default: the recipe's (official "
                                            "PROMPT_DEPTH 9; cross-dataset / domain generalisation config: 3)")
    fast_text: bool = option(True, FAST_DEEP_TEXT_HELP)

    def __post_init__(self) -> None:
        _check_positive_int("n_ctx", self.n_ctx)
        if self.prompt_depth is not None:
            _check_positive_int("prompt_depth", self.prompt_depth)
        _check_ctx_init(self.ctx_init)

    def for_recipe(self, context: RecipeContext) -> MaPLeConfig:
        """The fields left at None set to the official recipe of ``context``'s setting (:func:`maple_recipe`)."""
        return _fill_none(self, maple_recipe(context)["config"])


@dataclass(frozen=True)
class PromptSRCConfig(IndependentPromptOptions):
    """PromptSRC: IVLP's prompts trained with self-regulation towards the frozen CLIP and Gaussian aggregation."""

    text_loss_weight: float = option(25.0, "weight of the L1 between prompted and frozen text features (official "
                                           "TEXT_LOSS_WEIGHT 25)")
    image_loss_weight: float = option(10.0, "weight of the L1 between prompted and frozen image features "
                                            "(official IMAGE_LOSS_WEIGHT 10)")
    logit_loss_weight: float = option(1.0, "weight of the KL of the prompted from the frozen logits (official: 1, "
                                           "fixed in trainers/promptsrc.py)")
    text_templates: str = option("imagenet60", "template set the frozen text targets average over (official: the "
                                               "60 ImageNet templates)", choices=tuple(TEMPLATE_SETS))
    gpa: bool = option(True, "Gaussian prompt aggregation over the epochs (the final prompts are the weighted mean)")
    gpa_mean: float | None = option(None, "mean (in epochs, 1-based) of the aggregation weights; default: the "
                                          "recipe's (official: 15 base-to-novel; few-shot 30, or 45 for StanfordCars, "
                                          "Flowers102, FGVCAircraft, DTD, EuroSAT; cross-dataset 6)")
    gpa_std: float | None = option(None, "standard deviation (in epochs) of the aggregation weights; default: the "
                                         "recipe's (official: 1 base-to-novel; few-shot 30, or 5 for the datasets "
                                         "with mean 45; cross-dataset 10)")
    fast_text: bool = option(True, FAST_DEEP_TEXT_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("text_loss_weight", "image_loss_weight", "logit_loss_weight"):
            _check_weight(name, getattr(self, name))
        check_choice("text_templates", self.text_templates, tuple(TEMPLATE_SETS))
        if self.gpa_mean is not None and (isinstance(self.gpa_mean, bool) or
                                          not isinstance(self.gpa_mean, int | float) or
                                          not math.isfinite(self.gpa_mean)):
            raise ConfigError(f"gpa_mean must be a finite number, got {self.gpa_mean!r}")
        if self.gpa_std is not None and (isinstance(self.gpa_std, bool) or not isinstance(self.gpa_std, int | float)
                                         or not math.isfinite(self.gpa_std) or self.gpa_std <= 0):
            raise ConfigError(f"gpa_std must be a positive number, got {self.gpa_std!r}")

    def for_recipe(self, context: RecipeContext) -> PromptSRCConfig:
        """The fields left at None set to the official recipe of ``context``'s setting (:func:`promptsrc_recipe`)."""
        return _fill_none(self, promptsrc_recipe(context)["config"])


LORA_ENCODERS: tuple[str, ...] = ("both", "text", "vision")
LORA_POSITIONS: tuple[str, ...] = ("all", "bottom", "mid", "up", "half-bottom", "half-up", "top3")
LORA_PROJECTIONS: tuple[str, ...] = ("q", "k", "v")


@dataclass(frozen=True)
class CLIPLoRAConfig:
    """CLIP-LoRA: low-rank updates of the attention's query, key and value projections in both towers (the
    official repository MaxZanella/CLIP-LoRA, run_utils.py's defaults, fixed for every dataset and shot count)."""

    rank: int = option(2, "rank r of every low-rank update (official --r 2)")
    lora_alpha: float = option(1.0, "LoRA scaling numerator: the update is (alpha / sqrt(rank)) * B A (official --alpha 1; "
                               "loralib/layers.py scales by alpha / sqrt(r), not alpha / r)")
    dropout: float = option(0.25, "dropout on the input of each low-rank update, in training only (official "
                                  "--dropout_rate 0.25)")
    encoder: str = option("both", "towers that get the updates (official --encoder both)", choices=LORA_ENCODERS)
    position: str = option("all", "blocks of each tower that get the updates: all, the bottom / mid / up third, the "
                                  "half-bottom / half-up half, or top3 (official --position all; the official index "
                                  "lists are these fractions of the 12 / 24 blocks)", choices=LORA_POSITIONS)
    params: tuple[str, ...] = option(LORA_PROJECTIONS, "projections that get an update, any of q k v (official "
                                                       "--params q k v)")
    template: str = option("a photo of a {}.", "prompt template of the class names, in training and evaluation "
                                               "(official: 'a photo of a {}.' for every dataset, datasets/*.py)")

    def __post_init__(self) -> None:
        _check_positive_int("rank", self.rank)
        _check_positive("lora_alpha", self.lora_alpha)
        _check_fraction("dropout", self.dropout)
        if self.dropout >= 1.0:
            raise ConfigError(f"dropout must be smaller than 1, got {self.dropout!r}")
        check_choice("encoder", self.encoder, LORA_ENCODERS)
        check_choice("position", self.position, LORA_POSITIONS)
        params = tuple(self.params) if isinstance(self.params, list | tuple) else self.params
        if not isinstance(params, tuple) or not params or any(p not in LORA_PROJECTIONS for p in params) \
                or len(set(params)) != len(params):
            raise ConfigError(f"params must be distinct projections among {', '.join(LORA_PROJECTIONS)}, got "
                              f"{self.params!r}")
        object.__setattr__(self, "params", params)
        check_template(self.template)


# ----------------------------------------------------------------------------------------------------------------------
# test-time prompt tuning
# Source of the defaults: TPT's official code (github.com/azshue/TPT @ 63ecbac): tpt_classification.py's arguments and
# scripts/test_tpt.sh (ctx_init a_photo_of_a, -b 64), the settings the paper (Shu et al., NeurIPS 2022) reports.

IMAGENET_FAMILY: frozenset[str] = frozenset({"imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"})
"""The datasets whose TPT views are random resized crops only; the official code mixes AugMix into every other
dataset's views (``augmix=len(set_id) > 1``: the fine-grained cross-dataset sets)."""
TPT_AUGMIX_CHOICES: tuple[str, ...] = ("auto", "on", "off")


@dataclass(frozen=True)
class TPTConfig:
    """TPT: per test image, tune a unified CoOp-style context for a few steps to minimise the entropy of the mean
    prediction over its most confident augmented views, classify the original image, then reset the context."""

    n_ctx: int = option(4, "number of context vectors M when ctx_init is empty (official --n_ctx: 4)")
    ctx_init: str = option(
        "a photo of a",
        "initialise the context from this phrase's word embeddings (official scripts: a_photo_of_a); empty = "
        "random N(0, 0.02^2)",
    )
    init_prompt: str = option(
        "",
        "TPT+CoOp: start from a learned unified CoOp context instead: a CoOp prompt file (a CoOp run folder's "
        "prompt.safetensors) learned on the same backbone (official --load); empty = start from ctx_init",
    )
    tta_views: int = option(64, "views per test image: the original and tta_views - 1 augmented ones (official -b 64)")
    tta_selection: float = option(
        0.1, "fraction of the views the objective keeps, the lowest-entropy ones (official --selection_p 0.1)"
    )
    tta_steps: int = option(1, "optimiser steps per test image; 0 = no tuning (official --tta_steps 1)")
    tta_lr: float = option(5e-3, "AdamW learning rate of the per-image steps (official --lr 5e-3)")
    tta_weight_decay: float = option(
        0.01, "AdamW weight decay (the official optimiser is torch.optim.AdamW with its default, 0.01)"
    )
    augmix: str = option(
        "auto",
        "AugMix on the augmented views: auto = on for every dataset but ImageNet and its variants (as the official "
        "code), on, off (random resized crop and flip only)",
        choices=TPT_AUGMIX_CHOICES,
    )
    fast_text: bool = option(
        True,
        "exact fast text encoding (shortest length, shared prefix computed once per step); off = the plain "
        "77-token path",
    )

    def __post_init__(self) -> None:
        _check_positive_int("n_ctx", self.n_ctx)
        _check_ctx_init(self.ctx_init)
        if not isinstance(self.init_prompt, str):
            raise ConfigError(f"init_prompt must be a path (string), got {self.init_prompt!r}")
        _check_positive_int("tta_views", self.tta_views)
        if isinstance(self.tta_selection, bool) or not isinstance(self.tta_selection, int | float) \
                or not 0 < self.tta_selection <= 1:
            raise ConfigError(f"tta_selection must be a fraction in (0, 1], got {self.tta_selection!r}")
        if self.kept_views < 1:
            raise ConfigError(f"tta_selection {self.tta_selection} of {self.tta_views} views keeps no view "
                              "(int(views x selection) must be at least 1): raise tta_views or tta_selection")
        _check_non_negative_int("tta_steps", self.tta_steps)
        _check_positive("tta_lr", self.tta_lr)
        _check_weight("tta_weight_decay", self.tta_weight_decay)
        check_choice("augmix", self.augmix, TPT_AUGMIX_CHOICES)

    @property
    def kept_views(self) -> int:
        """The views the objective keeps: ``int(views * selection)`` (6 of 64), as the official code."""
        return int(self.tta_views * self.tta_selection)

    def for_dataset(self, dataset: str | None, template: str) -> TPTConfig:
        """``augmix="auto"`` resolved for ``dataset``: off for ImageNet and its variants, on for any other."""
        if self.augmix != "auto":
            return self
        imagenet = dataset is not None and key_of(dataset) in IMAGENET_FAMILY
        return dataclasses.replace(self, augmix="off" if imagenet else "on")


# ----------------------------------------------------------------------------------------------------------------------
# training defaults (the reference's per-method recipe), a function of the RecipeContext (shots, dataset, class subset,
# protocol: vlprompt.methods.recipe); ``context.recipe`` is "fewshot", "base2novel" or "crossdataset"


def _fill_none(config: Any, values: Mapping[str, Any]) -> Any:
    """``config`` with its fields that are None set from ``values`` (explicit values are kept)."""
    missing = {key: value for key, value in values.items() if getattr(config, key) is None}
    return dataclasses.replace(config, **missing) if missing else config


def no_train_defaults(context: RecipeContext = RecipeContext()) -> dict[str, Any]:
    """Methods without SGD training have no training defaults."""
    return {}


def coop_train_defaults(context: RecipeContext = RecipeContext()) -> dict[str, Any]:
    """CoOp's reference schedule: batch 32; epochs 50 (1 shot), 100 (2, 4 shots), 200 (8, 16 shots, or all data),
    50 on ImageNet whatever the shots; the rest of the recipe is :class:`~vlprompt.training.config.TrainConfig`'s
    defaults (SGD). The same in every setting (CoOp's one schedule; ImageNet-trained transfer sources get 50)."""
    shots = context.shots
    if _is_imagenet(context.dataset) or shots == 1:
        epochs = 50
    elif shots is not None and 1 < shots <= 4:
        epochs = 100
    else:
        epochs = 200
    return {"batch_size": 32, "epochs": epochs}


def cocoop_train_defaults(context: RecipeContext = RecipeContext()) -> dict[str, Any]:
    """CoCoOp's reference schedule: batch 1, 10 epochs (config vit_b16_c4_ep10_batch1_ctxv1 in both
    scripts/cocoop/base2new_train.sh and xd_train.sh); the rest of the recipe is :class:`~vlprompt.training.config.TrainConfig`'s defaults."""
    return {"batch_size": 1, "epochs": 10}


def kgcoop_train_defaults(context: RecipeContext = RecipeContext()) -> dict[str, Any]:
    """KgCoOp's schedule: 100 epochs (official configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml, the one config of
    every script); batch 128 in base-to-novel training (the same config, scripts/base2new_train.sh), 32 in few-shot
    and transfer training (/work/shared/reference/prompt-learning.md, "few-shot uses 32"; the repository's only other
    script, xd_train.sh, trains 4 shots on all classes with the batch-128 config); SGD lr 0.002, momentum 0.9, weight
    decay 5e-4, 1 constant warm-up epoch at 1e-5 (the same config = TrainConfig's defaults)."""
    return {"batch_size": 128 if context.recipe == "base2novel" else 32, "epochs": 100}


def prograd_train_defaults(context: RecipeContext = RecipeContext()) -> dict[str, Any]:
    """ProGrad's schedule: in few-shot and transfer training CoOp's (batch 32, epochs by shots; official README
    configs rn50_ep50 / rn50_ep100 / rn50; the domain-generalisation models are the few-shot ImageNet ones,
    scripts/eval.sh); in base-to-novel training 100 epochs, 50 on ImageNet (official
    scripts/base2new_train_prograd.sh CFG=rn50_ep100; README: rn50_ep50 for ImageNet); SGD as TrainConfig's
    defaults."""
    if context.recipe != "base2novel":
        return coop_train_defaults(context)
    return {"batch_size": 32, "epochs": 50 if _is_imagenet(context.dataset) else 100}


def tcp_train_defaults(context: RecipeContext = RecipeContext()) -> dict[str, Any]:
    """TCP's schedule (official configs/trainers/TCP/vit_b16_ep100_ctxv1.yaml, its only config; the repository has
    only the base-to-novel script): Adam with epsilon 1e-3 (the official README's edit of Dassl's optimiser, against
    NaN in fp16), batch 32, 50 epochs; lr 0.002, weight decay 5e-4 (Dassl's default), cosine with 1 constant warm-up
    epoch at 1e-5 (TrainConfig's defaults)."""
    return {"batch_size": 32, "epochs": 50, "optimizer": "adam", "adam_eps": 1e-3}


def clap_train_defaults(context: RecipeContext = RecipeContext()) -> dict[str, Any]:
    """CLAP's official recipe (configs/trainers/SGD_lr1e-1_B256_ep300.yaml, trainers/adapters.py): SGD lr 0.1,
    weight decay 0, batch 256, 300 epochs (momentum 0.9, cosine with 1 constant warm-up epoch at 1e-5: TrainConfig's
    defaults, Dassl's); 20 augmented views of every training image (epochs_aumentation = 20) with Dassl's random
    resized crop (scale 0.08-1) and flip."""
    return {"batch_size": 256, "epochs": 300, "lr": 0.1, "weight_decay": 0.0, "views": 20,
            "crop_scale_min": 0.08}


def tip_adapter_train_defaults(context: RecipeContext = RecipeContext()) -> dict[str, Any]:
    """Tip-Adapter's cache: 10 augmented views (augment_epoch) with RandomResizedCrop scale 0.5-1 + flip (main.py)."""
    return {"views": 10, "crop_scale_min": 0.5}


def tip_adapter_f_train_defaults(context: RecipeContext = RecipeContext()) -> dict[str, Any]:
    """Tip-Adapter-F: a pool of one augmented view per fine-tuning epoch (20; EuroSAT 100), crop scale 0.5-1; the
    cache averages the first 10 of them."""
    return {"views": _tip_f_epochs(context.dataset), "crop_scale_min": 0.5}


def lp_plus_plus_train_defaults(context: RecipeContext = RecipeContext()) -> dict[str, Any]:
    """LP++: one augmented view of each training image (the official loader's single pass, RandomResizedCrop scale
    0.5-1 + flip)."""
    return {"views": 1, "crop_scale_min": 0.5}


def ivlp_train_defaults(context: RecipeContext = RecipeContext()) -> dict[str, Any]:
    """IVLP's official recipe (PromptSRC repository, configs/trainers/IVLP/vit_b16_c2_ep20_batch4_4+4ctx.yaml, its
    only IVLP config, so every setting): batch 4, 20 epochs, lr 0.0025; the rest (momentum 0.9, weight decay 5e-4,
    1 constant warm-up epoch at 1e-5, cosine) is TrainConfig's defaults."""
    return {"batch_size": 4, "epochs": 20, "lr": 0.0025}


def maple_recipe(context: RecipeContext = RecipeContext()) -> dict[str, dict[str, Any]]:
    """MaPLe's official recipe of ``context``'s setting: ``{"train": ..., "config": ...}`` (batch 4 everywhere).

    Source: the MaPLe repository github.com/muzairkhattak/multimodal-prompt-learning @ 69bce21 (each value's
    file and key in a comment).
    """
    if context.recipe == "crossdataset":
        # configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml (scripts/maple/xd_train_maple.sh,
        # trained on ImageNet, all classes, 16 shots; the same models are evaluated for domain generalisation)
        return {"train": {"batch_size": 4,  # DATALOADER.TRAIN_X.BATCH_SIZE 4
                          "epochs": 2,  # OPTIM.MAX_EPOCH 2 (xd_test_maple.sh --load-epoch 2)
                          "lr": 0.0026},  # OPTIM.LR 0.0026
                "config": {"prompt_depth": 3}}  # TRAINER.MAPLE.PROMPT_DEPTH 3
    # base-to-novel: configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml (scripts/maple/base2new_train_maple.sh);
    # few-shot: the repository has no few-shot config or script, so this one (the paper reports no few-shot setting)
    return {"train": {"batch_size": 4,  # DATALOADER.TRAIN_X.BATCH_SIZE 4
                      "epochs": 5,  # OPTIM.MAX_EPOCH 5 (README "Epochs 5"; the PromptSRC repository's copy says 2)
                      "lr": 0.0035},  # OPTIM.LR 0.0035
            "config": {"prompt_depth": 9}}  # TRAINER.MAPLE.PROMPT_DEPTH 9


def maple_train_defaults(context: RecipeContext = RecipeContext()) -> dict[str, Any]:
    """MaPLe's official training recipe of the setting (:func:`maple_recipe`): batch 4, 5 epochs, lr 0.0035;
    cross-dataset 2 epochs, lr 0.0026. The rest is TrainConfig's defaults."""
    return maple_recipe(context)["train"]


PROMPTSRC_FEWSHOT_GPA_45_5: frozenset[str] = frozenset({
    "stanford_cars", "oxford_flowers", "fgvc_aircraft", "dtd", "eurosat"})
"""Datasets whose few-shot aggregation is mean 45, std 5 (the comment in PromptSRC's few-shot config: "StanfordCars,
Flowers102, FGVCAircraft, DTD and EuroSAT"); the others (ImageNet, Caltech101, OxfordPets, Food101, UCF101, SUN397,
and any custom dataset) take the config's active 30 / 30."""


def promptsrc_recipe(context: RecipeContext = RecipeContext()) -> dict[str, dict[str, Any]]:
    """PromptSRC's official recipe of ``context``'s setting: ``{"train": ..., "config": ...}``.

    Sources: PromptSRC repository github.com/muzairkhattak/PromptSRC @ bb95c77, configs/trainers/PromptSRC/*.yaml
    (all three: batch 4, SGD lr 0.0025, N_CTX 4 + 4, loss weights 25 / 10) and docs/TRAIN.md.
    """
    train = {"batch_size": 4,  # DATALOADER.TRAIN_X.BATCH_SIZE 4 (all three configs)
             "lr": 0.0025}  # OPTIM.LR 0.0025 (all three configs)
    if context.recipe == "crossdataset":
        # vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets.yaml (docs/TRAIN.md: ImageNet, all classes, 16 shots; the
        # same model for domain generalisation). scripts/promptsrc/xd_train.sh names "..._ep5_..._cross_datasets",
        # a file the repository does not have; its xd_test.sh and reproduce_xd.sh load epoch 20 of the ep20 config.
        return {"train": {**train, "epochs": 20},  # OPTIM.MAX_EPOCH 20
                "config": {"prompt_depth_text": 3, "prompt_depth_vision": 3,  # PROMPT_DEPTH_TEXT / _VISION 3
                           "gpa_mean": 6.0, "gpa_std": 10.0}}  # GPA_MEAN 6, GPA_STD 10
    if context.recipe == "fewshot":
        # vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml (scripts/promptsrc/few_shot.sh, K = 1, 2, 4, 8, 16)
        key = key_of(context.dataset) if context.dataset else ""
        gpa = (45.0, 5.0) if key in PROMPTSRC_FEWSHOT_GPA_45_5 else (30.0, 30.0)  # GPA_MEAN / GPA_STD, per dataset
        return {"train": {**train, "epochs": 50},  # OPTIM.MAX_EPOCH 50 (reproduce_few_shot.sh LOADEP=50)
                "config": {"prompt_depth_text": 9, "prompt_depth_vision": 9,  # PROMPT_DEPTH_TEXT / _VISION 9
                           "gpa_mean": gpa[0], "gpa_std": gpa[1]}}
    # base-to-novel: vit_b16_c2_ep20_batch4_4+4ctx.yaml (scripts/promptsrc/base2new_train.sh)
    return {"train": {**train, "epochs": 20},  # OPTIM.MAX_EPOCH 20
            "config": {"prompt_depth_text": 9, "prompt_depth_vision": 9,  # PROMPT_DEPTH_TEXT / _VISION 9
                       "gpa_mean": 15.0, "gpa_std": 1.0}}  # GPA_MEAN 15, GPA_STD 1


def promptsrc_train_defaults(context: RecipeContext = RecipeContext()) -> dict[str, Any]:
    """PromptSRC's official training recipe of the setting (:func:`promptsrc_recipe`): batch 4, lr 0.0025, 20 epochs
    (base-to-novel, cross-dataset), 50 epochs (few-shot). The rest is TrainConfig's defaults."""
    return promptsrc_recipe(context)["train"]


CLIP_LORA_STEPS_PER_SHOT = 500
"""CLIP-LoRA's training length: 500 x shots optimiser steps (official --n_iters 500; lora.py total_iters =
n_iters * shots)."""


def clip_lora_train_defaults(context: RecipeContext = RecipeContext()) -> dict[str, Any]:
    """CLIP-LoRA's official recipe (run_utils.py, lora.py, main.py), the same for every dataset, shot count and
    setting: 500 x shots iterations (all training images, shots 0: as 16 shots, the largest setting of the paper),
    batch 32, AdamW (lr 2e-4, betas 0.9 / 0.999, weight decay 1e-2), cosine per step to 1e-6
    (CosineAnnealingLR(total_iters, eta_min=1e-6)) with no warm-up, a fresh random resized crop (scale 0.08-1,
    bicubic) and flip at every visit."""
    per_class = context.shots if context.shots else 16
    return {"steps": CLIP_LORA_STEPS_PER_SHOT * per_class, "batch_size": 32, "optimizer": "adamw",
            "lr": 2e-4, "weight_decay": 1e-2, "warmup_epochs": 0, "min_lr": 1e-6, "views": "epochs",
            "crop_scale_min": 0.08}
