"""The papers' reported numbers, as data, for comparison columns in the report.

Every value names what was trained and evaluated (method, training dataset, evaluation dataset, subset, shots),
the backbone, and its source. Values are keyed by the experiment, not by the protocol that produced it: CoOp's
16-shot ImageNet number is the same cell in the few-shot table and in the domain-shift table's source column. Only
values that mean different things in different protocols (the cross-dataset mean of targets) name their protocol.
``AVERAGE`` stands for "mean over the 11 datasets" (few-shot, base-to-novel) or "mean over the targets"
(cross-dataset, as evaluation dataset). ``HARMONIC`` is the subset of published base-to-novel harmonic means.

Source: /work/shared/reference/prompt-learning.md ("Reported results"); KgCoOp's, ProGrad's and TCP's base-to-novel
tables as noted at :func:`_base2novel_table` (facts and sources in the issue-10 notes). Numbers the reference marks as
recalled, and per-dataset rows not re-read from the paper, carry ``recalled=True`` and are labelled so in every
table. Tip-Adapter, Tip-Adapter-F and CLIP-Adapter few-shot
numbers (ResNet-50, per dataset, 1 / 2 / 4 / 8 / 16 shots): the official Tip-Adapter repository's ``exp.log``
(gaopengcuhk/Tip-Adapter @ d0e2d6f; its README: the numbers of the paper's Figures 4 and 5; CLIP-Adapter issue #7:
the "CLIP-A" rows are CLIP-Adapter's). Tip-Adapter(-F)'s were chosen on the test set by the official code.
MaPLe, PromptSRC and IVLP: their official READMEs (means) and papers (per dataset, recalled).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from vlprompt.data.registry import key_of

AVERAGE = "__average__"
HARMONIC = "harmonic_mean"

_COOP_T1 = "CoOp (IJCV 2022) Table 1"
_COOP_T1_DG = "CoOp (IJCV 2022) Table 1, domain generalisation (M=16)"
_COOP_T1_ENS = "CoOp (IJCV 2022), prompt ensembling on ImageNet"
_COOP_FIG3 = "CoOp (IJCV 2022) Fig. 3, mean of 11 datasets"
_COCOOP_T1 = "CoCoOp (CVPR 2022) Table 1, mean of 11 datasets"
_COCOOP_T2 = "CoCoOp (CVPR 2022) Table 2, mean of the 10 targets (backbone ViT-B/16 as in all CoCoOp experiments)"


@dataclass(frozen=True)
class PublishedValue:
    """One reported accuracy (percent), as printed in the paper (``decimals`` digits)."""

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


def _same(method: str, dataset: str, shots: int | None, model: str, accuracy: float, source: str) -> PublishedValue:
    """A value trained and evaluated on the same dataset, all classes."""
    return PublishedValue(method, dataset, dataset, "all", shots, model, accuracy, source)


def _base2novel(method: str, shots: int | None, base: float, novel: float, h: float,
                source: str = _COCOOP_T1) -> list[PublishedValue]:
    return [
        PublishedValue(method, AVERAGE, AVERAGE, subset, shots, "ViT-B/16", value, source)
        for subset, value in (("base", base), ("new", novel), (HARMONIC, h))
    ]


_KGCOOP_README = "KgCoOp (CVPR 2023), official README table (github htyao89/KgCoOp), mean of 11 datasets"
_KGCOOP_T1 = "KgCoOp (CVPR 2023) Table 1"
_TCP_T1 = "TCP (CVPR 2024) Table 1"
_TCP_MEAN = "TCP (CVPR 2024) Table 1, mean of 11 datasets (as later papers' READMEs quote it)"

B2N_DATASETS: tuple[str, ...] = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                                 "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
"""The 11 datasets in the order of the papers' base-to-novel tables."""


def _base2novel_table(method: str, mean: tuple[float, float, float], mean_source: str,
                      rows: tuple[tuple[float, float, float], ...], source: str) -> list[PublishedValue]:
    """A method's base-to-novel table (ViT-B/16, 16 shots): the mean of 11 datasets and each dataset's base / novel /
    H in :data:`B2N_DATASETS` order. The per-dataset rows were written from the paper's table without re-reading it
    here (``recalled``): their means reproduce the published means and every H is the harmonic mean of its row."""
    values = [PublishedValue(method, AVERAGE, AVERAGE, subset, 16, "ViT-B/16", value, mean_source)
              for subset, value in zip(("base", "new", HARMONIC), mean, strict=True)]
    for dataset, row in zip(B2N_DATASETS, rows, strict=True):
        values += [PublishedValue(method, dataset, dataset, subset, 16, "ViT-B/16", value, source, recalled=True)
                   for subset, value in zip(("base", "new", HARMONIC), row, strict=True)]
    return values


