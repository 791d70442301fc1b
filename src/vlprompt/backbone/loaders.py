"""``load_clip``: one entry point for every CLIP checkpoint format, returning our frozen :class:`CLIP`.

Sources, tried in this order:

1. a short name of an OpenAI release (``"RN50"``, ``"ViT-B/16"``, aliases such as ``"ViT-B-16"``): downloaded once
   into the cache and verified by SHA-256 (:mod:`vlprompt.backbone.download`);
2. a directory: a Hugging Face ``transformers`` CLIP folder (``config.json`` + ``model.safetensors`` or
   ``pytorch_model.bin``, sharded or not), converted to OpenAI's names;
3. a file (``.pt``/``.pth``/``.bin``/``.safetensors``): an OpenAI TorchScript archive, or a plain state dict in
   OpenAI's / open_clip's layout (optionally wrapped under ``"state_dict"`` and prefixed ``module.``);
4. a Hugging Face hub id ``"org/name"`` that is not an existing path (needs ``huggingface_hub``; read from its cache
   when offline).

The architecture is inferred from the weights' shapes. Every failure a user can cause raises
:class:`~vlprompt.errors.CheckpointError` (a bad file, a mismatched architecture) or
:class:`~vlprompt.errors.ConfigError` (a bad option), never a half-loaded model.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from vlprompt.backbone.convert import (
    config_from_hf,
    hf_to_openai,
    is_hf_layout,
    normalize_state_dict,
    official_architecture,
    official_name,
    quick_gelu_from_model_name,
    same_architecture,
)
from vlprompt.backbone.download import OPENAI_CHECKPOINTS, ensure_checkpoint, resolve_short_name
from vlprompt.backbone.model import CLIP, CLIPConfig, config_from_state_dict
from vlprompt.errors import CheckpointError, ConfigError

PRECISIONS: Mapping[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""Weight precisions ``load_clip`` accepts."""

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
"""Weight files of a Hugging Face folder, in order of preference."""

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_OPENAI_LIKE = re.compile(r"(?i)(RN\d+(x\d+)?|ViT-[A-Z]+[/-]\d+(@\d+px)?)")  # the shape of OpenAI's names
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass
class _Weights:
    """OpenAI-named weights with their architecture and a JSON-able record of where they came from."""

    weights: dict[str, Tensor]
    config: CLIPConfig
    source: dict[str, Any] = field(default_factory=dict)


def load_clip(source: str | os.PathLike[str], device: str | torch.device = "cpu", precision: str = "fp32", *,
              cache_dir: str | os.PathLike[str] | None = None, model_name: str | None = None,
              quick_gelu: bool | None = None) -> CLIP:
    """Load a CLIP checkpoint as our :class:`CLIP`: eval mode, every parameter frozen, on ``device``, in ``precision``.

    Args:
        source: short name, checkpoint file, Hugging Face folder or hub id (see the module docstring).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... or a ``torch.device``.
        precision: weight dtype, ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        cache_dir: folder for short-name downloads (default ``$VLPROMPT_CACHE/clip`` or the user cache); for hub
            ids, the Hugging Face cache folder (default: huggingface_hub's).
        model_name: open_clip or OpenAI model name of a state-dict file (``"ViT-B-16"``, ``"ViT-B-16-quickgelu"``,
            ``"ViT-B/16"``): sets the activation (open_clip names without ``-quickgelu`` use GELU) and the weights
            must have that architecture.
        quick_gelu: force QuickGELU (True) or exact GELU (False); overrides what the name or format implies.

    The activation, unless ``quick_gelu`` is given: OpenAI archives and short names use QuickGELU; a Hugging Face
    folder's ``config.json`` says which; a state-dict file follows ``model_name``, and without one QuickGELU is
    assumed for a plain OpenAI-layout state dict, while a file with open_clip training traces (a ``"state_dict"``
    wrapper, ``module.`` prefixes, ``attn_mask`` buffers) is refused as ambiguous.

    The returned model has ``model.source`` (a JSON-able dict: kind, format, path, ...) and ``model.config.name``
    (``"ViT-B/16"`` for OpenAI's architectures, else the model name or the source's name).
    """
    dtype = _dtype(precision)
    target = _device(device)
    if quick_gelu is not None and not isinstance(quick_gelu, bool):
        raise ConfigError(f"quick_gelu must be True, False or None, got {quick_gelu!r}")
    if model_name is not None and (not isinstance(model_name, str) or not model_name.strip()):
        raise ConfigError(f"model_name must be a non-empty string such as 'ViT-B-16', got {model_name!r}")
    loaded = _resolve(source, cache_dir=cache_dir, model_name=model_name, quick_gelu=quick_gelu)
    model = build_clip(loaded.weights, loaded.config, origin=loaded.source.get("path", str(source)), dtype=dtype)
    model = model.to(target).eval().requires_grad_(False)
    model.source = {**loaded.source, "quick_gelu": loaded.config.quick_gelu, "precision": precision}
    return model


