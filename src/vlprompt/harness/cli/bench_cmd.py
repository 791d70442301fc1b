"""``vlprompt bench PROTOCOL``: one of the papers' experiments as one command.

    vlprompt bench fewshot --datasets dtd eurosat --root DATA --model RN50 --out runs
    vlprompt bench base2novel --root DATA --out runs --dry-run          the plan, each run's state and the totals
    vlprompt bench crossdataset --root DATA --out runs --jobs 4         4 worker processes, one GPU each
    vlprompt bench domainshift --root DATA --out runs                   reuses the ImageNet runs of crossdataset
    vlprompt bench fewshot --budget ...                                 smoke test: 2 epochs, 64 test images, marked everywhere
    vlprompt bench fewshot ... --executor slurm --slurm-partition gpu --slurm-gpus-per-task 1
                                                                        one Slurm job array, one task per run
    vlprompt bench fewshot ... --status                                 where each run (and its array task) stands

Re-running the same command skips finished runs, resumes interrupted ones and reruns failed ones. Exit status: 0 when
every run of the plan is finished (``--executor slurm``: when the array was submitted, or nothing was left to
submit), 1 when some failed (listed at the end), 130 after Ctrl-C, 2 for bad options. Only the runs import torch;
``--help``, ``--dry-run`` and ``--status`` never do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlprompt.common.io import atomic_write_json
from vlprompt.common.options import add_dataclass_arguments, dataclass_from_args
from vlprompt.common.progress import Progress
from vlprompt.errors import ConfigError
from vlprompt.harness.bench.protocols import (
    BUDGET_EPOCHS,
    BUDGET_TEST_IMAGES,
    PROTOCOLS,
    ProtocolOptions,
    build_plan,
    needs_data_root,
)
from vlprompt.harness.bench.status import RunState, count_states, inspect_run
from vlprompt.harness.cli.common import (
    ROOT_ENV,
    add_cache_options,
    add_root_option,
    console_logging,
    data_root,
    feature_cache_arg,
)
from vlprompt.training.config import TrainConfig


def budget_banner(epochs: int | None) -> str:
    """The smoke-test banner, with the epochs the runs really train for (``--epochs``, else the budget's)."""
    return (f"SMOKE TEST (--budget): {epochs if epochs is not None else BUDGET_EPOCHS} training epochs, at most "
            f"{BUDGET_TEST_IMAGES} test images per dataset; results are not comparable to the papers")


EXECUTORS = ("slurm", "local")  # = vlprompt.harness.bench.arrays.EXECUTORS (kept here so --help imports nothing)


def add_parser(subparsers: Any) -> None:
    """Register ``vlprompt bench``."""
    lines = [f"  {name:<13}{p.description} (methods: {', '.join(p.default_methods)}"
             f"{' + ' + ', '.join(p.baselines) if p.baselines else ''}; model {p.default_model})"
             for name, p in PROTOCOLS.items()]
    parser = subparsers.add_parser(
        "bench", help="run one of the papers' protocols (fewshot, base2novel, crossdataset, domainshift)",
        description="Run a protocol of the CoOp / CoCoOp papers as a set of independent runs under --out. Running "
                    "it again skips finished runs, resumes interrupted ones and reruns failed ones.\n\nprotocols:\n"
                    + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("protocol", choices=list(PROTOCOLS), metavar="PROTOCOL",
                        help=f"one of {', '.join(PROTOCOLS)}")
    parser.add_argument("--out", type=Path, required=True, help="output folder of the protocol's run folders")
    add_root_option(parser)
    parser.add_argument("--model", default=None,
                        help="CLIP backbone: a short name (RN50, ViT-B/16), a checkpoint file, hf:ID ... "
                             "(default: the protocol's, RN50 for fewshot, ViT-B/16 otherwise)")
    choice = parser.add_argument_group("what to run (defaults: the papers')")
    choice.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help="methods (space- or comma-separated); the protocol's baselines are added unless "
                             "--no-baselines")
    choice.add_argument("--no-baselines", action="store_true",
                        help="leave out the baselines (fewshot: zeroshot, linear_probe; base2novel: zeroshot)")
    choice.add_argument("--datasets", nargs="+", default=None, metavar="DATASET",
                        help="fewshot / base2novel: training datasets, built-in names or your own data as "
                             "folder:PATH, csv:FILE, json:FILE (default: the 11 benchmarks)")
    choice.add_argument("--shots", nargs="+", default=None, metavar="K",
                        help="shots per class (default: fewshot 1 2 4 8 16; other protocols 16)")
    choice.add_argument("--seeds", nargs="+", default=None, metavar="S", help="seeds (default: 1 2 3)")
    choice.add_argument("--source", default=None,
                        help="crossdataset / domainshift: the training dataset, built-in or custom (default: "
                             "imagenet; a custom source needs --targets for domainshift)")
    choice.add_argument("--targets", nargs="+", default=None, metavar="DATASET",
                        help="crossdataset / domainshift: evaluation datasets, built-in or custom (default: the "
                             "10 other benchmarks / imagenetv2 imagenet_sketch imagenet_a imagenet_r)")
    choice.add_argument("--method-option", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                        help="override a method option, e.g. coop.n_ctx=16 or coop.ctx_init= (repeatable; VALUE is "
                             "JSON, else a string). base2novel / transfer default to CoOp n_ctx=4, ctx_init='a "
                             "photo of a' as in the CoCoOp paper")
    how = parser.add_argument_group("how to run")
    how.add_argument("--dry-run", action="store_true",
                     help="print the plan with each run's state and what would happen; run nothing")
    how.add_argument("--status", action="store_true",
                     help="print where each run stands (finished, running / pending array task, failed, lost, not "
                          "submitted) with its job id; run and submit nothing")
    how.add_argument("--jobs", type=int, default=1,
                     help="worker processes, one run each at a time, each on its own GPU when several exist "
                          "(default: 1, in this process)")
    add_cache_options(how)
    how.add_argument("--skip-bad-images", action="store_true",
                     help="leave out unreadable images in every run (counted and listed in its results) instead of "
                          "failing that run")
    how.add_argument("--budget", action="store_true",
                     help="smoke test: 2 training epochs (unless --epochs), at most 64 test images per dataset; runs go to <protocol>-budget/ and "
                          "every output (results, report, summaries) is marked as such")
    cluster = parser.add_argument_group(
        "job arrays (submitit; pip install 'vlprompt[slurm]'): one task per unfinished run, see docs/cluster.md")
    cluster.add_argument("--executor", choices=EXECUTORS, default=None,
                         help="slurm: submit the unfinished runs as one Slurm job array and return (run the same "
                              "command again, or with --status, to see progress, collect and resubmit what failed "
                              "or was lost); local: the same array as processes of this machine, waited for "
                              "(default: run here, or in --jobs workers)")
    cluster.add_argument("--slurm-partition", default=None, help="partition of the array's tasks")
    cluster.add_argument("--slurm-gpus-per-task", type=int, default=None,
                         help="GPUs of each task (local: GPUs made visible to each task; default: none)")
    cluster.add_argument("--slurm-time", default="24:00:00",
                         help="wall-clock limit of each task: minutes, HH:MM:SS or D-HH:MM:SS (default: 24:00:00)")
    cluster.add_argument("--slurm-array-parallelism", type=int, default=None,
                         help="tasks running at once (Slurm: --array=...%%P, default all; local: default 1)")
    cluster.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
                         help="another #SBATCH option of every task, e.g. account=abc, qos=high, mem=32G, "
                              "cpus_per_task=8 (repeatable)")
    train = parser.add_argument_group("training options (every run; defaults: the methods' reference recipes)")
    add_dataclass_arguments(train, TrainConfig, exclude=("seed",))
    parser.set_defaults(func=run_bench)


