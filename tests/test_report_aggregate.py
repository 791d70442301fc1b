"""Aggregation maths and result collection, checked against hand computation."""

from __future__ import annotations

import json
import math

import pytest
from test_report_support import write_result, write_seeds

from vlprompt.data.registry import key_of
from vlprompt.harness.report.aggregate import (
    Stats,
    collect_results,
    dataset_label,
    dataset_sort_key,
    group_records,
    harmonic_mean,
    mean_if_complete,
    parse_result,
    partition_groups,
    seed_coverage_issues,
    t_quantile,
)
from vlprompt.errors import ConfigError, RunError, VlpromptError

# ----------------------------------------------------------------------------------------------------------- maths


def test_t_quantile_matches_closed_forms():
    # df = 1 is the Cauchy distribution: q(p) = tan(pi (p - 1/2))
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-13)
    # df = 2: P(|T| <= t) = t / sqrt(2 + t^2), so q = a sqrt(2 / (1 - a^2)) with a = 2p - 1
    assert t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95**2)), rel=1e-13)
    assert t_quantile(0.95, 2) == pytest.approx(0.9 * math.sqrt(2 / (1 - 0.9**2)), rel=1e-13)
    # textbook table values (4 decimals)
    assert [round(t_quantile(0.975, df), 3) for df in (3, 4, 9, 30)] == [3.182, 2.776, 2.262, 2.042]


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 41):
        assert t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-12), df


@pytest.mark.parametrize("p, df", [(0.5, 2), (1.0, 2), (0.975, 0), (0.975, 1.5)])
def test_t_quantile_rejects_bad_arguments(p, df):
    with pytest.raises(ValueError):
        t_quantile(p, df)


def test_stats_of_three_seeds_by_hand():
    stats = Stats.of([60.0, 62.0, 64.0])
    assert stats.n == 3
    assert stats.mean == 62.0
    assert stats.std == 2.0  # sqrt(((-2)^2 + 0 + 2^2) / (3 - 1))
    t = 0.95 * math.sqrt(2 / (1 - 0.95**2))  # t_{0.975, 2} = 4.30265...
    assert stats.ci95 == pytest.approx(t * 2.0 / math.sqrt(3.0), rel=1e-13)
    assert round(stats.ci95, 4) == 4.9683


def test_stats_of_one_seed_has_no_spread():
    assert Stats.of([58.18]) == Stats(n=1, mean=58.18, std=None, ci95=None)
    with pytest.raises(ValueError):
        Stats.of([])


def test_harmonic_mean_and_complete_means():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140, rel=1e-15)
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(None, 60.0) is None
    # CoCoOp's published average: H of the averaged base and novel accuracies
    assert round(harmonic_mean(80.47, 71.69), 2) == 75.83
    assert mean_if_complete([60.0, 70.0, 80.0]) == 70.0
    assert mean_if_complete([60.0, None]) is None
    assert mean_if_complete([]) is None


def test_dataset_names_are_canonical_and_ordered():
    assert key_of("OxfordPets") == key_of("pets") == "oxford_pets"
    assert key_of("Flowers102") == key_of("oxford-flowers") == "oxford_flowers"
    assert key_of("ImageNet-Sketch") == "imagenet_sketch"
    assert key_of("My_Data") == "My_Data"  # custom datasets keep their name
    assert dataset_label("oxford_pets") == dataset_label("OxfordPets") == "OxfordPets"
    assert dataset_label("oxford_flowers") == "Flowers102"
    assert dataset_label("my_data") == "my_data"
    names = ["ucf101", "my_data", "dtd", "imagenet_r", "imagenet"]
    assert sorted(names, key=dataset_sort_key) == ["imagenet", "dtd", "ucf101", "imagenet_r", "my_data"]


# ----------------------------------------------------------------------------------------------------------- collection


def test_groups_over_seeds_from_files(tmp_path):
    write_seeds(tmp_path, [64.0, 60.0, 62.0], method="coop", dataset="dtd", shots=16)
    write_seeds(tmp_path, [70.0, 71.0], method="coop", dataset="eurosat", shots=16)
    write_result(tmp_path, method="zeroshot", dataset="dtd", shots=None, seed=None, accuracy=44.0)
    collection = collect_results(tmp_path)
    assert len(collection.files) == 6 and len(collection.records) == 6 and not collection.skipped
    groups = {(g.key.method, g.key.dataset): g for g in group_records(collection.records)}
    dtd = groups["coop", "dtd"]
    assert dtd.seeds == (1, 2, 3) and dtd.accuracies == (64.0, 60.0, 62.0)
    assert (dtd.stats.mean, dtd.stats.std) == (62.0, 2.0)
    eurosat = groups["coop", "eurosat"].stats
    assert eurosat.mean == 70.5 and eurosat.std == pytest.approx(math.sqrt(0.5), rel=1e-15)
    # t_{0.975, 1} * std / sqrt(2) = 12.7062 * 0.7071 / 1.4142
    assert eurosat.ci95 == pytest.approx(math.tan(math.pi * 0.475) * math.sqrt(0.5) / math.sqrt(2), rel=1e-13)
    zeroshot = groups["zeroshot", "dtd"]
    assert zeroshot.key.shots == 0 and zeroshot.seeds == (None,) and zeroshot.stats.std is None


