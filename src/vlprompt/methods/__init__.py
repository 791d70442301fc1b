"""The methods: zero-shot CLIP, prompt ensembling, linear probe, CoOp, CoCoOp, KgCoOp, ProGrad, TCP, CLIP-Adapter,
Tip-Adapter(-F), LP++, CLAP, IVLP, MaPLe, PromptSRC, CLIP-LoRA, TPT; one explicit registry dict.

Every method is an ``nn.Module`` whose parameters and buffers are only its learned state (see "Method contract" in
docs/architecture.md). Most work on frozen image features (``clip.encode_image`` output, float32, not normalised);
those declared ``Training.IMAGES`` (IVLP, MaPLe, PromptSRC, CLIP-LoRA) take pre-processed images, whose features depend on their
prompts, and encode them with ``method.encode_images``.

This package module imports nothing heavy: the configs live in :mod:`vlprompt.methods.configs` and each
:class:`MethodSpec` builds its method through a lazy reference to the implementing module, which imports torch.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from vlprompt.common.options import config_from_dict
from vlprompt.errors import ConfigError
from vlprompt.methods.recipe import RecipeContext
from vlprompt.methods.configs import (
    CLAPConfig,
    CLIPAdapterConfig,
    CLIPLoRAConfig,
    CoCoOpConfig,
    CoOpConfig,
    EnsembleConfig,
    KgCoOpConfig,
    IVLPConfig,
    LinearProbeConfig,
    LPPlusPlusConfig,
    MaPLeConfig,
    PromptSRCConfig,
    TipAdapterConfig,
    TipAdapterFConfig,
    ProGradConfig,
    TCPConfig,
    TPTConfig,
    ZeroShotConfig,
    clap_train_defaults,
    clip_lora_train_defaults,
    cocoop_train_defaults,
    coop_train_defaults,
    ivlp_train_defaults,
    lp_plus_plus_train_defaults,
    maple_train_defaults,
    no_train_defaults,
    promptsrc_train_defaults,
    tip_adapter_f_train_defaults,
    tip_adapter_train_defaults,
    kgcoop_train_defaults,
    prograd_train_defaults,
    tcp_train_defaults,
)

if TYPE_CHECKING:
    from torch import nn

    from vlprompt.backbone.model import CLIP



class Training(enum.StrEnum):
    """What a method needs to learn, declared once in its registry entry and read by the pipeline, the API and the
    protocols (which features to compute, which fit to run, whether it needs training images)."""

    NONE = "none"
    """nothing to fit: the method is complete when built (zero-shot CLIP, prompt ensembling)"""
    CLOSED_FORM = "closed_form"
    """``method.fit(train, val, seed=...)`` once on frozen features: the method's own deterministic fit (linear probe;
    Tip-Adapter(-F)'s cache, fine-tuning and validation search; LP++'s full-batch optimiser), redone on resume"""
    FEATURES = "features"
    """the SGD loop (:func:`vlprompt.training.loop.train`) on cached frozen image features (CoOp, CoCoOp)"""
    IMAGES = "images"
    """the SGD loop with images decoded and augmented on the fly through the (prompted) towers"""
    TEST_TIME = "test_time"
    """adaptation per test image at evaluation (TPT): no training images; evaluation gives the classifier the
    frozen tower's features of augmented views of each test image ``[V, N, D]`` (``method.test_views()``)"""

    @property
    def uses_training_images(self) -> bool:
        """True when the method learns from a training split (few-shot sample, validation split)."""
        return self in (Training.CLOSED_FORM, Training.FEATURES, Training.IMAGES)

    @property
    def uses_sgd(self) -> bool:
        """True when the trainer optimises ``method.parameters()``."""
        return self in (Training.FEATURES, Training.IMAGES)


