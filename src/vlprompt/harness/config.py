"""The configuration of one run: :class:`RunConfig` (method, data, backbone, seed, training), its stable hash, and
the keys that may change when an interrupted run is resumed.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Mapping
from types import MappingProxyType
from dataclasses import dataclass, field
from typing import Any

from vlprompt.common.vocab import DEFAULT_MODEL, SUBSETS, Subset
from vlprompt.errors import ConfigError
from vlprompt.methods.recipe import RecipeContext
from vlprompt.common.options import check_choice, check_int, config_to_dict, json_values, known_fields, option
from vlprompt.methods import get_method, method_config
from vlprompt.training.config import (
    TRAIN_NON_IDENTITY_FIELDS,
    TrainConfig,
    drop_later_defaults,
    resolve_train_config,
    stable_hash,
)

# --------------------------------------------------------------------------------------------------------- RunConfig

# keys that may change between an interrupted run and its resumption without changing its results
NON_IDENTITY_KEYS: tuple[str, ...] = ("root", *(f"train.{name}" for name in TRAIN_NON_IDENTITY_FIELDS))

FORMER_VALUES: Mapping[str, Any] = MappingProxyType({
    "train.crop_scale_min": 0.08,  # 0.1: training views cropped at scale (0.08, 1), not an option
    "train.optimizer": None,  # 0.1: SGD only (None = SGD)
    "train.adam_eps": None,  # 0.1: no Adam
    "train.activation_checkpointing": False,  # 0.1: no image-in-the-loop training
    "train.steps": None,  # 0.1: the length in epochs only
    "train.min_lr": 0.0,  # 0.1: cosine to 0
})
"""The compatibility rule of saved run configurations, in one place: the keys added after vlprompt 0.1 (whose
``config.json`` lacks them), each with the value that means what 0.1 did. :func:`with_former_values` fills a
configuration with them where they are missing (``rundir.config_differences`` and ``rundir.read_run_config`` apply
it), so a 0.1 run folder compares equal to the same run described today, resumes, and keeps its configuration hash
(the same values are left out of the identity: :data:`~vlprompt.training.config.LATER_DEFAULTS`). A changed default is not a missing key: 0.1 saved
``train.precision`` (fp32, its default), so resuming a 0.1 run takes ``--precision fp32`` now that the default is
auto."""


def with_former_values(data: Mapping[str, Any]) -> dict[str, Any]:
    """A saved configuration (a JSON object) with each :data:`FORMER_VALUES` key it lacks set to that value (only
    where its parent object is there: a damaged file stays damaged)."""
    out = json.loads(json.dumps(dict(data)))
    for dotted, value in FORMER_VALUES.items():
        *parents, leaf = dotted.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf not in node:
            node[leaf] = value
    return out


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run. ``seed`` is the run's one seed; it is copied into ``train.seed``."""

    method: str
    dataset: str = option(dataclasses.MISSING, "a built-in dataset (see `vlprompt data list`) or your own: folder:PATH, "
                                               "csv:FILE, json:FILE")
    method_config: Any = field(default_factory=dict)
    """the method's typed config (its registry entry's ``config_cls``); a mapping of its fields is accepted and
    parsed (defaults filled in, unknown fields refused)"""
    root: str = ""
    shots: int = option(16, "training images per class (1, 2, 4, 8, 16 in the papers; 0 = every training image)")
    seed: int = option(1, "the run's seed: few-shot sample, initialisation, augmentation, data order")
    model: str = option(DEFAULT_MODEL, "CLIP backbone: an OpenAI name (RN50, ViT-B/16, ...), a checkpoint file or a "
                                       "Hugging Face folder / hub id")
    subset: Subset = option("all", "classes to train and test on: all, or the base / new half for base-to-novel")
    train: TrainConfig = field(default_factory=TrainConfig)
    budget: bool = option(False, "mark the results as a smoke test (reduced budget), never mixed with full results")
    protocol: str | None = option(
        None, "the protocol setting of the run (fewshot, base2novel, crossdataset, domainshift), recorded with the "
              "results: the methods' defaults follow its official recipe (e.g. PromptSRC few-shot: 50 epochs; "
              "crossdataset / domainshift: MaPLe and PromptSRC at prompt depth 3, MaPLe 2 epochs; base2novel: KgCoOp "
              "batch 128); none, or another label (it only labels the results), = base2novel's recipe with --subset "
              "base/new, else fewshot's; explicit options always win")
    max_test_images: int | None = option(None, "evaluate on a fixed subset of at most this many test images per "
                                                "dataset (smoke tests); none = all")
    skip_bad_images: bool = option(False, "leave out unreadable images (counted and listed in the results) instead "
                                          "of stopping with the list of them")

    def __post_init__(self) -> None:
        for name in ("method", "dataset", "model"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
        if not isinstance(self.root, str):
            raise ConfigError(f"root must be a path string, got {self.root!r}")
        check_int("shots", self.shots, minimum=0)
        check_int("seed", self.seed, minimum=0)
        check_choice("subset", self.subset, SUBSETS)
        if not isinstance(self.train, TrainConfig):
            raise ConfigError(f"train must be a TrainConfig, got {type(self.train).__name__}")
        if not isinstance(self.budget, bool):
            raise ConfigError(f"budget must be true or false, got {self.budget!r}")
        check_int("max_test_images", self.max_test_images, minimum=1, optional=True)
        if not isinstance(self.skip_bad_images, bool):
            raise ConfigError(f"skip_bad_images must be true or false, got {self.skip_bad_images!r}")
        if self.protocol is not None and (not isinstance(self.protocol, str) or not self.protocol):
            raise ConfigError(f"protocol must be a non-empty string or null, got {self.protocol!r}")
        # the method's fields left to the recipe (None) are filled here, from this run's setting, so that the config
        # (and config.json) holds the values the run uses; a dataclasses.replace keeps them (they are explicit then)
        object.__setattr__(self, "method_config", method_config(get_method(self.method), self.method_config,
                                                                self.recipe_context))
        if self.train.seed != self.seed:
            object.__setattr__(self, "train", dataclasses.replace(self.train, seed=self.seed))

    @property
    def recipe_context(self) -> RecipeContext:
        """The setting that selects the method's official recipe (shots, dataset, subset, protocol)."""
        return RecipeContext(shots=self.shots, dataset=self.dataset, subset=self.subset, protocol=self.protocol)

    def resolved(self) -> RunConfig:
        """This configuration with the method's training defaults of its setting filled in (epochs, batch size, lr,
        ...: :func:`~vlprompt.training.config.resolve_train_config`)."""
        train = resolve_train_config(self.train, method=self.method, shots=self.shots, dataset=self.dataset,
                                     subset=self.subset, protocol=self.protocol)
        return dataclasses.replace(self, train=train)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the method's config as its fields; tuples become lists)."""
        data = dataclasses.asdict(self)
        data["method_config"] = json_values(config_to_dict(self.method_config), "method_config")
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        kwargs = known_fields(cls, data, "run")
        if "train" in kwargs:
            train = kwargs["train"]
            if not isinstance(train, Mapping):
                raise ConfigError(f"train must be an object of training options, got {train!r}")
            kwargs["train"] = TrainConfig.from_dict(train)
        return cls(**kwargs)

    def identity_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without :data:`NON_IDENTITY_KEYS` (paths and devices) and without the training options
        that hold their :data:`~vlprompt.training.config.LATER_DEFAULTS`: what makes two runs the same."""
        data = _drop_keys(self.to_dict(), NON_IDENTITY_KEYS)
        data["train"] = drop_later_defaults(data["train"])
        return data

    def config_hash(self) -> str:
        """Stable 16-hex-digit SHA-256 of :meth:`identity_dict` (canonical JSON, sorted keys)."""
        return stable_hash(self.identity_dict())


def _drop_keys(data: dict[str, Any], dotted: Collection[str]) -> dict[str, Any]:
    out = json.loads(json.dumps(data))
    for key in dotted:
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.get(part, {})
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


