"""The papers' numbers in harness/report/published.py: well-formed, self-consistent to their printed precision, and
placed in the right cells by `vlprompt report`.

Rounding: a value printed with d decimals lies within h(d) = 0.5 * 10**-d of the paper's unrounded number. A value
computed from printed values (a harmonic mean, a mean of rows) therefore carries their errors too: for H = 2BN/(B+N)
the error of B and N propagates with dH/dB = 2N^2/(B+N)^2 and dH/dN = 2B^2/(B+N)^2 (their sum lies in [1, 2)); a mean
of 11 printed values is off by at most h of one value. Each check below allows exactly these bounds and no more.
"""

from __future__ import annotations

from collections import Counter

import pytest
from test_report_support import write_result, write_seeds

from vlprompt.data.registry import DATASETS
from vlprompt.harness.cli import report_cmd
from vlprompt.harness.report import published as pub
from vlprompt.harness.report.aggregate import collect_results, group_records, partition_groups
from vlprompt.harness.report.tables import build_tables

EPS = 1e-9  # float slack on top of the rounding bounds


def half_unit(value: pub.PublishedValue) -> float:
    return 0.5 * 10.0 ** -value.decimals


def tables_of(root):
    (partition,) = partition_groups(group_records(collect_results(root).records))
    return {t.table_id: t for t in build_tables(partition)}


def cells(table, label):
    (row,) = [r for r in table.rows if r.label == label]
    return [c.markdown() for c in row.cells]


def b2n_triples(model="ViT-B/16"):
    """(method, dataset) -> (base, new, H) for every published base-to-novel row of ``model``."""
    triples = {}
    for value in pub.PUBLISHED:
        if value.subset == "base" and value.model == model:
            row = [pub.lookup(value.method, value.dataset, value.eval_dataset, subset, value.shots, model)
                   for subset in pub.B2N_SUBSETS]
            assert all(v is not None for v in row), (value.method, value.dataset)
            triples[value.method, value.dataset] = tuple(row)
    return triples


# ------------------------------------------------------------------------------------------------ well-formed data


def test_every_value_is_well_formed_and_names_its_source():
    for v in pub.PUBLISHED:
        assert v.source.strip(), v
        assert pub.canonical_model(v.model) == v.model, v
        assert v.dataset == pub.AVERAGE or v.dataset in DATASETS, v
        assert v.eval_dataset == pub.AVERAGE or v.eval_dataset in DATASETS, v
        assert v.subset in ("all", *pub.B2N_SUBSETS), v
        assert 0.0 < v.accuracy < 100.0 and round(v.accuracy, v.decimals) == v.accuracy, v
        assert v.protocol in (None, "fewshot", "base2novel", "crossdataset", "domainshift"), v
        # a mean of targets only means something within one protocol
        assert (v.protocol is not None) == (v.eval_dataset == pub.AVERAGE and v.dataset != pub.AVERAGE), v


def test_one_value_per_cell():
    """lookup returns the first match, so no two values may answer the same question."""
    keys = Counter((v.method, v.dataset, v.eval_dataset, v.subset, v.shots, v.model) for v in pub.PUBLISHED)
    assert [k for k, n in keys.items() if n > 1] == []


def test_methods_the_registry_does_not_know_yet_are_allowed():
    """TPT's and CLIP-LoRA's entries arrive later; lookup and the tables never consult the method registry (the report
    end to end with both is below)."""
    value = pub.lookup("tpt", "ImageNet", "imagenet_r", "all", None, "RN50")
    assert (value.accuracy, value.decimals) == (59.11, 2)
    assert pub.lookup("clip_lora", "imagenet", "imagenet", "all", 16, "ViT-B/16") is None


# ----------------------------------------------------------------------------------------------- base-to-novel rows


def test_every_base_to_novel_h_is_the_harmonic_mean_of_its_row():
    triples = b2n_triples()
    assert {m for m, _ in triples} == {"zeroshot", "coop", "cocoop", "kgcoop", "prograd", "tcp", "ivlp", "maple",
                                       "promptsrc"}
    for (method, dataset), (base, new, h) in triples.items():
        b, n = base.accuracy, new.accuracy
        tolerance = (half_unit(h) + half_unit(base) * 2 * n * n / (b + n) ** 2
                     + half_unit(new) * 2 * b * b / (b + n) ** 2)
        assert abs(2 * b * n / (b + n) - h.accuracy) <= tolerance + EPS, (method, dataset)


@pytest.mark.parametrize("method", ["kgcoop", "prograd", "tcp", "maple", "promptsrc"])
def test_base_to_novel_means_are_the_means_of_the_rows(method):
    """Base and novel means are arithmetic means over the 11 datasets; the mean H is H of those means (CoCoOp's
    convention), not the mean of the H column (which is ~0.3 lower for every method here)."""
    triples = b2n_triples()
    rows = [triples[method, d] for d in pub.B2N_DATASETS]
    base_mean, new_mean, h_mean = triples[method, pub.AVERAGE]
    means = []
    for column, published in ((0, base_mean), (1, new_mean)):
        mean = sum(row[column].accuracy for row in rows) / len(rows)
        assert abs(mean - published.accuracy) <= half_unit(published) + 0.005 + EPS, (method, published.subset)
        means.append(mean)
    b, n = means
    h = 2 * b * n / (b + n)
    assert abs(h - h_mean.accuracy) <= half_unit(h_mean) + 0.005 * 2 + EPS, method
    assert sum(row[2].accuracy for row in rows) / len(rows) < h_mean.accuracy - 0.2, method


