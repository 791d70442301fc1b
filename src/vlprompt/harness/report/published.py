"""The papers' reported numbers, as data, for comparison columns in the report.

Every value names what was trained and evaluated (method, training dataset, evaluation dataset, subset, shots),
the backbone, and its source. Values are keyed by the experiment, not by the protocol that produced it: CoOp's
16-shot ImageNet number is the same cell in the few-shot table and in the domain-shift table's source column. Values
that belong to some protocols only name them (``protocols``): the mean of the targets, and the source-dataset
accuracy of a model trained with a transfer recipe (MaPLe's and PromptSRC's cross-dataset configs differ from their
few-shot ones). A protocol's own value takes precedence over a general one. ``AVERAGE`` stands for "mean over the 11
datasets" (few-shot, base-to-novel) or "mean over the targets" (cross-dataset and domain shift, as evaluation
dataset). ``HARMONIC`` is the subset of published base-to-novel harmonic means. Method keys need not be in the method
registry: a method registered later finds its numbers waiting.

Each source string names where the number was read (tests/test_report_published.py checks every value against its
row: H against base and novel, means against the rows, to the printed precision). Values typed from memory and not re-read carry
``recalled=True`` and are labelled so in every table. Several papers' tables could only be read as quoted, verbatim,
by later papers, read in markdown copies of them in the public code index: DiscoVL (Dong, Li, Li, 2026 preprint,
"Unveiling Disentangled Cross-Modal Representation Learning via Orthogonal Adversarial Regularization for
Vision-Language Models"), Beyond the Seen (Fan et al., NeurIPS, "Bounded Distribution Estimation for Open-Vocabulary
Learning") and RMAdapter (2026; its base-to-novel table garbles several rows, so only its transfer tables are used).
Where they disagree, the majority is entered and the disagreement is named in the source.

- ImageNet, 16 shots, prompt ensembling, CoOp's domain shift: CoOp (IJCV 2022) Table 1, as in
  /work/shared/reference/prompt-learning.md. CoOp's ResNet-50 few-shot curve (Fig. 3) is recalled.
- Base-to-novel means (ViT-B/16, 16 shots, 11 datasets): CoCoOp Table 1 and the official READMEs of KgCoOp (its own
  row and ProGrad's), MaPLe and PromptSRC (with its IVLP baseline); TCP's mean as quoted by DiscoVL and others.
- Base-to-novel per dataset: zero-shot CLIP, CoOp, CoCoOp, KgCoOp, MaPLe, PromptSRC and TCP as quoted by DiscoVL
  Table 1 (CLIP, CoOp, CoCoOp, PromptSRC, TCP also by Beyond the Seen Table 1). ProGrad's rows are recalled.
- Cross-dataset (ImageNet 16 shots -> 10 datasets, ViT-B/16): CoOp and CoCoOp (CoCoOp Table 2), MaPLe, PromptSRC
  and TCP, as quoted by DiscoVL Table 2 (all but TCP also by RMAdapter Table 2).
- Domain generalisation (ImageNet 16 shots -> ImageNet-V2 / -Sketch / -A / -R, ViT-B/16): zero-shot CLIP, CoCoOp,
  MaPLe and PromptSRC as quoted by DiscoVL Table 3 and RMAdapter Table 3; KgCoOp by RMAdapter Table 3 only.
- Few-shot per dataset, ResNet-50, 1 / 2 / 4 / 8 / 16 shots: Tip-Adapter, Tip-Adapter-F and CLIP-Adapter from the
  official Tip-Adapter repository's ``exp.log`` (gaopengcuhk/Tip-Adapter @ d0e2d6f; its README: the numbers of the
  paper's Figures 4 and 5; CLIP-Adapter issue #7: the "CLIP-A" rows are CLIP-Adapter's). Tip-Adapter(-F)'s were
  chosen on the test set by the official code.
- Domain shift, ResNet-50: TPT and TPT + CoOp from the official TPT README (azshue/TPT @ 63ecbac).

Not found in any readable source, so not entered: few-shot numbers of KgCoOp, ProGrad, TCP, LP++, CLAP, CLIP-LoRA,
MaPLe and PromptSRC (published as figures or in tables no readable copy holds); ProGrad's cross-dataset and domain
tables; KgCoOp's cross-dataset table; TCP's domain table; TPT's ViT-B/16 and cross-dataset numbers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from vlprompt.data.registry import key_of

AVERAGE = "__average__"
HARMONIC = "harmonic_mean"

B2N_SUBSETS: tuple[str, str, str] = ("base", "new", HARMONIC)
"""The three columns of a base-to-novel table: base accuracy, novel accuracy, their harmonic mean."""

B2N_DATASETS: tuple[str, ...] = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                                 "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
"""The 11 datasets in the order of the papers' base-to-novel tables."""

