"""OpenAI's released CLIP checkpoints: short names, official URLs and checksums, a verified download cache.

The official download URLs embed each file's SHA-256 (``.../models/<sha256>/<file>.pt``); every file is verified
against it, both after a download and whenever a cached copy is used. A download goes through the one downloader
(:mod:`vlprompt.common.fetch`: resumable, with progress) into ``<file>.part``, renamed into place only once its
checksum is right, so the cache never holds a partial checkpoint under its name. Nothing here imports torch, so the
CLI can list or fetch checkpoints cheaply.

The cache folder is ``cache_dir`` when given, else ``$VLPROMPT_CACHE/clip``, else ``clip/`` in the user cache folder
(:mod:`vlprompt.common.paths`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from vlprompt.common import locks
from vlprompt.common.fetch import FetchError, Opener, fetch, file_digest  # opener(request, timeout=s), as urlopen
from vlprompt.common.paths import cache_dir as cache_folder
from vlprompt.errors import CheckpointError

_BASE_URL = "https://openaipublic.azureedge.net/clip/models"
DOWNLOAD_LOCK_SECONDS = 24 * 3600.0
"""How long a process waits for another one downloading the same checkpoint."""

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenAICheckpoint:
    """One of OpenAI's released CLIP checkpoints (a TorchScript archive with fp16 weights)."""

    name: str
    """Canonical name, as OpenAI's ``clip.available_models()`` spells it: ``"ViT-B/16"``."""
    url: str
    """Official download URL; its second-to-last path component is the file's SHA-256."""
    architecture: Mapping[str, Any] = field(compare=False)
    """``CLIPConfig`` keyword arguments of the model (CLIP paper, Tables 19 and 20)."""

    @property
    def sha256(self) -> str:
        return self.url.rsplit("/", 2)[-2]

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def _resnet(embed: int, resolution: int, layers: tuple[int, int, int, int], width: int, text_width: int) -> dict:
    return dict(embed_dim=embed, image_resolution=resolution, vision_layers=layers, vision_width=width,
                vision_patch_size=None, transformer_width=text_width, transformer_heads=text_width // 64,
                transformer_layers=12)


def _vit(embed: int, resolution: int, layers: int, width: int, patch: int, text_width: int) -> dict:
    return dict(embed_dim=embed, image_resolution=resolution, vision_layers=layers, vision_width=width,
                vision_patch_size=patch, transformer_width=text_width, transformer_heads=text_width // 64,
                transformer_layers=12)


def _entry(name: str, sha256: str, filename: str, architecture: dict) -> OpenAICheckpoint:
    return OpenAICheckpoint(name, f"{_BASE_URL}/{sha256}/{filename}", MappingProxyType(architecture))


OPENAI_CHECKPOINTS: Mapping[str, OpenAICheckpoint] = MappingProxyType({
    entry.name: entry
    for entry in (
        _entry("RN50", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt",
               _resnet(1024, 224, (3, 4, 6, 3), 64, 512)),
        _entry("RN101", "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt",
               _resnet(512, 224, (3, 4, 23, 3), 64, 512)),
        _entry("RN50x4", "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt",
               _resnet(640, 288, (4, 6, 10, 6), 80, 640)),
        _entry("RN50x16", "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt",
               _resnet(768, 384, (6, 8, 18, 8), 96, 768)),
        _entry("RN50x64", "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt",
               _resnet(1024, 448, (3, 15, 36, 10), 128, 1024)),
        _entry("ViT-B/32", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt",
               _vit(512, 224, 12, 768, 32, 512)),
        _entry("ViT-B/16", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt",
               _vit(512, 224, 12, 768, 16, 512)),
        _entry("ViT-L/14", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt",
               _vit(768, 224, 24, 1024, 14, 768)),
        _entry("ViT-L/14@336px", "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
               "ViT-L-14-336px.pt", _vit(768, 336, 24, 1024, 14, 768)),
    )
})
"""OpenAI's checkpoints by canonical name (the URLs of OpenAI's ``clip/clip.py``)."""


def _aliases(name: str, filename: str) -> set[str]:
    stem = filename.removesuffix(".pt")
    names = {name, stem, name.replace("/", "-"), name.replace("/", "-").replace("@", "-")}
    if stem.endswith("px"):
        names.add(stem.removesuffix("px"))  # open_clip spells it "ViT-L-14-336"
    return {alias.casefold() for alias in names}


