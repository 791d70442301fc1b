"""Few-shot sampling as the reference does it (Dassl's ``generate_fewshot_dataset``), deterministic and portable.

For each label, in order of first appearance in the split: ``rng.sample(items, K)`` if the class has at least K items,
else all its items (no repetition) and the class is reported as short. Train is sampled first with K shots, then val
with ``min(K, 4)``, both from ONE ``random.Random(seed)``: no global random state is read or changed. Given the
reference's split file order the draws are the same calls the reference makes after seeding ``random`` with the seed.

Datasets without a val split (ImageNet) take their few-shot val images from the training images left after drawing
the shots (same generator, same rule). ``K < 1`` is an error (use the full splits for all data); a test-only dataset
(no train split) cannot be sampled. A K larger than every class keeps every training image and reports every class.

The result is saved as JSON with relative paths (portable across machines) and reused: see :func:`save_fewshot`,
:func:`load_fewshot`, :func:`load_or_sample_fewshot`.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlprompt.data.listing import format_offenders
from vlprompt.data.types import DatasetSplits, Item
from vlprompt.errors import ConfigError, DatasetError
from vlprompt.common.io import atomic_write_text

log = logging.getLogger(__name__)

FEWSHOT_KIND = "vlprompt.fewshot"
FEWSHOT_SCHEMA = 1
MAX_VAL_SHOTS = 4


@dataclass
class FewShotResult(DatasetSplits):
    """A :class:`DatasetSplits` whose train / val are the sampled few-shot sets (test unchanged), with the report.

    ``short_train`` / ``short_val`` map each class that had fewer images than asked to the number it had (all of them
    are used). ``val_from`` is "val" or "train" (datasets without a val split).
    """

    shots: int = 0
    seed: int = 0
    val_shots: int = 0
    val_from: str = "val"
    short_train: dict[int, int] = field(default_factory=dict)
    short_val: dict[int, int] = field(default_factory=dict)

    def as_splits(self) -> DatasetSplits:
        """The plain :class:`DatasetSplits` (without the sampling report)."""
        return DatasetSplits(self.name, self.image_dir, list(self.classnames), self.template, self.train, self.val,
                             self.test, split_source=self.split_source)

    def short_report(self) -> list[str]:
        """Human-readable lines about short classes (empty when every class had enough images)."""
        lines = []
        for split, short, wanted in (("train", self.short_train, self.shots), ("val", self.short_val, self.val_shots)):
            if short:
                listed = [f"{self.classnames[label]} ({count})" for label, count in short.items()]
                lines.append(f"{len(short)} classes have fewer than {wanted} {split} images, all of them are used: "
                             f"{format_offenders(listed)}")
        return lines


def _check_request(splits: DatasetSplits, shots: int, seed: int) -> None:
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ConfigError(f"shots must be an integer >= 1, got {shots!r} (to train on all images, do not sample).")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}.")
    if not splits.train:
        raise DatasetError(f"{splits.name} has no training images (it is a test-only dataset); few-shot training "
                           "sets are drawn from a dataset with a train split.")


def _sample_per_class(items: Sequence[Item], count: int, rng: random.Random) -> tuple[list[int], dict[int, int]]:
    """Indices of the sampled items and ``{label: available}`` of the short classes (reference order and calls)."""
    by_label: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        by_label.setdefault(item.label, []).append(index)
    chosen: list[int] = []
    short: dict[int, int] = {}
    for label, indices in by_label.items():
        if len(indices) >= count:
            chosen.extend(rng.sample(indices, count))
        else:
            chosen.extend(indices)
            short[label] = len(indices)
    return chosen, short


def _with_absent(short: dict[int, int], items: Sequence[Item], num_classes: int) -> dict[int, int]:
    """Add classes with no item at all (count 0) to the short report, sorted by label."""
    present = {item.label for item in items}
    merged = dict(short)
    for label in range(num_classes):
        if label not in present:
            merged[label] = 0
    return dict(sorted(merged.items()))


def sample_fewshot(splits: DatasetSplits, shots: int, seed: int) -> FewShotResult:
    """K shots per class from train and ``min(K, 4)`` per class for val, deterministic for (dataset, K, seed)."""
    _check_request(splits, shots, seed)
    rng = random.Random(seed)
    train_idx, short_train = _sample_per_class(splits.train, shots, rng)
    val_shots = min(shots, MAX_VAL_SHOTS)
    if splits.val:
        val_pool: list[Item] = list(splits.val)
        val_from = "val"
    else:
        taken = set(train_idx)
        val_pool = [item for index, item in enumerate(splits.train) if index not in taken]
        val_from = "train"
    val_idx, short_val = _sample_per_class(val_pool, val_shots, rng)
    result = FewShotResult(
        splits.name, splits.image_dir, list(splits.classnames), splits.template,
        [splits.train[i] for i in train_idx], [val_pool[i] for i in val_idx], list(splits.test),
        split_source=splits.split_source, shots=shots, seed=seed, val_shots=val_shots, val_from=val_from,
        short_train=_with_absent(short_train, splits.train, splits.num_classes),
        short_val=_with_absent(short_val, val_pool, splits.num_classes),
    )
    for line in result.short_report():
        log.warning("%s %d-shot seed %d: %s", splits.name, shots, seed, line)
    return result


def fewshot_document(result: FewShotResult) -> dict[str, Any]:
    """The portable JSON document of a few-shot sample (relative paths; no machine-specific data)."""
    return {
        "schema": FEWSHOT_SCHEMA,
        "kind": FEWSHOT_KIND,
        "dataset": result.name,
        "shots": result.shots,
        "seed": result.seed,
        "val_shots": result.val_shots,
        "val_from": result.val_from,
        "num_classes": result.num_classes,
        "classnames": list(result.classnames),
        "short_classes": {"train": {str(k): v for k, v in result.short_train.items()},
                          "val": {str(k): v for k, v in result.short_val.items()}},
        "train": [[item.path, item.label] for item in result.train],
        "val": [[item.path, item.label] for item in result.val],
    }


def dumps_fewshot(document: Mapping[str, Any]) -> str:
    """JSON text of a few-shot document: one key per line, and one item per line in the train / val lists."""
    lines = []
    for key, value in document.items():
        if key in ("train", "val"):
            body = ",\n".join("  " + json.dumps(entry, ensure_ascii=False) for entry in value)
            text = f"[\n{body}\n ]" if value else "[]"
        else:
            text = json.dumps(value, ensure_ascii=False)
        lines.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def save_fewshot(result: FewShotResult, path: str | Path) -> Path:
    """Write ``result`` as portable JSON at ``path`` (atomically); identical inputs give identical bytes."""
    return atomic_write_text(path, dumps_fewshot(fewshot_document(result)))


def load_fewshot(path: str | Path, splits: DatasetSplits) -> FewShotResult:
    """Read a few-shot file written by :func:`save_fewshot` for the full dataset ``splits``.

    Checks that it was sampled from this dataset: same name and number of classes, and every item is a train (or val)
    item of ``splits`` with the same label. Class names, image folder and test come from ``splits``.
    """
    path = Path(path)
    doc = _read_document(path)
    if doc["dataset"] != splits.name or doc["num_classes"] != splits.num_classes:
        raise DatasetError(f"few-shot file {path} was sampled from {doc['dataset']!r} ({doc['num_classes']} classes), "
                           f"not from {splits.name!r} ({splits.num_classes} classes).")
    known = {item.path: item.label for item in (*splits.train, *splits.val)}
    items = {split: [Item(p, int(label)) for p, label in doc[split]] for split in ("train", "val")}
    offenders = [f"{item.path} (label {item.label})" for split in ("train", "val") for item in items[split]
                 if known.get(item.path) != item.label]
    if offenders:
        raise DatasetError(f"few-shot file {path} has {len(offenders)} images that are not in {splits.name}'s splits "
                           f"with that label: {format_offenders(offenders)}. The dataset's split changed since the "
                           "file was written: delete it to sample again.")
    return FewShotResult(
        splits.name, splits.image_dir, list(splits.classnames), splits.template, items["train"], items["val"],
        list(splits.test), split_source=splits.split_source, shots=doc["shots"], seed=doc["seed"],
        val_shots=doc["val_shots"], val_from=doc["val_from"],
        short_train=_int_keys(doc["short_classes"]["train"]), short_val=_int_keys(doc["short_classes"]["val"]),
    )


def _read_document(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"few-shot file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"few-shot file {path} cannot be read ({exc}); delete it to sample again.") from None
    required = ("dataset", "shots", "seed", "val_shots", "val_from", "num_classes", "short_classes", "train", "val")
    if not isinstance(doc, dict) or doc.get("kind") != FEWSHOT_KIND or any(key not in doc for key in required):
        raise DatasetError(f"{path} is not a vlprompt few-shot file (written by `vlprompt data fewshot`).")
    if doc.get("schema") != FEWSHOT_SCHEMA:
        raise DatasetError(f"few-shot file {path} has schema {doc.get('schema')!r}; this vlprompt reads schema "
                           f"{FEWSHOT_SCHEMA}. Delete it to sample again.")
    return doc


def _int_keys(mapping: Mapping[str, int]) -> dict[int, int]:
    return {int(k): int(v) for k, v in mapping.items()}


def load_or_sample_fewshot(splits: DatasetSplits, shots: int, seed: int, path: str | Path) -> FewShotResult:
    """Reuse the few-shot file at ``path`` if it exists (it must match shots and seed), else sample and save it."""
    path = Path(path)
    if path.exists():
        result = load_fewshot(path, splits)
        if (result.shots, result.seed) != (shots, seed):
            raise DatasetError(f"few-shot file {path} holds {result.shots} shots with seed {result.seed}, not "
                               f"{shots} shots with seed {seed}: use another run folder or delete the file.")
        log.info("%s: reusing the %d-shot sample (seed %d) in %s", splits.name, shots, seed, path)
        return result
    result = sample_fewshot(splits, shots, seed)
    save_fewshot(result, path)
    return result
