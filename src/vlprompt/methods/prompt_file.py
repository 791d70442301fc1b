"""Learned prompts as one small safetensors file that knows which backbone it belongs to.

The file holds the method's ``state_dict()`` (only the learned state: CoOp's context, CoCoOp's context and meta-net, the
linear probe's layer, CLIP-Adapter's adapters, Tip-Adapter(-F)'s cache keys / labels and chosen alpha, beta, LP++'s
prototypes and multipliers, CLAP's prototypes; nothing for zero-shot) and string metadata:

``format`` ("vlprompt-prompt"), ``format_version``, ``method`` (registry name), ``config`` (JSON of the method's config),
``classnames`` (JSON list), ``backbone`` (the CLIP's name), ``backbone_fingerprint`` (``clip.fingerprint()``: SHA-256
of architecture and weights), ``vlprompt_version`` and, for a file saved in a run folder, ``run`` (that run's
configuration hash, so a prompt copied in from another run is recognised).

:func:`load_prompt` rebuilds the method on a CLIP and refuses one whose fingerprint differs (naming both backbones).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from vlprompt import __version__
from vlprompt.common.vocab import seeded_torch
from vlprompt.backbone.model import CLIP
from vlprompt.errors import CheckpointError, ConfigError
from vlprompt.common.io import atomic_write_bytes, safetensors_bytes
from vlprompt.methods import METHODS
from vlprompt.methods.base import FrozenClipMethod
from vlprompt.common.options import config_from_dict, config_to_dict

FORMAT = "vlprompt-prompt"
FORMAT_VERSION = 1

__all__ = ["FORMAT", "FORMAT_VERSION", "PromptHeader", "load_prompt", "read_prompt_header", "save_prompt"]


@dataclass(frozen=True)
class PromptHeader:
    """The metadata of a prompt file."""

    method: str
    config: dict[str, Any]
    classnames: list[str]
    backbone: str | None
    backbone_fingerprint: str
    vlprompt_version: str
    run: str | None = None  # the configuration hash of the run that wrote it (None: saved outside a run folder)

    def describe_backbone(self) -> str:
        return _describe(self.backbone, self.backbone_fingerprint)


def _describe(name: str | None, fingerprint: str) -> str:
    return f"{name or 'an unnamed CLIP'!r} (fingerprint {fingerprint[:12]})"


def save_prompt(method: FrozenClipMethod, path: str | os.PathLike[str], *, run: str | None = None) -> Path:
    """Write ``method``'s learned state and metadata to ``path`` (atomically); returns the path. ``run`` (the
    configuration hash of the run folder it is saved into) binds the file to that run."""
    name = getattr(method, "method_name", "")
    if name not in METHODS:
        raise ConfigError(f"cannot save a {type(method).__name__}: it is not a registered method ({', '.join(METHODS)})")
    clip = method.clip
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "method": name,
        "config": json.dumps(config_to_dict(method.config)),
        "classnames": json.dumps(method.classnames, ensure_ascii=False),
        "backbone": clip.config.name or "",
        "backbone_fingerprint": clip.fingerprint(),
        "vlprompt_version": __version__,
        **({"run": run} if run is not None else {}),
    }
    tensors = {key: value.detach().cpu().contiguous() for key, value in method.state_dict().items()}
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def read_prompt_header(path: str | os.PathLike[str]) -> PromptHeader:
    """The metadata of a prompt file, or a :class:`CheckpointError` if it is missing, corrupt or not a prompt file."""
    header, _ = _read(path, tensors=False)
    return header


def load_prompt(path: str | os.PathLike[str], clip: CLIP, *, classnames: Sequence[str] | None = None
                ) -> FrozenClipMethod:
    """Rebuild the saved method on ``clip`` (which must be the backbone it was learned on).

    ``classnames`` (optional) moves the method to another class list via ``with_classnames`` (cross-dataset
    evaluation; impossible for CSC CoOp and the linear probe, which raise :class:`ConfigError`).
    """
    header, tensors = _read(path, tensors=True)
    fingerprint = clip.fingerprint()
    if fingerprint != header.backbone_fingerprint:
        raise CheckpointError(
            f"prompt file {str(path)!r} was learned on backbone {header.describe_backbone()}, but the loaded backbone "
            f"is {_describe(clip.config.name, fingerprint)}; load the backbone the prompt was learned with"
        )
    spec = METHODS.get(header.method)
    if spec is None:
        raise CheckpointError(f"prompt file {str(path)!r} holds unknown method {header.method!r} "
                              f"(known: {', '.join(METHODS)}); it was written by vlprompt {header.vlprompt_version}")
    try:
        config = config_from_dict(spec.config_cls, header.config)
    except ConfigError as exc:
        raise CheckpointError(f"prompt file {str(path)!r} holds an invalid {header.method} config: {exc}") from None
    with seeded_torch(clip.device, None):  # the fresh initialisation is overwritten by the saved state
        method = spec.build(clip, header.classnames, config)
    try:
        method.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"prompt file {str(path)!r} does not match a {header.method} method on this backbone: "
                              f"{exc}") from None
    if classnames is not None and list(classnames) != header.classnames:
        method = method.with_classnames(classnames)
    return method  # type: ignore[return-value]


def _read(path: str | os.PathLike[str], *, tensors: bool) -> tuple[PromptHeader, dict[str, Tensor]]:
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"prompt file {str(source)!r} does not exist")
    try:
        with safe_open(str(source), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            loaded = {key: handle.get_tensor(key) for key in handle.keys()} if tensors else {}
    except Exception as exc:  # safetensors raises its own error types for truncated / garbled files
        raise CheckpointError(f"prompt file {str(source)!r} is corrupt or not a safetensors file: {exc}") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{str(source)!r} is a safetensors file but not a vlprompt prompt file "
                              f"(its metadata has no format={FORMAT!r})")
    try:
        version = int(metadata["format_version"])
        header = PromptHeader(
            method=metadata["method"],
            config=json.loads(metadata["config"]),
            classnames=json.loads(metadata["classnames"]),
            backbone=metadata.get("backbone") or None,
            backbone_fingerprint=metadata["backbone_fingerprint"],
            vlprompt_version=metadata.get("vlprompt_version", "unknown"),
            run=metadata.get("run"),
        )
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"prompt file {str(source)!r} has damaged metadata ({exc!r})") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(f"prompt file {str(source)!r} has format version {version}; this vlprompt reads up to "
                              f"{FORMAT_VERSION}: upgrade vlprompt")
    if not isinstance(header.classnames, list) or not isinstance(header.config, dict):
        raise CheckpointError(f"prompt file {str(source)!r} has damaged metadata (classnames / config)")
    return header, loaded
