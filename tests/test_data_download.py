"""``vlprompt data download``: the sources table, and downloads from a local HTTP server on 127.0.0.1 (offline).

Each dataset is served as small synthetic archives with the real archives' names and inner structure; the downloader
is pointed at the server through its ``sources`` parameter (or ``--sources FILE``), the same way a user points it at
a mirror.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
from download_support import (
    CLASSNAMES_TXT,
    JPEG,
    FileServer,
    Synthetic,
    full_dtd,
    jpeg,
    local_sources,
    sha256,
    sources_toml,
    synthetic,
    tar_bytes,
    zip_bytes,
)
from support import free_port

from vlprompt.data.download import DownloadOptions, download_datasets, downloadable_keys
from vlprompt.data.registry import DATASETS
from vlprompt.data.sources import NO_CHECKSUM, SourceUrl, load_sources, parse_sources
from vlprompt.data.splitfile import read_shipped_bytes
from vlprompt.errors import DatasetError
from vlprompt.harness.cli.main import main

NAMED = ("caltech101", "oxford_pets", "oxford_flowers", "food101", "fgvc_aircraft", "sun397", "dtd", "eurosat",
         "ucf101", "stanford_cars", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
QUIET = DownloadOptions(progress=False, workers=1, retries=3, timeout=10)


def _download(keys, root, sources, **options):
    return download_datasets(list(keys), root, sources=sources, options=replace(QUIET, **options),
                             out=lambda line: None)


def _toml_table(key: str, name: str, url: str, data: bytes, place: str = '[["dtd", "."]]') -> str:
    return (f'schema = 1\n[datasets.{key}]\nhomepage = "https://example.org"\nterms = "test terms"\n'
            f'[[datasets.{key}.files]]\nname = "{name}"\nsize = {len(data)}\nchecksum = "sha256:{sha256(data)}"\n'
            f'place = {place}\nsource = "test"\nurls = [{{ url = "{url}", kind = "official", note = "" }}]\n')


# ---- the sources table --------------------------------------------------------------------------------------------
def test_sources_table_covers_every_named_dataset_with_urls_sizes_checksums_or_the_explicit_mark():
    sources = load_sources()
    assert set(NAMED) | {"imagenet"} == set(sources.datasets) == set(DATASETS)
    assert downloadable_keys(sources) == [key for key in DATASETS if key != "imagenet"]
    raw = tomllib.loads((Path(__file__).parents[1] / "src/vlprompt/data/sources.toml").read_text())
    unverifiable = set()
    for key, entry in raw["datasets"].items():
        assert entry["homepage"].startswith("https://") and entry["terms"]
        for file in entry["files"]:
            assert file["checksum"] == NO_CHECKSUM or file["checksum"].split(":")[0] in ("sha256", "md5")
            assert file["source"] and file["urls"] and file["urls"][0]["kind"] == "official"
            if file["checksum"] == NO_CHECKSUM:
                unverifiable.add(file["name"])
    # only CoOp's Google Drive files (UCF101's mid-frames and the ImageNet class names) lack a published checksum
    assert unverifiable == {"UCF-101-midframes.zip", "classnames.txt"}
    for key in NAMED:
        entry = sources.get(key)
        assert entry.downloadable and all(f.urls for f in entry.files)
        assert all(f.checksum is not None or f.name in unverifiable for f in entry.files)
    assert sources.get("imagenet").manual and not sources.get("imagenet").downloadable
    assert sources.get("dtd").files[0].checksum == \
        "sha256:e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205"


@pytest.mark.parametrize(("change", "complaint"), [
    ({"checksum": "sha256:1234"}, "'checksum' must be"),
    ({"checksum": None}, "'checksum' must be"),
    ({"size": -1}, "'size' must be"),
    ({"urls": []}, "'urls' must list"),
    ({"place": [["../x", "."]]}, "without '..'"),
    ({"name": "a/b.tar"}, "plain file name"),
])
def test_a_malformed_sources_table_is_refused_with_the_entry_named(change, complaint):
    file = {"name": "dtd-r1.0.1.tar.gz", "size": 10, "checksum": NO_CHECKSUM, "place": [["dtd", "."]],
            "source": "test", "urls": [{"url": "https://example.org/x", "kind": "official"}]}
    file.update(change)
    file = {k: v for k, v in file.items() if v is not None}
    table = {"schema": 1, "datasets": {"dtd": {"homepage": "h", "terms": "t", "files": [file]}}}
    with pytest.raises(DatasetError, match=complaint) as info:
        parse_sources(table, "t.toml")
    assert "t.toml: datasets.dtd.files[0]" in str(info.value)


# ---- every dataset end to end ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", NAMED)
def test_each_dataset_is_downloaded_verified_extracted_arranged_and_checked(key, tmp_path):
    data = synthetic(key)
    root = tmp_path / "data"
    with FileServer() as server:
        sources = local_sources(server, {key: data})
        [result] = _download([key], root, sources)
    info = DATASETS[key]
    target = root / info.folder
    assert result.status == "installed" and result.path == target and target.is_dir()
    report = result.report
    assert report.missing == [] and report.unreadable == []
    assert report.splits.counts().as_dict() == data.counts and report.decoded == sum(
        data.counts[s] for s in ("train", "val", "test"))
    assert sorted(p.name for p in root.iterdir()) == [info.folder]      # no staging folder, no downloads left
    assert info.images_in(target).is_dir()
    expected_files = {
        "caltech101": ["101_ObjectCategories/BACKGROUND_Google/image_0001.jpg"],
        "oxford_pets": ["annotations/list.txt"],
        "oxford_flowers": ["imagelabels.mat", "cat_to_name.json"],
        "food101": ["meta/classes.txt", "split_vlprompt_Food101.json"],
        "fgvc_aircraft": ["variants.txt", "images_variant_test.txt", "families.txt"],
        "sun397": ["ClassName.txt", "Training_01.txt", "SUN397/ClassName.txt", "split_vlprompt_SUN397.json"],
        "dtd": ["labels/labels_joint_anno.txt"],
        "imagenetv2": ["classnames.txt"],
        "imagenet_sketch": ["classnames.txt", f"images/{'n01440764'}/sketch_0.JPEG"],
        "imagenet_a": ["classnames.txt", "imagenet-a/README.txt"],
        "imagenet_r": ["classnames.txt", "imagenet-r/README.txt"],
    }.get(key, [])
    for rel in expected_files:
        assert (target / rel).is_file(), rel
    if key == "sun397":   # macOS resource forks in the zip are not taken for partition files
        assert not (target / "._ClassName.txt").exists()
    if key == "oxford_flowers":
        assert (target / "cat_to_name.json").read_bytes() == read_shipped_bytes("cat_to_name_OxfordFlowers.json")
    if key in ("food101", "sun397"):   # created at download time with the reference procedure, beside the data
        created = json.loads((target / info.created_split_file).read_text())
        assert created["vlprompt"]["created_by"] == "vlprompt" and report.splits.split_source.startswith("created")


@pytest.mark.slow
def test_dtd_with_every_image_of_its_shipped_split_passes_data_check_through_the_cli(tmp_path, capsys):
    data = full_dtd()
    archive = data.files["dtd-r1.0.1.tar.gz"]
    root = tmp_path / "data"
    with FileServer({"dtd.tgz": archive}) as server:
        table = tmp_path / "mirror.toml"
        table.write_text(_toml_table("dtd", "dtd-r1.0.1.tar.gz", server.url("dtd.tgz"), archive))
        code = main(["data", "download", "dtd", "--root", str(root), "--sources", str(table), "--workers", "1",
                     "-q"])
        assert server.served["dtd.tgz"] == len(archive)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "DTD: terms: test terms (https://example.org)" in out
    assert "counts: as expected" in out and "decoded: 5640 images, unreadable: 0" in out and "  OK" in out
    assert main(["data", "check", "dtd", "--root", str(root), "--no-decode"]) == 0


def test_all_through_the_cli_with_a_mirror_table_installs_every_dataset(tmp_path, capsys):
    assert parse_sources(tomllib.loads(sources_toml(load_sources())), "round trip") == \
        replace(load_sources(), origin="round trip")
    root = tmp_path / "data"
    with FileServer() as server:
        table = tmp_path / "mirror.toml"
        table.write_text(sources_toml(local_sources(server, {key: synthetic(key) for key in NAMED})))
        code = main(["data", "download", "all", "--root", str(root), "--sources", str(table), "--workers", "1",
                     "-q"])
    out = capsys.readouterr().out
    assert code == 1, out      # 1: the synthetic copies are smaller than the reference datasets (the checks say so)
    for key in NAMED:
        assert f"{DATASETS[key].title}: installed at {root / DATASETS[key].folder}" in out
    assert out.count("missing files: 0") == len(NAMED) and out.count("unreadable: 0") == len(NAMED)
    assert "vlprompt data download imagenet" in out
    assert sorted(p.name for p in root.iterdir()) == sorted(DATASETS[key].folder for key in NAMED)


# ---- verification, safety, atomicity -----------------------------------------------------------------------------
def test_a_corrupted_archive_is_refused_by_its_checksum_and_nothing_is_left_in_the_data_root(tmp_path):
    data = synthetic("dtd")
    root = tmp_path / "data"
    root.mkdir()
    with FileServer() as server:
        sources = local_sources(server, {"dtd": data})
        good = server.files["dtd/dtd-r1.0.1.tar.gz"]
        server.files["dtd/dtd-r1.0.1.tar.gz"] = good[:100] + bytes([good[100] ^ 0xFF]) + good[101:]
        with pytest.raises(DatasetError) as info:
            _download(["dtd"], root, sources)
    message = str(info.value)
    assert "dtd-r1.0.1.tar.gz" in message and f"expected {sha256(good)}" in message and "was deleted" in message
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("kind", ["tar-parent", "tar-absolute", "tar-link", "zip-parent"])
def test_an_archive_whose_members_leave_the_destination_is_refused(kind, tmp_path):
    root = tmp_path / "data"
    members = {"dtd/images/banded/banded_0001.jpg": JPEG}
    if kind == "tar-parent":
        archive = tar_bytes({**members, "dtd/../../evil.txt": b"x"}, compress=True)
    elif kind == "tar-absolute":
        archive = tar_bytes({**members, "/tmp/evil.txt": b"x"}, compress=True)
    elif kind == "tar-link":
        archive = tar_bytes(members, compress=True, links={"dtd/images/escape": "../../../etc"})
    else:
        archive = zip_bytes({**members, "../evil.txt": b"x"})
    name = "EuroSAT.zip" if kind.startswith("zip") else "dtd-r1.0.1.tar.gz"
    key = "eurosat" if kind.startswith("zip") else "dtd"
    with FileServer() as server:
        sources = local_sources(server, {key: Synthetic({name: archive}, {})})
        with pytest.raises(DatasetError, match="outside the folder") as info:
            _download([key], root, sources)
    assert "refused" in str(info.value)
    assert not root.exists() and not (tmp_path / "evil.txt").exists()


def test_a_damaged_archive_without_a_published_checksum_is_refused_and_deleted(tmp_path):
    root = tmp_path / "data"
    with FileServer() as server:
        sources = local_sources(server, {"ucf101": Synthetic({"UCF-101-midframes.zip": b"PK\x03\x04 cut"}, {})},
                                checksums=False)
        with pytest.raises(DatasetError, match="cannot be unpacked"):
            _download(["ucf101"], root, sources)
    assert not root.exists()


def test_the_published_checksum_of_the_decompressed_tar_is_accepted_for_a_gz_archive(tmp_path):
    data = synthetic("imagenetv2")
    root = tmp_path / "data"
    with FileServer() as server:
        sources = local_sources(server, {"imagenetv2": data})
        entry = sources.get("imagenetv2")
        archive = data.files["imagenetv2-matched-frequency.tar.gz"]
        decoded = replace(entry.files[0], checksum=f"sha256:{sha256(gzip.decompress(archive))}")
        sources = replace(sources, datasets={**sources.datasets,
                                             "imagenetv2": replace(entry, files=(decoded, entry.files[1]))})
        [result] = _download(["imagenetv2"], root, sources)
    assert result.status == "installed" and result.report.missing == []


# ---- resuming -----------------------------------------------------------------------------------------------------
def test_an_interrupted_download_resumes_where_it_stopped(tmp_path, caplog):
    caplog.set_level("INFO", logger="vlprompt")
    data = synthetic("eurosat")
    root = tmp_path / "data"
    with FileServer() as server:
        sources = local_sources(server, {"eurosat": data})
        path = "eurosat/EuroSAT.zip"
        size = len(server.files[path])
        half = size // 2
        server.cut_once[path] = half
        [result] = _download(["eurosat"], root, sources)
        assert result.status == "installed"
        assert server.served[path] == size                 # every byte sent once: the rest came by a Range request
        ranges = [r for p, r in server.requests if p == path]
        assert ranges == [None, f"bytes={half}-"]
    # without a terminal, progress goes to the log
    assert "downloading EuroSAT.zip: 100%" in caplog.text and "the connection ended after" in caplog.text


def test_a_partial_download_left_by_an_earlier_run_is_continued_by_the_next_run(tmp_path):
    data = synthetic("dtd")
    root = tmp_path / "data"
    with FileServer() as server:
        sources = local_sources(server, {"dtd": data})
        path = "dtd/dtd-r1.0.1.tar.gz"
        size = len(server.files[path])
        server.cut_once[path] = size // 3
        with pytest.raises(DatasetError, match="run the command again to resume"):
            _download(["dtd"], root, sources, retries=0)
        parts = list((root / ".downloads").glob("dtd-r1.0.1.tar.gz.*.part"))
        assert len(parts) == 1 and parts[0].stat().st_size == size // 3
        assert not (root / "dtd").exists()
        [result] = _download(["dtd"], root, sources)
        assert result.status == "installed" and result.report.missing == []
        assert server.served[path] == size
        assert [r for p, r in server.requests if p == path] == [None, f"bytes={size // 3}-"]
    assert sorted(p.name for p in root.iterdir()) == ["dtd"]


def test_a_complete_partial_file_is_recognised_from_the_servers_416_answer(tmp_path):
    from vlprompt.data.download import partial_file

    data = synthetic("dtd")
    root = tmp_path / "data"
    with FileServer() as server:
        sources = local_sources(server, {"dtd": data})
        path = "dtd/dtd-r1.0.1.tar.gz"
        part = partial_file(root / ".downloads", "dtd-r1.0.1.tar.gz", server.url(path))
        part.parent.mkdir(parents=True)
        part.write_bytes(server.files[path])
        [result] = _download(["dtd"], root, sources)
        assert result.status == "installed" and server.served.get(path, 0) == 0
        assert [r for p, r in server.requests if p == path] == [f"bytes={len(server.files[path])}-"]


def test_a_server_without_range_support_sends_the_file_again_and_it_still_verifies(tmp_path):
    data = synthetic("dtd")
    root = tmp_path / "data"
    with FileServer() as server:
        sources = local_sources(server, {"dtd": data})
        path = "dtd/dtd-r1.0.1.tar.gz"
        size = len(server.files[path])
        server.no_ranges.add(path)
        server.cut_once[path] = size // 2
        [result] = _download(["dtd"], root, sources)
        assert result.status == "installed" and server.served[path] == size // 2 + size


# ---- offline, files placed by hand, mirrors ------------------------------------------------------------------------
def test_offline_one_message_names_url_file_checksum_and_where_to_put_it_exit_2(tmp_path, capsys):
    archive = synthetic("dtd").files["dtd-r1.0.1.tar.gz"]
    url = f"http://127.0.0.1:{free_port()}/dtd-r1.0.1.tar.gz"
    table = tmp_path / "offline.toml"
    table.write_text(_toml_table("dtd", "dtd-r1.0.1.tar.gz", url, archive))
    root = tmp_path / "data"
    code = main(["data", "download", "dtd", "--root", str(root), "--sources", str(table), "-q", "--timeout", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("vlprompt data: error: DTD: could not download dtd-r1.0.1.tar.gz")
    assert err.count("error:") == 1
    assert url in err and f"SHA-256 {sha256(archive)}" in err and "--from-file" in err
    assert str(root / ".downloads" / "dtd-r1.0.1.tar.gz") in err
    assert not root.exists()
    # put the file where the message says: the next run uses it without any network
    (root / ".downloads").mkdir(parents=True)
    (root / ".downloads" / "dtd-r1.0.1.tar.gz").write_bytes(archive)
    assert main(["data", "download", "dtd", "--root", str(root), "--sources", str(table), "-q", "--workers",
                 "1"]) == 1   # 1: the synthetic copy has fewer images than the reference (the check says so)
    out = capsys.readouterr().out
    assert "DTD: installed at" in out and "decoded: 18 images, unreadable: 0" in out
    assert (root / ".downloads" / "dtd-r1.0.1.tar.gz").is_file()    # a file the user placed is not deleted


def test_from_file_is_verified_and_used_instead_of_downloading(tmp_path):
    data = synthetic("oxford_pets")
    mine = tmp_path / "mine" / "images.tar.gz"
    mine.parent.mkdir()
    mine.write_bytes(data.files["images.tar.gz"])
    with FileServer() as server:
        sources = local_sources(server, {"oxford_pets": data})
        [result] = _download(["pets"], tmp_path / "data", sources, from_files=(mine,))
        assert "oxford_pets/images.tar.gz" not in server.served and result.status == "installed"
    assert mine.is_file()
    mine.write_bytes(b"not the archive")
    with FileServer() as server:
        sources = local_sources(server, {"oxford_pets": data})
        with pytest.raises(DatasetError, match="is not the expected images.tar.gz"):
            _download(["pets"], tmp_path / "other", sources, from_files=(mine,))


def test_a_web_page_instead_of_the_file_moves_on_to_the_mirror(tmp_path):
    data = synthetic("ucf101")
    with FileServer() as server:
        sources = local_sources(server, {"ucf101": data}, checksums=False)
        entry = sources.get("ucf101")
        server.files["drive"] = b"x"
        server.html.add("drive")
        first = replace(entry.files[0], urls=(SourceUrl(server.url("drive"), "official", "drive"),
                                              *entry.files[0].urls))
        sources = replace(sources, datasets={**sources.datasets, "ucf101": replace(entry, files=(first,
                                                                                                *entry.files[1:]))})
        [result] = _download(["ucf101"], tmp_path / "data", sources)
    assert result.status == "installed" and result.report.missing == []


def test_an_existing_dataset_folder_is_left_alone_and_checked(tmp_path):
    root = tmp_path / "data"
    (root / "dtd" / "images").mkdir(parents=True)
    with FileServer() as server:
        sources = local_sources(server, {"dtd": synthetic("dtd")})
        [result] = _download(["dtd"], root, sources)
        assert server.requests == []
    assert result.status == "present" and not result.ok and len(result.report.missing) == 5640


def test_two_runs_never_build_the_same_dataset_at_once(tmp_path):
    from vlprompt.common import locks

    root = tmp_path / "data"
    root.mkdir()
    with FileServer() as server:
        sources = local_sources(server, {"dtd": synthetic("dtd")})
        with locks.acquire(root / ".vlprompt-partial-dtd.lock"):
            with pytest.raises(DatasetError, match=f"another `vlprompt data download` \\(pid {os.getpid()}\\)"):
                _download(["dtd"], root, sources)
        assert server.requests == []
        [result] = _download(["dtd"], root, sources)
    assert result.status == "installed" and sorted(p.name for p in root.iterdir()) == ["dtd"]


def test_free_disk_space_is_checked_before_downloading(tmp_path, monkeypatch):
    import shutil

    from vlprompt.data import download

    with FileServer() as server:
        sources = local_sources(server, {"dtd": synthetic("dtd"), "eurosat": synthetic("eurosat")})
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(download.shutil, "disk_usage", lambda path: usage._replace(free=10))
        with pytest.raises(DatasetError, match="not enough free disk space: DTD needs about"):
            _download(["dtd"], tmp_path / "data", sources)
        with pytest.raises(DatasetError, match="not enough free disk space: DTD, EuroSAT needs about"):
            _download(["dtd", "eurosat"], tmp_path / "data", sources)   # all of them, before the first starts
        assert server.requests == []
    assert not (tmp_path / "data").exists()


# ---- ImageNet and its class names -----------------------------------------------------------------------------------
def test_imagenet_prints_the_steps_then_adds_classnames_and_checks_once_built(tmp_path, capsys):
    root = tmp_path / "data"
    assert main(["data", "download", "imagenet", "--root", str(root), "-q"]) == 1
    out = capsys.readouterr().out
    assert "ILSVRC2012_img_train.tar" in out and f"{root}/imagenet/images/val" in out and "does not exist yet" in out
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537", "n01484850"):
            (root / "imagenet" / "images" / split / wnid).mkdir(parents=True)
            (root / "imagenet" / "images" / split / wnid / "x.JPEG").write_bytes(jpeg(1))
    with FileServer() as server:
        sources = local_sources(server, {"imagenet": Synthetic({"classnames.txt": CLASSNAMES_TXT}, {})})
        [result] = _download(["imagenet"], root, sources)
    assert (root / "imagenet" / "classnames.txt").read_bytes() == CLASSNAMES_TXT
    assert result.status == "present" and result.report.missing == [] and result.report.splits.counts().test == 3


def test_variants_copy_imagenets_classnames_instead_of_downloading_them(tmp_path):
    root = tmp_path / "data"
    (root / "imagenet").mkdir(parents=True)
    (root / "imagenet" / "classnames.txt").write_bytes(CLASSNAMES_TXT)
    with FileServer() as server:
        sources = local_sources(server, {"imagenet_r": synthetic("imagenet_r")})
        [result] = _download(["imagenet-r"], root, sources)
        assert "imagenet_r/classnames.txt" not in server.served
    assert (root / "imagenet-rendition" / "classnames.txt").read_bytes() == CLASSNAMES_TXT
    assert result.report.splits.counts().classes == 2


# ---- the command line ---------------------------------------------------------------------------------------------
def test_dry_run_lists_terms_files_checksums_urls_and_sources_without_downloading(tmp_path, capsys):
    assert main(["data", "download", "all", "--root", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for key in NAMED:
        assert f"{DATASETS[key].title} -> {tmp_path / DATASETS[key].folder}" in out
    assert "UCF-101-midframes.zip: unknown size, no published checksum" in out
    assert "source: URL: CoOp (DTD section). Size and SHA-256: TFDS dtd.txt" in out
    assert list(tmp_path.iterdir()) == []


def test_unknown_names_and_a_missing_root_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VLPROMPT_DATA_ROOT", raising=False)
    assert main(["data", "download", "dtd"]) == 2
    assert "--root" in capsys.readouterr().err
    assert main(["data", "download", "nonsense", "--root", str(tmp_path)]) == 2
    assert "unknown dataset 'nonsense'" in capsys.readouterr().err


def test_the_download_command_does_not_import_torch():
    code = ("import sys; from vlprompt.harness.cli.main import main; "
            "main(['data', 'download', 'all', '--root', '/nonexistent', '--dry-run']); "
            "import vlprompt.data.download; assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
