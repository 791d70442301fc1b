"""The papers' protocols as plans: deterministic tuples of independent :class:`~vlprompt.harness.bench.plan.PlannedRun`.

- ``fewshot`` (CoOp Figure 3 / Table 1): every method x dataset x shots (1, 2, 4, 8, 16) x seed (1, 2, 3), with the
  zero-shot CLIP and linear-probe baselines alongside (zero-shot once per dataset, linear probe per shots x seed).
- ``base2novel`` (CoCoOp Table 1): train on the base classes with 16 shots, evaluate on base (``results.json``) and on
  novel classes (``eval-<dataset>-new.json``); zero-shot CLIP on base and novel as the reference row.
- ``crossdataset`` (CoCoOp Table 2): train on a source dataset (ImageNet, all classes, 16 shots), evaluate on the
  10 other datasets.
- ``domainshift`` (CoOp Table 1 right / CoCoOp Table 3): the same ImageNet-trained runs evaluated on ImageNet-V2,
  -Sketch, -A and -R (A and R on their 200-class subsets, as their readers give them).

Datasets are the built-in ones or custom (``folder:PATH``, ``csv:FILE``, ``json:FILE``: planned as absolute specs,
run folders ``custom_<name>``): in ``--datasets`` of few-shot and base-to-novel, as a transfer ``--source`` and in
``--targets`` (only when given: a custom source has no default domain-shift targets).

Cross-dataset and domain generalisation share their source runs (folder tree ``transfer``): a run trained by one is
only evaluated by the other. The shared run is a cross-dataset run (its ``results.json``, the source's own test
split, is the source column of CoCoOp's Table 2); each evaluation is labelled with the protocol that asked for it, and
domain generalisation also records the source's own result under its label (``eval-<source>-domainshift.json``, the
same metrics as ``results.json``), so that the report's tables of both protocols have their source column.

Method settings follow the papers: CoOp's own defaults (M = 16, random init) in the few-shot protocol; in the
base-to-novel and transfer protocols the CoCoOp paper fixes, for CoOp and CoCoOp alike, M = 4 initialised from
"a photo of a" (CoCoOp's config already is that; a choice of the CoCoOp paper's comparison, so it stays here rather
than in CoOp's own recipe). Every run records its protocol (``RunConfig.protocol``: the transfer runs
``crossdataset``), and each method's defaults follow that setting's official recipe
(:mod:`vlprompt.methods.recipe`: e.g. PromptSRC few-shot 50 epochs with aggregation 30 / 30 or 45 / 5; MaPLe and
PromptSRC cross-dataset at prompt depth 3, MaPLe 2 epochs at lr 0.0026; KgCoOp / ProGrad base-to-novel schedules),
exactly as ``vlprompt train --protocol P`` gets them. Everything is overridable (methods, datasets, shots, seeds,
source, targets, per-method options, training options); explicit values win.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from vlprompt.common.options import config_from_dict, config_to_dict
from vlprompt.common.vocab import DEFAULT_MODEL
from vlprompt.data.custom import CUSTOM_KINDS, CustomSpec, parse_custom_spec
from vlprompt.data.registry import DATASETS, lookup
from vlprompt.harness.bench.plan import PlannedRun, make_run, run_key, tree_name
from vlprompt.harness.rundir import EvalSpec, eval_name
from vlprompt.harness.config import RunConfig
from vlprompt.training.config import TrainConfig
from vlprompt.errors import ConfigError
from vlprompt.methods import METHODS, Training

BENCHMARKS: tuple[str, ...] = (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
    "sun397", "dtd", "eurosat", "ucf101",
)
"""The 11 datasets of the papers, in their tables' order."""

IMAGENET_VARIANTS: tuple[str, ...] = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
"""Domain generalisation targets (ImageNet-A and -R are read as their 200-class subsets)."""

DEFAULT_SHOTS: tuple[int, ...] = (1, 2, 4, 8, 16)
DEFAULT_SEEDS: tuple[int, ...] = (1, 2, 3)
TRANSFER_SHOTS = 16
BASE2NOVEL_SHOTS = 16
TRANSFER_TREE = "transfer"
SOURCE_PROTOCOL = "crossdataset"
"""The protocol label of the shared source runs (their own results.json)."""

