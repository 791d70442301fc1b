"""The user's own data: class folders, split folders, CSV and JSON lists, names files, overrides, templates."""

from __future__ import annotations

import json

import pytest
from support import class_folders, per_class, write_image

from vlprompt.data import Item, SplitCounts, load_dataset, sample_fewshot, subsample_classes
from vlprompt.errors import DatasetError


def test_class_folders_get_a_created_split_that_is_reused(tmp_path):
    data = tmp_path / "my pets"
    class_folders(data, {"dog": 5, "cat_black": 4})
    (data / "dog" / "notes.txt").write_text("not an image")
    splits = load_dataset(f"folder:{data}", cache_dir=tmp_path / "cache")
    assert splits.name == "my_pets" and splits.template == "a photo of a {}."
    assert splits.classnames == ["cat black", "dog"]   # sorted folder names, underscores to spaces
    assert splits.image_dir == data
    # 4 -> 2/1/1, 5 -> round(2.5)=2 / 1 / 2
    assert splits.counts() == SplitCounts(4, 2, 3, 2)
    assert per_class(splits.train) == {0: 2, 1: 2} and per_class(splits.test) == {0: 1, 1: 2}
    created = data / "split_vlprompt_my_pets.json"
    assert splits.split_source == f"created split file {created}"
    assert not any("notes.txt" in i.path for i in splits.train + splits.val + splits.test)
    again = load_dataset(str(data), cache_dir=tmp_path / "cache")   # a bare existing path works too
    assert (again.train, again.val, again.test) == (splits.train, splits.val, splits.test)


def test_split_folders_are_used_as_given(tmp_path, caplog):
    data = tmp_path / "birds"
    for split, count in (("train", 2), ("val", 1), ("test", 1)):
        class_folders(data / split, {"robin": count, "wren": count})
    write_image(data / "test" / "owl" / "x.png")   # a class seen only at test time
    splits = load_dataset("folder:birds", root=tmp_path)   # relative spec, found under the root
    assert splits.classnames == ["owl", "robin", "wren"]
    assert splits.val == [Item("val/robin/img000.jpg", 1), Item("val/wren/img000.jpg", 2)]
    assert splits.test[0] == Item("test/owl/x.png", 0)
    assert splits.counts() == SplitCounts(4, 2, 3, 3)
    assert not list(data.glob("split_vlprompt_*"))
    assert "birds: 1 classes have no training images (train/<class>/ missing or empty): owl" in caplog.text


def test_train_and_test_folders_without_val_take_val_from_train(tmp_path):
    data = tmp_path / "d"
    class_folders(data / "train", {"a": 5, "b": 10})
    class_folders(data / "test", {"a": 1, "b": 1})
    splits = load_dataset(f"folder:{data}", cache_dir=tmp_path / "cache")
    assert per_class(splits.val) == {0: 1, 1: 2} and per_class(splits.train) == {0: 4, 1: 8}
    assert not set(splits.val) & set(splits.train)
    assert (data / "split_vlprompt_d.json").is_file()


def test_only_a_train_folder_is_an_error(tmp_path):
    class_folders(tmp_path / "d" / "train", {"a": 2})
    with pytest.raises(DatasetError, match="has a train/ folder but no test/ folder"):
        load_dataset(f"folder:{tmp_path / 'd'}")


def test_csv_with_header_and_splits(tmp_path):
    class_folders(tmp_path / "img", {"x": 3})
    (tmp_path / "list.csv").write_text("label,path,split\nzebra,img/x/img000.jpg,train\n"
                                       "apple_tree,./img/x/img001.jpg,test\nzebra,img/x/img002.jpg,val\n")
    splits = load_dataset(f"csv:{tmp_path / 'list.csv'}")
    assert splits.name == "list" and splits.image_dir == tmp_path
    assert splits.classnames == ["apple tree", "zebra"]
    assert splits.train == [Item("img/x/img000.jpg", 1)]
    assert splits.test == [Item("img/x/img001.jpg", 0)] and splits.val == [Item("img/x/img002.jpg", 1)]


def test_csv_without_split_column_gets_a_created_split(tmp_path):
    made = class_folders(tmp_path, {"a": 4, "b": 4})
    rows = [f"{path},{cls}" for cls, paths in made.items() for path in paths]
    (tmp_path / "all.csv").write_text("\n".join(rows) + "\n")   # no header
    splits = load_dataset(str(tmp_path / "all.csv"), cache_dir=tmp_path / "cache")
    assert splits.counts() == SplitCounts(4, 2, 2, 2)
    assert (tmp_path / "split_vlprompt_all.json").is_file()