def _dtype(precision: str) -> torch.dtype:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def _device(device: str | torch.device) -> torch.device:
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"invalid device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from None
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was requested but CUDA is not available here: use device='cpu'")
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
    return target


# ----------------------------------------------------------------------------------------------------------------------
# where the weights come from


def _resolve(source: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None, model_name: str | None,
             quick_gelu: bool | None) -> _Weights:
    if isinstance(source, str) and (canonical := resolve_short_name(source)) is not None:
        return _from_short_name(canonical, cache_dir, quick_gelu)
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"a CLIP source must be a name or a path, got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_hf_dir(path, model_name=model_name, quick_gelu=quick_gelu)
    if path.exists():
        return _from_file(path, model_name=model_name, quick_gelu=quick_gelu)
    text = os.fspath(source)
    if isinstance(source, str) and _OPENAI_LIKE.fullmatch(text.strip()):
        raise CheckpointError(f"{text!r} is not one of OpenAI's CLIP models: the known names are "
                              f"{', '.join(OPENAI_CHECKPOINTS)} (ViT-B-16 style also works); or give a checkpoint file "
                              "or a Hugging Face folder")
    if isinstance(source, str) and _HUB_ID.fullmatch(text) and not text.endswith(_FILE_SUFFIXES):
        return _from_hub(text, cache_dir=cache_dir, model_name=model_name, quick_gelu=quick_gelu)
    raise CheckpointError(
        f"{text!r} is neither a known model name ({', '.join(OPENAI_CHECKPOINTS)}), an existing checkpoint file or "
        "folder, nor a Hugging Face hub id ('org/name')"
    )


def _from_short_name(canonical: str, cache_dir: str | os.PathLike[str] | None, quick_gelu: bool | None) -> _Weights:
    entry = OPENAI_CHECKPOINTS[canonical]
    path = ensure_checkpoint(canonical, cache_dir)
    loaded = _from_file(path, model_name=canonical, quick_gelu=quick_gelu)
    loaded.source.update(kind="openai", short_name=canonical, url=entry.url, sha256=entry.sha256)
    return loaded


def _from_file(path: Path, *, model_name: str | None, quick_gelu: bool | None) -> _Weights:
    obj, file_format = read_checkpoint_file(path)
    found = normalize_state_dict(obj, str(path))
    if is_hf_layout(found.weights):
        if (path.parent / "config.json").is_file():
            return _from_hf_weights(found.weights, path.parent, path, model_name=model_name, quick_gelu=quick_gelu)
        raise CheckpointError(f"{path} holds weights with Hugging Face transformers names; load the folder that holds "
                              "it together with its config.json")
    if quick_gelu is not None:
        activation, why = quick_gelu, "given"
    elif file_format == "torchscript":
        activation, why = True, "OpenAI archive"
    elif model_name is not None:
        activation, why = quick_gelu_from_model_name(model_name), "model name"
    elif found.looks_like_open_clip:
        raise ConfigError(
            f"{path} looks like an open_clip checkpoint, whose activation (QuickGELU or GELU) the weights do not tell: "
            "pass model_name= with the open_clip model name (e.g. 'ViT-B-16' or 'ViT-B-16-quickgelu') or quick_gelu="
        )
    else:
        activation, why = True, "OpenAI layout"
    kind = "openai" if file_format == "torchscript" or (model_name is None and not found.looks_like_open_clip) \
        else "open_clip"
    config = _config_from_weights(found.weights, activation, path)
    config = _named(config, model_name, fallback=path.stem, origin=path)
    source = {"kind": kind, "format": file_format, "path": str(path), "activation_from": why}
    if model_name is not None:
        source["model_name"] = model_name
    return _Weights(found.weights, config, source)


