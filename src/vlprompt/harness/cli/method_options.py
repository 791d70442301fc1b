"""Command-line options generated from the methods' config dataclasses (``vlprompt train --n-ctx 4 ...``).

Every field of every registered method's config becomes one ``--flag`` (``n_ctx`` -> ``--n-ctx``). A field that
several methods share (``n_ctx`` of CoOp and CoCoOp) is one flag: its help names the methods that take it and each
one's default. In ``--help`` the flags are grouped by the set of methods that take them. Only the chosen method's
options may be given: :func:`method_options_from_args` raises a ConfigError naming the methods a stray option belongs
to. Options not given are absent from the result, so the method's own defaults apply.

This module imports neither torch nor the methods' implementations (only their configs).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from vlprompt.common.options import argparse_kwargs, field_default, field_help
from vlprompt.errors import ConfigError

DEST_PREFIX = "method_option__"


@dataclass(frozen=True)
class MethodOption:
    """One generated flag: the config field it sets and the methods that have that field."""

    field: str
    methods: tuple[str, ...]

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def dest(self) -> str:
        return DEST_PREFIX + self.field


def collect_options(methods: Mapping[str, Any]) -> list[MethodOption]:
    """The options of ``methods`` (name -> MethodSpec), in order of first appearance."""
    owners: dict[str, list[str]] = {}
    for name, spec in methods.items():
        for f in dataclasses.fields(spec.config_cls):
            if f.init:
                owners.setdefault(f.name, []).append(name)
    return [MethodOption(name, tuple(found)) for name, found in owners.items()]


def add_method_arguments(parser: argparse.ArgumentParser, methods: Mapping[str, Any], *,
                         title: str = "options of {methods} (--method {choices})") -> list[MethodOption]:
    """Add every method option to ``parser``, one argument group per set of methods; returns the options.

    A flag that is already an option of ``parser`` (a training or run option) is a programming error (ValueError).
    """
    options = collect_options(methods)
    existing = {flag for action in parser._actions for flag in action.option_strings}  # noqa: SLF001
    groups: dict[tuple[str, ...], argparse._ArgumentGroup] = {}
    for option in options:
        if option.flag in existing:
            raise ValueError(f"method option {option.flag} ({', '.join(option.methods)}) clashes with an option of "
                             f"'{parser.prog}'; rename the config field")
        group = groups.get(option.methods)
        if group is None:
            group = parser.add_argument_group(title.format(methods=" and ".join(option.methods),
                                                           choices="|".join(option.methods)))
            groups[option.methods] = group
        specs = [methods[name] for name in option.methods]
        group.add_argument(option.flag, dest=option.dest, default=argparse.SUPPRESS,
                           help=_help(option, specs).replace("%", "%%"), **_kwargs(option.field, specs))
    return options


def method_options_from_args(args: argparse.Namespace, method: str, options: Collection[MethodOption]
                             ) -> dict[str, Any]:
    """``{field: value}`` of the options given on the command line; a ConfigError for an option ``method`` lacks."""
    given: dict[str, Any] = {}
    stray: list[str] = []
    for option in options:
        if not hasattr(args, option.dest):
            continue
        if method not in option.methods:
            stray.append(f"{option.flag} (an option of {' and '.join(option.methods)})")
            continue
        value = getattr(args, option.dest)
        given[option.field] = tuple(value) if isinstance(value, list) else value
    if stray:
        raise ConfigError(f"method {method} does not take {', '.join(stray)}; remove it or choose that method")
    return given


# ---------------------------------------------------------------------------------------------------------- helpers


def _help(option: MethodOption, specs: list[Any]) -> str:
    texts = [field_help(spec.config_cls, option.field) for spec in specs]
    defaults = [_default(spec.config_cls, option.field) for spec in specs]
    if len(set(texts)) == 1:
        text = texts[0]
    else:
        text = "; ".join(f"{spec.name}: {t}" for spec, t in zip(specs, texts))
    if defaults[0] is None and len(set(map(repr, defaults))) == 1 and "default: the recipe's" in text:
        shown = "default: by --protocol"  # None = the official recipe of the run's setting (methods.recipe)
    elif len(set(map(repr, defaults))) == 1:
        shown = f"default: {_show(defaults[0])}"
    else:
        shown = "default: " + ", ".join(f"{spec.name} {_show(d)}" for spec, d in zip(specs, defaults))
    prefix = f"[{', '.join(option.methods)}] "
    return f"{prefix}{text} ({shown})"


def _default(cls: type, name: str) -> Any:
    default = next((field_default(f) for f in dataclasses.fields(cls) if f.name == name), None)
    return None if default is dataclasses.MISSING else default


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value)) if value else "none"
    if isinstance(value, str):
        return repr(value) if value else "''"
    if value is None:
        return "unset"
    return str(value)


def _kwargs(name: str, specs: list[Any]) -> dict[str, Any]:
    """argparse keyword arguments for the field ``name`` (:func:`~vlprompt.common.options.argparse_kwargs`); its
    type must agree across ``specs``."""
    hints = [typing.get_type_hints(spec.config_cls)[name] for spec in specs]
    if len({str(h) for h in hints}) != 1:
        raise TypeError(f"config field {name!r} has different types in {', '.join(s.name for s in specs)}: {hints}")
    choices: tuple[Any, ...] | None = None
    for spec in specs:
        for f in dataclasses.fields(spec.config_cls):
            if f.name == name and "choices" in f.metadata:
                choices = tuple(f.metadata["choices"])
    kwargs = argparse_kwargs(hints[0], name, choices)
    if "choices" not in kwargs and kwargs.get("action") is not argparse.BooleanOptionalAction:
        kwargs.setdefault("metavar", name.upper())
    return kwargs