CROSS_TARGETS: tuple[str, ...] = B2N_DATASETS[1:]
"""The 10 targets of the cross-dataset tables (source ImageNet), in the papers' order."""

DOMAIN_TARGETS: tuple[str, ...] = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
"""The four ImageNet variants of the domain-generalisation tables, in the papers' order."""


@dataclass(frozen=True)
class PublishedValue:
    """One reported accuracy (percent), as printed in the source (``decimals`` digits)."""

    method: str
    dataset: str  # training dataset key (vlprompt.data.DATASETS), or AVERAGE
    eval_dataset: str  # evaluation dataset key, or AVERAGE
    subset: str  # "all", "base", "new" or HARMONIC
    shots: int | None  # None: no training images
    model: str  # canonical backbone name, e.g. "ViT-B/16"
    accuracy: float
    source: str
    decimals: int = 2
    recalled: bool = False
    protocols: tuple[str, ...] = ()  # the protocols the value belongs to; () for any


def _printed(text: str) -> tuple[float, int]:
    """A number as printed in its source ("54.7") -> (value, decimals)."""
    return float(text), len(text.partition(".")[2])


# ----------------------------------------------------------------------------------- one constructor per table shape


def _same(method: str, dataset: str, shots: int | None, model: str, accuracy: float, source: str) -> PublishedValue:
    """A value trained and evaluated on the same dataset, all classes."""
    return PublishedValue(method, dataset, dataset, "all", shots, model, accuracy, source)


def _b2n_mean(method: str, shots: int | None, printed: tuple[str, str, str], source: str) -> list[PublishedValue]:
    """A base-to-novel mean of 11 datasets (ViT-B/16): base, novel and H as printed in ``source``."""
    values = []
    for subset, text in zip(B2N_SUBSETS, printed, strict=True):
        accuracy, decimals = _printed(text)
        values.append(PublishedValue(method, AVERAGE, AVERAGE, subset, shots, "ViT-B/16", accuracy, source, decimals))
    return values


def _b2n_per_dataset(method: str, shots: int | None, rows: Sequence[tuple[float, float, float]], source: str, *,
                     recalled: bool) -> list[PublishedValue]:
    """A method's per-dataset base / novel / H (ViT-B/16, 2 decimals), one row per entry of :data:`B2N_DATASETS`."""
    return [
        PublishedValue(method, dataset, dataset, subset, shots, "ViT-B/16", accuracy, source, recalled=recalled)
        for dataset, row in zip(B2N_DATASETS, rows, strict=True)
        for subset, accuracy in zip(B2N_SUBSETS, row, strict=True)
    ]


def _fewshot_per_dataset(table: Mapping[str, Mapping[str, Sequence[float]]], shots: Sequence[int], model: str,
                         sources: Mapping[str, str]) -> list[PublishedValue]:
    """Few-shot accuracies per dataset: ``table[dataset][method]`` lists one value per entry of ``shots``."""
    return [
        _same(method, dataset, k, model, accuracy, sources[method])
        for dataset, rows in table.items() for method, accuracies in rows.items()
        for k, accuracy in zip(shots, accuracies, strict=True)
    ]


def _fewshot_average(method: str, model: str, printed: Mapping[int | None, str], source: str, *,
                     recalled: bool) -> list[PublishedValue]:
    """A few-shot curve of the 11-dataset mean: shots (None: no training images) -> value as printed."""
    values = []
    for shots, text in printed.items():
        accuracy, decimals = _printed(text)
        values.append(PublishedValue(method, AVERAGE, AVERAGE, "all", shots, model, accuracy, source, decimals,
                                     recalled))
    return values


