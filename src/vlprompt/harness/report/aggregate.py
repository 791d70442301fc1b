"""Collect run results and aggregate them over seeds.

Input is the result JSON every evaluated run writes (``results.json`` or ``eval-<dataset>.json``, see
docs/architecture.md "Results"); logs are never parsed. A file that cannot be read or does not follow the schema is
reported (path and reason) and skipped. Two files describing the same experiment and seed are an error naming both.

Statistics (all accuracies in percent):

- mean over seeds;
- sample standard deviation (``ddof=1``). With a single seed it is undefined: ``Stats.std`` and ``Stats.ci95`` are
  ``None`` and the tables show the mean alone (CSV leaves those cells empty);
- 95% confidence interval half-width ``t_{0.975, n-1} * std / sqrt(n)`` with the exact Student-t quantile
  (:func:`t_quantile`, computed here without scipy);
- harmonic mean ``H = 2BN / (B + N)`` of base and novel accuracies, computed from the seed-averaged B and N as the
  CoCoOp paper does (and, for the dataset average, from the averaged B and N);
- averages over datasets are means of per-dataset means and exist only when every dataset has the value
  (:func:`mean_if_complete`); a partial average is never computed silently.

Results of different backbones, and smoke-test (``"budget": true``) results, are never mixed: groups are split into
:class:`Partition` objects by (model, budget).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlprompt.common.vocab import SUBSETS, slug
from vlprompt.data.registry import DATASETS, key_of, title_of
from vlprompt.errors import ConfigError, RunError
from vlprompt.harness.rundir import CONFIG_FILE, EVAL_PREFIX, PREVIOUS_DIR, RESULT_SCHEMA, RESULTS_FILE

PROTOCOLS: tuple[str, ...] = ("fewshot", "base2novel", "crossdataset", "domainshift")
BUDGET_BANNER = "SMOKE TEST (budget) – not comparable to papers"

# method name -> display name, in table order; methods not listed keep their name and come after these
METHOD_NAMES: dict[str, str] = {
    "zeroshot": "Zero-shot CLIP",
    "ensemble": "Prompt ensembling",
    "linear_probe": "Linear probe CLIP",
    "coop": "CoOp",
    "cocoop": "CoCoOp",
    "kgcoop": "KgCoOp",
    "prograd": "ProGrad",
    "ivlp": "IVLP",
    "maple": "MaPLe",
    "promptsrc": "PromptSRC",
    "tcp": "TCP",
    "clip_adapter": "CLIP-Adapter",
    "tip_adapter": "Tip-Adapter",
    "tip_adapter_f": "Tip-Adapter-F",
    "lp_plus_plus": "LP++",
    "clap": "CLAP",
    "clip_lora": "CLIP-LoRA",
    "tpt": "TPT",
    "tpt_coop": "TPT+CoOp",
}

RESULT_FILE_PATTERN = re.compile(rf"^({re.escape(RESULTS_FILE[:-5])}|{re.escape(EVAL_PREFIX)}.+)\.json$")


def dataset_label(name: str) -> str:
    """Display name of a dataset: the papers' name of a built-in one, else the name itself."""
    return title_of(name)


def dataset_sort_key(name: str) -> tuple[int, str]:
    """Order datasets as the papers' tables do; unknown datasets follow, alphabetically."""
    order = list(DATASETS)
    key = key_of(name)
    return (order.index(key), "") if key in DATASETS else (len(order), name.lower())


def _is_set_aside(relative: Path, root: Path) -> bool:
    """True inside a run folder's ``previous/`` (an older run kept by ``--overwrite`` until the new one finishes)."""
    for depth, part in enumerate(relative.parts[:-1]):
        if part == PREVIOUS_DIR and (root.joinpath(*relative.parts[:depth]) / CONFIG_FILE).is_file():
            return True
    return False


def report_method(method: str, config: Any) -> str:
    """The row a result belongs to: its method, except TPT started from a learned CoOp prompt (``init_prompt`` in
    the recorded method config), which the TPT paper reports as its own row, TPT+CoOp (``tpt_coop``)."""
    if method == "tpt" and isinstance(config, Mapping):
        options = config.get("method_config")
        if isinstance(options, Mapping) and options.get("init_prompt"):
            return "tpt_coop"
    return method


def method_label(name: str) -> str:
    """Display name of a method (the name itself when unknown)."""
    return METHOD_NAMES.get(name, name)


def method_sort_key(name: str) -> tuple[int, str]:
    """Baselines first, then CoOp, CoCoOp and successors; unknown methods follow, alphabetically."""
    order = list(METHOD_NAMES)
    return (order.index(name), "") if name in METHOD_NAMES else (len(order), name.lower())


# ----------------------------------------------------------------------------------------------------------- maths


