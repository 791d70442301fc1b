"""The papers' reported numbers, as data, for comparison columns in the report.

Every value names what was trained and evaluated (method, training dataset, evaluation dataset, subset, shots),
the backbone, and its source. Values are keyed by the experiment, not by the protocol that produced it: CoOp's
16-shot ImageNet number is the same cell in the few-shot table and in the domain-shift table's source column. Only
values that mean different things in different protocols (the mean of the targets) name their protocol.
``AVERAGE`` stands for "mean over the 11 datasets" (few-shot, base-to-novel) or "mean over the targets"
(cross-dataset and domain shift, as evaluation dataset). ``HARMONIC`` is the subset of published base-to-novel
harmonic means. Method keys need not be in the method registry (a method built later finds its numbers waiting).

Each source string names where the number was read. Values typed from memory and not re-read in a source carry
``recalled=True`` and are labelled so in every table. What was read, and where:

- CoOp / CoCoOp numbers: /work/shared/reference/prompt-learning.md ("Reported results"), CoOp (IJCV 2022) Table 1,
  CoCoOp (CVPR 2022) Tables 1 and 2; CoOp's ResNet-50 few-shot curve (Fig. 3) is recalled.
- Base-to-novel means (ViT-B/16, 16 shots, 11 datasets): the official READMEs of KgCoOp (its own row and ProGrad's),
  MaPLe and PromptSRC (with its IVLP baseline); TCP's mean as quoted in a later paper's README (TCP's README and paper
  tables could not be read here).
- Base-to-novel per dataset: KgCoOp's H column as quoted in the DMC README (whose CLIP and CoOp columns reproduce
  CoCoOp's Table 1); every other per-dataset value (KgCoOp base / novel, ProGrad, TCP, MaPLe, PromptSRC) is recalled.
- Few-shot per dataset, ResNet-50, 1 / 2 / 4 / 8 / 16 shots: Tip-Adapter, Tip-Adapter-F and CLIP-Adapter from the
  official Tip-Adapter repository's ``exp.log`` (gaopengcuhk/Tip-Adapter @ d0e2d6f; its README: the numbers of the
  paper's Figures 4 and 5; CLIP-Adapter issue #7: the "CLIP-A" rows are CLIP-Adapter's). Tip-Adapter(-F)'s were
  chosen on the test set by the official code.
- Domain shift, ResNet-50: TPT and TPT + CoOp from the official TPT README (azshue/TPT @ 63ecbac, "Out-of-Distribution
  Generalization"; the same table on its gh-pages project page).

Not found in any readable source (so not entered): few-shot numbers of KgCoOp, ProGrad, TCP, LP++, CLAP, CLIP-LoRA
and PromptSRC; cross-dataset and domain-generalisation tables of MaPLe, PromptSRC, KgCoOp, ProGrad and TCP; TPT's
ViT-B/16 and cross-dataset numbers.
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

DOMAIN_TARGETS: tuple[str, ...] = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
"""The four ImageNet variants of the domain-generalisation tables."""


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
    protocol: str | None = None  # set when the value belongs to one protocol only (e.g. a target average)


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


def _b2n_per_dataset(method: str, rows: Mapping[str, tuple[float, float, float]], source: str, *,
                     h_source: str | None = None) -> list[PublishedValue]:
    """A method's per-dataset base / novel / H (ViT-B/16, 16 shots, 2 decimals). Base and novel are recalled; H is
    too unless ``h_source`` names where the H column was read."""
    values = []
    for dataset, row in rows.items():
        for subset, accuracy in zip(B2N_SUBSETS, row, strict=True):
            read = subset == HARMONIC and h_source is not None
            values.append(PublishedValue(method, dataset, dataset, subset, 16, "ViT-B/16", accuracy,
                                         h_source if read else source, recalled=not read))
    return values


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


def _transfer(method: str, train: str, shots: int | None, model: str, printed: Mapping[str, str], source: str,
              protocol: str) -> list[PublishedValue]:
    """One row of a cross-dataset or domain-shift table: evaluation dataset -> value as printed. The source dataset
    is an ordinary cell (shared with the few-shot table); AVERAGE (the mean of the targets) belongs to ``protocol``."""
    values = []
    for target, text in printed.items():
        accuracy, decimals = _printed(text)
        values.append(PublishedValue(method, train, target, "all", shots, model, accuracy, source, decimals,
                                     protocol=protocol if target == AVERAGE else None))
    return values


# ------------------------------------------------------------------------------------------------------ the tables

_COOP_T1 = "CoOp (IJCV 2022) Table 1"
_COOP_T1_DG = "CoOp (IJCV 2022) Table 1, domain generalisation (M=16)"
_COOP_T1_ENS = "CoOp (IJCV 2022), prompt ensembling on ImageNet"
_COOP_FIG3 = "CoOp (IJCV 2022) Fig. 3, mean of 11 datasets"
_COCOOP_T1 = "CoCoOp (CVPR 2022) Table 1, mean of 11 datasets"
_COCOOP_T2 = "CoCoOp (CVPR 2022) Table 2, mean of the 10 targets (backbone ViT-B/16 as in all CoCoOp experiments)"

_KGCOOP_README = "KgCoOp official README table (github htyao89/KgCoOp @ c43ccc3, readme.md), mean of 11 datasets"
_TCP_MEAN = ("TCP (CVPR 2024) Table 1, mean of 11 datasets, as quoted in the CLIP-SVD README (arXiv 2509.03740; "
             "the HiCroPL README quotes H 79.50)")
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

_B2N_RECALLED = "{}, base-to-novel, ViT-B/16"
_KGCOOP_H_DMC = ("KgCoOp (CVPR 2023) Table 1 H column, as quoted in the DMC README (Marouf et al., 'Decoupled Mode "
                 "Connectivity', base-to-novel HM table)")

# per dataset, in B2N_DATASETS order: method -> (the paper's table, (base, novel, H) per dataset)
_B2N_ROWS: dict[str, tuple[str, tuple[tuple[float, float, float], ...]]] = {
    "kgcoop": ("KgCoOp (CVPR 2023) Table 1", (
        (75.83, 69.96, 72.78), (97.72, 94.39, 96.03), (94.65, 97.76, 96.18), (71.76, 75.04, 73.36),
        (95.00, 74.73, 83.65), (90.50, 91.70, 91.10), (36.21, 33.55, 34.83), (80.29, 76.53, 78.36),
        (77.55, 54.99, 64.35), (85.64, 64.34, 73.48), (82.89, 76.67, 79.66),
    )),
    "prograd": ("KgCoOp (CVPR 2023) Table 1 (ProGrad's row)", (
        (77.02, 66.66, 71.46), (98.02, 93.89, 95.91), (95.07, 97.63, 96.33), (77.68, 68.63, 72.88),
        (95.54, 71.87, 82.03), (90.37, 89.59, 89.98), (40.54, 27.57, 32.82), (81.26, 74.17, 77.55),
        (77.35, 52.35, 62.45), (90.11, 60.89, 72.67), (84.33, 74.94, 79.35),
    )),
    "tcp": ("TCP (CVPR 2024) Table 1", (
        (77.27, 69.87, 73.38), (98.23, 94.67, 96.42), (94.67, 97.20, 95.92), (80.80, 74.13, 77.32),
        (97.73, 75.57, 85.23), (90.57, 91.37, 90.97), (41.97, 34.43, 37.83), (82.63, 78.20, 80.35),
        (82.77, 58.07, 68.25), (91.63, 74.73, 82.32), (87.13, 80.77, 83.83),
    )),
    "maple": ("MaPLe (CVPR 2023) Table 1", (
        (76.66, 70.54, 73.47), (97.74, 94.36, 96.02), (95.43, 97.76, 96.58), (72.94, 74.00, 73.47),
        (95.92, 72.46, 82.56), (90.71, 92.05, 91.38), (37.44, 35.61, 36.50), (80.82, 78.70, 79.75),
        (80.36, 59.18, 68.16), (94.07, 73.23, 82.35), (83.00, 78.66, 80.77),
    )),
    "promptsrc": ("PromptSRC (ICCV 2023) Table 1", (
        (77.60, 70.73, 74.01), (98.10, 94.03, 96.02), (95.33, 97.30, 96.30), (78.27, 74.97, 76.58),
        (98.07, 76.50, 85.95), (90.67, 91.53, 91.10), (42.73, 37.87, 40.15), (82.67, 78.47, 80.52),
        (83.37, 62.97, 71.75), (92.90, 73.90, 82.32), (87.10, 78.80, 82.74),
    )),
}
_B2N_H_SOURCES = {"kgcoop": _KGCOOP_H_DMC}


def _base2novel() -> list[PublishedValue]:
    values = [v for method, (shots, printed, source) in _B2N_MEANS.items()
              for v in _b2n_mean(method, shots, printed, source)]
    for method, (table, rows) in _B2N_ROWS.items():
        values += _b2n_per_dataset(method, dict(zip(B2N_DATASETS, rows, strict=True)), _B2N_RECALLED.format(table),
                                   h_source=_B2N_H_SOURCES.get(method))
    return values


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

_TPT_README = ("TPT official README (github azshue/TPT @ 63ecbac), 'Out-of-Distribution Generalization' table, "
               "CLIP-RN50")
# domain shift, ResNet-50, trained on ImageNet: (method, shots, {evaluation dataset: value as printed}, source).
# TPT has no training images; TPT + CoOp starts from CoOp's prompt learned on 16-shot ImageNet, so it is keyed as a
# 16-shot TPT run. AVERAGE is the README's "OOD Average" (mean of the four variants; its "Average" includes ImageNet).
_TPT_DOMAIN_SHIFT: tuple[tuple[str, int | None, dict[str, str], str], ...] = (
    ("tpt", None, {"imagenet": "60.74", "imagenet_a": "26.67", "imagenetv2": "54.7", "imagenet_r": "59.11",
                   "imagenet_sketch": "35.09", AVERAGE: "43.89"}, _TPT_README + ", row TPT"),
    ("tpt", 16, {"imagenet": "64.73", "imagenet_a": "30.32", "imagenetv2": "57.83", "imagenet_r": "58.99",
                 "imagenet_sketch": "35.86", AVERAGE: "45.75"}, _TPT_README + ", row TPT + CoOp (CoOp: 16 shots)"),
)


PUBLISHED: tuple[PublishedValue, ...] = (
    # ImageNet, 16 shots (CoOp Table 1); CoOp with M = 16 context tokens
    _same("zeroshot", "imagenet", None, "RN50", 58.18, _COOP_T1),
    _same("linear_probe", "imagenet", 16, "RN50", 55.87, _COOP_T1),
    _same("coop", "imagenet", 16, "RN50", 62.95, _COOP_T1 + " (M=16; M=4 gives 63.33)"),
    _same("zeroshot", "imagenet", None, "ViT-B/16", 66.73, _COOP_T1),
    _same("coop", "imagenet", 16, "ViT-B/16", 71.92, _COOP_T1 + " (M=16)"),
    # distribution shift, trained on ImageNet 16 shots, ViT-B/16, M = 16
    *_transfer("coop", "imagenet", 16, "ViT-B/16", {"imagenetv2": "64.18", "imagenet_sketch": "46.71",
                                                    "imagenet_a": "48.41", "imagenet_r": "74.32"},
               _COOP_T1_DG, "domainshift"),
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
    # cross-dataset transfer, ImageNet 16 shots -> mean of the 10 other datasets
    *_transfer("coop", "imagenet", 16, "ViT-B/16", {AVERAGE: "63.88"}, _COCOOP_T2, "crossdataset"),
    *_transfer("cocoop", "imagenet", 16, "ViT-B/16", {AVERAGE: "65.74"}, _COCOOP_T2, "crossdataset"),
    # few-shot, ResNet-50, per dataset: Tip-Adapter, Tip-Adapter-F, CLIP-Adapter (Tip-Adapter repo exp.log)
    *_fewshot_per_dataset(_TIP_FEWSHOT, _TIP_SHOTS, "RN50", _TIP_SOURCES),
    # domain shift, ResNet-50: TPT, TPT + CoOp (TPT README)
    *(v for method, shots, printed, source in _TPT_DOMAIN_SHIFT
      for v in _transfer(method, "imagenet", shots, "RN50", printed, source, "domainshift")),
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

    ``dataset``/``eval_dataset`` may be any spelling of a dataset name, or AVERAGE. Values tied to one protocol
    (the cross-dataset target average) match only that ``protocol``.
    """
    backbone = canonical_model(model)
    if backbone is None:
        return None
    train = dataset if dataset == AVERAGE else key_of(dataset)
    target = eval_dataset if eval_dataset == AVERAGE else key_of(eval_dataset)
    for value in PUBLISHED:
        if (value.method, value.dataset, value.eval_dataset, value.subset, value.shots, value.model) == (
            method, train, target, subset, shots or None, backbone,
        ) and value.protocol in (None, protocol):
            return value
    return None


def dataset_averages(model: str | None, subset: str) -> list[PublishedValue]:
    """The published means over datasets for ``subset`` on this backbone (e.g. every method's base-to-novel "base")."""
    backbone = canonical_model(model)
    return [v for v in PUBLISHED if v.model == backbone and v.dataset == AVERAGE and v.subset == subset]