@dataclass(frozen=True)
class _TransferTable:
    """One method's row of a cross-dataset or domain-shift table, as printed: the targets in ``targets`` order (None
    where nothing is entered), their mean (None: not entered), and where the row was read."""

    targets: tuple[str, ...]
    printed: tuple[str | None, ...]
    average: str | None
    source: str


def _transfer(method: str, shots: int | None, model: str, source_accuracy: str | None,
              tables: Mapping[str, _TransferTable], *,
              source_protocols: tuple[str, ...] | None = None) -> list[PublishedValue]:
    """A method trained on ImageNet and evaluated elsewhere, per protocol (``tables``: protocol -> row). The accuracy
    on ImageNet itself is entered once, for the protocols of ``tables`` (the recipe that trained it) unless
    ``source_protocols`` says otherwise (() when it is the same cell in every protocol); each mean of targets belongs
    to its own protocol; the targets themselves are ordinary cells."""
    values = []
    if source_accuracy is not None:
        accuracy, decimals = _printed(source_accuracy)
        source = " / ".join(t.source for t in tables.values())
        protocols = tuple(tables) if source_protocols is None else source_protocols
        values.append(PublishedValue(method, "imagenet", "imagenet", "all", shots, model, accuracy, source, decimals,
                                     protocols=protocols))
    for protocol, table in tables.items():
        for target, text in zip(table.targets, table.printed, strict=True):
            if text is not None:
                accuracy, decimals = _printed(text)
                values.append(PublishedValue(method, "imagenet", target, "all", shots, model, accuracy, table.source,
                                             decimals))
        if table.average is not None:
            accuracy, decimals = _printed(table.average)
            values.append(PublishedValue(method, "imagenet", AVERAGE, "all", shots, model, accuracy, table.source,
                                         decimals, protocols=(protocol,)))
    return values


def _cross(printed: str, average: str | None, source: str) -> _TransferTable:
    """A cross-dataset row: the 10 targets of :data:`CROSS_TARGETS` as one space-separated string."""
    return _TransferTable(CROSS_TARGETS, tuple(printed.split()), average, source)


def _domain(printed: str, average: str | None, source: str) -> _TransferTable:
    """A domain-generalisation row: the 4 variants of :data:`DOMAIN_TARGETS` as one space-separated string."""
    return _TransferTable(DOMAIN_TARGETS, tuple(printed.split()), average, source)


# ------------------------------------------------------------------------------------------------------ the tables

_COOP_T1 = "CoOp (IJCV 2022) Table 1"
_COOP_T1_DG = "CoOp (IJCV 2022) Table 1, domain generalisation (M=16)"
_COOP_T1_ENS = "CoOp (IJCV 2022), prompt ensembling on ImageNet"
_COOP_FIG3 = "CoOp (IJCV 2022) Fig. 3, mean of 11 datasets"
_COCOOP_T1 = "CoCoOp (CVPR 2022) Table 1, mean of 11 datasets"

_DISCOVL = "DiscoVL (Dong et al., 2026 preprint) Table {}"
_BEYOND = "Beyond the Seen (Fan et al., NeurIPS) Table {}"
_RMADAPTER = "RMAdapter (2026) Table {}"

_KGCOOP_README = "KgCoOp official README table (github htyao89/KgCoOp @ c43ccc3, readme.md), mean of 11 datasets"
_TCP_MEAN = (f"TCP (CVPR 2024) Table 1, mean of 11 datasets, as quoted in {_DISCOVL.format(1)}, {_BEYOND.format(1)} "
             "and the CLIP-SVD README")
_MAPLE_README = "MaPLe official README (github muzairkhattak/multimodal-prompt-learning @ 69bce21), mean of 11 datasets"
_PROMPTSRC_README = "PromptSRC official README (github muzairkhattak/PromptSRC @ bb95c77), mean of 11 datasets"