def _t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` (closed forms, Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2 == 1:
        total, term = 0.0, 1.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= cos2 * (2 * k) / (2 * k + 1)
        series = math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0
        return 2.0 / math.pi * (theta + series)
    total, term = 0.0, 1.0
    for k in range(1, df // 2 + 1):
        total += term
        term *= cos2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * total


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (``0.5 < p < 1``) of Student's t distribution with ``df >= 1`` (integer) degrees of freedom.

    Exact to double precision: the closed-form distribution function for integer degrees of freedom is inverted by
    bisection (agrees with scipy to ~1e-14): ``t_quantile(0.975, 2)`` = 4.30265272975...
    """
    if not 0.5 < p < 1.0:
        raise ValueError(f"p must be in (0.5, 1), got {p}")
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    mass = 2.0 * p - 1.0
    lo, hi = 0.0, 1.0
    while _t_two_sided_mass(hi, df) < mass:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _t_two_sided_mass(mid, df) < mass:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Stats:
    """Mean, sample std (ddof=1) and 95% CI half-width over ``n`` seeds; std and ci95 are None when n == 1."""

    n: int
    mean: float
    std: float | None
    ci95: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        """Statistics of one accuracy per seed."""
        n = len(values)
        if n == 0:
            raise ValueError("no values to summarise")
        mean = math.fsum(values) / n
        if n == 1:
            return cls(n=1, mean=mean, std=None, ci95=None)
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
        return cls(n=n, mean=mean, std=std, ci95=t_quantile(0.975, n - 1) * std / math.sqrt(n))


def harmonic_mean(base: float | None, novel: float | None) -> float | None:
    """H = 2BN / (B + N); None when either is missing, 0 when both are 0."""
    if base is None or novel is None:
        return None
    if base + novel == 0:
        return 0.0
    return 2.0 * base * novel / (base + novel)


def mean_if_complete(values: Sequence[float | None]) -> float | None:
    """The mean of ``values`` when none is missing (and there is at least one), else None."""
    if not values or any(v is None for v in values):
        return None
    return math.fsum(v for v in values if v is not None) / len(values)


# ----------------------------------------------------------------------------------------------------------- records


class MalformedResultError(ValueError):
    """A result file that cannot be read or does not follow the result schema (the message says why)."""


@dataclass(frozen=True)
class ResultRecord:
    """One evaluated run, as read from its result file."""

    path: Path
    protocol: str | None
    method: str
    dataset: str
    eval_dataset: str
    subset: str
    shots: int | None  # None: no training images (zero-shot, prompt ensembling)
    seed: int | None
    model: str | None
    budget: bool
    accuracy: float


def find_result_files(root: Path) -> list[Path]:
    """Every ``results.json`` and ``eval-*.json`` under ``root``, sorted.

    Hidden files and folders (temporary files of atomic writes) and runs set aside in a run folder's ``previous/``
    are skipped.
    """
    found = []
    for path in root.rglob("*.json"):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or _is_set_aside(relative, root):
            continue
        if RESULT_FILE_PATTERN.match(path.name) and path.is_file():
            found.append(path)
    return sorted(found)


_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def model_label(model: str | None) -> str | None:
    """A short, stable label of a backbone given as a path (results written before they recorded ``backbone``): the
    file's or folder's name; model names ("ViT-B/16") and hub ids ("org/name") stay as they are."""
    if model is None:
        return None
    if model.startswith(("/", "~", "./", "../", ".\\")) or "\\" in model or model.endswith(_CHECKPOINT_SUFFIXES):
        path = Path(model.replace("\\", "/"))
        return (path.stem if path.suffix in _CHECKPOINT_SUFFIXES else path.name) or model
    return model


def _optional_str(data: dict[str, Any], name: str, default: str | None = None) -> str | None:
    value = data.get(name, default)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise MalformedResultError(f"'{name}' must be a non-empty string or null, got {value!r}")
    return value


def _required_str(data: dict[str, Any], name: str) -> str:
    value = _optional_str(data, name)
    if value is None:
        raise MalformedResultError(f"missing '{name}'")
    return value


def _optional_int(data: dict[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedResultError(f"'{name}' must be a non-negative integer or null, got {value!r}")
    return value


def parse_result(path: Path) -> ResultRecord:
    """Read one result file; raise :class:`MalformedResultError` saying what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise MalformedResultError(f"cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise MalformedResultError(f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise MalformedResultError(f"expected a JSON object, got {type(data).__name__}")
    schema = data.get("schema")
    if schema != RESULT_SCHEMA:
        if schema is None:
            raise MalformedResultError("missing 'schema'")
        raise MalformedResultError(f"schema {schema!r} is not supported (this version reads {RESULT_SCHEMA})")
    method = report_method(_required_str(data, "method"), data.get("config"))
    dataset = _required_str(data, "dataset")
    eval_dataset = _optional_str(data, "eval_dataset") or dataset
    subset = data.get("subset", "all")
    if subset not in SUBSETS:
        raise MalformedResultError(f"'subset' must be one of {', '.join(SUBSETS)}, got {subset!r}")
    shots = _optional_int(data, "shots") or None  # 0 shots is zero-shot: same as null
    seed = _optional_int(data, "seed")
    budget = data.get("budget", False)
    if not isinstance(budget, bool):
        raise MalformedResultError(f"'budget' must be true or false, got {budget!r}")
    metrics = data.get("metrics")
    if not isinstance(metrics, dict):
        raise MalformedResultError("missing 'metrics' object")
    accuracy = metrics.get("accuracy")
    if isinstance(accuracy, bool) or not isinstance(accuracy, int | float) or not math.isfinite(accuracy):
        raise MalformedResultError(f"'metrics.accuracy' must be a finite number, got {accuracy!r}")
    if not 0.0 <= accuracy <= 100.0:
        raise MalformedResultError(f"'metrics.accuracy' is a percentage in [0, 100], got {accuracy!r}")
    return ResultRecord(
        path=path,
        protocol=_optional_str(data, "protocol"),
        method=method,
        dataset=dataset,
        eval_dataset=eval_dataset,
        subset=subset,
        shots=shots,
        seed=seed,
        model=_optional_str(data, "backbone") or model_label(_optional_str(data, "model")),
        budget=budget,
        accuracy=float(accuracy),
    )


@dataclass(frozen=True)
class SkippedFile:
    """A result file left out of the report, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Collection:
    """Everything read from a results folder."""

    root: Path
    files: tuple[Path, ...]
    records: tuple[ResultRecord, ...]
    skipped: tuple[SkippedFile, ...]


@dataclass(frozen=True, order=True)
class GroupKey:
    """What identifies an experiment, apart from the seed (datasets by their canonical key)."""

    protocol: str
    method: str
    dataset: str
    eval_dataset: str
    subset: str
    shots: int  # 0 for none
    model: str
    budget: bool

    @classmethod
    def of(cls, record: ResultRecord) -> GroupKey:
        return cls(
            protocol=record.protocol or "",
            method=record.method,
            dataset=key_of(record.dataset),
            eval_dataset=key_of(record.eval_dataset),
            subset=record.subset,
            shots=record.shots or 0,
            model=record.model or "",
            budget=record.budget,
        )

    def describe(self) -> str:
        """Human-readable description for messages."""
        shots = f"{self.shots} shots" if self.shots else "no shots"
        where = self.dataset if self.eval_dataset == self.dataset else f"{self.dataset} -> {self.eval_dataset}"
        parts = [self.protocol or "plain run", self.method, where, f"subset {self.subset}", shots]
        parts.append(f"model {self.model or 'unknown'}")
        if self.budget:
            parts.append("budget")
        return ", ".join(parts)


def _seed_text(seed: int | None) -> str:
    return "none" if seed is None else str(seed)


def collect_results(root: str | Path) -> Collection:
    """Find and parse every result file under ``root``.

    Raises ConfigError when ``root`` is not a folder or holds no result file, and RunError when two files describe
    the same experiment and seed.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(
            f"results folder {root} does not exist or is not a folder; pass the folder that holds the run folders"
        )
    files = find_result_files(root)
    if not files:
        raise ConfigError(
            f"no result files (results.json or eval-*.json) under {root}; evaluate some runs first or pass the "
            "folder that holds the run folders"
        )
    records: list[ResultRecord] = []
    skipped: list[SkippedFile] = []
    for path in files:
        try:
            records.append(parse_result(path))
        except MalformedResultError as exc:
            skipped.append(SkippedFile(path=path, reason=str(exc)))
    _check_duplicates(records)
    return Collection(root=root, files=tuple(files), records=tuple(records), skipped=tuple(skipped))


def _check_duplicates(records: Iterable[ResultRecord]) -> None:
    seen: dict[tuple[GroupKey, int | None], Path] = {}
    clashes: list[str] = []
    for record in records:
        key = (GroupKey.of(record), record.seed)
        if key in seen:
            clashes.append(f"{seen[key]} and {record.path} ({key[0].describe()}, seed {_seed_text(record.seed)})")
        else:
            seen[key] = record.path
    if clashes:
        shown = "; ".join(clashes[:10]) + (f"; and {len(clashes) - 10} more" if len(clashes) > 10 else "")
        raise RunError(
            f"duplicate results for the same experiment and seed: {shown}. Remove or move one file of each pair "
            "(for example an old copy of a run folder) and run the report again"
        )


# ----------------------------------------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class Group:
    """All seeds of one experiment, with their statistics."""

    key: GroupKey
    seeds: tuple[int | None, ...]
    accuracies: tuple[float, ...]
    paths: tuple[Path, ...]
    stats: Stats


def group_records(records: Iterable[ResultRecord]) -> list[Group]:
    """Group records by experiment (everything but the seed), seeds in increasing order."""
    buckets: dict[GroupKey, list[ResultRecord]] = {}
    for record in records:
        buckets.setdefault(GroupKey.of(record), []).append(record)
    groups = []
    for key in sorted(buckets):
        members = sorted(buckets[key], key=lambda r: (r.seed is not None, r.seed or 0, str(r.path)))
        accuracies = tuple(r.accuracy for r in members)
        groups.append(
            Group(
                key=key,
                seeds=tuple(r.seed for r in members),
                accuracies=accuracies,
                paths=tuple(r.path for r in members),
                stats=Stats.of(accuracies),
            )
        )
    return groups


@dataclass(frozen=True)
class Partition:
    """The groups of one backbone, either all smoke-test (budget) results or none."""

    model: str  # "" when the results do not name it
    budget: bool
    groups: tuple[Group, ...] = field(default=())

    @property
    def label(self) -> str:
        """Section title: the model name, with the smoke-test banner for budget results."""
        name = self.model or "unknown model"
        return f"{name} – {BUDGET_BANNER}" if self.budget else name

    @property
    def slug(self) -> str:
        """File-name prefix: the model slug, with ``-budget`` for budget results."""
        base = slug(self.model) if self.model else "unknown-model"
        return f"{base}-budget" if self.budget else base

    def protocol_groups(self, protocol: str) -> list[Group]:
        """This partition's groups of one protocol ("" for plain runs)."""
        return [g for g in self.groups if g.key.protocol == protocol]


def partition_groups(groups: Iterable[Group]) -> list[Partition]:
    """Split groups by (model, budget); full results first, then budget ones, each by model name."""
    buckets: dict[tuple[bool, str], list[Group]] = {}
    for group in groups:
        buckets.setdefault((group.key.budget, group.key.model), []).append(group)
    return [
        Partition(model=model, budget=budget, groups=tuple(members))
        for (budget, model), members in sorted(buckets.items())
    ]


class GroupIndex:
    """Look up a partition's groups by (protocol, method, dataset, eval_dataset, subset, shots)."""

    def __init__(self, groups: Iterable[Group]) -> None:
        self._by_key = {
            (g.key.protocol, g.key.method, g.key.dataset, g.key.eval_dataset, g.key.subset, g.key.shots): g
            for g in groups
        }

    def get(
        self, protocol: str, method: str, dataset: str, eval_dataset: str, subset: str, shots: int | None
    ) -> Group | None:
        """The group, or None when there is no such result."""
        return self._by_key.get((protocol, method, dataset, eval_dataset, subset, shots or 0))

    def mean(
        self, protocol: str, method: str, dataset: str, eval_dataset: str, subset: str, shots: int | None
    ) -> float | None:
        """The group's mean accuracy, or None."""
        group = self.get(protocol, method, dataset, eval_dataset, subset, shots)
        return None if group is None else group.stats.mean


def in_fewshot_layout(group: Group) -> bool:
    """A few-shot result of the papers' layout: all classes, evaluated on the training dataset."""
    key = group.key
    return key.protocol == "fewshot" and key.subset == "all" and key.eval_dataset == key.dataset


def in_base2novel_layout(group: Group) -> bool:
    """A base-to-novel result: base or novel classes, evaluated on the training dataset."""
    key = group.key
    return key.protocol == "base2novel" and key.subset in ("base", "new") and key.eval_dataset == key.dataset


def in_transfer_layout(group: Group, protocol: str) -> bool:
    """A cross-dataset or domain-shift result (``protocol``) on all classes of the evaluation dataset."""
    return group.key.protocol == protocol and group.key.subset == "all"


def seed_coverage_issues(groups: Sequence[Group]) -> list[str]:
    """Groups whose seeds differ from the most common seed set of their protocol and method."""
    by_method: dict[tuple[str, str], list[Group]] = {}
    for group in groups:
        by_method.setdefault((group.key.protocol, group.key.method), []).append(group)
    issues = []
    for members in by_method.values():
        counts = Counter(g.seeds for g in members)
        if len(counts) < 2:
            continue
        usual = max(counts, key=lambda seeds: (counts[seeds], len(seeds)))
        usual_text = ", ".join(_seed_text(s) for s in usual)
        for group in members:
            if group.seeds != usual:
                have = ", ".join(_seed_text(s) for s in group.seeds)
                issues.append(f"{group.key.describe()}: seeds [{have}], while most such runs have [{usual_text}]")
    return issues