@dataclass(frozen=True)
class LazyBuild:
    """``build(clip, classnames, config)`` of a method, importing its module (``"module:function"``) on first call."""

    target: str

    def __call__(self, clip: CLIP, classnames: list[str], config: Any) -> nn.Module:
        module_name, attr = self.target.split(":")
        build: Callable[..., nn.Module] = getattr(importlib.import_module(module_name), attr)
        return build(clip, classnames, config)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    ``training``: what the method needs to learn (:class:`Training`). ``train_defaults(context)`` gives the official
    recipe's training options for a :class:`~vlprompt.methods.recipe.RecipeContext` (shots, dataset, class subset,
    protocol): the length (``epochs``, or ``steps``: CLIP-LoRA) and ``batch_size``, and ``lr``, ``optimizer``,
    ``views``, ``warmup_epochs``, ``min_lr`` ... where the recipe is not
    :class:`~vlprompt.training.config.TrainConfig`'s Dassl SGD; empty for methods that are not trained by SGD. Config
    fields that depend on the setting are filled by the config's own ``for_recipe(context)`` (:func:`method_config`).
    """

    name: str
    config_cls: type
    training: Training
    build: Callable[[CLIP, list[str], Any], nn.Module]
    train_defaults: Callable[[RecipeContext], dict[str, Any]]
    description: str
    transfers: bool = True
    """its learned state can classify another class list (base-to-novel "new" classes, another dataset) through
    ``method.with_classnames``; False for a classifier over the training classes only (linear probe, Tip-Adapter's
    cache of training-class keys, LP++, CLAP)"""
    fit_views: bool = False
    """a closed-form fit on augmented training views ``[V, N, D]`` (``train.views``, ``train.crop_scale_min``, the
    pool the SGD loop reads) instead of eval-transform train features (Tip-Adapter's cache, LP++)"""


METHODS: Mapping[str, MethodSpec] = MappingProxyType({
    "zeroshot": MethodSpec(
        name="zeroshot", config_cls=ZeroShotConfig, training=Training.NONE,
        build=LazyBuild("vlprompt.methods.zeroshot:build_zeroshot"), train_defaults=no_train_defaults,
        description="zero-shot CLIP with the dataset's hand-crafted template",
    ),
    "ensemble": MethodSpec(
        name="ensemble", config_cls=EnsembleConfig, training=Training.NONE,
        build=LazyBuild("vlprompt.methods.zeroshot:build_ensemble"), train_defaults=no_train_defaults,
        description="zero-shot CLIP with prompt ensembling (mean of normalised text features over templates)",
    ),
    "linear_probe": MethodSpec(
        name="linear_probe", config_cls=LinearProbeConfig, training=Training.CLOSED_FORM,
        build=LazyBuild("vlprompt.methods.linear_probe:build_linear_probe"), train_defaults=no_train_defaults,
        description="logistic regression on frozen image features, C searched on the validation split",
        transfers=False,
    ),
    "coop": MethodSpec(
        name="coop", config_cls=CoOpConfig, training=Training.FEATURES,
        build=LazyBuild("vlprompt.methods.coop:build_coop"), train_defaults=coop_train_defaults,
        description="CoOp: learned context vectors (unified or class-specific) in the text prompt",
    ),
    "cocoop": MethodSpec(
        name="cocoop", config_cls=CoCoOpConfig, training=Training.FEATURES,
        build=LazyBuild("vlprompt.methods.cocoop:build_cocoop"), train_defaults=cocoop_train_defaults,
        description="CoCoOp: CoOp's context plus a per-image token from a small meta-net",
    ),
    "clip_adapter": MethodSpec(
        name="clip_adapter", config_cls=CLIPAdapterConfig, training=Training.FEATURES,
        build=LazyBuild("vlprompt.methods.clip_adapter:build_clip_adapter"), train_defaults=coop_train_defaults,
        description="CLIP-Adapter: a residual bottleneck MLP blended into the image (and/or text) features",
    ),
    "tip_adapter": MethodSpec(
        name="tip_adapter", config_cls=TipAdapterConfig, training=Training.CLOSED_FORM,
        build=LazyBuild("vlprompt.methods.tip_adapter:build_tip_adapter"),
        train_defaults=tip_adapter_train_defaults,
        description="Tip-Adapter: a training-free cache of the few-shot features, alpha / beta chosen on validation",
        transfers=False, fit_views=True,
    ),
    "tip_adapter_f": MethodSpec(
        name="tip_adapter_f", config_cls=TipAdapterFConfig, training=Training.CLOSED_FORM,
        build=LazyBuild("vlprompt.methods.tip_adapter:build_tip_adapter_f"),
        train_defaults=tip_adapter_f_train_defaults,
        description="Tip-Adapter-F: Tip-Adapter with fine-tuned keys; epoch and alpha / beta chosen on validation",
        transfers=False, fit_views=True,
    ),
    "lp_plus_plus": MethodSpec(
        name="lp_plus_plus", config_cls=LPPlusPlusConfig, training=Training.CLOSED_FORM,
        build=LazyBuild("vlprompt.methods.lp_plus_plus:build_lp_plus_plus"),
        train_defaults=lp_plus_plus_train_defaults,
        description="LP++: linear probe blending visual prototypes and text features, data-driven step sizes",
        transfers=False, fit_views=True,
    ),
    "clap": MethodSpec(
        name="clap", config_cls=CLAPConfig, training=Training.FEATURES,
        build=LazyBuild("vlprompt.methods.clap:build_clap"), train_defaults=clap_train_defaults,
        description="CLAP: zero-shot-initialised linear probe with a class-adaptive penalty to the zero-shot weights",
        transfers=False,
    ),
    "kgcoop": MethodSpec(
        name="kgcoop", config_cls=KgCoOpConfig, training=Training.FEATURES,
        build=LazyBuild("vlprompt.methods.kgcoop:build_kgcoop"), train_defaults=kgcoop_train_defaults,
        description="KgCoOp: CoOp plus a term keeping the learned class text features near the hand-crafted ones",
    ),
    "prograd": MethodSpec(
        name="prograd", config_cls=ProGradConfig, training=Training.FEATURES,
        build=LazyBuild("vlprompt.methods.prograd:build_prograd"), train_defaults=prograd_train_defaults,
        description="ProGrad: CoOp with its gradient projected off the conflicting KL-to-zero-shot direction",
    ),
    "tcp": MethodSpec(
        name="tcp", config_cls=TCPConfig, training=Training.FEATURES,
        build=LazyBuild("vlprompt.methods.tcp:build_tcp"), train_defaults=tcp_train_defaults,
        description="TCP: class-aware tokens from the hand-crafted class embeddings enter the text tower at one layer",
    ),
    "ivlp": MethodSpec(
        name="ivlp", config_cls=IVLPConfig, training=Training.IMAGES,
        build=LazyBuild("vlprompt.methods.ivlp:build_ivlp"), train_defaults=ivlp_train_defaults,
        description="IVLP: independent deep prompts in the text and image towers (ViT backbones)",
    ),
    "maple": MethodSpec(
        name="maple", config_cls=MaPLeConfig, training=Training.IMAGES,
        build=LazyBuild("vlprompt.methods.maple:build_maple"), train_defaults=maple_train_defaults,
        description="MaPLe: deep text prompts coupled to the image tower's prompts by learned linear maps (ViT)",
    ),
    "promptsrc": MethodSpec(
        name="promptsrc", config_cls=PromptSRCConfig, training=Training.IMAGES,
        build=LazyBuild("vlprompt.methods.promptsrc:build_promptsrc"), train_defaults=promptsrc_train_defaults,
        description="PromptSRC: IVLP's prompts self-regulated towards the frozen CLIP, Gaussian prompt aggregation",
    ),
    "clip_lora": MethodSpec(
        name="clip_lora", config_cls=CLIPLoRAConfig, training=Training.IMAGES,
        build=LazyBuild("vlprompt.methods.clip_lora:build_clip_lora"), train_defaults=clip_lora_train_defaults,
        description="CLIP-LoRA: low-rank updates of the q/k/v projections of both towers (mergeable into CLIP)",
    ),
    "tpt": MethodSpec(
        name="tpt", config_cls=TPTConfig, training=Training.TEST_TIME,
        build=LazyBuild("vlprompt.methods.tpt:build_tpt"), train_defaults=no_train_defaults,
        description="TPT: per test image, one entropy-minimising step of the prompt on its confident augmented views",
    ),
})
"""Every method, by name."""


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``, or a :class:`ConfigError` listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}: use one of {', '.join(METHODS)}") from None


