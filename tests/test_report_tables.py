"""Tables in the papers' layouts: exact Markdown and CSV cells for small hand-written cases."""

from __future__ import annotations

import csv
import io

import pytest
from test_report_support import write_result, write_seeds

from vlprompt.harness.report import published as pub
from vlprompt.data.registry import BENCHMARK_DATASETS
from vlprompt.harness.report.aggregate import collect_results, group_records, partition_groups
from vlprompt.harness.report.tables import CELL_LEGEND, build_tables, groups_csv, to_csv, to_markdown


def tables_of(root, show_published=True):
    partitions = partition_groups(group_records(collect_results(root).records))
    return [{t.table_id: t for t in build_tables(p, show_published=show_published)} for p in partitions]


def csv_rows(table):
    return list(csv.reader(io.StringIO(to_csv(table))))


@pytest.fixture
def fewshot_root(tmp_path):
    write_seeds(tmp_path, [60.0, 62.0, 64.0], dataset="dtd", shots=1)
    write_seeds(tmp_path, [70.0, 71.0, 72.0], dataset="dtd", shots=16)
    write_seeds(tmp_path, [80.0, 82.0], dataset="eurosat", shots=16)
    write_result(tmp_path, method="zeroshot", dataset="dtd", shots=None, seed=None, accuracy=44.0)
    write_result(tmp_path, method="zeroshot", dataset="eurosat", shots=None, seed=None, accuracy=48.5)
    return tmp_path


def test_fewshot_method_table_markdown(fewshot_root):
    (tables,) = tables_of(fewshot_root)
    assert list(tables) == ["fewshot_coop", "fewshot_1shots", "fewshot_16shots"]
    issue = "Few-shot: CoOp: average of '1 shot' is incomplete, no result for EuroSAT"
    assert to_markdown(tables["fewshot_coop"], heading_level=1) == "\n".join([
        "# Few-shot: CoOp (ViT-B/16)",
        "",
        "| Dataset | 1 shot | 16 shots | Zero-shot CLIP |",
        "| :--- | ---: | ---: | ---: |",
        "| DTD | 62.00 ± 2.00 | 71.00 ± 1.00 | 44.00 |",
        "| EuroSAT | – | 81.00 ± 1.41 | 48.50 |",
        "| Average (2 datasets) | incomplete (1/2) | 76.00 | 46.25 |",
        "",
        f"- {CELL_LEGEND}",
        f"- Incomplete: {issue}",
        "",
    ])
    assert tables["fewshot_coop"].issues == (issue,)


def test_fewshot_method_table_csv(fewshot_root):
    (tables,) = tables_of(fewshot_root)
    rows = csv_rows(tables["fewshot_coop"])
    assert rows[0] == [
        "Dataset",
        "1 shot mean", "1 shot std", "1 shot ci95", "1 shot n",
        "16 shots mean", "16 shots std", "16 shots ci95", "16 shots n",
        "Zero-shot CLIP mean", "Zero-shot CLIP std", "Zero-shot CLIP ci95", "Zero-shot CLIP n",
        "kind", "model", "source", "budget",
    ]
    # CI: t(0.975, 2) * 2 / sqrt(3) = 4.9683; t(0.975, 2) * 1 / sqrt(3) = 2.4841; t(0.975, 1) * sqrt(2) / sqrt(2)
    assert rows[1] == ["DTD", "62.0000", "2.0000", "4.9683", "3", "71.0000", "1.0000", "2.4841", "3",
                       "44.0000", "", "", "1", "data", "ViT-B/16", "", ""]
    assert rows[2] == ["EuroSAT", "", "", "", "", "81.0000", "1.4142", "12.7062", "2",
                       "48.5000", "", "", "1", "data", "ViT-B/16", "", ""]
    assert rows[3] == ["Average (2 datasets)", "incomplete (1/2)", "", "", "", "76.0000", "", "", "",
                       "46.2500", "", "", "", "average", "ViT-B/16", "", ""]
    assert len(rows) == 4


