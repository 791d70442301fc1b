"""``vlprompt train | eval | zeroshot | linear-probe``: run experiments in run folders and evaluate them.

    vlprompt train --method coop --dataset dtd --root DATA --shots 16 --seed 1 --model ViT-B/16 --out runs/dtd-coop
                   [--resume | --overwrite] [method options: --n-ctx --ctx-init --csc ...] [training options: --lr
                   --epochs --batch-size --precision --device --views ...] [--subset base] [--budget]
    vlprompt eval RUN [--dataset OTHER] [--root DATA] [--subset new]
    vlprompt zeroshot --dataset dtd --root DATA --model ViT-B/16 [--ensemble coop7|clip80|FILE] [--template T] --out DIR
    vlprompt linear-probe --dataset dtd --root DATA --shots 16 --seed 1 --model ViT-B/16 --out DIR

Each run folder gets config.json, log.txt, prompt.safetensors, results.json (and fewshot.json, checkpoints,
eval-<name>.json where they apply): see :mod:`vlprompt.harness.pipeline`. Under ``torchrun`` training is distributed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from vlprompt.common.vocab import PRECISION_CHOICES, SUBSETS
from vlprompt.harness.cli.common import (
    add_cache_options,
    add_output_options,
    add_root_option,
    console_logging,
    data_root,
    feature_cache_arg,
    percent,
    read_templates,
)
from vlprompt.errors import ConfigError
from vlprompt.common.io import json_text
from vlprompt.common.options import add_dataclass_arguments, dataclass_from_args
from vlprompt.harness.cli.method_options import add_method_arguments, method_options_from_args
from vlprompt.harness.config import RunConfig
from vlprompt.harness.rundir import RESULTS_FILE, EvalSpec, eval_file, eval_files, eval_name, read_result
from vlprompt.methods import METHODS
from vlprompt.methods.templates import TEMPLATE_SETS
from vlprompt.training.config import TrainConfig

# TrainConfig fields that matter to methods that are not trained by SGD (feature extraction and evaluation)
_EXTRACTION_FIELDS = ("precision", "device", "num_workers")


def add_parser(subparsers: Any) -> None:
    """Register ``train``, ``eval``, ``zeroshot`` and ``linear-probe``."""
    _add_train(subparsers)
    _add_eval(subparsers)
    _add_zeroshot(subparsers)
    _add_linear_probe(subparsers)


# ---------------------------------------------------------------------------------------------------------- parsers


def _add_train(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train", help="train a method (CoOp, CoCoOp, ...) on a dataset into a run folder",
        description="Run one experiment: sample the few-shot training set, extract image features (cached), train "
                    "or fit the method, save the learned prompt and evaluate it on the test split (a test-time "
                    "method, tpt, learns nothing here: it adapts its prompt to each test image during the "
                    "evaluation; its run records 0 shots). The run folder "
                    "(--out) receives config.json, fewshot.json, checkpoints (params/optim.safetensors, "
                    "state.json), prompt.safetensors, results.json, eval-<name>.json and log.txt.")
    parser.add_argument("--method", required=True, choices=list(METHODS),
                        help="; ".join(f"{name}: {spec.description}" for name, spec in METHODS.items()))
    _add_run_arguments(parser, shots=True)
    train_group = parser.add_argument_group("training options (gradient-trained methods; device, precision and "
                                            "workers apply to all)")
    add_dataclass_arguments(train_group, TrainConfig, exclude=("seed",))
    options = add_method_arguments(parser, METHODS)
    parser.set_defaults(func=run_train, method_options=options)


def _add_eval(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a trained run on another dataset or class subset",
        description="Evaluate a trained run folder on the test split of another dataset (cross-dataset transfer) or "
                    "another class subset (base-to-novel: --subset new) and write eval-<name>.json into it. The run "
                    "folder is only read; several evaluations may run at once, but not while the run trains.")
    parser.add_argument("run", type=Path, metavar="RUN", help="the run folder (the --out of `vlprompt train`)")
    parser.add_argument("--dataset", default=None,
                        help="dataset to evaluate on: a built-in name or folder:PATH, csv:FILE, json:FILE (default: "
                             "the run's own)")
    add_root_option(parser, run_default=True)
    parser.add_argument("--subset", default="all", choices=list(SUBSETS),
                        help="classes of the test split: all, or the base / new half (base-to-novel) (default: all)")
    parser.add_argument("--name", default=None,
                        help="result file eval-<name>.json (default: the dataset's name, plus -base/-new)")
    parser.add_argument("--model", default=None,
                        help="backbone (name or checkpoint) instead of the one recorded in the run; it must be the "
                             "same weights (the prompt file's fingerprint is checked)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the run's)")
    parser.add_argument("--precision", default=None, choices=list(PRECISION_CHOICES),
                        help="autocast precision of the evaluation; auto = measured on this machine (default: the "
                             "run's)")
    add_cache_options(parser)
    add_output_options(parser)
    parser.set_defaults(func=run_eval)


def _add_zeroshot(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "zeroshot", help="zero-shot CLIP (hand-crafted prompt or prompt ensembling) on a dataset",
        description="Evaluate zero-shot CLIP on a dataset's test split into a run folder: the dataset's hand-crafted "
                    "template (or --template), or prompt ensembling (--ensemble). Nothing is trained.")
    _add_run_arguments(parser, shots=False)
    parser.add_argument("--template", default=None,
                        help="prompt template with one '{}' for the class name (default: the dataset's hand-crafted "
                             "one); with --ensemble it is added to the set")
    parser.add_argument("--ensemble", default=None, metavar="|".join([*TEMPLATE_SETS, "FILE"]),
                        help="prompt ensembling over a template set: " + ", ".join(TEMPLATE_SETS) +
                             " (CoOp's 7 / CLIP's 80 ImageNet templates), or a text file with one template per line")
    group = parser.add_argument_group("compute options")
    add_dataclass_arguments(group, TrainConfig, exclude=_excluded_train_fields())
    parser.set_defaults(func=run_zeroshot)


def _add_linear_probe(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "linear-probe", help="linear probe CLIP (logistic regression on image features)",
        description="Fit linear probe CLIP (L2-regularised logistic regression on frozen image features, C searched "
                    "on the few-shot validation split as the reference does) and evaluate it into a run folder.")
    _add_run_arguments(parser, shots=True)
    group = parser.add_argument_group("compute options")
    add_dataclass_arguments(group, TrainConfig, exclude=_excluded_train_fields())
    options = add_method_arguments(parser, {"linear_probe": METHODS["linear_probe"]},
                                   title="linear probe options")
    parser.set_defaults(func=run_linear_probe, method_options=options)


def _excluded_train_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in _EXTRACTION_FIELDS)


def _add_run_arguments(parser: argparse.ArgumentParser, *, shots: bool) -> None:
    group = parser.add_argument_group("run options")
    add_dataclass_arguments(group, RunConfig, exclude=_RUN_FIELDS_SET_BY_COMMAND + (() if shots else ("shots",)))
    add_root_option(group)
    group.add_argument("--out", type=Path, required=True, help="the run folder to create (or resume)")
    group.add_argument("--resume", action="store_true",
                       help="continue an unfinished run in --out (same options); a finished one is refused")
    group.add_argument("--overwrite", action="store_true",
                       help="start again in --out; the earlier run is kept in previous/ until this one finishes")
    group.add_argument("--also-eval", action="append", default=[], metavar="DATASET",
                       help="after the run, also evaluate on this dataset's test split (cross-dataset transfer) "
                            "into eval-<dataset>.json; repeatable")
    group.add_argument("--eval-new", action="store_true",
                       help="with --subset base: also evaluate on the novel classes (eval-<dataset>-new.json)")
    add_cache_options(group)
    add_output_options(parser)


# RunConfig fields a command sets itself (the method and its options, the data root, the training recipe)
_RUN_FIELDS_SET_BY_COMMAND = ("method", "method_config", "root", "train")


# -------------------------------------------------------------------------------------------------------- commands


def run_train(args: argparse.Namespace) -> int:
    """``vlprompt train``."""
    options = method_options_from_args(args, args.method, args.method_options)
    train = dataclass_from_args(TrainConfig, args)
    return _run(args, args.method, options, train)


def run_zeroshot(args: argparse.Namespace) -> int:
    """``vlprompt zeroshot``."""
    options: dict[str, Any] = {}
    if args.ensemble is None:
        method = "zeroshot"
        if args.template is not None:
            options["template"] = args.template
    else:
        method = "ensemble"
        if args.ensemble in TEMPLATE_SETS:
            options["template_set"] = args.ensemble
            if args.template is not None:
                options["template"] = args.template
        else:
            templates = read_templates(Path(args.ensemble))
            options["templates"] = (*templates, args.template) if args.template is not None else templates
    train = dataclass_from_args(TrainConfig, args)
    return _run(args, method, options, train, shots=0)


def run_linear_probe(args: argparse.Namespace) -> int:
    """``vlprompt linear-probe``."""
    options = method_options_from_args(args, "linear_probe", args.method_options)
    train = dataclass_from_args(TrainConfig, args)
    return _run(args, "linear_probe", options, train)


def _run(args: argparse.Namespace, method: str, options: dict[str, Any], train: Any, *, shots: int | None = None
         ) -> int:
    """One run of ``method`` from the parsed run options (``shots`` fixed by the command, or from ``--shots``)."""
    from vlprompt.common import dist
    from vlprompt.harness.pipeline import run_experiment
    if args.eval_new and getattr(args, "subset", "all") != "base":
        raise ConfigError("--eval-new evaluates the novel classes of a run trained on the base classes: add "
                          "--subset base")
    root = data_root(args)
    fixed = {"method": method, "method_config": options, "train": train, "root": str(root) if root else ""}
    config = dataclass_from_args(RunConfig, args, fixed=fixed if shots is None else {**fixed, "shots": shots})
    evals = [EvalSpec(dataset) for dataset in args.also_eval]
    if args.eval_new:
        evals.append(EvalSpec(args.dataset, "new"))
    cache = feature_cache_arg(args)
    with console_logging(args.quiet), dist.distributed(train.device):
        payload = run_experiment(config, args.out, resume=args.resume, overwrite=args.overwrite, evals=evals,
                                 feature_cache=cache, progress=False if args.quiet else None)
        if dist.is_main_process():
            _print_run(args, payload)
    return 0


def _print_run(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    folder = Path(args.out)
    evals = {name: read_result(path) for name, path in eval_files(folder).items()}
    if args.json:
        print(json_text({"results": payload, "evals": evals}))
        return
    metrics = payload["metrics"]
    budget = " [budget smoke test]" if payload.get("budget") else ""
    print(f"{payload['method']} on {payload['eval_dataset']} ({payload['subset']} classes, {payload['shots']}-shot, "
          f"seed {payload['seed']}): test accuracy {percent(metrics['accuracy'])} "
          f"({metrics['num_samples']} images){budget}")
    for name, result in evals.items():
        print(f"  {result['eval_dataset']} ({result['subset']} classes): accuracy "
              f"{percent(result['metrics']['accuracy'])} -> {eval_file(name)}")
    print(f"results: {folder / RESULTS_FILE}")


def run_eval(args: argparse.Namespace) -> int:
    """``vlprompt eval``."""
    from vlprompt.harness.pipeline import evaluate_run

    with console_logging(args.quiet):
        payload = evaluate_run(args.run, dataset=args.dataset, subset=args.subset, root=data_root(args),
                               name=args.name, model=args.model, device=args.device, precision=args.precision,
                               feature_cache=feature_cache_arg(args), progress=False if args.quiet else None)
    out = Path(args.run) / eval_file(args.name or eval_name(payload["eval_dataset"], payload["subset"]))
    if args.json:
        print(json_text(payload))
    else:
        metrics = payload["metrics"]
        print(f"{payload['method']} run {args.run} on {payload['eval_dataset']} ({payload['subset']} classes): "
              f"accuracy {percent(metrics['accuracy'])} ({metrics['num_samples']} images) -> {out}")
    sys.stdout.flush()
    return 0