def method_config(spec: MethodSpec, options: Any, context: RecipeContext | None = None) -> Any:
    """``spec``'s typed config: ``options`` itself when it already is one, else built from a mapping of field values
    (defaults filled in; unknown names and bad values raise a ConfigError naming the method); then the fields the
    method leaves to the recipe (None) set to the official recipe of ``context`` (:func:`config_for_recipe`;
    None: an unknown setting, inferred as few-shot). Explicit values always win."""
    if isinstance(options, spec.config_cls):
        config = options
    elif dataclasses.is_dataclass(options) and not isinstance(options, type):
        raise ConfigError(f"method {spec.name} takes a {spec.config_cls.__name__}, got a {type(options).__name__}")
    else:
        try:
            config = config_from_dict(spec.config_cls, options)
        except ConfigError as exc:
            raise ConfigError(f"method {spec.name}: {exc}") from None
    return config_for_recipe(config, context if context is not None else RecipeContext())


def config_for_recipe(config: Any, context: RecipeContext) -> Any:
    """``config`` with the fields it leaves to the recipe (None) set to the official recipe of ``context``'s setting
    (the config's ``for_recipe``: MaPLe's and PromptSRC's prompt depth, PromptSRC's aggregation); other methods'
    configs are returned unchanged."""
    for_recipe = getattr(config, "for_recipe", None)
    return config if for_recipe is None else for_recipe(context)


def config_for_dataset(config: Any, dataset: str | None, template: str) -> Any:
    """``config`` completed with what it takes from the dataset (its name and hand-crafted ``template``).

    Zero-shot takes the template where none is set; the ensemble adds it to its set (not for ImageNet, as the
    reference); other methods' configs are returned unchanged. Callers with a ``DatasetSplits`` use
    ``config_for_dataset(config, splits.name, splits.template)`` before ``spec.build``.
    """
    for_dataset = getattr(config, "for_dataset", None)
    return config if for_dataset is None else for_dataset(dataset, template)


__all__ = [
    "METHODS",
    "CLAPConfig",
    "CLIPAdapterConfig",
    "CLIPLoRAConfig",
    "CoCoOpConfig",
    "CoOpConfig",
    "EnsembleConfig",
    "KgCoOpConfig",
    "IVLPConfig",
    "LazyBuild",
    "LPPlusPlusConfig",
    "LinearProbeConfig",
    "MaPLeConfig",
    "MethodSpec",
    "PromptSRCConfig",
    "TipAdapterConfig",
    "TipAdapterFConfig",
    "ProGradConfig",
    "TCPConfig",
    "TPTConfig",
    "Training",
    "ZeroShotConfig",
    "RecipeContext",
    "config_for_dataset",
    "config_for_recipe",
    "method_config",
    "get_method",
]