KGCOOP_B2N = (
    (75.83, 69.96, 72.78), (97.72, 94.39, 96.03), (94.65, 97.76, 96.18), (71.76, 75.04, 73.36),
    (95.00, 74.73, 83.65), (90.50, 91.70, 91.09), (36.21, 33.55, 34.83), (80.29, 76.53, 78.36),
    (77.55, 54.99, 64.35), (85.64, 64.34, 73.48), (82.89, 76.67, 79.65),
)
PROGRAD_B2N = (
    (77.02, 66.66, 71.46), (98.02, 93.89, 95.91), (95.07, 97.63, 96.33), (77.68, 68.63, 72.88),
    (95.54, 71.87, 82.03), (90.37, 89.59, 89.98), (40.54, 27.57, 32.82), (81.26, 74.17, 77.55),
    (77.35, 52.35, 62.45), (90.11, 60.89, 72.67), (84.33, 74.94, 79.35),
)
TCP_B2N = (
    (77.27, 69.87, 73.38), (98.23, 94.67, 96.42), (94.67, 97.20, 95.92), (80.80, 74.13, 77.32),
    (97.73, 75.57, 85.23), (90.57, 91.37, 90.97), (41.97, 34.43, 37.83), (82.63, 78.20, 80.35),
    (82.77, 58.07, 68.25), (91.63, 74.73, 82.32), (87.13, 80.77, 83.83),
)
"""Per-dataset base / novel / H (ViT-B/16) in :data:`B2N_DATASETS` order (see :func:`_base2novel_table`)."""

_MAPLE_T1 = "MaPLe (CVPR 2023) Table 1, base-to-novel, ViT-B/16"
_PROMPTSRC_T1 = "PromptSRC (ICCV 2023) Table 1, base-to-novel, ViT-B/16"
_PROMPTSRC_README_IVLP = "PromptSRC README (IVLP baseline, 4+4 prompts, depth 9, 20 epochs), mean of 11 datasets"

# per dataset (base, novel, H); recalled from the papers' tables, not re-read: each H is 2BN/(B+N) to 0.01 and the
# 11-dataset means equal the official READMEs' means exactly (see /work/notes/methods11.md)
_B2N_PER_DATASET: dict[str, dict[str, tuple[float, float, float]]] = {
    "maple": {
        "imagenet": (76.66, 70.54, 73.47), "caltech101": (97.74, 94.36, 96.02), "oxford_pets": (95.43, 97.76, 96.58),
        "stanford_cars": (72.94, 74.00, 73.47), "oxford_flowers": (95.92, 72.46, 82.56),
        "food101": (90.71, 92.05, 91.38), "fgvc_aircraft": (37.44, 35.61, 36.50), "sun397": (80.82, 78.70, 79.75),
        "dtd": (80.36, 59.18, 68.16), "eurosat": (94.07, 73.23, 82.35), "ucf101": (83.00, 78.66, 80.77),
    },
    "promptsrc": {
        "imagenet": (77.60, 70.73, 74.01), "caltech101": (98.10, 94.03, 96.02), "oxford_pets": (95.33, 97.30, 96.30),
        "stanford_cars": (78.27, 74.97, 76.58), "oxford_flowers": (98.07, 76.50, 85.95),
        "food101": (90.67, 91.53, 91.10), "fgvc_aircraft": (42.73, 37.87, 40.15), "sun397": (82.67, 78.47, 80.52),
        "dtd": (83.37, 62.97, 71.75), "eurosat": (92.90, 73.90, 82.32), "ucf101": (87.10, 78.80, 82.74),
    },
}


def _base2novel_per_dataset() -> list[PublishedValue]:
    sources = {"maple": _MAPLE_T1, "promptsrc": _PROMPTSRC_T1}
    return [
        PublishedValue(method, dataset, dataset, subset, 16, "ViT-B/16", value, sources[method], recalled=True)
        for method, table in _B2N_PER_DATASET.items()
        for dataset, row in table.items()
        for subset, value in zip(("base", "new", HARMONIC), row, strict=True)
    ]


def _fewshot_rn50_recalled() -> list[PublishedValue]:
    values = [
        PublishedValue("coop", AVERAGE, AVERAGE, "all", shots, "RN50", acc, _COOP_FIG3, decimals=1, recalled=True)
        for shots, acc in zip((1, 2, 4, 8, 16), (59.6, 61.8, 66.5, 69.9, 73.4), strict=True)
    ]
    approximate = _COOP_FIG3 + " (approximate)"
    values.append(
        PublishedValue("zeroshot", AVERAGE, AVERAGE, "all", None, "RN50", 58.8, approximate, decimals=1, recalled=True)
    )
    return values


