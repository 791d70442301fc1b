"""The split files shipped with the package: counts, classes and names equal the reference figures.

Reference figures (CoOp's dataset table; ``/work/shared/splits/split_zhou_*.json`` hold exactly these counts):
EuroSAT 13500 / 5400 / 8100 over 10 classes, DTD 2820 / 1128 / 1692 over 47, Flowers102 4093 / 1633 / 2463 over 102,
OxfordPets 2944 / 736 / 3669 over 37, Caltech101 4128 / 1649 / 2465 over 100, StanfordCars 6509 / 1635 / 8041 over 196,
UCF101 7639 / 1898 / 3783 over 101.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources

import pytest
from support import SHARED_SPLITS, needs_shared_splits

from vlprompt.data import DATASETS, load_dataset
from vlprompt.data.splitfile import parse_split, read_shipped_json, shipped_split_names
from vlprompt.data.types import SplitCounts
from vlprompt.errors import DatasetError

REFERENCE = {
    "eurosat": SplitCounts(13500, 5400, 8100, 10),
    "dtd": SplitCounts(2820, 1128, 1692, 47),
    "oxford_flowers": SplitCounts(4093, 1633, 2463, 102),
    "oxford_pets": SplitCounts(2944, 736, 3669, 37),
    "caltech101": SplitCounts(4128, 1649, 2465, 100),
    "stanford_cars": SplitCounts(6509, 1635, 8041, 196),
    "ucf101": SplitCounts(7639, 1898, 3783, 101),
}


def _shipped(key: str):
    file_name = DATASETS[key].split_file
    assert file_name is not None
    return parse_split(read_shipped_json(file_name), file_name)


def test_seven_split_files_and_flowers_names_are_shipped():
    assert shipped_split_names() == sorted(DATASETS[key].split_file for key in REFERENCE)
    folder = resources.files("vlprompt.data").joinpath("splits")
    assert folder.joinpath("cat_to_name_OxfordFlowers.json.gz").is_file()
    assert folder.joinpath("NOTICE.txt").is_file()


@pytest.mark.parametrize("key", sorted(REFERENCE))
def test_shipped_counts_equal_reference_and_registry(key):
    labelled = _shipped(key)
    found = SplitCounts(len(labelled.train), len(labelled.val), len(labelled.test), len(labelled.raw_classnames))
    assert found == REFERENCE[key]
    assert DATASETS[key].expected == REFERENCE[key]


@needs_shared_splits
@pytest.mark.parametrize("key", sorted(REFERENCE))
def test_shipped_files_are_the_shared_originals(key):
    name = DATASETS[key].split_file
    shipped = resources.files("vlprompt.data").joinpath("splits", name + ".gz").read_bytes()
    assert gzip.decompress(shipped) == (SHARED_SPLITS / name).read_bytes()


def test_eurosat_names_are_the_reference_renames_in_label_order():
    assert _shipped("eurosat").raw_classnames == [
        "Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road", "Industrial Buildings",
        "Pasture Land", "Permanent Crop Land", "Residential Buildings", "River", "Sea or Lake"]


def test_caltech101_has_no_background_or_easy_faces_and_uses_renames():
    names = _shipped("caltech101").raw_classnames
    assert names[:5] == ["face", "leopard", "motorbike", "accordion", "airplane"]
    assert not {"BACKGROUND_Google", "Faces_easy", "Faces", "airplanes", "Leopards", "Motorbikes"} & set(names)


def test_flowers_names_follow_cat_to_name():
    cat_to_name = read_shipped_json("cat_to_name_OxfordFlowers.json")
    names = _shipped("oxford_flowers").raw_classnames
    assert names == [cat_to_name[str(label + 1)] for label in range(102)]


def test_dtd_names_and_few_labels():
    labelled = _shipped("dtd")
    assert labelled.raw_classnames[:3] == ["banded", "blotchy", "braided"]
    assert labelled.raw_classnames[-1] == "zigzagged"
    assert labelled.test[0].path.startswith(labelled.raw_classnames[labelled.test[0].label] + "/")


def test_shipped_split_is_used_and_names_are_cleaned(tmp_path):
    (tmp_path / "oxford_pets" / "images").mkdir(parents=True)
    (tmp_path / "ucf101" / "UCF-101-midframes").mkdir(parents=True)
    pets = load_dataset("OxfordPets", tmp_path, check_files=False)
    assert pets.split_source == "shipped split file split_zhou_OxfordPets.json"
    assert pets.classnames[:3] == ["abyssinian", "american bulldog", "american pit bull terrier"]
    assert pets.template == "a photo of a {}, a type of pet."
    assert pets.counts() == REFERENCE["oxford_pets"]
    ucf = load_dataset("ucf101", tmp_path, check_files=False)
    assert ucf.classnames[0] == "Apply Eye Makeup"
    assert ucf.image_dir == tmp_path / "ucf101" / "UCF-101-midframes"


def test_shipped_split_against_an_empty_image_folder_lists_offenders_and_count(tmp_path):
    (tmp_path / "eurosat" / "2750").mkdir(parents=True)
    with pytest.raises(DatasetError) as info:
        load_dataset("eurosat", tmp_path)
    message = str(info.value)
    assert "27000 of its 27000 files are missing" in message
    assert "AnnualCrop/AnnualCrop_1381.jpg" in message and "(and 26990 more)" in message
    assert "check that --root" in message


def test_user_split_file_takes_precedence_over_shipped(tmp_path):
    folder = tmp_path / "eurosat"
    (folder / "2750" / "Forest").mkdir(parents=True)
    (folder / "2750" / "Forest" / "a.jpg").write_bytes(b"")
    own = {"train": [["Forest/a.jpg", 0, "Forest"]], "val": [["Forest/a.jpg", 0, "Forest"]],
           "test": [["Forest/a.jpg", 0, "Forest"]]}
    (folder / "split_zhou_EuroSAT.json").write_text(json.dumps(own))
    splits = load_dataset("EuroSAT", tmp_path)
    assert splits.classnames == ["Forest"] and splits.counts() == SplitCounts(1, 1, 1, 1)
    assert splits.split_source == f"split file {folder / 'split_zhou_EuroSAT.json'}"