FIXED_SEED = 1
"""The seed recorded for zero-shot and ensemble runs (they have nothing random; one run per dataset)."""

BUDGET_EPOCHS = 2
"""Training epochs of a smoke-test (``--budget``) run unless ``--epochs`` is given."""
BUDGET_TEST_IMAGES = 64
"""Test images per evaluated dataset of a smoke-test run (a fixed subset, ``RunConfig.max_test_images``)."""
BUDGET_METHOD_OPTIONS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "linear_probe": MappingProxyType({"c_grid": (1e-2, 1.0, 1e2), "search_steps": 0, "max_iter": 100}),
    "tip_adapter": MappingProxyType({"grid_steps": (20, 5)}),
    "tip_adapter_f": MappingProxyType({"grid_steps": (20, 5), "finetune_epochs": 2}),
    "lp_plus_plus": MappingProxyType({"iterations": 20}),
})
"""Method options of a smoke-test run (the user's ``--method-option`` still wins): the linear probe's C search is
a 3-value sweep with short lbfgs fits (its "fewer epochs"); Tip-Adapter(-F) search a 20 x 5 grid (and fine-tune 2
epochs), LP++ runs 20 iterations."""

# CoCoOp paper, section 4: "we fix the context length to 4 and initialize the context vectors using the pre-trained
# word embeddings of 'a photo of a' for both CoOp and CoCoOp" (base-to-novel, cross-dataset, domain generalisation)
COCOOP_PAPER_COOP: Mapping[str, Any] = MappingProxyType({"n_ctx": 4, "ctx_init": "a photo of a"})


def _training(method: str) -> Training:
    """What ``method`` needs to learn, from its registry entry (no torch)."""
    return METHODS[method].training


@dataclass(frozen=True)
class ProtocolOptions:
    """What the user chose; ``None`` means the protocol's default.

    ``method_options`` maps a method name to option overrides (its config fields), applied last.
    ``baselines`` adds the protocol's baselines (zero-shot CLIP; few-shot also the linear probe) to ``methods``.
    """

    out: Path
    root: str = ""
    model: str | None = None
    methods: tuple[str, ...] | None = None
    datasets: tuple[str, ...] | None = None
    shots: tuple[int, ...] | None = None
    seeds: tuple[int, ...] | None = None
    source: str | None = None
    targets: tuple[str, ...] | None = None
    baselines: bool = True
    budget: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    skip_bad_images: bool = False


@dataclass(frozen=True)
class Protocol:
    """A protocol: its defaults (shown by ``--help`` and ``--dry-run``) and its plan builder."""

    name: str
    description: str
    default_model: str
    default_methods: tuple[str, ...]
    baselines: tuple[str, ...]
    build: Callable[[Protocol, ProtocolOptions], tuple[PlannedRun, ...]]


# ------------------------------------------------------------------------------------------------------- validation


def _dataset_key(name: str, *, what: str, trainable: bool, root: str = "") -> str:
    """The registry key of a built-in dataset (any spelling), or the canonical spec of a custom dataset
    (``folder:`` / ``csv:`` / ``json:`` and its absolute path, so that every worker reads the same data; found as
    ``load_dataset`` finds it, also under ``root``); ConfigError naming the known ones otherwise."""
    prefixed = isinstance(name, str) and any(name.startswith(f"{kind}:") for kind in CUSTOM_KINDS)
    info = None if prefixed else lookup(name)
    if info is None:
        custom = parse_custom_spec(name, Path(root).expanduser() if root else None) \
            if isinstance(name, str) and name.strip() else None
        if custom is None:
            raise ConfigError(f"unknown {what} {name!r}; known datasets: {', '.join(DATASETS)}, or your own data as "
                              "folder:PATH, csv:FILE or json:FILE")
        return f"{custom.kind}:{custom.path}"
    if trainable and info.test_only:
        raise ConfigError(f"{info.title} is a test-only dataset (no training images): it cannot be a {what}; use it "
                          "as a domain generalisation target instead")
    return info.key


def custom_name(dataset: str) -> str | None:
    """The name of a planned custom dataset (a spec made by :func:`_dataset_key`: its folder's or file's name); None
    for a built-in dataset."""
    kind, _, path = dataset.partition(":")
    if kind not in CUSTOM_KINDS or not path:
        return None
    return CustomSpec(kind, Path(path)).name  # type: ignore[arg-type]


