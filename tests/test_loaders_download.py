"""Short names: verified downloads into the cache, without network (file:// URLs and fake openers)."""

from __future__ import annotations

import hashlib
import io
import urllib.error
from pathlib import Path

import platformdirs
import pytest
import torch
from clip_formats import save_torchscript, token_ids
from support import assert_fp32_close, assert_same_state

from vlprompt.backbone.download import (
    OPENAI_CHECKPOINTS,
    OpenAICheckpoint,
    default_cache_dir,
    download_verified,
    ensure_checkpoint,
    file_sha256,
)
from vlprompt.backbone.loaders import load_clip
from vlprompt.backbone.tiny import build_tiny_clip
from vlprompt.common.paths import cache_dir
from vlprompt.errors import CheckpointError

PAYLOAD = b"not really a checkpoint, but bytes with a checksum\n" * 100
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def release(url: str, name: str = "Tiny/8") -> dict[str, OpenAICheckpoint]:
    return {name: OpenAICheckpoint(name, url, {})}


def never(*args, **kwargs):
    raise AssertionError("no download expected")


def offline(*args, **kwargs):
    raise urllib.error.URLError(OSError(101, "Network is unreachable"))


@pytest.fixture()
def served(tmp_path) -> tuple[str, Path]:
    """A file reachable at a file:// URL whose second-to-last component is its SHA-256 (like OpenAI's URLs)."""
    source = tmp_path / "server" / PAYLOAD_SHA / "Tiny-8.pt"
    source.parent.mkdir(parents=True)
    source.write_bytes(PAYLOAD)
    return source.as_uri(), tmp_path / "cache"


def test_good_file_is_downloaded_and_verified(served):
    url, cache = served
    path = ensure_checkpoint("tiny/8", cache, checkpoints=release(url), progress=False)
    assert path == cache / "Tiny-8.pt"
    assert path.read_bytes() == PAYLOAD
    assert [p.name for p in cache.iterdir() if p.suffix != ".lock"] == ["Tiny-8.pt"]  # no temporary file left


def test_cached_file_is_reused_without_download(served):
    url, cache = served
    ensure_checkpoint("Tiny/8", cache, checkpoints=release(url), progress=False)
    mtime = (cache / "Tiny-8.pt").stat().st_mtime_ns
    assert ensure_checkpoint("Tiny/8", cache, checkpoints=release(url), urlopen=never) == cache / "Tiny-8.pt"
    assert (cache / "Tiny-8.pt").stat().st_mtime_ns == mtime


def test_wrong_checksum_is_rejected_and_not_kept(tmp_path):
    source = tmp_path / "server" / ("0" * 64) / "Tiny-8.pt"
    source.parent.mkdir(parents=True)
    source.write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match=f"has SHA-256 {PAYLOAD_SHA}, expected {'0' * 64}: it was not kept"):
        ensure_checkpoint("Tiny/8", cache, checkpoints=release(source.as_uri()), progress=False)
    assert not (cache / "Tiny-8.pt").exists()
    assert [p.name for p in cache.iterdir() if p.suffix != ".lock"] == []


def test_offline_error_names_file_url_path_and_checksum(tmp_path):
    entry = OPENAI_CHECKPOINTS["ViT-B/16"]
    with pytest.raises(CheckpointError) as info:
        ensure_checkpoint("ViT-B-16", tmp_path, urlopen=offline)
    message = str(info.value)
    for part in ("ViT-B-16.pt", entry.url, str(tmp_path / "ViT-B-16.pt"), entry.sha256, "Network is unreachable"):
        assert part in message
    assert not (tmp_path / "ViT-B-16.pt").exists()


