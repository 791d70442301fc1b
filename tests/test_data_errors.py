"""Bad inputs give the documented errors: missing root / split / files, corrupt images, empty classes, odd K."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import class_folders, truncated_jpeg, write_image

from vlprompt.data import DatasetSplits, Item, check_dataset, load_dataset, sample_fewshot, subsample_classes
from vlprompt.errors import ConfigError, DatasetError


def _dtd_with_own_split(root: Path, entries: dict[str, list[list]]) -> Path:
    folder = root / "dtd"
    (folder / "images").mkdir(parents=True)
    (folder / "split_zhou_DescribableTextures.json").write_text(json.dumps(entries))
    return folder


def test_missing_root_and_dataset_folder(tmp_path):
    with pytest.raises(DatasetError, match=r"data root .*nope does not exist\. Pass --root as the folder"):
        load_dataset("dtd", tmp_path / "nope")
    with pytest.raises(DatasetError, match=r"dataset folder .*dtd does not exist\. DTD is expected at .*/dtd/images/"):
        load_dataset("dtd", tmp_path)
    (tmp_path / "images").mkdir()   # the user passed the dataset folder itself as root
    with pytest.raises(DatasetError, match="--root seems to be the dataset folder itself: pass its parent"):
        load_dataset("dtd", tmp_path)
    (tmp_path / "dtd").mkdir()
    with pytest.raises(DatasetError, match=r"DTD image folder .*dtd/images does not exist"):
        load_dataset("dtd", tmp_path)
    with pytest.raises(DatasetError, match="give the data root"):
        load_dataset("dtd")


def test_missing_split_or_list_files(tmp_path):
    _dtd_with_own_split(tmp_path, {"train": [], "test": []})
    with pytest.raises(DatasetError, match="split_zhou_DescribableTextures.json has no val split"):
        load_dataset("dtd", tmp_path)
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text('{"train": [["a.jpg", 0, ')
    with pytest.raises(DatasetError, match="cannot be read .* it may be truncated"):
        load_dataset("dtd", tmp_path)
    (tmp_path / "fgvc_aircraft" / "images").mkdir(parents=True)
    (tmp_path / "fgvc_aircraft" / "variants.txt").write_text("A300B4\n")
    with pytest.raises(DatasetError, match=r"images_variant_train.txt does not exist: FGVCAircraft needs"):
        load_dataset("fgvc_aircraft", tmp_path)
    (tmp_path / "sun397" / "SUN397").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"ClassName.txt does not exist"):
        load_dataset("sun397", tmp_path, cache_dir=tmp_path / "cache")
    (tmp_path / "imagenet" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"classnames.txt does not exist"):
        load_dataset("imagenet", tmp_path)


def test_split_naming_absent_files_lists_first_offenders_and_count(tmp_path):
    folder = _dtd_with_own_split(tmp_path, {
        "train": [[f"banded/b{i}.jpg", 0, "banded"] for i in range(14)] + [["dotted/d.jpg", 1, "dotted"]],
        "val": [["banded/b0.jpg", 0, "banded"]], "test": [["banded/b1.jpg", 0, "banded"]]})
    write_image(folder / "images" / "banded" / "b0.jpg")
    write_image(folder / "images" / "banded" / "b1.jpg")
    with pytest.raises(DatasetError) as info:
        load_dataset("dtd", tmp_path)
    message = str(info.value)
    assert "disagrees with the images on disk: 13 of its 15 files are missing" in message
    assert "banded/b2.jpg, banded/b3.jpg" in message and "(and 3 more)" in message
    assert "Folders absent under the image folder: dotted." in message
    splits = load_dataset("dtd", tmp_path, check_files=False)   # the check can be turned off
    assert splits.counts().train == 15


def test_inconsistent_split_entries(tmp_path):
    _dtd_with_own_split(tmp_path, {"train": [["a.jpg", 0, "banded"], ["b.jpg", 0, "dotted"]], "val": [], "test": []})
    with pytest.raises(DatasetError, match=r"label 0 is 'banded' and 'dotted' \(train\[1\]\)"):
        load_dataset("dtd", tmp_path, check_files=False)
    _dtd_with_own_split(tmp_path / "2", {"train": [["a.jpg", 0, "x"], ["b.jpg", 2, "y"]], "val": [], "test": []})
    with pytest.raises(DatasetError, match=r"train\[1\] has label 2, but with 2 distinct labels they must run 0..1 "
                                           r"without gaps"):
        load_dataset("dtd", tmp_path / "2", check_files=False)
    _dtd_with_own_split(tmp_path / "3", {"train": [["/abs/a.jpg", 0, "x"]], "val": [], "test": []})
    with pytest.raises(DatasetError, match="is not relative to the image folder"):
        load_dataset("dtd", tmp_path / "3", check_files=False)


def test_class_with_zero_images(tmp_path):
    data = tmp_path / "mine"
    class_folders(data, {"full": 4})
    (data / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"1 classes have too few images .*: empty \(0 images\)"):
        load_dataset(f"folder:{data}", cache_dir=tmp_path / "cache")
    class_folders(tmp_path / "imagenet" / "images" / "train", {"n01": 1, "n02": 1})
    class_folders(tmp_path / "imagenet" / "images" / "val", {"n01": 1})
    (tmp_path / "imagenet" / "images" / "val" / "n02").mkdir()
    (tmp_path / "imagenet" / "classnames.txt").write_text("n01 tench\nn02 goldfish\n")
    with pytest.raises(DatasetError, match=r"1 classes have zero images in .*val: n02"):
        load_dataset("imagenet", tmp_path)
    base = tmp_path / "fgvc_aircraft"
    write_image(base / "images" / "1.jpg")
    (base / "variants.txt").write_text("A300B4\nCessna 172\n")
    for split in ("train", "val", "test"):
        (base / f"images_variant_{split}.txt").write_text("1 A300B4\n")
    with pytest.raises(DatasetError, match="1 classes have zero images: Cessna 172"):
        load_dataset("fgvc_aircraft", tmp_path)


def _toy(train_counts: list[int]) -> DatasetSplits:
    train = [Item(f"c{label}/{i}.jpg", label) for label, count in enumerate(train_counts) for i in range(count)]
    val = [Item(f"c{label}/v.jpg", label) for label in range(len(train_counts))]
    return DatasetSplits("toy", Path("/data/toy"), [f"c{i}" for i in range(len(train_counts))], "a photo of a {}.",
                         train, val, [])


def test_k_larger_than_a_class_keeps_its_images_and_reports_it():
    result = sample_fewshot(_toy([5, 1, 0, 3]), 2, 7)
    by_label = {label: [i for i in result.train if i.label == label] for label in range(4)}
    assert [len(by_label[label]) for label in range(4)] == [2, 1, 0, 2]
    assert by_label[1] == [Item("c1/0.jpg", 1)]
    assert result.short_train == {1: 1, 2: 0}
    assert result.short_report()[0] == "2 classes have fewer than 2 train images, all of them are used: c1 (1), c2 (0)"
    assert len(result.val) == 4 and result.short_val == {0: 1, 1: 1, 2: 1, 3: 1}


def test_bad_k_seed_subset_and_test_only():
    splits = _toy([2, 2])
    for shots in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="shots must be an integer >= 1"):
            sample_fewshot(splits, shots, 1)
    with pytest.raises(ConfigError, match="seed must be an integer"):
        sample_fewshot(splits, 1, "1")
    with pytest.raises(ConfigError, match="unknown class subset 'novel'"):
        subsample_classes(splits, "novel")
    test_only = DatasetSplits("t", Path("/x"), ["a"], "{}", [], [], [Item("a.jpg", 0)])
    with pytest.raises(DatasetError, match="test-only dataset"):
        sample_fewshot(test_only, 1, 1)


def test_base_novel_odd_class_count_relabels_from_zero():
    splits = _toy([1, 1, 1, 1, 1])
    base, new = subsample_classes(splits, "base"), subsample_classes(splits, "new")
    assert base.classnames == ["c0", "c1", "c2"] and new.classnames == ["c3", "c4"]   # ceil(5 / 2) = 3 base
    assert new.train == [Item("c3/0.jpg", 0), Item("c4/0.jpg", 1)]
    assert subsample_classes(splits, "all") == splits


def test_check_finds_corrupt_truncated_empty_and_non_image_files(tmp_path):
    data = tmp_path / "mine"
    class_folders(data, {"a": 4, "b": 4})
    truncated_jpeg(data / "a" / "img001.jpg")
    (data / "a" / "img002.jpg").write_bytes(b"")
    (data / "b" / "img003.jpg").write_text("<html>not an image</html>")
    report = check_dataset(f"folder:{data}", None, workers=1, progress=False, cache_dir=tmp_path / "cache")
    assert report.decoded == 8 and report.missing == [] and report.expected is None
    assert sorted(bad.path for bad in report.unreadable) == ["a/img001.jpg", "a/img002.jpg", "b/img003.jpg"]
    reasons = {bad.path: bad.reason for bad in report.unreadable}
    assert "truncated" in reasons["a/img001.jpg"]
    assert not report.ok and report.lines()[-1] == "PROBLEMS FOUND"


def test_cap_test_split_keeps_a_fixed_ordered_subset():
    from vlprompt.data import DatasetSplits, Item, cap_test_split

    test = [Item(f"c{i % 3}/{i}.jpg", i % 3) for i in range(100)]
    splits = DatasetSplits(name="toy", image_dir=Path("."), classnames=["a", "b", "c"], template="{}.",
                           train=[], val=[], test=test)
    capped = cap_test_split(splits, 10)
    assert len(capped.test) == 10
    assert capped.test == cap_test_split(splits, 10).test  # the same items every time
    positions = [test.index(item) for item in capped.test]
    assert positions == sorted(positions)  # original order kept
    assert len(splits.test) == 100  # the input is not modified
    assert cap_test_split(splits, None) is splits and cap_test_split(splits, 100) is splits
