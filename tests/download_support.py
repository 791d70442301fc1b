"""Helpers for the download tests (no tests here): a local HTTP file server and synthetic dataset archives.

``FileServer`` serves in-memory files on 127.0.0.1 with single ``Range: bytes=N-`` requests, counts the bytes it
serves per file, and can cut a response short once (to test resuming). ``synthetic(key)`` builds small archives with
the real archives' names and inner structure (tar / tgz / zip as the real ones) for each dataset; ``local_sources``
turns the shipped sources table into one that points at the server and carries the synthetic files' checksums.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import tarfile
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from PIL import Image

from vlprompt.data.registry import DATASETS
from vlprompt.data.sources import NO_CHECKSUM, SourceFile, SourceUrl, Sources, load_sources
from vlprompt.data.splitfile import read_shipped_json

WNIDS = ("n01440764", "n01443537", "n01484850")
CLASSNAMES_TXT = b"n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n"


def jpeg(value: int = 0) -> bytes:
    """A tiny valid JPEG (4x4, colour from ``value``)."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (value * 37 % 256, value * 91 % 256, 60)).save(buffer, "JPEG")
    return buffer.getvalue()


JPEG = jpeg()


# ---- archives -----------------------------------------------------------------------------------------------------
def tar_bytes(members: Mapping[str, bytes], *, compress: bool,
              links: Mapping[str, str] = MappingProxyType({})) -> bytes:
    """A tar (gzip-compressed with ``compress``) holding ``members`` (name -> bytes) and symbolic ``links``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compress else "w", **({"compresslevel": 1} if compress else {})) \
            as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


def zip_bytes(members: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- synthetic datasets -------------------------------------------------------------------------------------------
@dataclass
class Synthetic:
    """A dataset's files as served (name -> bytes) and the counts the check must find."""

    files: dict[str, bytes]
    counts: dict[str, int]            # train / val / test / classes
    extra: dict[str, str] = field(default_factory=dict)   # file name -> place target of files not in the table


def _trimmed_split(split_file: str, per_class: int, classes: int) -> tuple[dict, list[str]]:
    """The shipped split cut to its first ``classes`` labels, ``per_class`` images per split and label."""
    data = read_shipped_json(split_file)
    trimmed: dict[str, list] = {}
    for split in ("train", "val", "test"):
        taken: dict[int, int] = {}
        rows = []
        for path, label, name in data[split]:
            if label < classes and taken.get(label, 0) < per_class:
                taken[label] = taken.get(label, 0) + 1
                rows.append([path, label, name])
        trimmed[split] = rows
    paths = [row[0] for split in trimmed.values() for row in split]
    return trimmed, paths


def _split_json(split: dict) -> bytes:
    return json.dumps(split).encode()


def _counts(train: int, val: int, test: int, classes: int) -> dict[str, int]:
    return {"train": train, "val": val, "test": test, "classes": classes}