def test_timeout_and_short_body_are_reported(tmp_path):
    def timeout(*args, **kwargs):
        raise TimeoutError("timed out")

    with pytest.raises(CheckpointError, match="timed out"):
        download_verified("https://example.invalid/x/f.pt", PAYLOAD_SHA, tmp_path / "f.pt", urlopen=timeout,
                          progress=False)

    class Short(io.BytesIO):
        headers = {"Content-Length": str(len(PAYLOAD))}

    def short(*args, **kwargs):
        return Short(PAYLOAD[:100])

    with pytest.raises(CheckpointError, match="connection ended after 100 B of .*expected SHA-256.*resumes"):
        download_verified("https://example.invalid/x/f.pt", PAYLOAD_SHA, tmp_path / "f.pt", urlopen=short,
                          progress=False)
    assert not (tmp_path / "f.pt").exists()  # never half-written; what arrived waits in the part file
    assert (tmp_path / "f.pt.part").read_bytes() == PAYLOAD[:100]


class Resuming(io.BytesIO):
    """A server that honours Range: 206 with the rest of the file (or 200 with all of it)."""

    requests: list = []

    def __init__(self, request) -> None:
        Resuming.requests.append(request.get_header("Range"))
        start = int(request.get_header("Range")[6:-1]) if request.get_header("Range") else 0
        super().__init__(PAYLOAD[start:])
        self.status = 206 if start else 200
        self.headers = {"Content-Length": str(len(PAYLOAD) - start), "Content-Type": "application/octet-stream"}
        if start:
            self.headers["Content-Range"] = f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}"


def test_an_interrupted_download_resumes_where_it_stopped(tmp_path):
    """The checkpoint download is the one resumable downloader's: a part file left by a killed download is
    continued with an HTTP Range request, and only the missing bytes are fetched."""
    target = tmp_path / "f.pt"
    (tmp_path / "f.pt.part").write_bytes(PAYLOAD[:1000])  # what a killed download left
    Resuming.requests = []
    assert download_verified("https://example.invalid/x/f.pt", PAYLOAD_SHA, target,
                             urlopen=lambda request, timeout: Resuming(request), progress=False) == target
    assert Resuming.requests == ["bytes=1000-"]
    assert target.read_bytes() == PAYLOAD and not (tmp_path / "f.pt.part").exists()


def test_corrupt_cached_file_is_reported_not_used_not_deleted(tmp_path):
    entry = OPENAI_CHECKPOINTS["RN50"]
    cached = tmp_path / "RN50.pt"
    cached.write_bytes(b"half a download")
    with pytest.raises(CheckpointError) as info:
        load_clip("RN50", cache_dir=tmp_path)
    message = str(info.value)
    assert str(cached) in message and entry.sha256 in message and hashlib.sha256(b"half a download").hexdigest() \
        in message
    assert "Delete it to download it again" in message and entry.url in message
    assert cached.read_bytes() == b"half a download"


def test_unknown_short_name():
    with pytest.raises(CheckpointError, match="unknown CLIP model name 'RN18'"):
        ensure_checkpoint("RN18")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "clip"
    monkeypatch.delenv("VLPROMPT_CACHE")
    assert default_cache_dir() == Path(platformdirs.user_cache_dir("vlprompt", appauthor=False)) / "clip"
    assert default_cache_dir() == cache_dir("clip")  # the one cache root (common.paths)


def test_downloaded_archive_loads(tmp_path):
    """End to end with a tiny archive published at a file:// URL under its own checksum."""
    model = build_tiny_clip("vit", seed=1).requires_grad_(False)
    archive = save_torchscript(model, tmp_path / "built.pt")
    sha = file_sha256(archive)
    served = tmp_path / "server" / sha / "Tiny-8.pt"
    served.parent.mkdir(parents=True)
    archive.rename(served)
    path = ensure_checkpoint("Tiny/8", tmp_path / "cache", checkpoints=release(served.as_uri()), progress=False)
    loaded = load_clip(path)
    ids = token_ids([320, 1125])
    assert_same_state(loaded, model)  # what loading promises, bit for bit; outputs: the same maths, other memory
    with torch.inference_mode():
        assert_fp32_close(loaded.encode_text(ids), model.encode_text(ids))


def test_download_module_does_not_import_torch():
    """The CLI can resolve names and fetch files without paying for torch."""
    import subprocess
    import sys

    code = "import sys; from vlprompt.backbone import download; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
