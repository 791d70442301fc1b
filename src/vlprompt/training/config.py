"""Typed run configuration with the papers' defaults, its validation, and argparse options generated from it.

:class:`TrainConfig` holds the reference recipe of CoOp/CoCoOp (Dassl engine): SGD lr 0.002, momentum 0.9, weight
decay 5e-4, one constant warm-up epoch at 1e-5 then cosine decay. ``epochs`` and ``batch_size`` left at ``None`` mean
"the method's default" (each MethodSpec's ``train_defaults``: CoOp batch 32 and 50 / 100 / 100 / 200 / 200 epochs for
1 / 2 / 4 / 8 / 16 shots, ImageNet 50; CoCoOp batch 1, 10 epochs); :func:`resolve_train_config` fills them in, and the
resolved values are what a run folder saves. :class:`RunConfig` describes a whole run (method, data, backbone, seed, training) and has a stable
:meth:`RunConfig.config_hash`.

:func:`add_dataclass_arguments` / :func:`dataclass_from_args` turn any such dataclass (these, and the methods'
configs) into command-line options, with the field's help text. Help comes from ``field(metadata={"help": ...})`` or,
failing that, from the string literal written right under the field (attribute docstring).

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import inspect
import json
import math
import re
import textwrap
import types
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from vlprompt.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]
Subset = Literal["all", "base", "new"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
SUBSETS: tuple[str, ...] = typing.get_args(Subset)

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _opt(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's keyword
    """A dataclass field with a default and its command-line help text."""
    return field(default=default, metadata={"help": help})


# ------------------------------------------------------------------------------------------------------- TrainConfig


@dataclass(frozen=True)
class TrainConfig:
    """How a gradient-trained method (CoOp, CoCoOp, ...) is optimised; defaults are the reference recipe.

    ``epochs`` / ``batch_size`` = None stand for the method's defaults (:func:`resolve_train_config`).
    """

    lr: float = _opt(0.002, "base learning rate of SGD")
    momentum: float = _opt(0.9, "SGD momentum (dampening 0, no Nesterov)")
    weight_decay: float = _opt(5e-4, "SGD weight decay (L2) on the learned parameters")
    epochs: int | None = _opt(None, "training epochs; default: the method's (CoOp 50/100/100/200/200 for "
                                    "1/2/4/8/16 shots, ImageNet 50; CoCoOp 10)")
    batch_size: int | None = _opt(None, "training batch size (the global batch under torchrun); "
                                        "default: the method's (CoOp 32, CoCoOp 1)")
    warmup_epochs: int = _opt(1, "epochs at the constant warm-up learning rate before the cosine schedule")
    warmup_lr: float = _opt(1e-5, "constant learning rate of the warm-up epochs")
    precision: Precision = _opt("fp32", "compute precision of training: fp32, or bf16/fp16 autocast "
                                        "(learned parameters stay fp32; fp16 uses loss scaling)")
    device: str = _opt("auto", "auto (CUDA when available), cpu, cuda or cuda:N")
    seed: int = _opt(1, "the one seed of a run: few-shot sampling, initialisation, augmentation, data order")
    views: int | Literal["epochs"] = _opt("epochs", "augmented views of each training image, a pool shared by all "
                                                    "runs and cached (epoch e shows image i its view "
                                                    "(e + offset_i) % V, offsets drawn from the seed); 'epochs' (the "
                                                    "default) = a fresh augmentation every epoch as in the reference; "
                                                    "fewer views extract faster; 0 = no augmentation")
    num_workers: int = _opt(0, "image loading worker processes for feature extraction")
    tensorboard: bool = _opt(False, "also write TensorBoard scalars into the run folder")

    def __post_init__(self) -> None:
        _check_number("lr", self.lr, minimum=0.0, strict=True)
        _check_number("momentum", self.momentum, minimum=0.0, maximum=1.0, maximum_open=True)
        _check_number("weight_decay", self.weight_decay, minimum=0.0)
        _check_int("epochs", self.epochs, minimum=1, optional=True)
        _check_int("batch_size", self.batch_size, minimum=1, optional=True)
        _check_int("warmup_epochs", self.warmup_epochs, minimum=0)
        _check_number("warmup_lr", self.warmup_lr, minimum=0.0, strict=True)
        _check_choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.device, str) or not _DEVICE_PATTERN.match(self.device):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _check_int("seed", self.seed, minimum=0)
        if self.views != "epochs":
            if isinstance(self.views, str):
                raise ConfigError(f"train.views must be a non-negative integer or 'epochs', got {self.views!r}")
            _check_int("views", self.views, minimum=0)
        _check_int("num_workers", self.num_workers, minimum=0)
        if not isinstance(self.tensorboard, bool):
            raise ConfigError(f"train.tensorboard must be true or false, got {self.tensorboard!r}")
        if self.epochs is not None and self.warmup_epochs >= self.epochs:
            raise ConfigError(f"train.warmup_epochs ({self.warmup_epochs}) must be smaller than train.epochs "
                              f"({self.epochs}); lower --warmup-epochs or raise --epochs")

    @property
    def is_resolved(self) -> bool:
        """True once ``epochs`` and ``batch_size`` are concrete numbers."""
        return self.epochs is not None and self.batch_size is not None

    @property
    def num_views(self) -> int:
        """The number of augmented views to extract (``views`` with 'epochs' resolved); needs ``epochs``."""
        if self.views != "epochs":
            return int(self.views)
        if self.epochs is None:
            raise ConfigError("train.views='epochs' needs train.epochs: resolve the configuration first")
        return self.epochs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys are an error."""
        return cls(**_known_kwargs(cls, data, "train"))


