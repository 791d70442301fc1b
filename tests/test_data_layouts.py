"""Synthetic on-disk layouts of the datasets without fixtures, read as the reference reads them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from support import class_folders, per_class, write_image

from vlprompt.data import DATASETS, Item, SplitCounts, load_dataset, sample_fewshot, subsample_classes
from vlprompt.data.standard import CREATORS
from vlprompt.errors import DatasetError

# deliberately not in wnid order: the reference orders classes by sorted wnid
CLASSNAMES_TXT = "n03 great white shark\nn01 tench\nn02 goldfish\n"


def _imagenet(root: Path, train_per_class: int = 3) -> None:
    (root / "imagenet").mkdir(parents=True)
    (root / "imagenet" / "classnames.txt").write_text(CLASSNAMES_TXT)
    for number, wnid in enumerate(("n01", "n02", "n03")):
        for i in range(train_per_class):
            write_image(root / "imagenet" / "images" / "train" / wnid / f"{wnid}_{i}.JPEG", number + i)
        write_image(root / "imagenet" / "images" / "val" / wnid / f"val_{number}.JPEG", number)


def test_imagenet_classes_in_sorted_wnid_order_val_folder_is_test(tmp_path):
    _imagenet(tmp_path)
    splits = load_dataset("ImageNet", tmp_path)
    assert splits.classnames == ["tench", "goldfish", "great white shark"]
    assert splits.template == "a photo of a {}."
    assert splits.image_dir == tmp_path / "imagenet" / "images"
    assert splits.counts() == SplitCounts(9, 0, 3, 3)
    assert splits.train[:2] == [Item("train/n01/n01_0.JPEG", 0), Item("train/n01/n01_1.JPEG", 0)]
    assert splits.test == [Item("val/n01/val_0.JPEG", 0), Item("val/n02/val_1.JPEG", 1), Item("val/n03/val_2.JPEG", 2)]


def test_imagenet_fewshot_val_comes_from_remaining_train_images(tmp_path):
    _imagenet(tmp_path)
    splits = load_dataset("imagenet", tmp_path)
    result = sample_fewshot(splits, 2, 1)
    assert result.val_from == "train" and result.val_shots == 2
    assert Counter(i.label for i in result.train) == {0: 2, 1: 2, 2: 2}
    assert not set(result.train) & set(result.val)
    assert set(result.train) | set(result.val) == set(splits.train)
    assert result.short_val == {0: 1, 1: 1, 2: 1}   # 3 per class - 2 shots = 1 left for val


def test_imagenet_v2_sketch_use_imagenet_classes(tmp_path):
    _imagenet(tmp_path)
    v2 = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    for label in range(3):
        write_image(v2 / str(label) / "a.jpeg", label)
    write_image(v2 / "2" / "b.jpeg", 9)
    splits = load_dataset("imagenet-v2", tmp_path)   # classnames.txt from <root>/imagenet
    assert splits.classnames == ["tench", "goldfish", "great white shark"]
    assert splits.train == [] and splits.val == []
    assert splits.test == [Item("0/a.jpeg", 0), Item("1/a.jpeg", 1), Item("2/a.jpeg", 2), Item("2/b.jpeg", 2)]

    sketch = tmp_path / "imagenet-sketch"
    (sketch).mkdir()
    (sketch / "classnames.txt").write_text("n01 tench fish\nn02 goldfish\nn03 shark\n")   # its own copy wins
    for wnid in ("n01", "n02", "n03"):
        write_image(sketch / "images" / wnid / "s.png", 1)
    splits = load_dataset("ImageNetSketch", tmp_path)
    assert splits.classnames == ["tench fish", "goldfish", "shark"]
    assert splits.test == [Item("n01/s.png", 0), Item("n02/s.png", 1), Item("n03/s.png", 2)]


@pytest.mark.parametrize(("name", "folder", "sub"), [("imagenet_a", "imagenet-adversarial", "imagenet-a"),
                                                     ("ImageNet-R", "imagenet-rendition", "imagenet-r")])
def test_imagenet_a_r_are_the_present_wnid_subsets_relabelled(tmp_path, name, folder, sub):
    _imagenet(tmp_path)
    base = tmp_path / folder / sub
    write_image(base / "n03" / "x.jpg", 1)
    write_image(base / "n01" / "y.jpg", 2)
    write_image(base / "n01" / "z.jpg", 3)
    (base / "README.txt").write_text("not a class")
    splits = load_dataset(name, tmp_path)
    assert splits.classnames == ["tench", "great white shark"]
    assert splits.test == [Item("n01/y.jpg", 0), Item("n01/z.jpg", 0), Item("n03/x.jpg", 1)]
    assert splits.train == [] and splits.val == []
    assert subsample_classes(splits, "new").test == [Item("n03/x.jpg", 0)]
    with pytest.raises(DatasetError, match="test-only dataset"):
        sample_fewshot(splits, 1, 1)


def test_imagenet_subset_folder_that_is_not_a_wnid_is_refused(tmp_path):
    _imagenet(tmp_path)
    write_image(tmp_path / "imagenet-adversarial" / "imagenet-a" / "n99" / "x.jpg")
    with pytest.raises(DatasetError, match="1 folders that are not ImageNet wnids of classnames.txt: n99"):
        load_dataset("imagenet_a", tmp_path)


def _fgvc(root: Path, test_lines: str = "1000003 Cessna 172\n") -> Path:
    base = root / "fgvc_aircraft"
    base.mkdir(parents=True)
    (base / "variants.txt").write_text("707-320\nA300B4\nCessna 172\n")
    (base / "images_variant_train.txt").write_text("1000001 Cessna 172\n1000002 707-320\n")
    (base / "images_variant_val.txt").write_text("1000004 A300B4\n")
    (base / "images_variant_test.txt").write_text(test_lines)
    for image_id in range(1000001, 1000005):
        write_image(base / "images" / f"{image_id}.jpg", image_id % 7)
    return base


def test_fgvc_aircraft_from_official_variant_lists(tmp_path):
    _fgvc(tmp_path)
    splits = load_dataset("FGVCAircraft", tmp_path)
    assert splits.classnames == ["707-320", "A300B4", "Cessna 172"]
    assert splits.template == "a photo of a {}, a type of aircraft."
    assert splits.train == [Item("1000001.jpg", 2), Item("1000002.jpg", 0)]
    assert splits.val == [Item("1000004.jpg", 1)] and splits.test == [Item("1000003.jpg", 2)]


def test_fgvc_unknown_variant_and_missing_image_are_reported(tmp_path):
    base = _fgvc(tmp_path, test_lines="1000003 Cessna 999\n")
    with pytest.raises(DatasetError, match="names 1 variants absent from variants.txt: Cessna 999"):
        load_dataset("fgvc_aircraft", tmp_path)
    (base / "images_variant_test.txt").write_text("1000003 Cessna 172\n1000777 A300B4\n")
    with pytest.raises(DatasetError, match="1 of its 5 files are missing .*: 1000777.jpg"):
        load_dataset("fgvc_aircraft", tmp_path)


def test_caltech101_split_created_without_excluded_classes_with_renames(tmp_path):
    images = tmp_path / "caltech-101" / "101_ObjectCategories"
    class_folders(images, {"BACKGROUND_Google": 5, "Faces": 5, "Faces_easy": 5, "Leopards": 7, "accordion": 5,
                           "airplanes": 10})
    info = DATASETS["caltech101"]
    created = CREATORS["caltech101"](info, tmp_path / "caltech-101")
    assert created.raw_classnames == ["face", "leopard", "accordion", "airplane"]
    # per class round(n * 0.5) train, round(n * 0.2) val, the rest test (Python's round: 2.5 -> 2, 3.5 -> 4)
    assert per_class(created.train) == {0: 2, 1: 4, 2: 2, 3: 5}
    assert per_class(created.val) == {0: 1, 1: 1, 2: 1, 3: 2}
    assert per_class(created.test) == {0: 2, 1: 2, 2: 2, 3: 3}
    every = created.train + created.val + created.test
    assert not any(i.path.startswith(("BACKGROUND_Google/", "Faces_easy/")) for i in every)
    assert {i.path.split("/")[0] for i in every if i.label == 3} == {"airplanes"}
    assert len(set(every)) == 5 + 7 + 5 + 10
    assert CREATORS["caltech101"](info, tmp_path / "caltech-101") == created   # deterministic


def test_eurosat_split_created_with_descriptive_names(tmp_path):
    class_folders(tmp_path / "eurosat" / "2750", {"AnnualCrop": 4, "HerbaceousVegetation": 4, "SeaLake": 4})
    created = CREATORS["eurosat"](DATASETS["eurosat"], tmp_path / "eurosat")
    assert created.raw_classnames == ["Annual Crop Land", "Herbaceous Vegetation Land", "Sea or Lake"]
    assert (len(created.train), len(created.val), len(created.test)) == (6, 3, 3)


def test_food101_split_created_written_and_reused(tmp_path):
    class_folders(tmp_path / "food-101" / "images", {"apple_pie": 10, "baby_back_ribs": 5})
    first = load_dataset("food101", tmp_path, cache_dir=tmp_path / "cache")
    written = tmp_path / "food-101" / "split_vlprompt_Food101.json"
    assert first.split_source == f"created split file {written}"
    assert first.classnames == ["apple pie", "baby back ribs"]
    assert first.counts() == SplitCounts(7, 3, 5, 2)
    document = json.loads(written.read_text())
    assert document["train"][0][1:] == [0, "apple_pie"] and document["vlprompt"]["seed"] == 1
    write_image(tmp_path / "food-101" / "images" / "apple_pie" / "img999.jpg")   # new images do not change it
    second = load_dataset("food-101", tmp_path, cache_dir=tmp_path / "cache")
    assert second.split_source == first.split_source
    assert (second.train, second.val, second.test) == (first.train, first.val, first.test)


def test_created_split_goes_to_the_cache_when_the_dataset_folder_is_read_only(tmp_path, monkeypatch):
    from vlprompt.data import resolve

    class_folders(tmp_path / "food-101" / "images", {"apple_pie": 4, "baby_back_ribs": 4})
    real_write = resolve.write_split_file

    def refuse_dataset_folder(path, splits, meta=None):
        if Path(path).parent == tmp_path / "food-101":
            raise PermissionError(13, "Permission denied", str(path))
        return real_write(path, splits, meta)

    monkeypatch.setattr(resolve, "write_split_file", refuse_dataset_folder)
    first = load_dataset("food101", tmp_path, cache_dir=tmp_path / "cache")
    cached = list((tmp_path / "cache" / "splits").glob("food-101-*/split_vlprompt_Food101.json"))
    assert len(cached) == 1 and first.split_source == f"created split file {cached[0]}"
    assert not (tmp_path / "food-101" / "split_vlprompt_Food101.json").exists()
    again = load_dataset("food101", tmp_path, cache_dir=tmp_path / "cache")
    assert again.split_source == first.split_source and again.train == first.train


def test_sun397_partition_01_with_val_from_train(tmp_path):
    base = tmp_path / "sun397"
    base.mkdir()
    (base / "ClassName.txt").write_text("/a/abbey\n/b/bakery/shop\n")
    train_lines, test_lines = [], []
    for cls in ("a/abbey", "b/bakery/shop"):
        for i in range(7):
            write_image(base / "SUN397" / cls / f"sun_{i}.jpg", i)
            (train_lines if i < 5 else test_lines).append(f"/{cls}/sun_{i}.jpg")
    (base / "Training_01.txt").write_text("\n".join(train_lines) + "\n")
    (base / "Testing_01.txt").write_text("\n".join(test_lines) + "\n")
    splits = load_dataset("SUN397", tmp_path, cache_dir=tmp_path / "cache")
    assert splits.classnames == ["abbey", "shop bakery"]
    assert per_class(splits.train) == {0: 4, 1: 4} and per_class(splits.val) == {0: 1, 1: 1}
    assert splits.test == [Item("a/abbey/sun_5.jpg", 0), Item("a/abbey/sun_6.jpg", 0),
                           Item("b/bakery/shop/sun_5.jpg", 1), Item("b/bakery/shop/sun_6.jpg", 1)]
    assert (base / "split_vlprompt_SUN397.json").is_file()


def test_registry_keys_folders_and_aliases():
    assert list(DATASETS) == ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                              "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101", "imagenetv2", "imagenet_sketch",
                              "imagenet_a", "imagenet_r"]
    assert [info.folder for info in DATASETS.values()] == [
        "imagenet", "caltech-101", "oxford_pets", "stanford_cars", "oxford_flowers", "food-101", "fgvc_aircraft",
        "sun397", "dtd", "eurosat", "ucf101", "imagenetv2", "imagenet-sketch", "imagenet-adversarial",
        "imagenet-rendition"]
    from vlprompt.data import lookup

    for alias, key in (("Flowers102", "oxford_flowers"), ("oxford_flowers", "oxford_flowers"),
                       ("OxfordFlowers", "oxford_flowers"), ("DescribableTextures", "dtd"), ("DTD", "dtd"),
                       ("ImageNet-A", "imagenet_a"), ("imagenet-sketch", "imagenet_sketch"), ("EuroSAT", "eurosat"),
                       ("Caltech-101", "caltech101"), ("food-101", "food101"), ("ImageNetV2", "imagenetv2")):
        assert lookup(alias).key == key
    assert lookup("mnist") is None
    assert DATASETS["imagenet_r"].template == DATASETS["imagenet"].template == "a photo of a {}."
    assert DATASETS["eurosat"].template == "a centered satellite photo of {}."