# base-to-novel means (ViT-B/16, 11 datasets): method -> (shots, (base, novel, H) as printed, source)
_B2N_MEANS: dict[str, tuple[int | None, tuple[str, str, str], str]] = {
    "zeroshot": (None, ("69.34", "74.22", "71.70"), _COCOOP_T1),
    "coop": (16, ("82.69", "63.22", "71.66"), _COCOOP_T1),
    "cocoop": (16, ("80.47", "71.69", "75.83"), _COCOOP_T1),
    "kgcoop": (16, ("80.73", "73.6", "77.0"), _KGCOOP_README),
    "prograd": (16, ("82.48", "70.75", "76.16"), _KGCOOP_README + " (ProGrad's row)"),
    "tcp": (16, ("84.13", "75.36", "79.51"), _TCP_MEAN),
    "ivlp": (16, ("84.21", "71.79", "77.51"), _PROMPTSRC_README + " (IVLP baseline: 4+4 prompts, depth 9, 20 epochs)"),
    "maple": (16, ("82.28", "75.14", "78.55"), _MAPLE_README),
    "promptsrc": (16, ("84.26", "76.10", "79.97"), _PROMPTSRC_README),
}

_QUOTED_B2N = "{} Table 1 (base-to-novel, ViT-B/16), as quoted in " + _DISCOVL.format(1)
_QUOTED_B2N_BOTH = _QUOTED_B2N + " and " + _BEYOND.format(1)

# per dataset, in B2N_DATASETS order: method -> (shots, source, recalled, (base, novel, H) per dataset)
_B2N_ROWS: dict[str, tuple[int | None, str, bool, tuple[tuple[float, float, float], ...]]] = {
    "zeroshot": (None, _QUOTED_B2N_BOTH.format("CoCoOp (CVPR 2022)") + " (EuroSAT H: DiscoVL, RMAdapter)", False, (
        (72.43, 68.14, 70.22), (96.84, 94.00, 95.40), (91.17, 97.26, 94.12), (63.37, 74.89, 68.65),
        (72.08, 77.80, 74.83), (90.10, 91.22, 90.66), (27.19, 36.29, 31.09), (69.36, 75.35, 72.23),
        (53.24, 59.90, 56.37), (56.48, 64.05, 60.03), (70.53, 77.50, 73.85),
    )),
    "coop": (16, _QUOTED_B2N_BOTH.format("CoCoOp (CVPR 2022)") + " (EuroSAT H: DiscoVL, RMAdapter)", False, (
        (76.47, 67.88, 71.92), (98.00, 89.81, 93.73), (93.67, 95.29, 94.47), (78.12, 60.40, 68.13),
        (97.60, 59.67, 74.06), (88.33, 82.26, 85.19), (40.44, 22.30, 28.75), (80.60, 65.89, 72.51),
        (79.44, 41.18, 54.24), (92.19, 54.74, 68.69), (84.69, 56.05, 67.46),
    )),
    "cocoop": (16, _QUOTED_B2N_BOTH.format("CoCoOp (CVPR 2022)") + " (EuroSAT H: DiscoVL, RMAdapter)", False, (
        (75.98, 70.43, 73.10), (97.96, 93.81, 95.84), (95.20, 97.69, 96.43), (70.49, 73.59, 72.01),
        (94.87, 71.75, 81.71), (90.70, 91.29, 90.99), (33.41, 23.71, 27.74), (79.74, 76.86, 78.27),
        (77.01, 56.00, 64.85), (87.49, 60.04, 71.21), (82.33, 73.45, 77.64),
    )),
    "kgcoop": (16, _QUOTED_B2N.format("KgCoOp (CVPR 2023)"), False, (
        (75.83, 69.96, 72.78), (97.72, 94.39, 96.03), (94.65, 97.76, 96.18), (71.76, 75.04, 73.36),
        (95.00, 74.73, 83.65), (90.50, 91.70, 91.09), (36.21, 33.55, 34.83), (80.29, 76.53, 78.36),
        (77.55, 54.99, 64.35), (85.64, 64.34, 73.48), (82.89, 76.67, 79.65),
    )),
    "prograd": (16, "KgCoOp (CVPR 2023) Table 1 (ProGrad's row), base-to-novel, ViT-B/16", True, (
        (77.02, 66.66, 71.46), (98.02, 93.89, 95.91), (95.07, 97.63, 96.33), (77.68, 68.63, 72.88),
        (95.54, 71.87, 82.03), (90.37, 89.59, 89.98), (40.54, 27.57, 32.82), (81.26, 74.17, 77.55),
        (77.35, 52.35, 62.45), (90.11, 60.89, 72.67), (84.33, 74.94, 79.35),
    )),
    "tcp": (16, _QUOTED_B2N_BOTH.format("TCP (CVPR 2024)") + " (EuroSAT H: DiscoVL)", False, (
        (77.27, 69.87, 73.38), (98.23, 94.67, 96.42), (94.67, 97.20, 95.92), (80.80, 74.13, 77.32),
        (97.73, 75.57, 85.23), (90.57, 91.37, 90.97), (41.97, 34.43, 37.83), (82.63, 78.20, 80.35),
        (82.77, 58.07, 68.25), (91.63, 74.73, 82.32), (87.13, 80.77, 83.83),
    )),
    "maple": (16, _QUOTED_B2N.format("MaPLe (CVPR 2023)"), False, (
        (76.66, 70.54, 73.47), (97.74, 94.36, 96.02), (95.43, 97.76, 96.58), (72.94, 74.00, 73.47),
        (95.92, 72.46, 82.56), (90.71, 92.05, 91.38), (37.44, 35.61, 36.50), (80.82, 78.70, 79.75),
        (80.36, 59.18, 68.16), (94.07, 73.23, 82.35), (83.00, 78.66, 80.77),
    )),
    "promptsrc": (16, _QUOTED_B2N_BOTH.format("PromptSRC (ICCV 2023)") + " (EuroSAT H: DiscoVL)", False, (
        (77.60, 70.73, 74.01), (98.10, 94.03, 96.02), (95.33, 97.30, 96.30), (78.27, 74.97, 76.58),
        (98.07, 76.50, 85.95), (90.67, 91.53, 91.10), (42.73, 37.87, 40.15), (82.67, 78.47, 80.52),
        (83.37, 62.97, 71.75), (92.90, 73.90, 82.32), (87.10, 78.80, 82.74),
    )),
}