# ---------------------------------------------------------------------------------------------- method defaults


def method_train_defaults(method: str, shots: int, dataset: str) -> dict[str, Any]:
    """The method's reference ``epochs`` / ``batch_size`` (from its MethodSpec in ``vlprompt.methods.METHODS``).

    CoOp: batch 32, epochs 50 / 100 / 100 / 200 / 200 for 1 / 2 / 4 / 8 / 16 shots, ImageNet 50; CoCoOp: batch 1,
    10 epochs. Empty for methods that are not trained by SGD.
    """
    from vlprompt.methods import get_method  # light: the registry module imports no torch

    defaults = get_method(method).train_defaults(shots, dataset)
    return {key: defaults[key] for key in ("epochs", "batch_size") if key in defaults}


def resolve_train_config(train: TrainConfig, *, method: str, shots: int, dataset: str) -> TrainConfig:
    """``train`` with ``epochs`` / ``batch_size`` that were left at None replaced by the method's defaults.

    Methods without SGD training (no defaults) keep None there.
    """
    defaults = method_train_defaults(method, shots, dataset)
    epochs = train.epochs if train.epochs is not None else defaults.get("epochs")
    batch_size = train.batch_size if train.batch_size is not None else defaults.get("batch_size")
    if epochs is not None and train.warmup_epochs >= epochs:
        raise ConfigError(f"train.warmup_epochs ({train.warmup_epochs}) must be smaller than the {epochs} epochs of "
                          f"{method}; lower --warmup-epochs or raise --epochs")
    return dataclasses.replace(train, epochs=epochs, batch_size=batch_size)


# --------------------------------------------------------------------------------------------------------- RunConfig

