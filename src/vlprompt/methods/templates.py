"""Prompt templates: the hand-crafted template of each benchmark dataset and the ImageNet template sets.

A template is a string with exactly one ``{}`` where the class name goes ("a photo of a {}."). Each dataset's
hand-crafted template lives in its registry entry (:mod:`vlprompt.data.registry`) and comes with its splits
(``DatasetSplits.template``); :func:`dataset_template` reads it without a dataset on disk.

Template sets for prompt ensembling (:data:`TEMPLATE_SETS`):

- ``"coop7"``: the 7 ImageNet templates CoOp's prompt-ensembling baseline selects (``IMAGENET_TEMPLATES_SELECT``);
  the reference adds the dataset's own template for every dataset but ImageNet;
- ``"clip80"``: the 80 ImageNet templates of CLIP's prompt-engineering notebook;
- ``"imagenet60"``: the first 60 of them, the set PromptSRC averages its frozen text targets over.

This module imports nothing heavy (the CLI reads it at start).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from vlprompt.common.vocab import DEFAULT_TEMPLATE
from vlprompt.data.registry import DATASETS, key_of, lookup
from vlprompt.errors import ConfigError

PLACEHOLDER = "{}"

IMAGENET_TEMPLATES_SELECT: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
"""The 7 ImageNet templates of CoOp's prompt-ensembling baseline (reference ``IMAGENET_TEMPLATES_SELECT``)."""

IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)
"""CLIP's 80 ImageNet prompt-engineering templates."""

IMAGENET_TEMPLATES_60: tuple[str, ...] = (IMAGENET_TEMPLATES[39], *IMAGENET_TEMPLATES[:39], *IMAGENET_TEMPLATES[40:60])
"""The first 60 of CLIP's 80, "a photo of a {}." first: the templates PromptSRC averages its frozen text targets over
(``IMAGENET_TEMPLATES`` of the official ``trainers/imagenet_templates.py``, in its order)."""

TEMPLATE_SETS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "coop7": IMAGENET_TEMPLATES_SELECT,
    "clip80": IMAGENET_TEMPLATES,
    "imagenet60": IMAGENET_TEMPLATES_60,
})


# Per-method template tables of the official code of the CoOp successors, as overrides of the datasets' own
# hand-crafted templates (registry key -> template); datasets not listed use their own. Sources: the official
# trainers' CUSTOM_TEMPLATES dicts.

KGCOOP_TEMPLATES: Mapping[str, str] = MappingProxyType({
    "dtd": "a photo of a {}, a type of texture.",
})
"""KgCoOp's hand-crafted templates (htyao89/KgCoOp trainers/kgcoop.py): CoOp's, except DTD."""

PROGRAD_TEMPLATES: Mapping[str, str] = MappingProxyType({
    "oxford_pets": "a type of pet, a photo of a {}.",
    "oxford_flowers": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.",
    "dtd": "a texture of {}.",
    "food101": "a type of food, a photo of {}.",
})
"""ProGrad's zero-shot templates, class name last (BeierZhu/Prompt-align trainers/prograd.py)."""

TCP_TEMPLATES: Mapping[str, str] = MappingProxyType({
    "fgvc_aircraft": "a photo of an aircraft {}.",
    "dtd": "a photo of a {}, a type of texture.",
    "food101": "a photo of a {}, a type of food.",
})
"""TCP's hand-crafted templates for the class-aware tokens and the knowledge loss (TCP trainers/tcp.py
``CUSTOM_TEMPLATES_ori``)."""

TCP_PROMPT_TEMPLATES: Mapping[str, str] = MappingProxyType({
    "oxford_pets": "{}, a type of pet.",
    "oxford_flowers": "{}, a type of flower.",
    "fgvc_aircraft": "{}, a type of aircraft.",
    "dtd": "{} texture.",
    "stanford_cars": "{}, a type of car",
    "food101": "{}, a type of food.",
    "ucf101": "person doing {}.",
})
"""What follows TCP's learned context in its prompts (TCP trainers/tcp.py ``CUSTOM_TEMPLATES`` with the four
context words removed); "{}." for the datasets not listed. StanfordCars has no final period in the official table."""


def method_template(table: Mapping[str, str], dataset: str | None, fallback: str) -> str:
    """``table``'s template for ``dataset`` (any spelling the dataset registry knows), else ``fallback``."""
    if dataset is None:
        return fallback
    return table.get(key_of(dataset), fallback)


def dataset_template(name: str) -> str:
    """The hand-crafted template of a built-in dataset (any spelling the dataset registry knows)."""
    info = lookup(name)
    if info is None:
        raise ConfigError(f"no hand-crafted template is known for dataset {name!r} (known: {', '.join(DATASETS)}); "
                          "pass a template with one '{}' for the class name instead")
    return info.template


def template_set(name: str) -> tuple[str, ...]:
    """A named template set (:data:`TEMPLATE_SETS`)."""
    try:
        return TEMPLATE_SETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown template set {name!r}: use one of {', '.join(TEMPLATE_SETS)}, or pass your own templates"
        ) from None


def check_template(template: str) -> str:
    """Return ``template`` if it holds exactly one ``{}`` placeholder, else raise :class:`ConfigError`."""
    if not isinstance(template, str):
        raise ConfigError(f"a template must be a string, got {type(template).__name__}: {template!r}")
    count = template.count(PLACEHOLDER)
    if count != 1:
        raise ConfigError(
            f"template {template!r} has {count} '{{}}' placeholders; it needs exactly one, where the class name goes "
            f"(e.g. {DEFAULT_TEMPLATE!r})"
        )
    return template


def check_templates(templates: Iterable[str]) -> tuple[str, ...]:
    """Validate several templates (at least one, each with one ``{}``); duplicates are dropped, order kept."""
    checked = tuple(dict.fromkeys(check_template(template) for template in templates))
    if not checked:
        raise ConfigError("the template list is empty: give at least one template with '{}' for the class name")
    return checked


def fill(template: str, classname: str) -> str:
    """The prompt of one class: ``template`` with its ``{}`` replaced by ``classname`` (no other formatting)."""
    return template.replace(PLACEHOLDER, classname, 1)