_TIP_EXP_LOG = ("Tip-Adapter repo exp.log (paper Fig. 4/5; RN50; alpha, beta and the -F epoch chosen on the test "
                "set)")
_CLIP_ADAPTER_EXP_LOG = "Tip-Adapter repo exp.log, row CLIP-A (RN50; CLIP-Adapter issue #7)"

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


def _tip_fewshot() -> list[PublishedValue]:
    return [
        _same(method, dataset, shots, "RN50", acc, _CLIP_ADAPTER_EXP_LOG if method == "clip_adapter" else _TIP_EXP_LOG)
        for dataset, rows in _TIP_FEWSHOT.items() for method, accuracies in rows.items()
        for shots, acc in zip((16, 8, 4, 2, 1), accuracies, strict=True)
    ]


PUBLISHED: tuple[PublishedValue, ...] = (
    # ImageNet, 16 shots (CoOp Table 1); CoOp with M = 16 context tokens
    _same("zeroshot", "imagenet", None, "RN50", 58.18, _COOP_T1),
    _same("linear_probe", "imagenet", 16, "RN50", 55.87, _COOP_T1),
    _same("coop", "imagenet", 16, "RN50", 62.95, _COOP_T1 + " (M=16; M=4 gives 63.33)"),
    _same("zeroshot", "imagenet", None, "ViT-B/16", 66.73, _COOP_T1),
    _same("coop", "imagenet", 16, "ViT-B/16", 71.92, _COOP_T1 + " (M=16)"),
    # distribution shift, trained on ImageNet 16 shots, ViT-B/16, M = 16
    *(
        PublishedValue("coop", "imagenet", target, "all", 16, "ViT-B/16", acc, _COOP_T1_DG)
        for target, acc in (
            ("imagenetv2", 64.18), ("imagenet_sketch", 46.71), ("imagenet_a", 48.41), ("imagenet_r", 74.32)
        )
    ),
    # prompt ensembling on ImageNet
    _same("ensemble", "imagenet", None, "RN50", 60.41, _COOP_T1_ENS),
    _same("ensemble", "imagenet", None, "RN101", 62.54, _COOP_T1_ENS),
    _same("ensemble", "imagenet", None, "ViT-B/32", 63.71, _COOP_T1_ENS),
    _same("ensemble", "imagenet", None, "ViT-B/16", 68.74, _COOP_T1_ENS),
    # base-to-novel, ViT-B/16, mean of 11 datasets (CoOp and CoCoOp trained with 16 shots on base classes)
    *_base2novel("zeroshot", None, 69.34, 74.22, 71.70),
    *_base2novel("coop", 16, 82.69, 63.22, 71.66),
    *_base2novel("cocoop", 16, 80.47, 71.69, 75.83),
    *_base2novel_table("kgcoop", (80.73, 73.60, 77.00), _KGCOOP_README, KGCOOP_B2N, _KGCOOP_T1),
    *_base2novel_table("prograd", (82.48, 70.75, 76.16), _KGCOOP_README + " (ProGrad's row)", PROGRAD_B2N,
                       _KGCOOP_T1 + " (ProGrad's row)"),
    *_base2novel_table("tcp", (84.13, 75.36, 79.51), _TCP_MEAN, TCP_B2N, _TCP_T1),
    *_base2novel("ivlp", 16, 84.21, 71.79, 77.51, _PROMPTSRC_README_IVLP),
    *_base2novel("maple", 16, 82.28, 75.14, 78.55, "MaPLe (CVPR 2023) Table 1 / official README, mean of 11 datasets"),
    *_base2novel("promptsrc", 16, 84.26, 76.10, 79.97,
                 "PromptSRC (ICCV 2023) Table 1 / official README, mean of 11 datasets"),
    *_base2novel_per_dataset(),
    # few-shot, ResNet-50, mean of 11 datasets (recalled)
    *_fewshot_rn50_recalled(),
    # cross-dataset transfer, ImageNet 16 shots -> mean of the 10 other datasets
    PublishedValue("coop", "imagenet", AVERAGE, "all", 16, "ViT-B/16", 63.88, _COCOOP_T2, protocol="crossdataset"),
    PublishedValue("cocoop", "imagenet", AVERAGE, "all", 16, "ViT-B/16", 65.74, _COCOOP_T2, protocol="crossdataset"),
    # few-shot, ResNet-50, per dataset: Tip-Adapter, Tip-Adapter-F, CLIP-Adapter (Tip-Adapter repo exp.log)
    *_tip_fewshot(),
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