def _config_from_weights(weights: Mapping[str, Tensor], quick_gelu: bool, origin: Path) -> CLIPConfig:
    try:
        return config_from_state_dict(weights, quick_gelu=quick_gelu)
    except CheckpointError as exc:
        raise CheckpointError(f"{origin}: {exc}") from None
    except (ValueError, IndexError, TypeError) as exc:  # shapes that describe no valid CLIP
        raise CheckpointError(f"{origin}: the weights' shapes describe no valid CLIP ({exc})") from None


def _named(config: CLIPConfig, model_name: str | None, *, fallback: str, origin: Path | str) -> CLIPConfig:
    """``config`` with its name set; checks the weights against the architecture ``model_name`` stands for."""
    if model_name is not None and (expected := official_architecture(model_name)) is not None:
        if not same_architecture(config, expected):
            raise CheckpointError(f"{origin} holds a {describe(config)}, but {model_name!r} is a "
                                  f"{describe(expected)}: pass the right model name or file")
    name = official_name(config) or model_name or fallback
    return CLIPConfig(**{**config.to_dict(), "name": name})


def describe(config: CLIPConfig) -> str:
    """Short human description of an architecture, for error messages."""
    if config.is_vit:
        vision = (f"ViT ({config.vision_layers} layers, width {config.vision_width}, patch {config.vision_patch_size},"
                  f" {config.image_resolution} px)")
    else:
        blocks = tuple(config.vision_layers)  # type: ignore[arg-type]
        vision = f"ResNet (blocks {blocks}, width {config.vision_width}, {config.image_resolution} px)"
    return (f"{vision} with a {config.transformer_layers}-layer, width-{config.transformer_width} text tower, "
            f"embedding {config.embed_dim}")


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face folders and hub ids


def _from_hf_dir(directory: Path, *, model_name: str | None, quick_gelu: bool | None) -> _Weights:
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} is a folder without config.json: a Hugging Face transformers CLIP folder "
                              f"holds config.json and one of {', '.join(HF_WEIGHT_FILES)}")
    weight_file = next((directory / name for name in HF_WEIGHT_FILES if (directory / name).is_file()), None)
    if weight_file is None:
        raise CheckpointError(f"{directory} has config.json but no weights: expected one of "
                              f"{', '.join(HF_WEIGHT_FILES)}")
    raw = _read_hf_weights(weight_file)
    weights = normalize_state_dict(raw, str(weight_file)).weights
    if not is_hf_layout(weights):
        raise CheckpointError(f"{weight_file} does not hold transformers CLIPModel weights (names such as "
                              "'text_model.…' and 'vision_model.…')")
    return _from_hf_weights(weights, directory, weight_file, model_name=model_name, quick_gelu=quick_gelu)