def dataset_label(dataset: str) -> str:
    """How a planned dataset names its folder level and evaluation files: a built-in's registry key, a custom
    dataset's name (its folder's or list file's name)."""
    custom = custom_name(dataset)
    return custom if custom is not None else dataset


def _folder_label(dataset: str) -> str:
    """The run folder level of a dataset: a built-in's key, ``custom_<name>`` for a custom dataset (never the same
    folder as a built-in dataset)."""
    custom = custom_name(dataset)
    return dataset if custom is None else f"custom_{custom}"


def _check_custom_names(datasets: Sequence[str]) -> None:
    """Two custom datasets with the same name would share run folders and result names: refused."""
    seen: dict[str, str] = {}
    for dataset in datasets:
        label = _folder_label(dataset)
        if label in seen and seen[label] != dataset:
            raise ConfigError(f"the custom datasets {seen[label]} and {dataset} have the same name "
                              f"{dataset_label(dataset)!r}; rename one folder or file")
        seen[label] = dataset


def _unique(values: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(values))


def _method_names(protocol: Protocol, options: ProtocolOptions) -> tuple[str, ...]:

    chosen = options.methods if options.methods is not None else protocol.default_methods
    if not chosen:
        raise ConfigError("--methods is empty: name at least one method")
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(map(repr, unknown))}; known methods: {', '.join(METHODS)}")
    extra = protocol.baselines if options.baselines else ()
    names = _unique([*extra, *chosen])
    for method in options.method_options:
        if method not in names:
            raise ConfigError(f"options given for method {method!r}, which this {protocol.name} plan does not run "
                              f"(methods: {', '.join(names)})")
    return names


def _counts(values: tuple[int, ...] | None, default: tuple[int, ...], what: str, minimum: int) -> tuple[int, ...]:
    chosen = default if values is None else values
    if not chosen:
        raise ConfigError(f"--{what} is empty: give at least one value")
    bad = [v for v in chosen if isinstance(v, bool) or not isinstance(v, int) or v < minimum]
    if bad:
        raise ConfigError(f"--{what} must be integers >= {minimum}, got {', '.join(map(str, bad))}")
    return _unique(sorted(chosen))


def _method_config(method: str, base: Mapping[str, Any], options: ProtocolOptions) -> dict[str, Any]:
    """The method's option overrides (protocol defaults, then the user's), checked against its config class."""
    merged = {**base, **options.method_options.get(method, {})}
    if not merged:
        return {}
    config = config_from_dict(METHODS[method].config_cls, merged)  # raises ConfigError naming bad fields
    full = config_to_dict(config)
    return {key: full[key] for key in merged}


# ------------------------------------------------------------------------------------------------------ run configs


def _train_config(options: ProtocolOptions) -> TrainConfig:
    train = options.train
    if options.budget and train.epochs is None and train.steps is None:
        warmup = train.warmup_epochs
        train = dataclasses.replace(train, epochs=BUDGET_EPOCHS,
                                    warmup_epochs=None if warmup is None else min(warmup, BUDGET_EPOCHS - 1))
    return train


def _config(protocol: str, options: ProtocolOptions, model: str, method: str, dataset: str, *, shots: int,
            seed: int, subset: str = "all", method_config: Mapping[str, Any] | None = None) -> RunConfig:
    return RunConfig(method=method, dataset=dataset, method_config=dict(method_config or {}), root=options.root,
                     shots=shots, seed=seed, model=model, subset=subset, train=_train_config(options),
                     budget=options.budget, protocol=protocol,
                     max_test_images=BUDGET_TEST_IMAGES if options.budget else None,
                     skip_bad_images=options.skip_bad_images)


def _variants(method: str, shots: tuple[int, ...], seeds: tuple[int, ...]) -> list[tuple[int, int] | None]:
    """(shots, seed) pairs of a method; ``[None]`` for methods with nothing to learn (one run, shots 0)."""
    if not _training(method).uses_training_images:
        return [None]
    return [(k, s) for k in shots for s in seeds]