def _base2novel() -> list[PublishedValue]:
    values = [v for method, (shots, printed, source) in _B2N_MEANS.items()
              for v in _b2n_mean(method, shots, printed, source)]
    for method, (shots, source, recalled, rows) in _B2N_ROWS.items():
        values += _b2n_per_dataset(method, shots, rows, source, recalled=recalled)
    return values


_CROSS_QUOTED = "{} Table 2 (cross-dataset, ViT-B/16), as quoted in " + _DISCOVL.format(2)
_DOMAIN_QUOTED = "{} Table 3 (domain generalisation, ViT-B/16), as quoted in " + _DISCOVL.format(3)

# ImageNet 16 shots (zero-shot CLIP: no training images) -> other datasets, ViT-B/16
_TRANSFER_VIT_B16: tuple[tuple[str, int | None, str | None, dict[str, _TransferTable]], ...] = (
    # CoCoOp's run of CoOp: its ImageNet accuracy (71.51) is not CoOp's own M=16 number (71.92, Table 1 above)
    ("coop", 16, "71.51", {
        "crossdataset": _cross("93.70 89.14 64.51 68.71 85.30 18.47 64.15 41.92 46.39 66.55", "63.88",
                               _CROSS_QUOTED.format("CoCoOp (CVPR 2022)") + ", " + _BEYOND.format(2) + " and "
                               + _RMADAPTER.format(2) + " (DiscoVL prints DTD 41.90)"),
    }),
    ("cocoop", 16, "71.02", {
        "crossdataset": _cross("94.43 90.14 65.32 71.88 86.06 22.94 67.36 45.73 45.37 68.21", "65.74",
                               _CROSS_QUOTED.format("CoCoOp (CVPR 2022)") + ", " + _BEYOND.format(2) + " and "
                               + _RMADAPTER.format(2)),
        "domainshift": _domain("64.07 48.75 50.63 76.18", None,
                               _DOMAIN_QUOTED.format("CoCoOp (CVPR 2022)") + " and " + _RMADAPTER.format(3)
                               + " (mean not entered: 59.91 vs 59.90)"),
    }),
    ("maple", 16, "70.72", {
        "crossdataset": _cross("93.53 90.49 65.57 72.23 86.20 24.74 67.01 46.49 48.06 68.69", "66.30",
                               _CROSS_QUOTED.format("MaPLe (CVPR 2023)") + " and " + _RMADAPTER.format(2)),
        "domainshift": _domain("64.07 49.15 50.90 76.98", None,
                               _DOMAIN_QUOTED.format("MaPLe (CVPR 2023)") + " and " + _RMADAPTER.format(3)
                               + " (mean not entered: 60.27 vs 60.26)"),
    }),
    ("promptsrc", 16, "71.27", {
        "crossdataset": _cross("93.60 90.25 65.70 70.25 86.15 23.90 67.10 46.87 45.50 68.75", "65.81",
                               _CROSS_QUOTED.format("PromptSRC (ICCV 2023)") + ", " + _BEYOND.format(2) + " and "
                               + _RMADAPTER.format(2)),
        "domainshift": _domain("64.35 49.55 50.90 77.80", "60.65",
                               _DOMAIN_QUOTED.format("PromptSRC (ICCV 2023)") + " and " + _RMADAPTER.format(3)),
    }),
    ("tcp", 16, "71.40", {
        "crossdataset": _cross("93.97 91.25 64.69 71.21 86.69 23.45 67.15 44.35 51.45 68.73", "66.29",
                               _CROSS_QUOTED.format("TCP (CVPR 2024)")),
    }),
    ("kgcoop", 16, "71.20", {
        "domainshift": _domain("64.10 48.97 50.69 76.70", "60.11",
                               "KgCoOp (CVPR 2023), domain generalisation, ViT-B/16, as quoted in "
                               + _RMADAPTER.format(3) + " only"),
    }),
    # zero-shot CLIP's ImageNet accuracy is CoOp's Table 1 value above (66.73, the same in every quoting table)
    ("zeroshot", None, None, {
        "domainshift": _domain("60.83 46.15 47.77 73.96", None,
                               _DOMAIN_QUOTED.format("CoCoOp (CVPR 2022)") + " and " + _RMADAPTER.format(3)
                               + " (mean not entered: 57.18 vs 57.17)"),
    }),
)

