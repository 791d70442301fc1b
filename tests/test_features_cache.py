"""The SQLite feature cache on its own: storage round trip, corrupt rows, content hashes, keys, errors."""

from __future__ import annotations

import hashlib
import os
import pickle
import sqlite3

import numpy as np
import pytest

from vlprompt.features import cache as feature_cache
from vlprompt.errors import VlpromptError
from vlprompt.features.cache import FeatureCache, FeatureCacheError, FeatureKeyer, default_cache_root


@pytest.fixture
def cache(tmp_path):
    with FeatureCache(tmp_path / "cache") as c:
        yield c


def test_round_trip_is_bit_exact_and_counts(cache):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    assert cache.put_many([("a", a), ("b", b)]) == 2
    got = cache.get_many(["a", "b", "absent", "a"], dim=16)
    assert set(got) == {"a", "b"}
    assert got["a"].tobytes() == a.tobytes() and got["b"].tobytes() == b.tobytes()
    stats = cache.stats()
    assert (stats.rows, stats.payload_bytes, stats.hits, stats.misses, stats.corrupt) == (2, 128, 2, 1, 0)
    assert stats.path == cache.root / "features.sqlite" and stats.file_bytes > 0


def test_rows_of_another_dimension_are_not_served(cache):
    cache.put_many([("k", np.ones(8))])
    assert cache.get_many(["k"], dim=16) == {}
    assert cache.get_many(["k"], dim=8)["k"].tolist() == [1.0] * 8
    assert cache.corrupt == 1