# ------------------------------------------------------------------------------------------------------- parsing


def _split(values: Sequence[str] | None) -> tuple[str, ...] | None:
    """``["a,b", "c"]`` -> ``("a", "b", "c")``; None stays None."""
    if values is None:
        return None
    return tuple(item.strip() for value in values for item in value.split(",") if item.strip())


def _integers(values: Sequence[str] | None, option: str) -> tuple[int, ...] | None:
    items = _split(values)
    if items is None:
        return None
    try:
        return tuple(int(item) for item in items)
    except ValueError:
        raise ConfigError(f"--{option} takes whole numbers, got {' '.join(items)}") from None


def parse_method_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["coop.n_ctx=16", "coop.ctx_init=a photo of a"]`` -> ``{"coop": {"n_ctx": 16, "ctx_init": "a photo of a"}}``.

    A value is read as JSON when it is valid JSON (numbers, true/false, lists), else kept as a string.
    """
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, text = item.partition("=")
        method, dot, field_name = name.strip().partition(".")
        if not sep or not dot or not method or not field_name:
            raise ConfigError(f"--method-option {item!r} must look like METHOD.FIELD=VALUE, e.g. coop.n_ctx=16")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        options.setdefault(method, {})[field_name] = value
    return options


def options_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~vlprompt.harness.bench.protocols.ProtocolOptions` of the parsed command line."""
    root = data_root(args)
    return ProtocolOptions(
        out=Path(args.out).expanduser().resolve(),
        root=str(root.expanduser().resolve()) if root else "",
        model=args.model,
        methods=_split(args.methods),
        datasets=_split(args.datasets),
        shots=_integers(args.shots, "shots"),
        seeds=_integers(args.seeds, "seeds"),
        source=args.source,
        targets=_split(args.targets),
        baselines=not args.no_baselines,
        budget=args.budget,
        train=dataclass_from_args(TrainConfig, args),
        method_options=parse_method_options(args.method_option),
        skip_bad_images=args.skip_bad_images,
    )