def test_fewshot_per_shot_tables(fewshot_root):
    (tables,) = tables_of(fewshot_root)
    one = tables["fewshot_1shots"]
    assert one.columns == ("CoOp", "Zero-shot CLIP")
    assert [(r.label, [c.markdown() for c in r.cells]) for r in one.rows] == [
        ("DTD", ["62.00 ± 2.00", "44.00"]),
        ("EuroSAT", ["–", "48.50"]),
        ("Average (2 datasets)", ["incomplete (1/2)", "46.25"]),
    ]
    sixteen = tables["fewshot_16shots"]
    assert [c.markdown() for c in sixteen.rows[-1].cells] == ["76.00", "46.25"]


def test_average_is_named_after_all_eleven_datasets(tmp_path):
    for i, dataset in enumerate(BENCHMARK_DATASETS):
        write_result(tmp_path, dataset=dataset, shots=4, seed=1, accuracy=50.0 + i)
    (tables,) = tables_of(tmp_path)
    average = tables["fewshot_coop"].rows[-1]
    assert average.label == "Average (11 datasets)" and average.kind == "average"
    assert average.cells[0].mean == pytest.approx(55.0, rel=1e-15)  # mean of 50..60
    assert [r.label for r in tables["fewshot_coop"].rows[:3]] == ["ImageNet", "Caltech101", "OxfordPets"]


def test_base2novel_harmonic_mean_from_averaged_accuracies(tmp_path):
    write_seeds(tmp_path, [80.0, 82.0], protocol="base2novel", dataset="dtd", subset="base")
    write_seeds(tmp_path, [60.0, 64.0], protocol="base2novel", dataset="dtd", subset="new")
    write_result(tmp_path, protocol="base2novel", dataset="eurosat", subset="base", accuracy=90.0)
    write_result(tmp_path, protocol="base2novel", dataset="eurosat", subset="new", accuracy=70.0)
    (tables,) = tables_of(tmp_path)
    assert list(tables) == ["base2novel_coop", "base2novel_average"]
    table = tables["base2novel_coop"]
    assert table.columns == ("Base", "Novel", "H")
    # H(81, 62) = 70.2378 (the mean of per-seed H values would be 70.2309)
    # average: B = 85.5, N = 66, H(85.5, 66) = 74.4950 (the mean of per-dataset H would be 74.4939)
    assert to_markdown(table).splitlines()[4:11] == [
        "| DTD | 81.00 ± 1.41 | 62.00 ± 2.83 | 70.24 |",
        "| DTD (published) | 79.44 | 41.18 | 54.24 |",
        "| EuroSAT | 90.00 | 70.00 | 78.75 |",
        "| EuroSAT (published) | 92.19 | 54.74 | 68.69 |",
        "| Average (2 datasets) | 85.50 | 66.00 | 74.50 |",
        "| Average (11 datasets, published) | 82.69 | 63.22 | 71.66 |",
        "",
    ]
    assert table.rows[0].cells[2].mean == pytest.approx(2 * 81 * 62 / 143, rel=1e-14)
    assert table.rows[4].cells[2].mean == pytest.approx(2 * 85.5 * 66 / 151.5, rel=1e-14)
    summary = tables["base2novel_average"]
    assert summary.title == "Base-to-novel: Average (2 datasets)"
    labels = [r.label for r in summary.rows]
    assert labels == ["CoOp", "Zero-shot CLIP (published)", "CoOp (published)", "CoCoOp (published)",
                      "KgCoOp (published)", "ProGrad (published)", "TCP (published)", "IVLP (published)",
                      "MaPLe (published)", "PromptSRC (published)"]
    assert [c.markdown() for c in summary.rows[3].cells] == ["80.47", "71.69", "75.83"]
    assert csv_rows(summary)[4][-3:] == ["ViT-B/16", "CoCoOp (CVPR 2022) Table 1, mean of 11 datasets", ""]


def test_base_without_novel_is_listed_and_has_no_h(tmp_path):
    write_result(tmp_path, protocol="base2novel", dataset="dtd", subset="base", accuracy=80.0)
    write_result(tmp_path, protocol="base2novel", dataset="eurosat", subset="base", accuracy=90.0)
    write_result(tmp_path, protocol="base2novel", dataset="eurosat", subset="new", accuracy=70.0)
    (tables,) = tables_of(tmp_path)
    table = tables["base2novel_coop"]
    assert [c.markdown() for c in table.rows[0].cells] == ["80.00", "–", "–"]
    assert table.rows[4].label == "Average (2 datasets)"
    assert [c.markdown() for c in table.rows[4].cells] == ["85.00", "incomplete (1/2)", "–"]
    assert "Base-to-novel: CoOp: DTD has base but no novel results, so no H" in table.issues