def test_replacing_a_row(cache):
    cache.put_many([("k", np.zeros(4))])
    cache.put_many([("k", np.arange(4))])
    assert cache.get_many(["k"])["k"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert cache.stats().rows == 1


@pytest.mark.parametrize("damage", [
    "UPDATE features SET data = substr(data, 1, 12) WHERE key = 'k'",          # truncated blob
    "UPDATE features SET dim = 5 WHERE key = 'k'",                              # length no longer dim * 4
    "UPDATE features SET data = zeroblob(16) WHERE key = 'k'",                  # same length, checksum differs
    "UPDATE features SET dim = 0, data = x'' WHERE key = 'k'",                  # empty row
])
def test_corrupt_rows_are_treated_as_missing(cache, damage):
    cache.put_many([("k", np.arange(1, 5)), ("ok", np.ones(4))])
    with sqlite3.connect(cache.path) as conn:
        conn.execute(damage)
    got = cache.get_many(["k", "ok"])
    assert list(got) == ["ok"] and cache.corrupt == 1 and cache.misses == 1


def test_put_rejects_non_vectors(cache):
    with pytest.raises(ValueError, match="1-D"):
        cache.put_many([("k", np.ones((2, 2)))])
    with pytest.raises(ValueError, match="1-D"):
        cache.put_many([("k", np.ones(0))])


def test_many_keys_span_several_queries(cache):
    vectors = np.arange(1200 * 2, dtype=np.float32).reshape(1200, 2)
    cache.put_many((f"k{i}", v) for i, v in enumerate(vectors))
    got = cache.get_many([f"k{i}" for i in range(1200)], dim=2)
    assert len(got) == 1200 and got["k1199"].tolist() == [2398.0, 2399.0]


def test_clear(cache, tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    cache.put_many([("a", np.ones(3))])
    cache.file_digests([tmp_path / "f"])
    assert cache.clear() == 1
    stats = cache.stats()
    assert (stats.rows, stats.hashed_files) == (0, 0)


def test_file_digests_are_sha256_and_list_unreadable_files(cache, tmp_path):
    (tmp_path / "a").write_bytes(b"hello")
    digests, errors = cache.file_digests([tmp_path / "a", tmp_path / "missing"])
    assert digests == [hashlib.sha256(b"hello").hexdigest(), None]
    assert list(errors) == [1] and "No such file" in errors[1]


def test_unchanged_files_are_not_hashed_again(cache, tmp_path, monkeypatch):
    for name in "abc":
        (tmp_path / name).write_bytes(name.encode() * 100)
    paths = [tmp_path / name for name in "abc"]
    # files written this instant are "racily clean"; pretend the stat tick is fine-grained
    monkeypatch.setattr(feature_cache, "RACY_MARGIN_NS", -1)
    first, _ = cache.file_digests(paths)
    calls = []
    real = feature_cache.file_digest
    monkeypatch.setattr(feature_cache, "file_digest", lambda p: calls.append(p) or real(p))
    assert cache.file_digests(paths)[0] == first and calls == []
    (tmp_path / "b").write_bytes(b"different content, different size")
    again, _ = cache.file_digests(paths)
    assert len(calls) == 1 and again[0] == first[0] and again[1] != first[1]


def test_recently_changed_files_are_always_hashed(cache, tmp_path, monkeypatch):
    """A same-size rewrite inside one timestamp tick keeps size and mtime: recent files are never trusted (and the
    inode change time, which no tool can set back, is part of the stat checked)."""
    path = tmp_path / "a"
    path.write_bytes(b"one")
    first, _ = cache.file_digests([path])
    calls = []
    real = feature_cache.file_digest
    monkeypatch.setattr(feature_cache, "file_digest", lambda p: calls.append(p) or real(p))
    before = path.stat()
    path.write_bytes(b"two")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, same mtime: only the content differs
    second, _ = cache.file_digests([path])
    assert calls and second[0] == hashlib.sha256(b"two").hexdigest() != first[0]


def test_keys_separate_every_component():
    keyer = FeatureKeyer("model", "fp32", "cpu", "eval(224)")
    base = keyer.eval_key("d1")
    assert keyer.eval_key("d1") == base and len(base) == 64
    variants = {
        FeatureKeyer("model2", "fp32", "cpu", "eval(224)").eval_key("d1"),
        FeatureKeyer("model", "bf16", "cpu", "eval(224)").eval_key("d1"),
        FeatureKeyer("model", "fp32", "cuda", "eval(224)").eval_key("d1"),
        FeatureKeyer("model", "fp32", "cpu", "eval(336)").eval_key("d1"),
        keyer.eval_key("d2"),
        keyer.view_key("d1", seed=1, view=0, path="a.jpg"),
        keyer.view_key("d1", seed=2, view=0, path="a.jpg"),
        keyer.view_key("d1", seed=1, view=1, path="a.jpg"),
        keyer.view_key("d1", seed=1, view=0, path="b.jpg"),
    }
    assert len(variants) == 9 and base not in variants
    assert keyer.view_key("d1", seed=1, view=0, path="a.jpg") == keyer.view_key("d1", seed=1, view=0, path="a.jpg")


def test_default_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "c"))
    assert default_cache_root() == tmp_path / "c" / "features"
    assert FeatureCache().root == tmp_path / "c" / "features"
    monkeypatch.delenv("VLPROMPT_CACHE")
    assert default_cache_root().parts[-2:] == ("vlprompt", "features")


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "features.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(FeatureCacheError, match="delete") as info:
        FeatureCache(root).get_many(["k"])
    assert isinstance(info.value, VlpromptError)