def synthetic(key: str) -> Synthetic:
    """Small archives in the real structure of ``key``'s archives (see the sources table for their names)."""
    info = DATASETS[key]
    if info.split_file is not None and key not in ("food101", "sun397"):
        return _shipped_split_dataset(key)
    if key == "food101":
        members = {f"food-101/images/{c}/{i}.jpg": JPEG for c in ("apple_pie", "baby_back_ribs", "baklava")
                   for i in range(100, 105)}
        members.update({"food-101/meta/classes.txt": b"apple_pie\nbaby_back_ribs\nbaklava\n",
                        "food-101/README.txt": b"Food-101", "food-101/license_agreement.txt": b"terms"})
        # 5 images per class: round(2.5)=2 train, round(1.0)=1 val, 2 test
        return Synthetic({"food-101.tar.gz": tar_bytes(members, compress=True)}, _counts(6, 3, 6, 3))
    if key == "fgvc_aircraft":
        variants = ["707-320", "A300B4", "Cessna 172"]
        members = {"fgvc-aircraft-2013b/README.md": b"FGVC", "fgvc-aircraft-2013b/data/families.txt": b"Boeing\n",
                   "fgvc-aircraft-2013b/data/variants.txt": "\n".join(variants).encode() + b"\n"}
        number = 1000000
        for split, per in (("train", 2), ("val", 1), ("test", 2)):
            lines = []
            for variant in variants:
                for _ in range(per):
                    number += 1
                    members[f"fgvc-aircraft-2013b/data/images/{number:07d}.jpg"] = JPEG
                    lines.append(f"{number:07d} {variant}")
            members[f"fgvc-aircraft-2013b/data/images_variant_{split}.txt"] = "\n".join(lines).encode() + b"\n"
        return Synthetic({"fgvc-aircraft-2013b.tar.gz": tar_bytes(members, compress=True)}, _counts(6, 3, 6, 3))
    if key == "sun397":
        classes = ["/a/abbey", "/b/bakery/shop", "/c/canyon"]
        images = {"SUN397/README.txt": b"SUN397", "SUN397/ClassName.txt": "\n".join(classes).encode() + b"\n"}
        training, testing = [], []
        for name in classes:
            for i in range(7):
                rel = f"{name}/sun_{i:04d}.jpg"
                images[f"SUN397{rel}"] = JPEG
                (training if i < 5 else testing).append(rel)
        partitions = {"ClassName.txt": "\n".join(classes).encode() + b"\n",
                      "Training_01.txt": "\n".join(training).encode() + b"\n",
                      "Testing_01.txt": "\n".join(testing).encode() + b"\n",
                      "Training_02.txt": b"", "Testing_02.txt": b"", "__MACOSX/._ClassName.txt": b"fork"}
        # 5 training images per class: round(1.0)=1 to val, 4 stay in train; 2 test each
        return Synthetic({"SUN397.tar.gz": tar_bytes(images, compress=True), "Partitions.zip": zip_bytes(partitions)},
                         _counts(12, 3, 6, 3))
    if key == "imagenetv2":
        members = {f"imagenetv2-matched-frequency-format-val/{label}/{i}abc.jpeg": JPEG
                   for label in range(3) for i in range(2)}
        return Synthetic({"imagenetv2-matched-frequency.tar.gz": tar_bytes(members, compress=True),
                          "classnames.txt": CLASSNAMES_TXT}, _counts(0, 0, 6, 3))
    if key == "imagenet_sketch":
        members = {f"sketch/{wnid}/sketch_{i}.JPEG": JPEG for wnid in WNIDS for i in range(2)}
        return Synthetic({"ImageNet-Sketch.zip": zip_bytes(members), "classnames.txt": CLASSNAMES_TXT},
                         _counts(0, 0, 6, 3))
    if key in ("imagenet_a", "imagenet_r"):
        top = "imagenet-a" if key == "imagenet_a" else "imagenet-r"
        members = {f"{top}/README.txt": b"readme"}
        members.update({f"{top}/{wnid}/x_{i}.jpg": JPEG for wnid in WNIDS[:2] for i in range(3)})
        return Synthetic({f"{top}.tar": tar_bytes(members, compress=False), "classnames.txt": CLASSNAMES_TXT},
                         _counts(0, 0, 6, 2))
    raise KeyError(key)


# shipped-split datasets: (archive name, how an image path of the split maps to the archive member, compression)
_SHIPPED = {
    "caltech101": ("101_ObjectCategories.tar.gz", "101_ObjectCategories/{}", "tgz"),
    "oxford_pets": ("images.tar.gz", "images/{}", "tgz"),
    "stanford_cars": (None, "{}", "tgz"),
    "oxford_flowers": ("102flowers.tgz", "jpg/{}", "tgz"),
    "dtd": ("dtd-r1.0.1.tar.gz", "dtd/images/{}", "tgz"),
    "eurosat": ("EuroSAT.zip", "2750/{}", "zip"),
    "ucf101": ("UCF-101-midframes.zip", "UCF-101-midframes/{}", "zip"),
}


def _shipped_split_dataset(key: str) -> Synthetic:
    """A trimmed copy of the shipped split (served as the user's own split file) and archives with its images."""
    info = DATASETS[key]
    split, paths = _trimmed_split(info.split_file, per_class=2, classes=3)   # type: ignore[arg-type]
    archive, member, kind = _SHIPPED[key]
    files: dict[str, bytes] = {}
    if key == "stanford_cars":
        for folder in ("cars_train", "cars_test"):
            members = {p: JPEG for p in paths if p.startswith(folder + "/")}
            files[f"{folder}.tgz"] = tar_bytes(members, compress=True)
    else:
        members = {member.format(p): JPEG for p in paths}
        if key == "caltech101":
            members["101_ObjectCategories/BACKGROUND_Google/image_0001.jpg"] = JPEG
        if key == "dtd":
            members.update({"dtd/labels/labels_joint_anno.txt": b"", "dtd/imdb/imdb.mat": b"MATLAB"})
        files[archive] = zip_bytes(members) if kind == "zip" else tar_bytes(members, compress=True)
    if key == "oxford_pets":
        files["annotations.tar.gz"] = tar_bytes({"annotations/list.txt": b"#", "annotations/trainval.txt": b""},
                                                compress=True)
    if key == "oxford_flowers":
        files["imagelabels.mat"] = b"MATLAB 5.0 MAT-file, synthetic labels"
    counts = _counts(*(len(split[s]) for s in ("train", "val", "test")), 3)
    files[info.split_file] = _split_json(split)                               # type: ignore[index]
    return Synthetic(files, counts, {info.split_file: info.split_file})      # type: ignore[dict-item]