@pytest.fixture
def transfer_root(tmp_path):
    for protocol, targets in (("crossdataset", ("dtd", "eurosat")), ("domainshift", ("imagenet_r", "imagenetv2"))):
        common = {"protocol": protocol, "dataset": "imagenet"}
        write_seeds(tmp_path, [70.0, 72.0], eval_dataset="imagenet", **common)
        write_seeds(tmp_path, [40.0, 42.0], eval_dataset=targets[0], **common)
        write_seeds(tmp_path, [50.0, 50.0], eval_dataset=targets[1], **common)
        write_result(tmp_path, method="cocoop", eval_dataset="imagenet", accuracy=71.0, **common)
        write_result(tmp_path, method="cocoop", eval_dataset=targets[0], accuracy=45.0, **common)
    return tmp_path


def test_crossdataset_layout_with_published_target_average(transfer_root):
    (tables,) = tables_of(transfer_root)
    table = tables["crossdataset_imagenet"]
    assert table.title == "Cross-dataset transfer: source ImageNet"
    assert table.columns == ("ImageNet (source)", "DTD", "EuroSAT", "Average (2 targets)")
    assert to_markdown(table).splitlines()[4:9] == [
        "| CoOp | 71.00 ± 1.41 | 41.00 ± 1.41 | 50.00 ± 0.00 | 45.50 |",
        "| CoOp (published) | 71.51 | 41.92 | 46.39 | 63.88 |",
        "| CoCoOp | 71.00 | 45.00 | – | incomplete (1/2) |",
        "| CoCoOp (published) | 71.02 | 45.73 | 45.37 | 65.74 |",
        "",
    ]


def test_domainshift_layout_never_shows_the_crossdataset_average(transfer_root):
    (tables,) = tables_of(transfer_root)
    table = tables["domainshift_imagenet"]
    assert table.columns == ("ImageNet (source)", "ImageNet-V2", "ImageNet-R", "Average (2 targets)")
    assert [(r.label, [c.markdown() for c in r.cells]) for r in table.rows] == [
        ("CoOp", ["71.00 ± 1.41", "50.00 ± 0.00", "41.00 ± 1.41", "45.50"]),
        ("CoOp (published)", ["71.92", "64.18", "74.32", "–"]),
        ("CoCoOp", ["71.00", "–", "45.00", "incomplete (1/2)"]),
        ("CoCoOp (published)", ["71.02", "64.07", "76.18", "–"]),
    ]


def test_no_published_rows_when_disabled_or_other_backbone(transfer_root, tmp_path):
    (tables,) = tables_of(transfer_root, show_published=False)
    assert all(r.kind != "published" for t in tables.values() for r in t.rows)
    other = tmp_path / "rn101"
    write_result(other, protocol="crossdataset", dataset="imagenet", model="RN101", accuracy=60.0)
    (tables,) = tables_of(other)
    assert all(r.kind != "published" for t in tables.values() for r in t.rows)


def test_recalled_rn50_fewshot_average(tmp_path):
    for dataset in ("dtd", "eurosat"):
        write_result(tmp_path, dataset=dataset, shots=1, model="RN50", accuracy=50.0)
        write_result(tmp_path, dataset=dataset, method="zeroshot", shots=None, seed=None, model="RN50", accuracy=40.0)
    (tables,) = tables_of(tmp_path)
    table = tables["fewshot_coop"]
    assert [(r.label, r.kind) for r in table.rows[-2:]] == [
        ("Average (2 datasets)", "average"), ("Average (11 datasets, published)", "published")]
    assert [c.markdown() for c in table.rows[-1].cells] == ["59.6 (recalled)", "58.8 (recalled)"]
    assert csv_rows(table)[-1][1] == "59.6"
    assert any("recalled" in note for note in table.notes)


