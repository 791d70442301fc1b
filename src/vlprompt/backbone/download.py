"""OpenAI's released CLIP checkpoints: short names, official URLs and checksums, a verified download cache.

The official download URLs embed each file's SHA-256 (``.../models/<sha256>/<file>.pt``); every file is verified
against it, both after a download and whenever a cached copy is used. A download goes to a temporary file that is
renamed into place only once its checksum is right, so the cache never holds a partial file. Nothing here imports
torch, so the CLI can list or fetch checkpoints cheaply.

The cache folder is ``cache_dir`` when given, else ``$VLPROMPT_CACHE/clip``, else ``clip/`` in the user cache folder
(:mod:`vlprompt.common.paths`).
"""

from __future__ import annotations

import hashlib
import logging
import http.client
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

from vlprompt.common import locks
from vlprompt.common.paths import cache_dir as cache_folder
from vlprompt.errors import CheckpointError
from vlprompt.common.io import atomic_write

_BASE_URL = "https://openaipublic.azureedge.net/clip/models"
_CHUNK = 1 << 20
DOWNLOAD_LOCK_SECONDS = 24 * 3600.0
"""How long a process waits for another one downloading the same checkpoint."""

logger = logging.getLogger(__name__)

# A URL opener: ``opener(url, timeout=seconds)`` returns a context manager over a readable binary response with a
# ``headers`` mapping (``urllib.request.urlopen`` is the default; tests pass their own or use ``file://`` URLs).
Opener = Callable[..., Any]


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
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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
    """Download ``url`` to ``target`` atomically, keeping it only if its SHA-256 is ``sha256``.

    Network failures (no connection, timeout, HTTP error, connection cut short) raise :class:`CheckpointError`
    naming the file, the URL, the expected path and the checksum; a wrong checksum or a short body raises
    :class:`CheckpointError` too. ``target`` is never left half-written.
    """
    target = Path(target)
    opener = urlopen or urllib.request.urlopen
    what = label or target.name
    digest = hashlib.sha256()

    def offline(reason: object) -> CheckpointError:
        return CheckpointError(
            f"could not download the {what} CLIP checkpoint {target.name} from {url} ({reason}). Without network, "
            f"download that file elsewhere and place it at {target} (expected SHA-256 {sha256}); it is verified "
            f"before use"
        )

    def write(handle: BinaryIO) -> None:
        received = 0
        try:
            with opener(url, timeout=timeout) as response:
                length = response.headers.get("Content-Length")
                total = int(length) if length is not None and str(length).isdigit() else None
                with _progress_bar(total, what, progress) as bar:
                    while chunk := response.read(_CHUNK):
                        handle.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            raise offline(getattr(exc, "reason", None) or exc) from exc
        if total is not None and received != total:
            raise offline(f"the connection ended after {received} of {total} bytes")
        if digest.hexdigest() != sha256:
            raise CheckpointError(
                f"the downloaded {what} checkpoint from {url} has SHA-256 {digest.hexdigest()}, expected {sha256}: "
                f"it was not kept. Try again; if it persists, download the file by hand and place it at {target}"
            )

    return atomic_write(target, write)


def _progress_bar(total: int | None, label: str, enabled: bool) -> Any:
    from tqdm import tqdm  # ~70 ms, only for a bar: this module stays light (no torch, no tqdm)

    return tqdm(total=total, desc=f"downloading {label}", unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, file=sys.stderr, leave=False)