def test_which_base_to_novel_values_were_read_and_which_recalled():
    triples = b2n_triples()
    for (method, dataset), row in triples.items():
        if dataset == pub.AVERAGE:
            assert not any(v.recalled for v in row), method  # every mean was read in a README
        elif method == "kgcoop":
            # KgCoOp's H column was read (DMC README); its base and novel columns were not
            assert [v.recalled for v in row] == [True, True, False], dataset
            assert "DMC README" in row[2].source
        else:
            assert all(v.recalled for v in row), (method, dataset)
    # the KgCoOp README prints two of its means with one decimal; they are kept as printed
    assert [(v.accuracy, v.decimals) for v in triples["kgcoop", pub.AVERAGE]] == [(80.73, 2), (73.6, 1), (77.0, 1)]


# ------------------------------------------------------------------------------------------- few-shot, domain shift


def test_tip_adapter_exp_log_table_is_complete():
    """exp.log: 11 datasets x (Tip, Tip-F, CLIP-A) x 1/2/4/8/16 shots, ResNet-50."""
    for method in ("tip_adapter", "tip_adapter_f", "clip_adapter"):
        for dataset in pub.B2N_DATASETS:
            for shots in (1, 2, 4, 8, 16):
                value = pub.lookup(method, dataset, dataset, "all", shots, "RN50")
                assert value is not None and not value.recalled and "exp.log" in value.source, (method, dataset)
    # two spot checks against exp.log's imagenet and fgvc blocks
    assert pub.lookup("tip_adapter_f", "imagenet", "imagenet", "all", 16, "RN50").accuracy == 65.51
    assert pub.lookup("clip_adapter", "fgvc_aircraft", "fgvc_aircraft", "all", 1, "RN50").accuracy == 17.49


@pytest.mark.parametrize("shots", [None, 16])
def test_tpt_domain_shift_rows_and_their_target_average(shots):
    """The README's "OOD Average" is the mean of the four ImageNet variants."""
    targets = [pub.lookup("tpt", "imagenet", t, "all", shots, "RN50") for t in pub.DOMAIN_TARGETS]
    average = pub.lookup("tpt", "imagenet", pub.AVERAGE, "all", shots, "RN50", "domainshift")
    assert pub.lookup("tpt", "imagenet", pub.AVERAGE, "all", shots, "RN50", "crossdataset") is None
    mean = sum(v.accuracy for v in targets) / 4
    tolerance = half_unit(average) + sum(half_unit(v) for v in targets) / 4
    assert abs(mean - average.accuracy) <= tolerance + EPS
    assert pub.lookup("tpt", "imagenet", "imagenetv2", "all", shots, "ViT-B/16") is None


# ------------------------------------------------------------------------------------- through the report, end to end


def test_report_places_base_to_novel_values_per_dataset(tmp_path):
    for dataset in ("dtd", "food101"):
        write_result(tmp_path, protocol="base2novel", method="kgcoop", dataset=dataset, subset="base", accuracy=80.0)
        write_result(tmp_path, protocol="base2novel", method="kgcoop", dataset=dataset, subset="new", accuracy=70.0)
    table = tables_of(tmp_path)["base2novel_kgcoop"]
    assert [r.label for r in table.rows] == ["Food101", "Food101 (published)", "DTD", "DTD (published)",
                                             "Average (2 datasets)", "Average (11 datasets, published)"]
    assert cells(table, "Food101 (published)") == ["90.50 (recalled)", "91.70 (recalled)", "91.10"]
    assert cells(table, "Average (11 datasets, published)") == ["80.73", "73.6", "77.0"]
    assert any("DMC README" in note for note in table.notes) and any("recalled" in n for n in table.notes)


def test_report_places_fewshot_and_domain_shift_values(tmp_path):
    for shots, acc in ((1, 50.0), (16, 70.0)):
        write_result(tmp_path, method="tip_adapter", dataset="eurosat", shots=shots, model="RN50", accuracy=acc)
    common = {"protocol": "domainshift", "method": "tpt", "dataset": "imagenet", "model": "RN50", "seed": None}
    for target, acc in (("imagenet", 60.0), ("imagenet_a", 25.0), ("imagenet_r", 58.0)):
        write_result(tmp_path, eval_dataset=target, shots=None, accuracy=acc, **common)
        write_result(tmp_path, eval_dataset=target, shots=16, accuracy=acc + 3, **common)
    write_seeds(tmp_path, [40.0, 41.0], method="clip_lora", dataset="eurosat", shots=4, model="RN50")  # none known
    tables = tables_of(tmp_path)
    fewshot = tables["fewshot_tip-adapter"]
    assert fewshot.columns == ("1 shot", "16 shots")
    assert cells(fewshot, "EuroSAT (published)") == ["54.38", "70.54"]
    assert all(r.kind != "published" for r in tables["fewshot_clip-lora"].rows)
    shift = tables["domainshift_imagenet"]
    assert shift.columns == ("ImageNet (source)", "ImageNet-A", "ImageNet-R", "Average (2 targets)")
    # the published target average is the mean of all four variants; it stands beside our two-target mean
    assert cells(shift, "tpt (published)") == ["60.74", "26.67", "59.11", "43.89"]
    assert cells(shift, "tpt (16 shots) (published)") == ["64.73", "30.32", "58.99", "45.75"]


def test_cli_report_writes_the_published_rows(tmp_path):
    write_result(tmp_path, method="tip_adapter_f", dataset="dtd", shots=16, model="RN50", accuracy=60.0)
    report_cmd.write_report(tmp_path, tmp_path / "out", formats=("md",))
    text = (tmp_path / "out" / "tables.md").read_text(encoding="utf-8")
    assert "| DTD (published) | 66.55 |" in text
    assert "Tip-Adapter repo exp.log" in text