def resolve_short_name(name: str, checkpoints: Mapping[str, OpenAICheckpoint] = OPENAI_CHECKPOINTS) -> str | None:
    """Canonical name of a short name or alias (case-insensitive: ``"vit-b-16"`` -> ``"ViT-B/16"``), else None."""
    key = name.strip().casefold()
    for canonical, entry in checkpoints.items():
        if key in _aliases(canonical, entry.filename):
            return canonical
    return None


def default_cache_dir() -> Path:
    """``$VLPROMPT_CACHE/clip`` if the variable is set, else ``<user cache folder>/vlprompt/clip`` (common.paths)."""
    return cache_folder("clip")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (:func:`vlprompt.common.fetch.file_digest`, no progress display)."""
    return file_digest(Path(path), "sha256", label=Path(path).name, progress=False)


def ensure_checkpoint(name: str, cache_dir: str | os.PathLike[str] | None = None, *,
                      checkpoints: Mapping[str, OpenAICheckpoint] = OPENAI_CHECKPOINTS,
                      urlopen: Opener | None = None, timeout: float = 60.0, progress: bool = True) -> Path:
    """Path of the verified checkpoint file for a short name, downloading it into the cache when it is absent.

    A cached file is used only if its SHA-256 matches; a mismatching file is reported (never used, never deleted).
    Raises :class:`CheckpointError` for an unknown name, a failed or offline download (the message names the file,
    URL, expected path and checksum, so the file can be placed by hand) or a checksum mismatch.
    """
    canonical = resolve_short_name(name, checkpoints)
    if canonical is None:
        raise CheckpointError(f"unknown CLIP model name {name!r}: known names are {', '.join(checkpoints)}")
    entry = checkpoints[canonical]
    target = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / entry.filename
    if not target.exists():
        with locks.acquire(str(target) + ".lock", timeout=DOWNLOAD_LOCK_SECONDS,
                           on_wait=lambda holder: logger.warning("waiting for process %s, which is downloading %s",
                                                                 holder, target)):
            if not target.exists():  # another process may have finished it while we waited
                download_verified(entry.url, entry.sha256, target, urlopen=urlopen, timeout=timeout,
                                  progress=progress, label=entry.name)
                return target
    verify_cached(target, entry)
    return target


def verify_cached(path: Path, entry: OpenAICheckpoint) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a regular file with the checkpoint's SHA-256."""
    if not path.is_file():
        raise CheckpointError(f"{path} exists but is not a regular file; remove it so the {entry.name} checkpoint "
                              f"can be downloaded there")
    actual = file_sha256(path)
    if actual != entry.sha256:
        raise CheckpointError(
            f"the cached {entry.name} checkpoint {path} ({path.stat().st_size} bytes) has SHA-256 {actual}, "
            f"expected {entry.sha256}: the file is corrupt, truncated or a different file. Delete it to download it "
            f"again, or replace it by hand with the file from {entry.url}"
        )


def download_verified(url: str, sha256: str, target: str | os.PathLike[str], *, urlopen: Opener | None = None,
                      timeout: float = 60.0, progress: bool = True, label: str | None = None) -> Path:
    """Download ``url`` to ``target``, keeping it only if its SHA-256 is ``sha256``, through the one downloader
    (:func:`vlprompt.common.fetch.fetch`): the bytes go to ``<target>.part``, which an interrupted download leaves
    behind and the next call resumes (HTTP Range), and which is renamed to ``target`` once verified.

    Network failures (no connection, timeout, HTTP error, connection cut short after the fetcher's retries) raise
    :class:`CheckpointError` naming the file, the URL, the expected path and the checksum; a wrong checksum raises
    :class:`CheckpointError` too and the bytes are not kept. ``target`` is never half-written. ``progress``: a bar
    on a terminal, else log lines (False: neither).
    """
    target = Path(target)
    what = label or target.name
    part = target.with_name(target.name + ".part")
    try:
        fetch(url, part, label=what, opener=urlopen, timeout=timeout, progress=None if progress else False)
    except FetchError as exc:
        raise CheckpointError(
            f"could not download the {what} CLIP checkpoint {target.name} from {url} ({exc.reason}). Without network, "
            f"download that file elsewhere and place it at {target} (expected SHA-256 {sha256}); it is verified "
            f"before use. What arrived is kept in {part} and the next attempt resumes from it"
        ) from None
    actual = file_digest(part, "sha256", label=what, progress=None if progress else False)
    if actual != sha256:
        part.unlink(missing_ok=True)
        raise CheckpointError(
            f"the downloaded {what} checkpoint from {url} has SHA-256 {actual}, expected {sha256}: it was not "
            f"kept. Try again; if it persists, download the file by hand and place it at {target}"
        )
    os.replace(part, target)
    return target
