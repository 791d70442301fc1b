"""One way to declare an option and one generator of command-line options for every command.

A configuration is a frozen dataclass whose fields are declared with :func:`option` (a default, the help text, and
for a closed set of values its ``choices``) and validated in ``__post_init__`` with the ``check_*`` helpers, which
raise :class:`~vlprompt.errors.ConfigError`. :func:`config_to_dict` / :func:`config_from_dict` turn one into JSON
values and back (unknown keys are an error). :func:`argparse_kwargs` maps a field's type to argparse keywords, and
:func:`add_dataclass_arguments` / :func:`dataclass_from_args` add a whole dataclass as ``--flags`` and read it back
(the method options of :mod:`vlprompt.harness.cli.method_options` use the same keyword mapping). Spellings on the
command line: ``none`` (or ``null``) for an optional value left unset, several values for a tuple
(``--c-grid 1 0.01``), ``--flag / --no-flag`` for a bool.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import math
import textwrap
import types
import typing
from collections.abc import Collection, Mapping
from dataclasses import field
from typing import Any, Literal, TypeVar

from vlprompt.errors import ConfigError

ConfigT = TypeVar("ConfigT")
NONE_WORDS: tuple[str, ...] = ("none", "null")
"""What the command line accepts for an optional value left unset."""


def option(default: Any, help: str, *, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field with its command-line help (and closed set of values) in ``metadata``."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


# ------------------------------------------------------------------------------------------------------- validation


def check_number(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
                 strict: bool = False, maximum_open: bool = False, prefix: str = "") -> None:
    """A ConfigError unless ``value`` is a finite number within the bounds (``strict``/``maximum_open``: exclusive)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{prefix}{name} must be a finite number, got {value!r}")
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        bound = f"greater than {minimum}" if strict else f"at least {minimum}"
        raise ConfigError(f"{prefix}{name} must be {bound}, got {value!r}")
    if maximum is not None and (value > maximum or (maximum_open and value == maximum)):
        bound = f"smaller than {maximum}" if maximum_open else f"at most {maximum}"
        raise ConfigError(f"{prefix}{name} must be {bound}, got {value!r}")


def check_int(name: str, value: Any, *, minimum: int, optional: bool = False, prefix: str = "") -> None:
    """A ConfigError unless ``value`` is an integer of at least ``minimum`` (or None when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an integer or null" if optional else "an integer"
        raise ConfigError(f"{prefix}{name} must be {kind}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{prefix}{name} must be at least {minimum}, got {value}")


def check_choice(name: str, value: Any, choices: Collection[Any], prefix: str = "") -> None:
    """A ConfigError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{prefix}{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


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


def argparse_kwargs(hint: Any, name: str, choices: Collection[Any] | None = None) -> dict[str, Any]:
    """argparse keyword arguments (type/choices/nargs/action/metavar) for a field of type ``hint`` (``choices``
    from its metadata). The one mapping from field types to command-line syntax."""
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
        return {"type": item, "nargs": "+", "metavar": item.__name__.upper()}
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
        if optional and text.lower() in NONE_WORDS:
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


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default (its factory's value), else ``dataclasses.MISSING``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


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
        kwargs = argparse_kwargs(hints[f.name], f.name, f.metadata.get("choices"))
        help_text = field_help(cls, f.name)
        default = field_default(f)
        if default is not dataclasses.MISSING and kwargs.get("action") is not argparse.BooleanOptionalAction:
            # None that stands for the method's value (TrainConfig's resolved fields say so in their help)
            method_default = default is None and "default: the method's" in help_text
            shown = "method default" if method_default else default
            shown = "''" if shown == "" else ("none" if shown is None else shown)
            help_text = f"{help_text} (default: {shown})".strip()
        flag = "--" + (prefix + f.name).replace("_", "-")
        parser.add_argument(flag, dest=_dest(prefix, f.name), default=argparse.SUPPRESS,
                            required=default is dataclasses.MISSING, help=help_text.replace("%", "%%"), **kwargs)


def dataclass_from_args(cls: type, args: argparse.Namespace, prefix: str = "", *, base: Any = None,
                        fixed: Mapping[str, Any] | None = None) -> Any:
    """Build ``cls`` from the options :func:`add_dataclass_arguments` added (those given on the command line override
    ``base``, or the defaults; ``fixed`` fields are set by the command itself). Sequences become tuples when the field
    is a tuple. Validation errors are ConfigError."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        dest = _dest(prefix, f.name)
        if f.init and hasattr(args, dest):
            value = getattr(args, dest)
            if typing.get_origin(hints[f.name]) is tuple and isinstance(value, list):
                value = tuple(value)
            values[f.name] = value
    values.update(fixed or {})
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except TypeError as exc:
        raise ConfigError(f"cannot build {cls.__name__} from the options: {exc}") from exc


def json_values(value: Any, name: str) -> Any:
    """``value`` through JSON (tuples become lists); ConfigError when it holds anything but JSON values."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must hold only JSON values (numbers, strings, lists, objects): {exc}") from exc


def known_fields(cls: type, data: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``data`` as keyword arguments of dataclass ``cls``; ConfigError for a non-mapping, unknown keys or missing
    required keys (fields without a default)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} configuration must be an object, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown {what} configuration key(s) {', '.join(map(repr, unknown))}; "
                          f"known keys: {', '.join(names)}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"the {what} configuration lacks the required key(s) {', '.join(map(repr, missing))}")
    return dict(data)




# ------------------------------------------------------------------------------------------------- serialisation


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