_TIP_EXP_LOG = ("Tip-Adapter repo exp.log (github gaopengcuhk/Tip-Adapter @ d0e2d6f; paper Fig. 4/5; RN50; alpha, "
                "beta and the -F epoch chosen on the test set)")
_CLIP_ADAPTER_EXP_LOG = "Tip-Adapter repo exp.log, row CLIP-A (RN50; CLIP-Adapter issue #7)"
_TIP_SHOTS = (16, 8, 4, 2, 1)  # exp.log's column order

# exp.log: dataset -> {method: accuracies at 16, 8, 4, 2, 1 shots}
_TIP_FEWSHOT: dict[str, dict[str, tuple[float, float, float, float, float]]] = {
    "imagenet": {"tip_adapter": (62.01, 61.45, 60.98, 60.96, 60.70),
                 "tip_adapter_f": (65.51, 64.00, 62.52, 61.69, 61.13),
                 "clip_adapter": (63.59, 62.68, 61.84, 61.52, 61.20)},
    "sun397": {"tip_adapter": (66.85, 65.62, 64.15, 62.70, 61.30),
               "tip_adapter_f": (71.47, 68.87, 66.21, 63.64, 62.50),
               "clip_adapter": (69.55, 67.50, 65.96, 63.29, 61.30)},
    "oxford_pets": {"tip_adapter": (88.14, 87.03, 86.45, 87.03, 86.10),
                    "tip_adapter_f": (89.70, 88.09, 87.54, 87.03, 87.00),
                    "clip_adapter": (87.84, 87.65, 87.46, 86.73, 85.99)},
    "eurosat": {"tip_adapter": (70.54, 67.95, 65.32, 61.68, 54.38),
                "tip_adapter_f": (84.54, 77.93, 74.12, 66.15, 59.53),
                "clip_adapter": (84.43, 77.93, 73.38, 63.90, 61.40)},
    "caltech101": {"tip_adapter": (90.18, 89.83, 89.39, 88.44, 87.18),
                   "tip_adapter_f": (92.86, 91.44, 90.56, 89.74, 89.33),
                   "clip_adapter": (92.49, 91.40, 89.98, 89.37, 88.60)},
    "dtd": {"tip_adapter": (60.93, 58.63, 53.96, 49.47, 46.22),
            "tip_adapter_f": (66.55, 62.71, 57.39, 53.72, 49.65),
            "clip_adapter": (65.96, 61.00, 56.86, 51.48, 45.80)},
    "fgvc_aircraft": {"tip_adapter": (29.76, 25.59, 22.41, 21.21, 19.05),
                      "tip_adapter_f": (35.55, 30.21, 25.80, 23.19, 20.22),
                      "clip_adapter": (32.10, 26.25, 22.59, 20.10, 17.49)},
    "food101": {"tip_adapter": (77.83, 77.76, 77.54, 77.52, 77.42),
                "tip_adapter_f": (79.43, 78.64, 78.24, 77.81, 77.51),
                "clip_adapter": (78.25, 78.04, 77.92, 77.22, 76.82)},
    "oxford_flowers": {"tip_adapter": (89.89, 87.98, 83.80, 79.13, 73.12),
                       "tip_adapter_f": (94.80, 91.51, 88.83, 82.30, 79.98),
                       "clip_adapter": (93.90, 91.72, 87.17, 81.61, 73.49)},
    "ucf101": {"tip_adapter": (70.58, 68.68, 66.46, 64.74, 62.60),
               "tip_adapter_f": (78.03, 74.25, 70.55, 66.43, 64.87),
               "clip_adapter": (76.76, 73.30, 69.05, 67.12, 62.20)},
    "stanford_cars": {"tip_adapter": (66.77, 62.93, 61.45, 57.93, 57.54),
                      "tip_adapter_f": (75.74, 69.25, 64.57, 61.50, 58.86),
                      "clip_adapter": (74.01, 67.89, 62.45, 58.74, 55.13)},
}
_TIP_SOURCES = {"tip_adapter": _TIP_EXP_LOG, "tip_adapter_f": _TIP_EXP_LOG, "clip_adapter": _CLIP_ADAPTER_EXP_LOG}