def test_integer_labels_need_a_names_file(tmp_path):
    class_folders(tmp_path, {"a": 3})
    rows = [["a/img000.jpg", 1, "train"], ["a/img001.jpg", 0, "test"], ["a/img002.jpg", 0, "val"]]
    (tmp_path / "items.json").write_text(json.dumps(rows))
    with pytest.raises(DatasetError, match="integer labels, so the class names must come from a names file"):
        load_dataset(f"json:{tmp_path / 'items.json'}")
    (tmp_path / "classnames.txt").write_text("sea_lion\nwalrus\n")
    splits = load_dataset(f"json:{tmp_path / 'items.json'}", cache_dir=tmp_path / "cache")
    assert splits.classnames == ["sea_lion", "walrus"]   # the names file is taken as written
    assert splits.train[0] == Item("a/img000.jpg", 1)


def test_json_objects_with_absolute_paths(tmp_path):
    made = class_folders(tmp_path / "pics", {"a": 1, "b": 1, "c": 1})
    rows = [{"path": str(tmp_path / "pics" / p), "label": cls, "split": split}
            for (cls, paths), split in zip(made.items(), ("train", "test", "val")) for p in paths]
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "x.json").write_text(json.dumps(rows))
    splits = load_dataset(f"json:{tmp_path / 'lists' / 'x.json'}", cache_dir=tmp_path / "cache")
    assert splits.image_dir == tmp_path / "pics"
    assert splits.train == [Item("a/img000.jpg", 0)] and splits.test == [Item("b/img000.jpg", 1)]
    assert splits.val == [Item("c/img000.jpg", 2)]


def test_coop_split_file_as_custom_dataset(tmp_path):
    class_folders(tmp_path, {"x": 2})
    doc = {"train": [["x/img000.jpg", 0, "thing_one"]], "val": [], "test": [["x/img001.jpg", 0, "thing_one"]]}
    (tmp_path / "split.json").write_text(json.dumps(doc))
    splits = load_dataset(f"json:{tmp_path / 'split.json'}")
    assert splits.classnames == ["thing one"] and splits.counts() == SplitCounts(1, 0, 1, 1)


def test_names_file_overrides_and_template(tmp_path):
    data = tmp_path / "cars"
    class_folders(data, {"audi_a4": 4, "bmw_x5": 4, "vw_golf": 4})
    (data / "classnames.txt").write_text("bmw_x5\tBMW X5 SUV\n2\tVolkswagen Golf\n")
    (data / "template.txt").write_text("a photo of a {}, a type of car.\n")
    splits = load_dataset(f"folder:{data}", cache_dir=tmp_path / "cache")
    assert splits.classnames == ["audi a4", "BMW X5 SUV", "Volkswagen Golf"]
    assert splits.template == "a photo of a {}, a type of car."
    renamed = load_dataset(f"folder:{data}", classnames={"audi a4": "Audi A4"}, cache_dir=tmp_path / "cache")
    assert renamed.classnames == ["Audi A4", "BMW X5 SUV", "Volkswagen Golf"]
    (data / "classnames_override.json").write_text(json.dumps(["A", "B", "C"]))
    assert load_dataset(f"folder:{data}", cache_dir=tmp_path / "cache").classnames == ["A", "B", "C"]
    with pytest.raises(DatasetError, match="names 1 classes the dataset does not have: tesla"):
        load_dataset(f"folder:{data}", classnames={"tesla": "Tesla"}, cache_dir=tmp_path / "cache")
    (data / "template.txt").write_text("a photo of a car\n")
    with pytest.raises(DatasetError, match=r"must hold a prompt template with '\{\}'"):
        load_dataset(f"folder:{data}", cache_dir=tmp_path / "cache")


def test_custom_data_takes_part_in_fewshot_and_base_to_novel(tmp_path):
    data = tmp_path / "shapes"
    class_folders(data, {"circle": 8, "square": 8, "triangle": 8})
    splits = load_dataset(f"folder:{data}", cache_dir=tmp_path / "cache")
    fewshot = sample_fewshot(splits, 2, 1)
    assert per_class(fewshot.train) == {0: 2, 1: 2, 2: 2} and fewshot.short_train == {}
    base = subsample_classes(fewshot, "base")
    assert base.classnames == ["circle", "square"] and subsample_classes(fewshot, "new").classnames == ["triangle"]


def test_unknown_name_lists_choices(tmp_path):
    with pytest.raises(DatasetError, match=r"unknown dataset 'mnist': use a built-in name \(imagenet, caltech101"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DatasetError, match="custom dataset 'nowhere' not found"):
        load_dataset("folder:nowhere", tmp_path)
