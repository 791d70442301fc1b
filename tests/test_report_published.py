"""The papers' numbers in harness/report/published.py: well-formed, self-consistent to their printed precision, and
placed in the right cells by `vlprompt report`.

Rounding: a value printed with d decimals lies within h(d) = 0.5 * 10**-d of the paper's unrounded number. A value
computed from printed values (a harmonic mean, a mean of rows) therefore carries their errors too: for H = 2BN/(B+N)
the error of B and N propagates with dH/dB = 2N^2/(B+N)^2 and dH/dN = 2B^2/(B+N)^2 (their sum lies in [1, 2)); a mean
of 11 printed values is off by at most h of one value. Each check below allows exactly these bounds and no more.
"""

from __future__ import annotations

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
        assert set(v.protocols) <= {"fewshot", "base2novel", "crossdataset", "domainshift"}, v
        # a mean of targets means something within one protocol only; a transfer recipe's source accuracy may be
        # restricted to the transfer protocols; nothing else names a protocol
        if v.eval_dataset == pub.AVERAGE and v.dataset != pub.AVERAGE:
            assert len(v.protocols) == 1, v
        elif v.protocols:
            assert v.eval_dataset == v.dataset == "imagenet" and set(v.protocols) <= {"crossdataset", "domainshift"}, v


def test_one_value_per_cell():
    """No two values answer the same question: per cell at most one value for any protocol, and the protocols
    named by the others do not overlap."""
    cells = {}
    for v in pub.PUBLISHED:
        cells.setdefault((v.method, v.dataset, v.eval_dataset, v.subset, v.shots, v.model), []).append(v)
    for key, values in cells.items():
        assert sum(1 for v in values if not v.protocols) <= 1, key
        named = [p for v in values for p in v.protocols]
        assert len(named) == len(set(named)), key


def test_a_protocols_own_value_takes_precedence():
    """CoOp's ImageNet accuracy: CoCoOp's run in the cross-dataset table (beside its targets and their mean), CoOp's
    own M=16 run elsewhere; a transfer recipe's source accuracy is not a few-shot number."""
    assert pub.lookup("coop", "imagenet", "imagenet", "all", 16, "ViT-B/16", "crossdataset").accuracy == 71.51
    for protocol in (None, "fewshot", "domainshift"):
        assert pub.lookup("coop", "imagenet", "imagenet", "all", 16, "ViT-B/16", protocol).accuracy == 71.92
    for protocol in ("crossdataset", "domainshift"):
        assert pub.lookup("maple", "imagenet", "imagenet", "all", 16, "ViT-B/16", protocol).accuracy == 70.72
    assert pub.lookup("maple", "imagenet", "imagenet", "all", 16, "ViT-B/16", "fewshot") is None
    assert pub.lookup("maple", "imagenet", "imagenet", "all", 16, "ViT-B/16") is None


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
    assert len(triples) == 9 + 8 * 11  # every mean; every dataset of every method but IVLP
    for (method, dataset), (base, new, h) in triples.items():
        b, n = base.accuracy, new.accuracy
        tolerance = (half_unit(h) + half_unit(base) * 2 * n * n / (b + n) ** 2
                     + half_unit(new) * 2 * b * b / (b + n) ** 2)
        assert abs(2 * b * n / (b + n) - h.accuracy) <= tolerance + EPS, (method, dataset)


@pytest.mark.parametrize("method", ["zeroshot", "coop", "cocoop", "kgcoop", "prograd", "tcp", "maple", "promptsrc"])
def test_base_to_novel_means_are_the_means_of_the_rows(method):
    """Base and novel means are arithmetic means over the 11 datasets; the mean H is H of those means (CoCoOp's
    convention), not the mean of the H column (lower by 0.1 to 0.4 here, far outside the rounding bound)."""
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
    assert sum(row[2].accuracy for row in rows) / len(rows) < h_mean.accuracy - 0.1, method


def test_which_base_to_novel_values_were_read_and_which_recalled():
    triples = b2n_triples()
    for (method, dataset), row in triples.items():
        if dataset == pub.AVERAGE or method != "prograd":
            assert not any(v.recalled for v in row), (method, dataset)
        else:
            assert all(v.recalled for v in row), dataset  # ProGrad's per-dataset rows were not found in any source
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


