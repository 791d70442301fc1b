"""``vlprompt data list | check | split | fewshot`` through the real entry point, on the fixtures and tmp folders."""

from __future__ import annotations

import json

from support import FIXTURES, class_folders, needs_fixtures

from vlprompt.harness.cli.main import main


def test_list_shows_every_dataset_with_folder_and_counts(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["key", "name", "folder", "image", "folder", "classes", "train", "val", "test"]
    assert lines[9].split() == ["dtd", "DTD", "dtd", "images", "47", "2820", "1128", "1692"]
    assert lines[15].split() == ["imagenet_r", "ImageNet-R", "imagenet-rendition", "imagenet-r", "200", "-", "-",
                                 "30000"]
    assert main(["data", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 15 and rows[8]["key"] == "dtd" and rows[8]["test"] == 1692
    assert rows[8]["split_file"] == "split_zhou_DescribableTextures.json" and rows[8]["template"] == "{} texture."


@needs_fixtures
def test_list_with_a_root_shows_which_datasets_are_there(capsys):
    assert main(["data", "list", "--root", str(FIXTURES)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-1] == "found"
    found = {line.split()[0]: line.split()[-1] for line in lines[1:16]}
    assert found == {key: ("yes" if key in ("dtd", "oxford_flowers") else "no") for key in found} and len(found) == 15


def test_data_without_subcommand_prints_help(capsys):
    assert main(["data"]) == 2
    assert "check" in capsys.readouterr().out


@needs_fixtures
def test_check_on_the_trimmed_fixture_reports_counts_against_the_reference(capsys):
    assert main(["data", "check", "DescribableTextures", "--root", str(FIXTURES), "--workers", "1"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "images: train 20, val 10, test 15" in out
    assert ("counts differ from the reference: train: 20 images, expected 2820; val: 10 images, expected 1128; "
            "test: 15 images, expected 1692; classes: 5, expected 47") in out
    assert "missing files: 0" in out and "decoded: 45 images, unreadable: 0" in out and out[-1] == "PROBLEMS FOUND"


def test_check_passes_on_a_good_custom_dataset_and_fails_on_bad_files(tmp_path, capsys):
    data = tmp_path / "good"
    class_folders(data, {"a": 4, "b": 4})
    args = ["data", "check", f"folder:{data}", "--workers", "1", "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "OK"
    (data / "b" / "img000.jpg").write_bytes(b"GIF89a broken")
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "unreadable: 1" in out and "img000.jpg" in out


def test_check_missing_root_exits_2_with_a_message(tmp_path, capsys):
    assert main(["data", "check", "eurosat", "--root", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlprompt data: error: data root") and "does not exist" in err


def test_split_writes_and_keeps_the_split_of_a_custom_dataset(tmp_path, capsys):
    data = tmp_path / "toys"
    class_folders(data, {"ball": 5, "kite": 4})
    args = ["data", "split", f"folder:{data}", "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    written = data / "split_vlprompt_toys.json"
    out = capsys.readouterr().out
    assert "toys: 2 classes, 4 train / 2 val / 3 test" in out and f"split file: {written}" in out
    first = written.read_text()
    assert main([*args, "--force", "--out", str(tmp_path / "copy.json")]) == 0
    assert written.read_text() == first   # re-created deterministically
    copy = json.loads((tmp_path / "copy.json").read_text())
    assert copy["train"] == json.loads(first)["train"]
    assert main(["data", "split", "dtd", "--root", str(tmp_path)]) == 2
    assert "is a built-in dataset" in capsys.readouterr().err


@needs_fixtures
def test_fewshot_writes_and_prints_the_sampled_file(tmp_path, capsys):
    out_file = tmp_path / "fs.json"
    args = ["data", "fewshot", "Flowers102", "--root", str(FIXTURES), "--shots", "2", "--seed", "1",
            "--out", str(out_file)]
    assert main(args) == 0
    summary = capsys.readouterr().out
    assert "oxford_flowers: 2 shots, seed 1: 10 train / 10 val images (2 per class, from val), 15 test" in summary
    assert f"written: {out_file}" in summary
    first = out_file.read_text()
    assert main([*args, "--json"]) == 0
    printed = capsys.readouterr().out
    assert printed == first == out_file.read_text()
    doc = json.loads(printed)
    assert (doc["dataset"], doc["shots"], doc["seed"], len(doc["train"])) == ("oxford_flowers", 2, 1, 10)
    assert main(["data", "fewshot", "dtd", "--root", str(FIXTURES), "--shots", "8", "--seed", "2", "--out",
                 str(tmp_path / "k8.json")]) == 0
    assert "note: 5 classes have fewer than 8 train images, all of them are used" in capsys.readouterr().out
    assert main(["data", "fewshot", "dtd", "--root", str(FIXTURES), "--shots", "0", "--seed", "1"]) == 2
    assert "shots must be an integer >= 1" in capsys.readouterr().err