_TPT_README = "TPT official README (github azshue/TPT @ 63ecbac), 'Out-of-Distribution Generalization', CLIP-RN50"
# domain shift, ResNet-50: TPT needs no training images, so its ImageNet accuracy is the same cell in every protocol;
# TPT + CoOp starts from CoOp's prompt learned on 16-shot ImageNet: its own row, ``tpt_coop`` (a TPT run with an
# ``init_prompt``, see ``aggregate.report_method``), with no training images of its own. The mean is
# the README's "OOD Average" (of the four variants; its "Average" includes ImageNet).
_TPT_RN50: tuple[tuple[str, int | None, str, _TransferTable], ...] = (
    ("tpt", None, "60.74", _domain("54.7 35.09 26.67 59.11", "43.89", _TPT_README + ", row TPT")),
    ("tpt_coop", None, "64.73", _domain("57.83 35.86 30.32 58.99", "45.75", _TPT_README + ", row TPT + CoOp (16 shots)")),
)


PUBLISHED: tuple[PublishedValue, ...] = (
    # ImageNet, 16 shots (CoOp Table 1); CoOp with M = 16 context tokens
    _same("zeroshot", "imagenet", None, "RN50", 58.18, _COOP_T1),
    _same("linear_probe", "imagenet", 16, "RN50", 55.87, _COOP_T1),
    _same("coop", "imagenet", 16, "RN50", 62.95, _COOP_T1 + " (M=16; M=4 gives 63.33)"),
    _same("zeroshot", "imagenet", None, "ViT-B/16", 66.73, _COOP_T1),
    _same("coop", "imagenet", 16, "ViT-B/16", 71.92, _COOP_T1 + " (M=16)"),
    # distribution shift, trained on ImageNet 16 shots, ViT-B/16, M = 16 (its ImageNet accuracy: the value above)
    *_transfer("coop", 16, "ViT-B/16", None, {"domainshift": _domain("64.18 46.71 48.41 74.32", None, _COOP_T1_DG)}),
    # prompt ensembling on ImageNet
    _same("ensemble", "imagenet", None, "RN50", 60.41, _COOP_T1_ENS),
    _same("ensemble", "imagenet", None, "RN101", 62.54, _COOP_T1_ENS),
    _same("ensemble", "imagenet", None, "ViT-B/32", 63.71, _COOP_T1_ENS),
    _same("ensemble", "imagenet", None, "ViT-B/16", 68.74, _COOP_T1_ENS),
    # base-to-novel, ViT-B/16: means of 11 datasets and per-dataset rows
    *_base2novel(),
    # few-shot, ResNet-50, mean of 11 datasets (recalled)
    *_fewshot_average("coop", "RN50", {1: "59.6", 2: "61.8", 4: "66.5", 8: "69.9", 16: "73.4"}, _COOP_FIG3,
                      recalled=True),
    *_fewshot_average("zeroshot", "RN50", {None: "58.8"}, _COOP_FIG3 + " (approximate)", recalled=True),
    # cross-dataset transfer and domain generalisation, ImageNet 16 shots, ViT-B/16
    *(v for method, shots, source_accuracy, tables in _TRANSFER_VIT_B16
      for v in _transfer(method, shots, "ViT-B/16", source_accuracy, tables)),
    # few-shot, ResNet-50, per dataset: Tip-Adapter, Tip-Adapter-F, CLIP-Adapter (Tip-Adapter repo exp.log)
    *_fewshot_per_dataset(_TIP_FEWSHOT, _TIP_SHOTS, "RN50", _TIP_SOURCES),
    # domain shift, ResNet-50: TPT, TPT + CoOp (TPT README)
    *(v for method, shots, source_accuracy, table in _TPT_RN50
      for v in _transfer(method, shots, "RN50", source_accuracy, {"domainshift": table}, source_protocols=())),
)