# ------------------------------------------------------------------------------------------------------ commands


def plan_lines(protocol: str, runs: Sequence[Any], out: Path, budget: bool, epochs: int | None = None) -> list[str]:
    """The dry-run listing: one line per run (action, state, folder, what it is) and the totals (``epochs``: the
    --epochs given, for the smoke-test banner)."""
    statuses = [inspect_run(run, out) for run in runs]
    lines = [f"*** {budget_banner(epochs)} ***"] if budget else []
    lines.append(f"{protocol}: {len(runs)} run(s) under {out}")
    width = max((len(run.key) for run in runs), default=0)
    for run, status in zip(runs, statuses):
        detail = f"  [{status.detail}]" if status.detail else ""
        lines.append(f"  {status.action:<9}{status.state.value:<10}{run.key:<{width}}  {run.describe()}{detail}")
    counts = count_states(statuses)
    todo = sum(1 for s in statuses if s.state is not RunState.FINISHED)
    lines.append("totals: " + ", ".join(f"{n} {state}" for state, n in counts.items())
                 + f" -> {todo} to do, {len(runs) - todo} to skip")
    return lines


def _worker_setup(jobs: int, device: str) -> tuple[list[str | None] | None, int | None]:
    """Devices and CPU threads of the workers (none for one worker: it runs here with the runs' own device)."""
    if jobs <= 1:
        return None, None
    # the bench machinery (arrays, execute, launch, runner, workers: ~40 ms of imports) loads only when runs are
    # executed or inspected, never for --help or --dry-run
    from vlprompt.harness.bench.workers import threads_per_worker, worker_devices

    gpu_count = 0
    if device in ("auto", "cuda"):
        import torch

        gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return list(worker_devices(jobs, device, gpu_count)), threads_per_worker(jobs)


def summary_path(out: Path, protocol: str, budget: bool) -> Path:
    """``OUT/bench-<protocol>[-budget].json``: the last invocation's plan and outcome."""
    return Path(out) / f"bench-{protocol}{'-budget' if budget else ''}.json"