def test_a_newer_format_is_refused(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    with sqlite3.connect(root / "features.sqlite") as conn:
        conn.execute("PRAGMA user_version=99")
    with pytest.raises(FeatureCacheError, match="format version 99"):
        FeatureCache(root).stats()


def test_pickles_without_its_connection(cache):
    cache.put_many([("k", np.ones(2))])
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.get_many(["k"])["k"].tolist() == [1.0, 1.0]
    clone.close()


def _open_and_write(root: str, barrier, index: int) -> None:
    from vlprompt.features.cache import FeatureCache

    barrier.wait()
    with FeatureCache(root) as cache:
        cache.put_many([(f"k{index}", np.full(4, index, dtype=np.float32))])


def test_processes_opening_a_new_cache_together_all_succeed(tmp_path):
    """Ranks of a distributed job open the same fresh cache at the same moment (SQLite's journal-mode switch would
    answer 'database is locked' to all but one without the set-up lock)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    for attempt in range(5):
        root = tmp_path / f"cache{attempt}"
        workers = 6
        barrier = context.Barrier(workers)
        processes = [context.Process(target=_open_and_write, args=(str(root), barrier, i)) for i in range(workers)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=120)
        assert [process.exitcode for process in processes] == [0] * workers
        with FeatureCache(root) as cache:
            assert sorted(cache.get_many([f"k{i}" for i in range(workers)], dim=4)) == [f"k{i}" for i in range(workers)]


# ------------------------------------------------------------------------------------------------ cluster safety

MOUNTS = """\
/dev/nvme0n1p2 / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw,nosuid,nodev 0 0
fileserver:/export/home /home nfs4 rw,relatime,vers=4.2 0 0
10.0.0.1@o2ib:/scratch /lustre/scratch lustre rw,flock 0 0
/dev/nvme1n1 /lustre/scratch/local xfs rw 0 0
gpfs0 /gpfs gpfs rw 0 0
//nas/share /mnt/my\\040share cifs rw 0 0
"""


def test_network_filesystems_are_found_in_the_mounts_table():
    assert feature_cache.network_filesystem("/home/ada/.cache/vlprompt/features", MOUNTS) == "nfs4"
    assert feature_cache.network_filesystem("/lustre/scratch/ada/cache", MOUNTS) == "lustre"
    assert feature_cache.network_filesystem("/lustre/scratch/local/cache", MOUNTS) is None  # the longest mount wins
    assert feature_cache.network_filesystem("/gpfs/projects/x", MOUNTS) == "gpfs"
    assert feature_cache.network_filesystem("/mnt/my share/cache", MOUNTS) == "cifs"
    assert feature_cache.network_filesystem("/tmp/cache", MOUNTS) is None
    assert feature_cache.network_filesystem("/homework/cache", MOUNTS) is None  # a prefix of the name is not a parent
    assert feature_cache.network_filesystem("/anything", "") is None


def test_a_read_write_cache_on_a_network_filesystem_warns(tmp_path, monkeypatch, caplog):
    table = f"server:/export {tmp_path} nfs rw 0 0\n"
    monkeypatch.setattr(feature_cache, "_read_mounts", lambda: table)
    with caplog.at_level("WARNING", logger="vlprompt.features.cache"), FeatureCache(tmp_path / "c") as cache:
        cache.put_many([("a", np.ones(4, np.float32))])
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "network file system (nfs)" in warning and "VLPROMPT_CACHE=$TMPDIR" in warning
    assert "--cache-read-only" in warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="vlprompt.features.cache"), \
            FeatureCache(tmp_path / "c", read_only=True) as reader:
        assert set(reader.get_many(["a"])) == {"a"}
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # read-only is the safe way: no warning


def test_a_read_only_cache_serves_rows_and_writes_nothing(tmp_path):
    rng = np.random.default_rng(1)
    row = rng.standard_normal(8).astype(np.float32)
    image = tmp_path / "img.bin"
    image.write_bytes(b"pixels")
    with FeatureCache(tmp_path / "c") as writer:
        writer.put_many([("kept", row)])
    before = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir() if p.is_file()}
    os.chmod(tmp_path / "c", 0o555)  # nothing may be created beside the database either
    try:
        with FeatureCache(tmp_path / "c", read_only=True) as reader:
            assert reader.get_many(["kept", "new"])["kept"].tobytes() == row.tobytes()
            assert reader.put_many([("new", row)]) == 0 and reader.unstored == 1
            digests, errors = reader.file_digests([image])
            assert digests == [hashlib.sha256(b"pixels").hexdigest()] and not errors
            assert reader.stats().rows == 1 and reader.stats().hashed_files == 0
            with pytest.raises(FeatureCacheError, match="read-only"):
                reader.clear()
    finally:
        os.chmod(tmp_path / "c", 0o755)
    after = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir() if p.is_file()}
    assert after == before
    with pytest.raises(FeatureCacheError, match="does not exist"):
        FeatureCache(tmp_path / "none", read_only=True).get_many(["a"])