def _runs_for(protocol: Protocol, options: ProtocolOptions, *, tree: str, datasets: Sequence[str],
              methods: Sequence[str], shots: tuple[int, ...], seeds: tuple[int, ...], subset: str,
              method_defaults: Mapping[str, Mapping[str, Any]],
              evals: Callable[[str, str], tuple[EvalSpec, ...]], config_protocol: str) -> list[PlannedRun]:
    model = options.model or protocol.default_model
    runs = []
    for dataset in datasets:
        for method in methods:
            defaults = {**method_defaults.get(method, {}),
                        **(BUDGET_METHOD_OPTIONS.get(method, {}) if options.budget else {})}
            method_config = _method_config(method, defaults, options)
            for variant in _variants(method, shots, seeds):
                k, s = variant if variant is not None else (0, FIXED_SEED)
                key = run_key(tree, model, _folder_label(dataset), method,
                              *(variant if variant is not None else (None, None)))
                config = _config(config_protocol, options, model, method, dataset, shots=k, seed=s, subset=subset,
                                 method_config=method_config)
                runs.append(make_run(options.out, key, config, evals(dataset, method)))
    return runs


# -------------------------------------------------------------------------------------------------------- protocols


def _fewshot(protocol: Protocol, options: ProtocolOptions) -> tuple[PlannedRun, ...]:
    if options.source is not None or options.targets is not None:
        raise ConfigError("--source and --targets belong to crossdataset and domainshift; few-shot runs train and "
                          "test on each of --datasets")
    datasets = _training_datasets(options)
    return tuple(_runs_for(
        protocol, options, tree=tree_name(protocol.name, options.budget), datasets=datasets,
        methods=_method_names(protocol, options), shots=_counts(options.shots, DEFAULT_SHOTS, "shots", 1),
        seeds=_counts(options.seeds, DEFAULT_SEEDS, "seeds", 0), subset="all", method_defaults={},
        evals=lambda dataset, method: (), config_protocol=protocol.name,
    ))


def _base2novel(protocol: Protocol, options: ProtocolOptions) -> tuple[PlannedRun, ...]:
    if options.source is not None or options.targets is not None:
        raise ConfigError("--source and --targets belong to crossdataset and domainshift; base-to-novel runs train "
                          "on the base classes of each of --datasets")
    methods = _method_names(protocol, options)
    _refuse_fixed_classifiers(methods, "evaluated on the novel classes")
    datasets = _training_datasets(options)
    return tuple(_runs_for(
        protocol, options, tree=tree_name(protocol.name, options.budget), datasets=datasets, methods=methods,
        shots=_counts(options.shots, (BASE2NOVEL_SHOTS,), "shots", 1),
        seeds=_counts(options.seeds, DEFAULT_SEEDS, "seeds", 0), subset="base",
        method_defaults={"coop": COCOOP_PAPER_COOP},
        evals=lambda dataset, method: (EvalSpec(dataset, "new", eval_name(dataset_label(dataset), "new")),),
        config_protocol=protocol.name,
    ))


def _training_datasets(options: ProtocolOptions) -> tuple[str, ...]:
    datasets = _unique([_dataset_key(d, what="training dataset", trainable=True, root=options.root)
                        for d in (options.datasets or BENCHMARKS)])
    _check_custom_names(datasets)
    return datasets


def transfer_targets(protocol: str, source: str, targets: Sequence[str] | None, root: str = "") -> tuple[str, ...]:
    """The evaluation datasets of a transfer protocol: the user's, or the papers' (other benchmarks / variants).

    A custom source has no default domain-shift targets (ImageNet's variants have ImageNet's classes): name its
    shifted test sets with --targets. Custom targets are only evaluated when given."""
    if targets is None:
        if protocol == "domainshift" and custom_name(source) is not None:
            raise ConfigError(f"domain generalisation from the custom dataset {dataset_label(source)!r} has no default "
                              "targets: name test sets with the same classes in --targets")
        chosen: Sequence[str] = (IMAGENET_VARIANTS if protocol == "domainshift"
                                 else [d for d in BENCHMARKS if d != source])
    else:
        chosen = targets
    keys = _unique([_dataset_key(t, what="target dataset", trainable=False, root=root) for t in chosen])
    if not keys:
        raise ConfigError("--targets is empty: name at least one evaluation dataset")
    if source in keys:
        raise ConfigError(f"the source dataset {dataset_label(source)} is evaluated anyway; leave it out of --targets")
    _check_custom_names([source, *keys])
    return keys