def run_bench(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    options = options_from_args(args)
    runs = build_plan(args.protocol, options)
    if args.status:
        from vlprompt.harness.bench.arrays import array_statuses, status_lines

        banner = [f"*** {budget_banner(options.train.epochs)} ***"] if options.budget else []
        print("\n".join([*banner, f"{args.protocol}: {len(runs)} run(s) under {options.out}",
                         *status_lines(array_statuses(runs, options.out))]))
        return 0
    if args.dry_run:
        print("\n".join(plan_lines(args.protocol, runs, options.out, options.budget, options.train.epochs)))
        return 0
    if not options.root and needs_data_root(runs):
        raise ConfigError(f"give the data root with --root (or set ${ROOT_ENV}); it holds the dataset folders")
    if args.executor is not None:
        return _run_array(args, options, runs)
    from vlprompt.harness.bench.launch import execute_plan
    from vlprompt.harness.bench.runner import PipelineRunner
    devices, threads = _worker_setup(args.jobs, options.train.device)
    banner_text = budget_banner(options.train.epochs)
    banner = [f"*** {banner_text} ***"] if options.budget else []
    print("\n".join([*banner, f"{args.protocol}: {len(runs)} run(s) under {options.out}"
                     + (f" with {args.jobs} workers" if args.jobs > 1 else "")]), flush=True)
    runner = PipelineRunner(progress=None if args.jobs == 1 else False, feature_cache=feature_cache_arg(args))
    with console_logging(quiet=False) if args.jobs == 1 else contextlib.nullcontext():  # the runs' own lines
        result = execute_plan(runs, options.out, runner, jobs=args.jobs, devices=devices, threads=threads,
                              log=lambda line: print(line, flush=True))
    record = {"protocol": args.protocol, "budget": options.budget, **({"banner": banner_text} if options.budget
                                                                       else {}), **result.to_dict()}
    written = atomic_write_json(summary_path(options.out, args.protocol, options.budget), record)
    print("\n".join([*banner, *result.lines(), f"summary: {written}"]))
    return result.exit_code


def array_options(args: argparse.Namespace) -> Any:
    """The :class:`~vlprompt.harness.bench.arrays.ArrayOptions` of the parsed command line."""
    from vlprompt.harness.bench.arrays import ArrayOptions, parse_slurm_options, parse_time

    return ArrayOptions(executor=args.executor, partition=args.slurm_partition,
                        gpus_per_task=args.slurm_gpus_per_task, time_min=parse_time(args.slurm_time),
                        array_parallelism=args.slurm_array_parallelism,
                        extra=parse_slurm_options(args.slurm_option))


def _run_array(args: argparse.Namespace, options: Any, runs: Sequence[Any]) -> int:
    """``--executor slurm|local``: submit the runs that need a task as one array (local: and wait for it)."""
    from vlprompt.harness.bench.arrays import array_statuses, outcome_of, status_lines, submit_array
    from vlprompt.harness.bench.execute import new_session
    from vlprompt.harness.bench.runner import PipelineRunner

    if args.jobs != 1:
        raise ConfigError("--jobs and --executor exclude each other: an array runs one task per run (use "
                          "--slurm-array-parallelism for how many run at once)")
    settings = array_options(args)
    out = options.out
    before = array_statuses(runs, out)
    todo = [s.run for s in before if s.to_submit]
    active = [s for s in before if s.active]
    banner_text = budget_banner(options.train.epochs)
    banner = [f"*** {banner_text} ***"] if options.budget else []
    counts = f"{sum(s.label == 'finished' for s in before)} finished, {len(active)} pending or running"
    print("\n".join([*banner, f"{args.protocol}: {len(runs)} run(s) under {out}: {counts}, {len(todo)} to submit "
                     f"({settings.executor})"]), flush=True)
    for s in before:
        if s.label in ("failed", "lost"):
            print(f"  resubmitting {s.run.key} ({s.label}{': job ' + s.job_id if s.job_id else ''})", flush=True)
        elif s.label == "conflict":
            print(f"  not submitted: {s.run.key} {s.status.detail}", flush=True)
    session = new_session()
    runner = PipelineRunner(progress=False, feature_cache=feature_cache_arg(args))
    with Progress(len(todo), "bench", "run", emit=lambda line: print(line, flush=True)) as shown:
        result = submit_array(todo, out, runner, settings, session=session,
                              log=lambda line: print(line, flush=True), on_task_end=lambda _: shown.update(1))
    after = array_statuses(runs, out)
    unfinished = [s.run.key for s in after if s.label != "finished"]
    record = {"protocol": args.protocol, "budget": options.budget, "executor": settings.executor,
              **({"banner": banner_text} if options.budget else {}), "session": session,
              "runs": [run.key for run in runs], "submitted": result.submitted, "job_ids": result.job_ids,
              "outcomes": result.outcomes, "states": {s.run.key: s.label for s in after}, "unfinished": unfinished}
    written = atomic_write_json(summary_path(out, args.protocol, options.budget), record)
    if settings.executor == "slurm":
        if result.job_ids:
            array_id = result.job_ids[0].split("_")[0]
            print(f"submitted job array {array_id}: {len(result.job_ids)} task(s), one per run")
        print("\n".join([*status_lines(after), f"summary: {written}",
                         "see progress with the same command and --status; run the same command again to collect "
                         "and resubmit what failed or was lost"]))
        return 1 if any(s.label == "conflict" for s in after) else 0
    failed = [outcome_of(o) for o in result.outcomes if not o.get("ok")]
    lines = [*status_lines(after)]
    lines += [f"  FAILED {o.key}: {o.error}" for o in failed if o.key in unfinished]
    if unfinished:
        lines.append("run the same command again to rerun the failed runs and resume the others")
    print("\n".join([*banner, *lines, f"summary: {written}"]))
    return 1 if unfinished else 0