def test_budget_tables_carry_the_banner_and_no_published_numbers(tmp_path):
    write_seeds(tmp_path, [10.0, 20.0], dataset="imagenet", budget=True)
    (tables,) = tables_of(tmp_path)
    table = tables["fewshot_coop"]
    assert table.budget
    markdown = to_markdown(table)
    assert "> **SMOKE TEST (budget) – not comparable to papers**" in markdown
    assert all(r.kind != "published" for r in table.rows)
    rows = csv_rows(table)
    assert rows[0][-1] == "budget"
    assert all(row[-1] == "SMOKE TEST (budget) – not comparable to papers" for row in rows[1:])


def test_plain_runs_go_to_a_generic_table_with_escaped_names(tmp_path):
    write_result(tmp_path, protocol=None, dataset="my|data", shots=4, accuracy=33.0)
    write_result(tmp_path, protocol=None, method="linear_probe", dataset="my|data", shots=4, accuracy=30.0)
    (tables,) = tables_of(tmp_path)
    table = tables["other_runs"]
    assert table.title == "Runs (no protocol)"
    assert table.columns == ("Linear probe CLIP, 4 shots", "CoOp, 4 shots")
    assert to_markdown(table).splitlines()[4] == "| my\\|data | 30.00 | 33.00 |"


def test_groups_csv_long_format(fewshot_root):
    groups = group_records(collect_results(fewshot_root).records)
    rows = list(csv.reader(io.StringIO(groups_csv(groups))))
    assert rows[0][:6] == ["protocol", "method", "dataset", "eval_dataset", "subset", "shots"]
    assert ["fewshot", "coop", "dtd", "dtd", "all", "1", "ViT-B/16", "false", "3", "1 2 3", "62.0000", "2.0000",
            "4.9683", "60 62 64"] in rows
    assert len(rows) == 1 + 5


@pytest.mark.parametrize("name, expected", [
    ("ViT-B/16", "ViT-B/16"), ("ViT-B-16", "ViT-B/16"), ("openai/clip-vit-base-patch16", "ViT-B/16"),
    ("/models/ViT-B-32.pt", "ViT-B/32"), ("RN50", "RN50"), ("rn101", "RN101"), ("tiny-vit", None), (None, None),
])
def test_canonical_model(name, expected):
    assert pub.canonical_model(name) == expected


def test_published_lookup():
    value = pub.lookup("coop", "ImageNet", "imagenet", "all", 16, "ViT-B-16")
    assert (value.accuracy, value.source) == (71.92, "CoOp (IJCV 2022) Table 1 (M=16)")
    assert pub.lookup("ensemble", "imagenet", "imagenet", "all", None, "RN50").accuracy == 60.41
    assert pub.lookup("coop", "imagenet", pub.AVERAGE, "all", 16, "ViT-B/16", "crossdataset").accuracy == 63.88
    assert pub.lookup("coop", "imagenet", pub.AVERAGE, "all", 16, "ViT-B/16", "domainshift") is None
    assert pub.lookup("coop", "imagenet", "imagenet", "all", 16, "ViT-L/14") is None
    # the published base-to-novel H values agree with H of the published base and novel means (to rounding)
    bases = pub.dataset_averages("ViT-B/16", "base")
    assert [(v.method, v.shots) for v in bases] == [
        ("zeroshot", None), ("coop", 16), ("cocoop", 16), ("kgcoop", 16), ("prograd", 16), ("tcp", 16), ("ivlp", 16),
        ("maple", 16), ("promptsrc", 16)]
    for base in bases:
        n, h = (pub.lookup(base.method, pub.AVERAGE, pub.AVERAGE, subset, base.shots, "ViT-B/16")
                for subset in ("new", pub.HARMONIC))
        assert abs(2 * base.accuracy * n.accuracy / (base.accuracy + n.accuracy) - h.accuracy) < 0.015, base.method
    # any spelling of the backbone; per-dataset rows (their consistency: test_report_published.py)
    assert pub.lookup("maple", "DTD", "dtd", "new", 16, "ViT-B-16.pt").accuracy == 59.18
    assert pub.lookup("ivlp", pub.AVERAGE, pub.AVERAGE, pub.HARMONIC, 16, "ViT-B/16").accuracy == 77.51