def _transfer(protocol: Protocol, options: ProtocolOptions) -> tuple[PlannedRun, ...]:
    if options.datasets is not None:
        raise ConfigError(f"{protocol.name} trains on --source (default imagenet) and evaluates on --targets; "
                          "--datasets belongs to fewshot and base2novel")
    methods = _method_names(protocol, options)
    if protocol.name == SOURCE_PROTOCOL:  # domain shift keeps the source's classes (or a subset: ImageNet-A / -R)
        _refuse_fixed_classifiers(methods, "evaluated on another dataset's classes")
    source = _dataset_key(options.source or "imagenet", what="source dataset", trainable=True, root=options.root)
    targets = transfer_targets(protocol.name, source, options.targets, options.root)

    def evals(dataset: str, method: str) -> tuple[EvalSpec, ...]:
        found = tuple(EvalSpec(t, "all", eval_name(dataset_label(t)), protocol.name) for t in targets)
        if protocol.name == SOURCE_PROTOCOL:
            return found
        return (EvalSpec(source, "all", eval_name(f"{dataset_label(source)}-{protocol.name}"), protocol.name),
                *found)

    return tuple(_runs_for(
        protocol, options, tree=tree_name(TRANSFER_TREE, options.budget), datasets=(source,), methods=methods,
        shots=_counts(options.shots, (TRANSFER_SHOTS,), "shots", 1),
        seeds=_counts(options.seeds, DEFAULT_SEEDS, "seeds", 0), subset="all",
        method_defaults={"coop": COCOOP_PAPER_COOP}, evals=evals, config_protocol=SOURCE_PROTOCOL,
    ))


def _refuse_fixed_classifiers(methods: Sequence[str], why: str) -> None:
    """A classifier over its training classes (linear probe, Tip-Adapter's cache, LP++, CLAP) knows only those
    classes: no novel classes, no other dataset (the domain-shift variants keep them, so it takes part there)."""
    bad = [m for m in methods if not METHODS[m].transfers]
    if bad:
        raise ConfigError(f"{', '.join(bad)} learns a classifier over the training classes only and cannot be {why}; "
                          "leave it out of --methods")


PROTOCOLS: Mapping[str, Protocol] = MappingProxyType({
    "fewshot": Protocol(
        "fewshot", "K-shot training (1, 2, 4, 8, 16) x seeds 1-3 per dataset, zero-shot and linear-probe baselines "
        "alongside (CoOp Figure 3, Table 1)", "RN50", ("coop",), ("zeroshot", "linear_probe"), _fewshot),
    "base2novel": Protocol(
        "base2novel", "train on base classes (16 shots), test on base and novel classes, harmonic mean "
        "(CoCoOp Table 1)", DEFAULT_MODEL, ("coop", "cocoop"), ("zeroshot",), _base2novel),
    "crossdataset": Protocol(
        "crossdataset", "train on a source dataset (ImageNet, 16 shots, all classes), test on the other datasets "
        "(CoCoOp Table 2)", DEFAULT_MODEL, ("coop", "cocoop"), (), _transfer),
    "domainshift": Protocol(
        "domainshift", "the ImageNet-trained runs tested on ImageNet-V2, -Sketch, -A and -R (CoOp Table 1, "
        "CoCoOp Table 3)", DEFAULT_MODEL, ("coop", "cocoop"), (), _transfer),
})
"""Protocol name -> :class:`Protocol` (the one registry of protocols)."""


def needs_data_root(runs: Sequence[PlannedRun]) -> bool:
    """True when a planned run trains or evaluates on a built-in dataset (read under the data root); runs on custom
    datasets alone need none (their specs are absolute paths)."""
    return any(custom_name(dataset) is None
               for run in runs for dataset in (run.config.dataset, *(e.dataset for e in run.evals)))


def build_plan(protocol: str, options: ProtocolOptions) -> tuple[PlannedRun, ...]:
    """The runs of ``protocol`` with ``options``, in a deterministic order (dataset, method, shots, seed)."""
    spec = PROTOCOLS.get(protocol)
    if spec is None:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    runs = spec.build(spec, options)
    keys = [run.key for run in runs]
    if len(set(keys)) != len(keys):  # a bug, not a user error: two runs in one folder
        raise AssertionError(f"plan of {protocol} puts two runs in one folder: {keys}")
    return runs
