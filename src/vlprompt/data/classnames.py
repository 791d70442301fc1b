"""Class names for prompts: cleaning (underscores to spaces, as the reference trainers do) and user name files.

A *names file* gives class names, either all of them in label order or some of them by key:

- ``.json``: a list of names in label order, or an object ``{key: name}``;
- ``.txt`` (any other suffix): one name per line in label order, or ``key<TAB>name`` lines (every line with a tab).

A key is a class's raw name (folder name, name in the split file), its cleaned name, or its label as a decimal string.
The same format serves as an *override file* for any dataset (built-in or custom): the names it gives replace the
cleaned ones; the others keep theirs. Two classes may not end up with the same name (compared as CLIP reads them:
case and spacing ignored), unless the dataset itself names them alike (ImageNet's two "crane" classes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from vlprompt.common.io import read_text
from vlprompt.data.listing import format_offenders
from vlprompt.errors import DatasetError

# a names file: all names in label order, or some names by key
NamesSpec = list[str] | dict[str, str]


def clean_classname(name: str) -> str:
    """The prompt form of a raw class name: underscores become spaces (the reference's ``replace("_", " ")``)."""
    return name.replace("_", " ").strip()


def read_names_file(path: str | Path) -> NamesSpec:
    """Read a names / override file (see the module docstring) into a list (label order) or a ``{key: name}`` dict."""
    path = Path(path)
    try:
        text = read_text(path, "class names file", DatasetError)
    except FileNotFoundError:
        raise DatasetError(f"class names file {path} does not exist.") from None
    if path.suffix.lower() == ".json":
        return _names_from_json(text, path)
    lines = [line.strip("\r") for line in text.split("\n")]
    lines = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise DatasetError(f"class names file {path} is empty: write one class name per line.")
    tabbed = [line for line in lines if "\t" in line]
    if tabbed and len(tabbed) != len(lines):
        raise DatasetError(
            f"class names file {path} mixes 'key<TAB>name' lines and plain lines: use one form for every line."
        )
    if tabbed:
        mapping: dict[str, str] = {}
        for line in lines:
            key, _, name = line.partition("\t")
            mapping[key.strip()] = name.strip()
        return mapping
    return [line.strip() for line in lines]


def _names_from_json(text: str, path: Path) -> NamesSpec:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"class names file {path} is not valid JSON: {exc}") from None
    if isinstance(data, list) and all(isinstance(n, str) for n in data):
        return list(data)
    if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
        return {str(k): v for k, v in data.items()}
    raise DatasetError(
        f"class names file {path} must hold a JSON list of names in label order or an object {{class: name}}."
    )


def prompt_key(name: str) -> str:
    """What a class name becomes in a prompt as far as CLIP can tell: its tokenizer lowercases and splits on spaces,
    so ``"Sea  Lion"`` and ``"sea lion"`` give the same prompt."""
    return " ".join(name.lower().split())


def same_named(names: Sequence[str]) -> dict[str, list[int]]:
    """``{name: labels}`` of the names that several labels share (compared by :func:`prompt_key`)."""
    labels: dict[str, list[int]] = {}
    first: dict[str, str] = {}
    for label, name in enumerate(names):
        key = prompt_key(name)
        labels.setdefault(key, []).append(label)
        first.setdefault(key, name)
    return {first[key]: found for key, found in labels.items() if len(found) > 1}


def same_name_message(shared: Mapping[str, list[int]], source: str) -> str:
    """The refusal of classes that share a name: which names, which labels, and what to do."""
    listed = [f"{name!r} (labels {', '.join(map(str, labels))})" for name, labels in shared.items()]
    return (f"{source} gives several classes the same name: {format_offenders(listed)}; their prompts would be "
            "identical, so no classifier can tell them apart: give each class its own name")


def apply_names(raw_names: Sequence[str], *layers: tuple[NamesSpec | None, str]) -> list[str]:
    """Cleaned prompt names for ``raw_names`` (label order), with each ``(names, source)`` layer applied in turn.

    A list layer must name every class; a mapping layer may name some, by raw name, cleaned name, current name or
    label; a key that matches no class raises :class:`DatasetError` (it is almost always a typo). ``source`` names the
    file in messages.
    """
    current = [clean_classname(n) for n in raw_names]
    for names, source in layers:
        if names is None:
            continue
        if isinstance(names, list):
            if len(names) != len(raw_names):
                raise DatasetError(
                    f"{source} lists {len(names)} names but the dataset has {len(raw_names)} classes: give one name "
                    "per class in label order, or use 'key<TAB>name' lines / a JSON object to rename only some."
                )
            current = [n.strip() for n in names]
        else:
            current = _apply_mapping(raw_names, current, names, source)
    empty = [str(label) for label, name in enumerate(current) if not name]
    if empty:
        raise DatasetError(f"class names must not be empty; labels without a name: {format_offenders(empty)}.")
    own = {prompt_key(name) for name in same_named(raw_names)}  # the dataset's own (ImageNet's two "crane" classes)
    shared = {name: labels for name, labels in same_named(current).items() if prompt_key(name) not in own}
    if shared:
        sources = [source for names, source in layers if names is not None and source]
        raise DatasetError(same_name_message(shared, " and ".join(sources) or "the dataset") + ".")
    return current


def _apply_mapping(raw_names: Sequence[str], current: list[str], names: Mapping[str, str], source: str) -> list[str]:
    index: dict[str, int] = {}
    for label, (raw, now) in enumerate(zip(raw_names, current)):
        for key in (raw, clean_classname(raw), now, str(label)):
            index.setdefault(key, label)
    unknown = [key for key in names if key not in index]
    if unknown:
        raise DatasetError(
            f"{source} names {len(unknown)} classes the dataset does not have: {format_offenders(unknown)}. "
            f"Keys are class names as in the dataset (e.g. {raw_names[0]!r}) or labels (e.g. '0')."
        )
    result = list(current)
    for key, name in names.items():
        result[index[key]] = name.strip()
    return result