# keys that may change between an interrupted run and its resumption without changing its results
NON_IDENTITY_KEYS: tuple[str, ...] = ("root", "train.device", "train.num_workers", "train.tensorboard")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run. ``seed`` is the run's one seed; it is copied into ``train.seed``."""

    method: str
    dataset: str
    method_config: dict[str, Any] = field(default_factory=dict)
    root: str = ""
    shots: int = 16
    seed: int = 1
    model: str = "ViT-B/16"
    subset: Subset = "all"
    train: TrainConfig = field(default_factory=TrainConfig)
    budget: bool = False
    protocol: str | None = None
    max_test_images: int | None = None
    """evaluate on a fixed subset of at most this many test images per dataset (smoke tests); None = all"""
    skip_bad_images: bool = False
    """leave out unreadable images (listed and counted in the results) instead of stopping the run"""

    def __post_init__(self) -> None:
        for name in ("method", "dataset", "model"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
        if not isinstance(self.root, str):
            raise ConfigError(f"root must be a path string, got {self.root!r}")
        if not isinstance(self.method_config, Mapping):
            raise ConfigError(f"method_config must be a mapping of option names to values, got {self.method_config!r}")
        _check_int("shots", self.shots, minimum=0, prefix="")
        _check_int("seed", self.seed, minimum=0, prefix="")
        _check_choice("subset", self.subset, SUBSETS, prefix="")
        if not isinstance(self.train, TrainConfig):
            raise ConfigError(f"train must be a TrainConfig, got {type(self.train).__name__}")
        if not isinstance(self.budget, bool):
            raise ConfigError(f"budget must be true or false, got {self.budget!r}")
        _check_int("max_test_images", self.max_test_images, minimum=1, optional=True, prefix="")
        if not isinstance(self.skip_bad_images, bool):
            raise ConfigError(f"skip_bad_images must be true or false, got {self.skip_bad_images!r}")
        if self.protocol is not None and (not isinstance(self.protocol, str) or not self.protocol):
            raise ConfigError(f"protocol must be a non-empty string or null, got {self.protocol!r}")
        object.__setattr__(self, "method_config", dict(self.method_config))
        if self.train.seed != self.seed:
            object.__setattr__(self, "train", dataclasses.replace(self.train, seed=self.seed))

    def resolved(self) -> RunConfig:
        """This configuration with the method's default epochs and batch size filled in."""
        train = resolve_train_config(self.train, method=self.method, shots=self.shots, dataset=self.dataset)
        return dataclasses.replace(self, train=train)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (method_config normalised through JSON, so tuples become lists)."""
        data = dataclasses.asdict(self)
        data["method_config"] = _json_roundtrip(self.method_config, "method_config")
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        kwargs = _known_kwargs(cls, data, "run")
        if "train" in kwargs:
            train = kwargs["train"]
            if not isinstance(train, Mapping):
                raise ConfigError(f"train must be an object of training options, got {train!r}")
            kwargs["train"] = TrainConfig.from_dict(train)
        return cls(**kwargs)

    def identity_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without :data:`NON_IDENTITY_KEYS` (paths and devices): what makes two runs the same."""
        return _drop_keys(self.to_dict(), NON_IDENTITY_KEYS)

    def config_hash(self) -> str:
        """Stable 16-hex-digit SHA-256 of :meth:`identity_dict` (canonical JSON, sorted keys)."""
        return stable_hash(self.identity_dict())


def stable_hash(data: Mapping[str, Any]) -> str:
    """16-hex-digit SHA-256 of ``data`` as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:16]


def train_identity(train: TrainConfig) -> dict[str, Any]:
    """The training options that change the learned parameters (device, workers and logging left out)."""
    return _drop_keys({"train": train.to_dict()}, NON_IDENTITY_KEYS)["train"]


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


def _json_roundtrip(value: Any, name: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must hold only JSON values (numbers, strings, lists, objects): {exc}") from exc


def _known_kwargs(cls: type, data: Mapping[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} configuration must be an object, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown {what} configuration key(s) {', '.join(map(repr, unknown))}; "
                          f"known keys: {', '.join(names)}")
    return dict(data)


# ------------------------------------------------------------------------------------------------------- validation


def _check_number(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
                  strict: bool = False, maximum_open: bool = False, prefix: str = "train.") -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{prefix}{name} must be a finite number, got {value!r}")
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        bound = f"greater than {minimum}" if strict else f"at least {minimum}"
        raise ConfigError(f"{prefix}{name} must be {bound}, got {value!r}")
    if maximum is not None and (value > maximum or (maximum_open and value == maximum)):
        bound = f"smaller than {maximum}" if maximum_open else f"at most {maximum}"
        raise ConfigError(f"{prefix}{name} must be {bound}, got {value!r}")


def _check_int(name: str, value: Any, *, minimum: int, optional: bool = False, prefix: str = "train.") -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an integer or null" if optional else "an integer"
        raise ConfigError(f"{prefix}{name} must be {kind}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{prefix}{name} must be at least {minimum}, got {value}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...], prefix: str = "train.") -> None:
    if value not in choices:
        raise ConfigError(f"{prefix}{name} must be one of {', '.join(choices)}, got {value!r}")


# ------------------------------------------------------------------------------------------- argparse generation


def field_help(cls: type, name: str) -> str:
    """Help text of a dataclass field: ``metadata["help"]``, else its attribute docstring, else ''."""
    for f in dataclasses.fields(cls):
        if f.name == name and "help" in f.metadata:
            return str(f.metadata["help"])
    return _attribute_docstrings(cls).get(name, "")


def _attribute_docstrings(cls: type) -> dict[str, str]:
    """``{field: docstring}`` for string literals written right below annotated class attributes."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _option_type(hint: Any, name: str, choices: Collection[Any] | None = None) -> dict[str, Any]:
    """argparse keyword arguments (type/choices/nargs/action) for one field type (``choices`` from metadata)."""
    if choices is not None and hint in (int, float, str):
        return {"type": hint, "choices": list(choices)}
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if hint in (int, float, str):
        return {"type": hint}
    if origin is Literal:
        if all(isinstance(a, str) for a in args):
            return {"choices": list(args)}
        return {"type": type(args[0]), "choices": list(args)}
    if origin in (list, tuple, Collection) and args:
        item = args[0]
        if item not in (int, float, str) or (origin is tuple and len(args) == 2 and args[1] is not Ellipsis):
            raise TypeError(f"field {name!r}: unsupported sequence type {hint!r}")
        return {"type": item, "nargs": "*"}
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        optional = len(members) < len(args)
        literals = [v for m in members if typing.get_origin(m) is Literal for v in typing.get_args(m)]
        scalars = [m for m in members if m in (int, float, str)]
        if len(scalars) + (1 if literals else 0) != len(members) or len(scalars) > 1:
            raise TypeError(f"field {name!r}: unsupported union type {hint!r}")
        scalar = scalars[0] if scalars else None
        return {"type": _union_parser(scalar, literals, optional),
                "metavar": _union_metavar(scalar, literals, optional)}
    raise TypeError(f"field {name!r}: type {hint!r} cannot be turned into a command-line option")


def _union_parser(scalar: type | None, literals: list[Any], optional: bool):
    def parse(text: str) -> Any:
        if text in literals:
            return text
        if optional and text.lower() in ("none", "null", "default"):
            return None
        if scalar is not None:
            try:
                return scalar(text)
            except ValueError:
                pass
        expected = [scalar.__name__] if scalar is not None else []
        expected += [repr(v) for v in literals] + (["none"] if optional else [])
        raise argparse.ArgumentTypeError(f"expected {' or '.join(expected)}, got {text!r}")

    return parse


def _union_metavar(scalar: type | None, literals: list[Any], optional: bool) -> str:
    parts = ([scalar.__name__.upper()] if scalar is not None else []) + [str(v) for v in literals]
    return "|".join(parts + (["none"] if optional else []))


def _dest(prefix: str, name: str) -> str:
    return (prefix.replace("-", "_") + name) if prefix else name


def add_dataclass_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, prefix: str = "",
                            *, exclude: Collection[str] = ()) -> None:
    """Add one ``--{prefix}{field-name}`` option per field of dataclass ``cls`` (help = the field's help).

    Options that are not given stay absent from the parsed namespace (``argparse.SUPPRESS``), so
    :func:`dataclass_from_args` keeps the dataclass default for them. bool fields become ``--flag/--no-flag``,
    Literal fields and fields with ``metadata["choices"]`` get choices, ``int | None`` fields accept ``none``, sequences take several values.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        kwargs = _option_type(hints[f.name], f.name, f.metadata.get("choices"))
        help_text = field_help(cls, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if default is not dataclasses.MISSING and kwargs.get("action") is not argparse.BooleanOptionalAction:
            shown = "method default" if default is None and f.name in ("epochs", "batch_size") else default
            shown = "''" if shown == "" else shown
            help_text = f"{help_text} (default: {shown})".strip()
        option = "--" + (prefix + f.name).replace("_", "-")
        parser.add_argument(option, dest=_dest(prefix, f.name), default=argparse.SUPPRESS,
                            help=help_text.replace("%", "%%"), **kwargs)


def dataclass_from_args(cls: type, args: argparse.Namespace, prefix: str = "", *, base: Any = None) -> Any:
    """Build ``cls`` from the options :func:`add_dataclass_arguments` added (those given on the command line override
    ``base``, or the defaults). Sequences become tuples when the field is a tuple. Validation errors are ConfigError."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        dest = _dest(prefix, f.name)
        if f.init and hasattr(args, dest):
            value = getattr(args, dest)
            if typing.get_origin(hints[f.name]) is tuple and isinstance(value, list):
                value = tuple(value)
            values[f.name] = value
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except TypeError as exc:
        raise ConfigError(f"cannot build {cls.__name__} from the options: {exc}") from exc