def full_dtd() -> Synthetic:
    """DTD's archive with every image its shipped split names (5,640): the check must then report OK."""
    split = read_shipped_json("split_zhou_DescribableTextures.json")
    paths = {row[0] for name in ("train", "val", "test") for row in split[name]}
    members = {f"dtd/images/{p}": JPEG for p in sorted(paths)}
    members["dtd/labels/labels_joint_anno.txt"] = b""
    counts = _counts(*(len(split[s]) for s in ("train", "val", "test")), 47)
    return Synthetic({"dtd-r1.0.1.tar.gz": tar_bytes(members, compress=True)}, counts)


def local_sources(server: FileServer, served: Mapping[str, Synthetic], *, base: Sources | None = None,
                  checksums: bool = True) -> Sources:
    """The shipped table with each listed dataset's URLs on ``server`` and the synthetic files' SHA-256 and size.

    Files a synthetic dataset adds (a trimmed split file) become extra plain-file entries; the server gets every file.
    """
    base = base or load_sources()
    datasets = dict(base.datasets)
    for key, data in served.items():
        entry = base.get(key)
        files = []
        for file in entry.files:
            content = data.files[file.name]
            server.files[f"{key}/{file.name}"] = content
            files.append(replace(file, urls=(SourceUrl(server.url(f"{key}/{file.name}"), "official", "test"),),
                                 checksum=f"sha256:{sha256(content)}" if checksums else None, size=len(content)))
        for name, target in data.extra.items():
            server.files[f"{key}/{name}"] = data.files[name]
            files.append(SourceFile(name, (SourceUrl(server.url(f"{key}/{name}"), "official", "test"),),
                                    f"sha256:{sha256(data.files[name])}", len(data.files[name]),
                                    ((".", target),), "test"))
        datasets[key] = replace(entry, files=tuple(files))
    return Sources(MappingProxyType(datasets), "test table")


def sources_toml(sources: Sources) -> str:
    """``sources`` in the TOML form of ``vlprompt/data/sources.toml`` (what ``--sources FILE`` reads)."""
    q = json.dumps   # JSON strings are valid TOML basic strings
    lines = ["schema = 1"]
    for key, entry in sources.datasets.items():
        lines += [f"[datasets.{key}]", f"homepage = {q(entry.homepage)}", f"terms = {q(entry.terms)}"]
        lines += [f"{name} = {q(value)}" for name, value in (("manual", entry.manual), ("layout", entry.layout))
                  if value is not None]
        for file in entry.files:
            lines += [f"[[datasets.{key}.files]]", f"name = {q(file.name)}",
                      f"size = {file.size if file.size is not None else q('unknown')}",
                      f"checksum = {q(file.checksum or NO_CHECKSUM)}",
                      "place = [" + ", ".join(f"[{q(a)}, {q(b)}]" for a, b in file.place) + "]",
                      f"source = {q(file.source)}"]
            if file.copy_from is not None:
                lines.append(f"copy_from = {q(file.copy_from)}")
            lines.append("urls = [" + ", ".join(f"{{ url = {q(u.url)}, kind = {q(u.kind)}, note = {q(u.note)} }}"
                                                for u in file.urls) + "]")
    return "\n".join(lines) + "\n"


# ---- the server ---------------------------------------------------------------------------------------------------
class FileServer:
    """Serve ``files`` (path -> bytes) on 127.0.0.1 until closed; use as a context manager.

    ``served[path]`` counts body bytes sent, ``requests`` records ``(path, Range header)``; ``cut_once[path] = n``
    makes the next response for ``path`` stop after ``n`` body bytes and close the connection; paths in
    ``no_ranges`` ignore Range headers (answer 200 with the whole file); ``html`` paths answer with a web page.
    """

    def __init__(self, files: Mapping[str, bytes] | None = None) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.served: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut_once: dict[str, int] = {}
        self.no_ranges: set[str] = set()
        self.html: set[str] = set()
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return None

            def do_GET(self) -> None:  # noqa: N802 - the http.server interface
                path = self.path.lstrip("/")
                range_header = self.headers.get("Range")
                with server._lock:
                    server.requests.append((path, range_header))
                data = server.files.get(path)
                if data is None:
                    self.send_error(404)
                    return
                if path in server.html:
                    page = b"<html>confirm</html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                start = 0
                if range_header and path not in server.no_ranges:
                    start = int(range_header.removeprefix("bytes=").rstrip("-"))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with server._lock:
                    cut = server.cut_once.pop(path, None)
                if cut is not None:
                    body = body[:cut]
                self.wfile.write(body)
                with server._lock:
                    server.served[path] = server.served.get(path, 0) + len(body)
                if cut is not None:
                    self.close_connection = True

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
