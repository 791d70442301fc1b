"""Custom datasets (folder:PATH, csv:FILE, json:FILE) in `vlprompt bench`: planned like built-in ones (canonical
absolute spec, run folders custom_<name>, evaluation files named after the dataset), run end to end with a --budget
few-shot, base-to-novel and cross-dataset protocol on a tiny custom folder and a tiny random CLIP, and refused clearly
where they make no sense (a custom source's default domain-shift targets, two custom datasets of one name)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import FIXTURES, class_folders, needs_fixtures

from vlprompt.errors import ConfigError, DatasetError
from vlprompt.harness.bench.protocols import ProtocolOptions, build_plan
from vlprompt.harness.cli.main import main

CLASSES = {"red_apple": 8, "green_pear": 8, "yellow_lemon": 8, "blue_plum": 8}


@pytest.fixture
def custom(tmp_path) -> Path:
    folder = tmp_path / "data" / "fruit"
    class_folders(folder, CLASSES)
    return folder


def plan(out, protocol, **kwargs):
    return build_plan(protocol, ProtocolOptions(out=out, baselines=False, seeds=(1,), methods=("coop",), **kwargs))


def test_custom_datasets_are_planned_with_an_absolute_spec(tmp_path, custom, monkeypatch):
    monkeypatch.chdir(custom.parent)
    for spelling in ("folder:fruit", "fruit", str(custom)):
        (run,) = plan(tmp_path, "fewshot", datasets=(spelling,), shots=(2,))
        assert run.config.dataset == f"folder:{custom}"
        assert run.key == "fewshot/rn50/custom_fruit/coop/shots2/seed1"
    (run,) = plan(tmp_path, "base2novel", datasets=("folder:fruit",))
    assert run.config.subset == "base" and [(e.dataset, e.subset, e.name) for e in run.evals] == [
        (f"folder:{custom}", "new", "fruit-new")]
    # relative to --root, as load_dataset finds it
    monkeypatch.chdir(tmp_path)
    (run,) = plan(tmp_path, "fewshot", datasets=("folder:fruit",), shots=(1,), root=str(custom.parent))
    assert run.config.dataset == f"folder:{custom}"


def test_custom_sources_and_targets_of_the_transfer_protocols(tmp_path, custom):
    (run,) = plan(tmp_path, "crossdataset", source=f"folder:{custom}", targets=("dtd",))
    assert run.config.dataset == f"folder:{custom}" and run.key.startswith("transfer/vit-b-16/custom_fruit/coop/")
    assert [(e.dataset, e.name) for e in run.evals] == [("dtd", "dtd")]
    (run,) = plan(tmp_path, "crossdataset", source=f"folder:{custom}")
    assert len(run.evals) == 11  # the benchmarks, ImageNet included
    shifted = custom.parent / "fruit_sketch"
    class_folders(shifted, CLASSES)
    (run,) = plan(tmp_path, "domainshift", source=f"folder:{custom}", targets=(f"folder:{shifted}",))
    assert [(e.dataset, e.name) for e in run.evals] == [
        (f"folder:{custom}", "fruit-domainshift"), (f"folder:{shifted}", "fruit_sketch")]
    with pytest.raises(ConfigError, match="has no default targets"):
        plan(tmp_path, "domainshift", source=f"folder:{custom}")


def test_bad_custom_datasets_are_clear_errors(tmp_path, custom):
    with pytest.raises(ConfigError, match="unknown training dataset 'no_such'.*folder:PATH"):
        plan(tmp_path, "fewshot", datasets=("no_such",))
    with pytest.raises(DatasetError, match="not found"):
        plan(tmp_path, "fewshot", datasets=("folder:" + str(tmp_path / "missing"),))
    other = tmp_path / "elsewhere" / "fruit"
    class_folders(other, CLASSES)
    with pytest.raises(ConfigError, match="have the same name 'fruit'"):
        plan(tmp_path, "fewshot", datasets=(str(custom), str(other)))


@needs_fixtures
@pytest.mark.usefixtures("private_cache")
def test_budget_protocols_run_on_a_custom_folder(tmp_path, custom, tiny_model_file, capsys):
    out = tmp_path / "bench"
    common = ["--out", str(out), "--model", str(tiny_model_file), "--seeds", "1", "--budget", "--precision", "fp32",
              "--num-workers", "0", "--methods", "coop"]
    assert main(["bench", "fewshot", "--datasets", f"folder:{custom}", "--shots", "1", *common]) == 0, \
        capsys.readouterr()
    assert main(["bench", "base2novel", "--datasets", str(custom), "--shots", "2", *common]) == 0, capsys.readouterr()
    assert main(["bench", "crossdataset", "--source", f"folder:{custom}", "--targets", "dtd", "--root",
                 str(FIXTURES), "--shots", "2", *common]) == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert "0 failed, 0 not finished" in printed
    fewshot = out / "fewshot-budget" / "tiny" / "custom_fruit"
    assert {p.parent.relative_to(fewshot).as_posix() for p in fewshot.rglob("results.json")} == {
        "coop/shots1/seed1", "linear_probe/shots1/seed1", "zeroshot"}
    coop = json.loads((fewshot / "coop/shots1/seed1/results.json").read_text())
    assert coop["dataset"] == f"folder:{custom}" and coop["protocol"] == "fewshot"
    novel = out / "base2novel-budget/tiny/custom_fruit/coop/shots2/seed1/eval-fruit-new.json"
    assert json.loads(novel.read_text())["subset"] == "new"
    transfer = out / "transfer-budget/tiny/custom_fruit/coop/shots2/seed1"
    assert json.loads((transfer / "eval-dtd.json").read_text())["eval_dataset"] == "dtd"
    # a second invocation finds every run finished
    assert main(["bench", "fewshot", "--datasets", f"folder:{custom}", "--shots", "1", *common]) == 0
    assert "0 failed, 0 not finished" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0, capsys.readouterr().err