def _from_hf_weights(weights: dict[str, Tensor], directory: Path, weight_file: Path, *, model_name: str | None,
                     quick_gelu: bool | None) -> _Weights:
    config_path = directory / "config.json"
    try:
        hf_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {config_path}: {exc}") from None
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{config_path} is not a JSON object")
    try:
        converted = hf_to_openai(weights)
        config = config_from_hf(hf_config, converted)
    except CheckpointError as exc:
        raise CheckpointError(f"{weight_file}: {exc}") from None
    except (ValueError, IndexError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{weight_file}: the weights' shapes describe no valid CLIP ({exc})") from None
    if quick_gelu is not None and quick_gelu != config.quick_gelu:
        raise ConfigError(f"quick_gelu={quick_gelu} contradicts {config_path}, whose hidden_act is "
                          f"{'quick_gelu' if config.quick_gelu else 'gelu'}")
    config = _named(config, model_name, fallback=directory.name, origin=directory)
    source = {"kind": "hf", "format": weight_file.name, "path": str(directory)}
    if model_name is not None:
        source["model_name"] = model_name
    return _Weights(converted, config, source)


def _read_hf_weights(weight_file: Path) -> dict[str, Tensor]:
    if not weight_file.name.endswith(".index.json"):
        obj, _ = read_checkpoint_file(weight_file)
        return obj
    try:
        index = json.loads(weight_file.read_text(encoding="utf-8"))
        shards = sorted(set(index["weight_map"].values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read the shard index {weight_file} ({exc})") from None
    merged: dict[str, Tensor] = {}
    for shard in shards:
        obj, _ = read_checkpoint_file(weight_file.parent / shard)
        merged.update(normalize_state_dict(obj, str(weight_file.parent / shard)).weights)
    return merged


def _from_hub(repo_id: str, *, cache_dir: str | os.PathLike[str] | None, model_name: str | None,
              quick_gelu: bool | None) -> _Weights:
    snapshot = download_hub_snapshot(repo_id, cache_dir=cache_dir)
    loaded = _from_hf_dir(snapshot, model_name=model_name, quick_gelu=quick_gelu)
    if loaded.config.name == snapshot.name:  # a snapshot folder is named by its commit hash: use the hub id instead
        loaded.config = CLIPConfig(**{**loaded.config.to_dict(), "name": repo_id})
    loaded.source.update(hub_id=repo_id)
    return loaded


def download_hub_snapshot(repo_id: str, *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Local folder holding ``config.json`` and the weights of a hub repository (downloaded, or from the cache).

    With ``HF_HUB_OFFLINE=1`` only the local Hugging Face cache is read.
    """
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise CheckpointError(f"{repo_id!r} is not an existing path, and loading it as a Hugging Face hub id needs "
                              "huggingface_hub: pip install huggingface_hub") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=offline))

    not_cached = (f"{repo_id!r} is neither in the local Hugging Face cache nor downloadable now"
                  f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: connect once to download it, or pass the local "
                  "folder that holds its config.json and weights")
    try:
        try:
            config_file = fetch("config.json")
        except LocalEntryNotFoundError:
            raise
        except EntryNotFoundError:
            raise CheckpointError(f"the Hugging Face repository {repo_id!r} has no config.json: it is not a "
                                  "transformers CLIP repository") from None
        for name in HF_WEIGHT_FILES:
            try:
                weight_file = fetch(name)
            except EntryNotFoundError:
                continue
            if name.endswith(".index.json"):
                index = json.loads(weight_file.read_text(encoding="utf-8"))
                for shard in sorted(set(index["weight_map"].values())):
                    fetch(shard)
            return config_file.parent
    except LocalEntryNotFoundError:
        raise CheckpointError(not_cached) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"the Hugging Face repository {repo_id!r} does not exist or is not accessible "
                              "(private or gated repositories need `hf auth login`)") from None
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"could not get {repo_id!r} from the Hugging Face hub: {exc}") from None
    raise CheckpointError(f"the Hugging Face repository {repo_id!r} has config.json but none of "
                          f"{', '.join(HF_WEIGHT_FILES)}")


# ----------------------------------------------------------------------------------------------------------------------
# reading files


def read_checkpoint_file(path: Path) -> tuple[Any, str]:
    """Load a checkpoint file's object and name its format: ``"torchscript"``, ``"safetensors"`` or ``"torch"``.

    TorchScript archives are recognised by their zip entries and read with ``torch.jit.load`` (their
    ``state_dict()``); safetensors files by their header; anything else goes through
    ``torch.load(weights_only=True)``. Missing, empty, truncated or corrupt files raise :class:`CheckpointError`.
    """
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or save did not complete; fetch or save it "
                              "again")
    try:
        if path.suffix == ".safetensors" or _has_safetensors_header(path, size):
            return load_file(str(path), device="cpu"), "safetensors"
        if zipfile.is_zipfile(path) and _is_torchscript_zip(path):
            return torch.jit.load(str(path), map_location="cpu").state_dict(), "torchscript"
        return torch.load(path, map_location="cpu", weights_only=True), "torch"
    except Exception as exc:  # noqa: BLE001 - every reader failure means the same thing to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"cannot read {path} ({size} bytes) as a CLIP checkpoint: {type(exc).__name__}"
            f"{': ' + reason[:300] if reason else ''}. The file is truncated, corrupt or not a checkpoint "
            "(expected a TorchScript archive, a torch.save state dict or a safetensors file); download or save it "
            "again"
        ) from None


def _has_safetensors_header(path: Path, size: int) -> bool:
    """A safetensors file starts with a little-endian u64 header length, then a JSON object."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= size - 8 and head[8:9] == b"{"


def _is_torchscript_zip(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(name.endswith("/constants.pkl") or "/code/" in name for name in names)


# ----------------------------------------------------------------------------------------------------------------------
# building the model


def build_clip(weights: dict[str, Tensor], config: CLIPConfig, *, origin: str = "the checkpoint",
               dtype: torch.dtype = torch.float32) -> CLIP:
    """Our CLIP holding exactly ``weights`` (OpenAI names), floating tensors cast to ``dtype``, in eval mode.

    The model is built on the meta device and the weights are assigned, so no memory goes to a random init. Raises
    :class:`CheckpointError` naming ``origin`` if a weight is missing, unexpected, of the wrong shape or not finite.
    """
    try:
        with torch.device("meta"):
            model = CLIP(config)
    except ValueError as exc:
        raise CheckpointError(f"{origin}: the weights describe no valid CLIP ({exc})") from None
    expected = model.state_dict()
    problems = _compare(weights, expected)
    if problems:
        raise CheckpointError(f"{origin} does not fit the CLIP its weights imply, a {describe(config)}: "
                              + "; ".join(problems))
    cast: dict[str, Tensor] = {}
    for key, reference in expected.items():
        tensor = weights.get(key)
        if tensor is None:  # optional: BatchNorm's num_batches_tracked (unused in eval)
            tensor = torch.zeros(reference.shape, dtype=reference.dtype)
        elif tensor.is_floating_point():
            tensor = tensor.to(dtype)
        cast[key] = tensor
    model.load_state_dict(cast, strict=True, assign=True)
    return model.eval()


def _compare(weights: Mapping[str, Tensor], expected: Mapping[str, Tensor], limit: int = 5) -> list[str]:
    """Human-readable differences between a state dict and the model's expected tensors."""

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")

    missing = sorted(key for key in expected if key not in weights and not key.endswith("num_batches_tracked"))
    unexpected = sorted(key for key in weights if key not in expected)
    wrong = [f"{key} has shape {tuple(weights[key].shape)}, expected {tuple(expected[key].shape)}"
             for key in expected if key in weights and weights[key].shape != expected[key].shape]
    wrong += [f"{key} is {weights[key].dtype}, expected a floating-point tensor"
              for key in expected if key in weights and expected[key].is_floating_point()
              and not weights[key].is_floating_point()]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing weight(s): {listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weight(s): {listed(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s)/type(s): {listed(wrong)}")
    if not problems:
        # a float64 sum is finite exactly when every element is (it cannot overflow), without a full-size mask
        bad = [key for key, tensor in weights.items()
               if tensor.is_floating_point() and not bool(tensor.sum(dtype=torch.float64).isfinite())]
        if bad:
            problems.append(f"{len(bad)} weight(s) hold NaN or infinite values: {listed(bad)}")
    return problems