def test_tpt_domain_shift_rows():
    """TPT (no training images) and TPT + CoOp (CoOp's 16-shot ImageNet prompt), ResNet-50 only; TPT adapts at test
    time, so its ImageNet accuracy is one cell for every protocol."""
    for protocol in (None, "fewshot", "domainshift"):
        assert pub.lookup("tpt", "imagenet", "imagenet", "all", None, "RN50", protocol).accuracy == 60.74
    assert pub.lookup("tpt_coop", "imagenet", "imagenet", "all", None, "RN50").accuracy == 64.73
    assert pub.lookup("tpt", "imagenet", "imagenet", "all", 16, "RN50") is None
    assert pub.lookup("tpt", "imagenet", pub.AVERAGE, "all", None, "RN50", "crossdataset") is None
    assert pub.lookup("tpt", "imagenet", "imagenetv2", "all", None, "ViT-B/16") is None


@pytest.mark.parametrize("protocol, targets", [("crossdataset", pub.CROSS_TARGETS),
                                               ("domainshift", pub.DOMAIN_TARGETS)])
def test_transfer_means_are_the_means_of_their_targets(protocol, targets):
    averages = [v for v in pub.PUBLISHED if v.eval_dataset == pub.AVERAGE and v.dataset == "imagenet"
                and protocol in v.protocols]
    assert {(v.method, v.model) for v in averages} >= (
        {("coop", "ViT-B/16"), ("cocoop", "ViT-B/16"), ("maple", "ViT-B/16"), ("promptsrc", "ViT-B/16"),
         ("tcp", "ViT-B/16")} if protocol == "crossdataset" else
        {("promptsrc", "ViT-B/16"), ("kgcoop", "ViT-B/16"), ("tpt", "RN50"), ("tpt_coop", "RN50")})
    for average in averages:
        row = [pub.lookup(average.method, "imagenet", t, "all", average.shots, average.model, protocol)
               for t in targets]
        assert all(v is not None for v in row), average
        mean = sum(v.accuracy for v in row) / len(row)
        tolerance = half_unit(average) + sum(half_unit(v) for v in row) / len(row)
        assert abs(mean - average.accuracy) <= tolerance + EPS, average


def test_transfer_rows_are_complete():
    for method in ("cocoop", "maple", "promptsrc", "tcp"):
        for target in ("imagenet", *pub.CROSS_TARGETS):
            assert pub.lookup(method, "imagenet", target, "all", 16, "ViT-B/16", "crossdataset") is not None
    for method, shots in (("zeroshot", None), ("coop", 16), ("cocoop", 16), ("kgcoop", 16), ("maple", 16),
                          ("promptsrc", 16)):
        for target in ("imagenet", *pub.DOMAIN_TARGETS):
            assert pub.lookup(method, "imagenet", target, "all", shots, "ViT-B/16", "domainshift") is not None
    # where the quoting papers disagree on a mean, none is entered
    assert pub.lookup("maple", "imagenet", pub.AVERAGE, "all", 16, "ViT-B/16", "domainshift") is None


# ------------------------------------------------------------------------------------- through the report, end to end


def test_report_places_base_to_novel_values_per_dataset(tmp_path):
    for dataset in ("dtd", "food101"):
        write_result(tmp_path, protocol="base2novel", method="kgcoop", dataset=dataset, subset="base", accuracy=80.0)
        write_result(tmp_path, protocol="base2novel", method="kgcoop", dataset=dataset, subset="new", accuracy=70.0)
    table = tables_of(tmp_path)["base2novel_kgcoop"]
    assert [r.label for r in table.rows] == ["Food101", "Food101 (published)", "DTD", "DTD (published)",
                                             "Average (2 datasets)", "Average (11 datasets, published)"]
    # as printed: the paper's H comes from unrounded seed means, so H(90.50, 91.70) = 91.0967 is printed 91.09
    assert cells(table, "Food101 (published)") == ["90.50", "91.70", "91.09"]
    assert cells(table, "Average (11 datasets, published)") == ["80.73", "73.6", "77.0"]
    assert any("DiscoVL" in note for note in table.notes) and not any("recalled" in n for n in table.notes)
    prograd_root = tmp_path / "prograd"
    write_result(prograd_root, protocol="base2novel", method="prograd", dataset="dtd", subset="base", accuracy=80.0)
    table = tables_of(prograd_root)["base2novel_prograd"]
    assert cells(table, "DTD (published)") == ["77.35 (recalled)", "52.35 (recalled)", "62.45 (recalled)"]
    assert any("recalled" in n for n in table.notes)