# squashed spelling -> canonical backbone name
_MODEL_ALIASES: dict[str, str] = {
    "rn50": "RN50",
    "resnet50": "RN50",
    "rn101": "RN101",
    "resnet101": "RN101",
    "vitb32": "ViT-B/32",
    "vitbasepatch32": "ViT-B/32",
    "vitb16": "ViT-B/16",
    "vitbasepatch16": "ViT-B/16",
    "vitl14": "ViT-L/14",
    "vitlargepatch14": "ViT-L/14",
}
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def canonical_model(name: str | None) -> str | None:
    """The published backbone name a model string refers to, or None when it is not one of them.

    Accepts OpenAI short names (``"ViT-B/16"``, ``"RN50"``), open_clip spellings (``"ViT-B-16"``), Hugging Face ids
    (``"openai/clip-vit-base-patch16"``) and checkpoint file names (``".../ViT-B-16.pt"``).
    """
    if not name:
        return None
    text = name.strip()
    if text.lower().endswith(_WEIGHT_SUFFIXES):
        text = PurePosixPath(text.replace("\\", "/")).stem
    text = text.lower()
    for prefix in ("openai/", "laion/", "timm/"):
        text = text.removeprefix(prefix)
    squashed = re.sub(r"[^a-z0-9]", "", text)
    squashed = squashed.removeprefix("clip")
    return _MODEL_ALIASES.get(squashed)


def lookup(
    method: str,
    dataset: str,
    eval_dataset: str,
    subset: str,
    shots: int | None,
    model: str | None,
    protocol: str | None = None,
) -> PublishedValue | None:
    """The published value for this experiment and backbone, or None.

    ``dataset``/``eval_dataset`` may be any spelling of a dataset name, or AVERAGE. A value that names its protocols
    matches only those, and is preferred there to a value for any protocol (CoCoOp's run of CoOp in the
    cross-dataset table, CoOp's own run elsewhere).
    """
    backbone = canonical_model(model)
    if backbone is None:
        return None
    train = dataset if dataset == AVERAGE else key_of(dataset)
    target = eval_dataset if eval_dataset == AVERAGE else key_of(eval_dataset)
    key = (method, train, target, subset, shots or None, backbone)
    general = None
    for value in PUBLISHED:
        if (value.method, value.dataset, value.eval_dataset, value.subset, value.shots, value.model) != key:
            continue
        if not value.protocols:
            general = general or value
        elif protocol in value.protocols:
            return value
    return general


def dataset_averages(model: str | None, subset: str) -> list[PublishedValue]:
    """The published means over datasets for ``subset`` on this backbone (e.g. every method's base-to-novel "base")."""
    backbone = canonical_model(model)
    return [v for v in PUBLISHED if v.model == backbone and v.dataset == AVERAGE and v.subset == subset]