def test_malformed_files_are_skipped_with_reasons(tmp_path):
    good = write_result(tmp_path, accuracy=61.0)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{not json", encoding="utf-8")
    cases = {
        "eval-a.json": {"schema": 1, "method": "coop", "dataset": "dtd"},
        "eval-b.json": json.loads(good.read_text()) | {"metrics": {"accuracy": 163.2}},
        "eval-c.json": json.loads(good.read_text()) | {"subset": "novel"},
        "eval-d.json": json.loads(good.read_text()) | {"schema": 2},
        "eval-e.json": [1, 2],
        "eval-f.json": json.loads(good.read_text()) | {"seed": "one"},
        "eval-g.json": json.loads(good.read_text()) | {"budget": "yes"},
    }
    for name, payload in cases.items():
        (bad / name).write_text(json.dumps(payload), encoding="utf-8")
    # not result files: temp files, hidden folders, other JSON
    (tmp_path / ".results.json.x1.tmp").write_text("{", encoding="utf-8")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "results.json").write_text("{", encoding="utf-8")
    (tmp_path / "config.json").write_text("{", encoding="utf-8")

    collection = collect_results(tmp_path)
    assert [r.path for r in collection.records] == [good]
    reasons = {s.path.name: s.reason for s in collection.skipped}
    assert set(reasons) == {"results.json", *cases}
    assert reasons["results.json"].startswith("not valid JSON")
    assert reasons["eval-a.json"] == "missing 'metrics' object"
    assert reasons["eval-b.json"] == "'metrics.accuracy' is a percentage in [0, 100], got 163.2"
    assert "'subset' must be one of all, base, new" in reasons["eval-c.json"]
    assert reasons["eval-d.json"] == "schema 2 is not supported (this version reads 1)"
    assert reasons["eval-e.json"] == "expected a JSON object, got list"
    assert "'seed' must be a non-negative integer" in reasons["eval-f.json"]
    assert "'budget' must be true or false" in reasons["eval-g.json"]


def test_duplicate_results_name_both_files(tmp_path):
    first = write_result(tmp_path, seed=1, accuracy=60.0)
    copy = tmp_path / "copy-of-run" / "results.json"
    copy.parent.mkdir()
    copy.write_text(first.read_text(), encoding="utf-8")
    with pytest.raises(RunError) as info:
        collect_results(tmp_path)
    message = str(info.value)
    assert str(first) in message and str(copy) in message and "seed 1" in message
    assert isinstance(info.value, VlpromptError)


def test_same_seed_in_budget_and_full_runs_is_not_a_duplicate(tmp_path):
    write_result(tmp_path, seed=1, accuracy=60.0)
    write_result(tmp_path, seed=1, accuracy=20.0, budget=True)
    groups = group_records(collect_results(tmp_path).records)
    partitions = partition_groups(groups)
    assert [(p.model, p.budget, p.slug) for p in partitions] == [
        ("ViT-B/16", False, "vit-b-16"),
        ("ViT-B/16", True, "vit-b-16-budget"),
    ]
    assert [g.stats.mean for p in partitions for g in p.groups] == [60.0, 20.0]
    assert "SMOKE TEST (budget)" in partitions[1].label


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        collect_results(tmp_path / "nope")
    (tmp_path / "runs").mkdir()
    with pytest.raises(ConfigError, match="no result files"):
        collect_results(tmp_path / "runs")


def test_spellings_of_a_dataset_are_one_group(tmp_path):
    write_result(tmp_path, dataset="dtd", seed=1, accuracy=60.0)
    write_result(tmp_path, dataset="DescribableTextures", seed=2, accuracy=64.0)
    (group,) = group_records(collect_results(tmp_path).records)
    assert (group.key.dataset, group.key.eval_dataset, group.seeds, group.stats.mean) == ("dtd", "dtd", (1, 2), 62.0)
    write_result(tmp_path, dataset="textures", seed=2, accuracy=64.0)
    with pytest.raises(RunError, match="duplicate"):
        collect_results(tmp_path)


def test_runs_set_aside_by_overwrite_are_ignored(tmp_path):
    run = tmp_path / "dtd-coop"  # a run folder being re-run: config.json, and the old results in previous/
    write_result(run, accuracy=60.0).parent.rename(run / "previous")
    (run / "config.json").write_text("{}", encoding="utf-8")
    assert (run / "previous" / "results.json").is_file()
    fresh = write_result(tmp_path, accuracy=61.0)
    # "previous" folders that are not inside a run folder are ordinary folders
    other = write_result(tmp_path / "previous", dataset="eurosat", accuracy=70.0)
    assert [r.path for r in collect_results(tmp_path).records] == sorted([fresh, other])


def test_zero_shots_is_the_same_as_null(tmp_path):
    path = write_result(tmp_path, method="zeroshot", shots=0, seed=None)
    assert parse_result(path).shots is None


def test_seed_coverage_issues_name_the_odd_group(tmp_path):
    for dataset in ("dtd", "eurosat", "ucf101"):
        write_seeds(tmp_path, [50.0, 51.0, 52.0], dataset=dataset)
    write_seeds(tmp_path, [50.0, 51.0], dataset="food101")
    issues = seed_coverage_issues(group_records(collect_results(tmp_path).records))
    assert len(issues) == 1
    assert "food101" in issues[0] and "seeds [1, 2]" in issues[0] and "[1, 2, 3]" in issues[0]