def test_report_places_fewshot_and_domain_shift_values(tmp_path):
    for shots, acc in ((1, 50.0), (16, 70.0)):
        write_result(tmp_path, method="tip_adapter", dataset="eurosat", shots=shots, model="RN50", accuracy=acc)
    common = {"protocol": "domainshift", "method": "tpt", "dataset": "imagenet", "model": "RN50", "seed": None}
    for target, acc in (("imagenet", 60.0), ("imagenet_a", 25.0), ("imagenet_r", 58.0)):
        write_result(tmp_path, eval_dataset=target, shots=None, accuracy=acc, **common)
        # TPT+CoOp: a TPT run started from a CoOp prompt (its recorded init_prompt) is the paper's own row
        write_result(tmp_path / "tpt-coop", eval_dataset=target, shots=0, accuracy=acc + 3,
                     config={"method_config": {"init_prompt": "/runs/coop/prompt.safetensors"}}, **common)
    write_seeds(tmp_path, [40.0, 41.0], method="clip_lora", dataset="eurosat", shots=4, model="RN50")  # none known
    tables = tables_of(tmp_path)
    fewshot = tables["fewshot_tip-adapter"]
    assert fewshot.columns == ("1 shot", "16 shots")
    assert cells(fewshot, "EuroSAT (published)") == ["54.38", "70.54"]
    assert all(r.kind != "published" for r in tables["fewshot_clip-lora"].rows)
    shift = tables["domainshift_imagenet"]
    assert shift.columns == ("ImageNet (source)", "ImageNet-A", "ImageNet-R", "Average (2 targets)")
    # the published target average is the mean of all four variants; it stands beside our two-target mean
    assert cells(shift, "TPT (published)") == ["60.74", "26.67", "59.11", "43.89"]
    assert cells(shift, "TPT+CoOp") == ["63.00", "28.00", "61.00", "44.50"]
    assert cells(shift, "TPT+CoOp (published)") == ["64.73", "30.32", "58.99", "45.75"]


def test_cli_report_writes_the_published_rows(tmp_path):
    write_result(tmp_path, method="tip_adapter_f", dataset="dtd", shots=16, model="RN50", accuracy=60.0)
    report_cmd.write_report(tmp_path, tmp_path / "out", formats=("md",))
    text = (tmp_path / "out" / "tables.md").read_text(encoding="utf-8")
    assert "| DTD (published) | 66.55 |" in text
    assert "Tip-Adapter repo exp.log" in text


def test_report_places_transfer_values_by_protocol(tmp_path):
    """MaPLe's cross-dataset recipe gives 70.72 on ImageNet: shown beside its transfer runs, not a few-shot run."""
    for target, acc in (("imagenet", 70.0), ("caltech101", 93.0), ("eurosat", 47.0)):
        write_result(tmp_path, protocol="crossdataset", method="maple", dataset="imagenet", eval_dataset=target,
                     accuracy=acc)
    write_result(tmp_path, protocol="fewshot", method="maple", dataset="imagenet", accuracy=72.0)
    tables = tables_of(tmp_path)
    cross = tables["crossdataset_imagenet"]
    assert cross.columns == ("ImageNet (source)", "Caltech101", "EuroSAT", "Average (2 targets)")
    # the published mean is over the paper's 10 targets
    assert cells(cross, "MaPLe (published)") == ["70.72", "93.53", "48.06", "66.30"]
    assert all(r.kind != "published" for r in tables["fewshot_maple"].rows)
