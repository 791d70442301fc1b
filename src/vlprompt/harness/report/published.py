"""The papers' reported numbers, as data, for comparison columns in the report.

Every value names what was trained and evaluated (method, training dataset, evaluation dataset, subset, shots),
the backbone, and its source. Values are keyed by the experiment, not by the protocol that produced it: CoOp's
16-shot ImageNet number is the same cell in the few-shot table and in the domain-shift table's source column. Only
values that mean different things in different protocols (the cross-dataset mean of targets) name their protocol.
``AVERAGE`` stands for "mean over the 11 datasets" (few-shot, base-to-novel) or "mean over the targets"
(cross-dataset, as evaluation dataset). ``HARMONIC`` is the subset of published base-to-novel harmonic means.

Source: /work/shared/reference/prompt-learning.md ("Reported results"). Numbers the reference marks as recalled
carry ``recalled=True`` and are labelled so in every table.
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


def _base2novel(method: str, shots: int | None, base: float, novel: float, h: float) -> list[PublishedValue]:
    return [
        PublishedValue(method, AVERAGE, AVERAGE, subset, shots, "ViT-B/16", value, _COCOOP_T1)
        for subset, value in (("base", base), ("new", novel), (HARMONIC, h))
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
    *_base2novel("kgcoop", 16, 80.73, 73.60, 77.00),
    *_base2novel("maple", 16, 82.28, 75.14, 78.55),
    *_base2novel("promptsrc", 16, 84.26, 76.10, 79.97),
    # few-shot, ResNet-50, mean of 11 datasets (recalled)
    *_fewshot_rn50_recalled(),
    # cross-dataset transfer, ImageNet 16 shots -> mean of the 10 other datasets
    PublishedValue("coop", "imagenet", AVERAGE, "all", 16, "ViT-B/16", 63.88, _COCOOP_T2, protocol="crossdataset"),
    PublishedValue("cocoop", "imagenet", AVERAGE, "all", 16, "ViT-B/16", 65.74, _COCOOP_T2, protocol="crossdataset"),
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
