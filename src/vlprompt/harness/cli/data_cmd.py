"""``vlprompt data``: list, download and check the built-in datasets, write split and few-shot files.

    vlprompt data list [--root DIR] [--json]                              with a root: which datasets are there
    vlprompt data download NAME [NAME ...]|all [--root DIR] [--dry-run]   fetch, verify, arrange, check
    vlprompt data check NAME [--root DIR] [--workers N] [--no-decode]      exit 0: all good, 1: problems found
    vlprompt data split SPEC [--root DIR] [--out FILE] [--force]           your own data: folder:PATH, csv:FILE, ...
    vlprompt data fewshot NAME --shots K --seed S [--root DIR] [--out FILE] [--json]

``--root`` defaults to ``$VLPROMPT_DATA_ROOT``. Torch is never imported by these commands.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlprompt.errors import ConfigError
from vlprompt.common.io import json_text
from vlprompt.data import DATASETS
from vlprompt.data.check import check_dataset
from vlprompt.data.custom import parse_custom_spec
from vlprompt.data.fewshot import sample_fewshot, save_fewshot
from vlprompt.data.info import ReadContext, default_cache_dir
from vlprompt.data.load import load_dataset
from vlprompt.data.registry import lookup
from vlprompt.data.splitfile import LabelledSplits, write_split_file
from vlprompt.harness.cli.common import ROOT_ENV, add_root_option, console_logging, data_root


def add_parser(subparsers: Any) -> None:
    """Register ``vlprompt data`` and its subcommands."""
    parser = subparsers.add_parser("data", help="datasets: list, download, check, split, fewshot",
                                   description="List, download, check and prepare datasets (built-in or your own).")
    parser.set_defaults(func=_help_of(parser))
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    p_list = sub.add_parser("list", help="supported datasets, their folder names and expected counts")
    p_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_list.add_argument("--root", type=Path, default=None,
                        help=f"also show which datasets have their image folder under this data root "
                             f"(default: ${ROOT_ENV})")
    p_list.set_defaults(func=run_list)

    p_down = sub.add_parser(
        "download", help="fetch built-in datasets, verify them, arrange them as the readers expect, check them",
        description="Download built-in datasets from their sources (official first, then mirrors; shown with "
                    "--dry-run), verify each file's published checksum before extracting, extract safely, arrange "
                    "the files into the reader's layout and run `data check` on the result. Interrupted downloads "
                    "resume. Exit status 0: all present and checked, 1: a check found problems (or ImageNet is not "
                    "built yet), 2: something could not be downloaded (the message says where to put the file).")
    p_down.add_argument("datasets", nargs="+", metavar="NAME",
                        help="built-in datasets (e.g. dtd eurosat), or 'all' for every one that can be fetched; "
                             "'imagenet' prints the steps to follow with your ImageNet account")
    p_down.add_argument("--root", type=Path, default=None,
                        help=f"data root that receives the dataset folders (default: ${ROOT_ENV})")
    p_down.add_argument("--downloads", type=Path, default=None, metavar="DIR",
                        help="folder for downloaded archives and partial downloads; files you put there are used "
                             "(default: <root>/.downloads)")
    p_down.add_argument("--from-file", type=Path, action="append", default=[], metavar="PATH",
                        help="use this file instead of downloading it (matched by file name; repeatable)")
    p_down.add_argument("--sources", type=Path, default=None, metavar="FILE",
                        help="another sources table in the format of vlprompt/data/sources.toml (e.g. your own "
                             "mirror's URLs)")
    p_down.add_argument("--keep-archives", action="store_true", help="keep the downloaded archives afterwards")
    p_down.add_argument("--dry-run", action="store_true",
                        help="print the terms, files, sizes, checksums, URLs and their sources; download nothing")
    p_down.add_argument("--no-decode", action="store_true", help="final check: presence and counts only")
    p_down.add_argument("--workers", type=int, default=None, metavar="N",
                        help="decoding processes of the final check (default: CPUs, at most 8)")
    p_down.add_argument("--timeout", type=float, default=60.0,
                        help="seconds without data before a connection counts as failed (default: 60)")
    p_down.add_argument("--retries", type=int, default=3,
                        help="resumed attempts after a connection cut short (default: 3)")
    p_down.add_argument("-q", "--quiet", action="store_true", help="no progress messages or bars on stderr")
    p_down.set_defaults(func=run_download)

    p_check = sub.add_parser("check", help="presence, counts against the expected numbers, unreadable images")
    _dataset_args(p_check)
    p_check.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPUs, at most 8)")
    p_check.add_argument("--no-decode", action="store_true", help="skip decoding (only presence and counts)")
    p_check.set_defaults(func=run_check)

    p_split = sub.add_parser("split", help="write the split file of your own dataset")
    _dataset_args(p_split, what="your dataset: folder:PATH, csv:FILE, json:FILE or a path")
    p_split.add_argument("--out", type=Path, default=None, help="also write the split (CoOp format) to this file")
    p_split.add_argument("--force", action="store_true", help="re-create a split vlprompt created before")
    p_split.set_defaults(func=run_split)

    p_few = sub.add_parser("fewshot", help="sample K shots per class and write the portable few-shot file")
    _dataset_args(p_few)
    p_few.add_argument("--shots", type=int, required=True, help="images per class for train (val: min(K, 4))")
    p_few.add_argument("--seed", type=int, required=True, help="random seed (the papers use 1, 2, 3)")
    p_few.add_argument("--out", type=Path, default=None,
                       help="output file (default: fewshot_<dataset>_<K>shot_seed<S>.json here)")
    p_few.add_argument("--json", action="store_true", help="print the written file instead of a summary")
    p_few.set_defaults(func=run_fewshot)


def _help_of(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``vlprompt data`` without a subcommand: print its help, exit status 2."""

    def show_help(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return show_help


def _dataset_args(parser: argparse.ArgumentParser, what: str | None = None) -> None:
    parser.add_argument("dataset", metavar="NAME",
                        help=what or "built-in dataset (see `vlprompt data list`) or folder:PATH, csv:FILE, json:FILE")
    add_root_option(parser)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where created splits of read-only datasets go (default: $VLPROMPT_CACHE/splits or the "
                             "user cache folder)")


def run_list(args: argparse.Namespace) -> int:
    """Print the registry: key, name, folder, image folder, classes, expected counts (and presence under a root)."""
    root = data_root(args)
    found = {key: info.image_dir(root).is_dir() for key, info in DATASETS.items()} if root is not None else None
    if args.json:
        rows = [{"key": key, "name": info.title, "folder": info.folder, "image_folder": info.image_subdir,
                 "template": info.template, "split_file": info.split_file, **info.expected.as_dict(),
                 **({"found": found[key]} if found is not None else {})}
                for key, info in DATASETS.items()]
        print(json_text(rows, indent=1))
        return 0
    header = ("key", "name", "folder", "image folder", "classes", "train", "val", "test")
    if found is not None:
        header = (*header, "found")
    table = [header]
    for key, info in DATASETS.items():
        expected = info.expected.as_dict()
        counts = [str(expected[n]) if expected[n] else "-" for n in ("train", "val", "test")]
        row = (key, info.title, info.folder, info.image_subdir or ".", str(info.expected.classes), *counts)
        table.append((*row, "yes" if found[key] else "no") if found is not None else row)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if root is not None:
        print(f"\n'found': <root>/<folder>/<image folder> exists under {root}.")
    print("\nYour own data: folder:PATH (a folder per class, optionally under train/ val/ test/), csv:FILE or "
          "json:FILE (path,label[,split]).")
    return 0


def run_download(args: argparse.Namespace) -> int:
    """Download the named datasets; exit 0 when every one is present and passes its check, 1 otherwise."""
    # ~90 ms of imports (archives, HTTP, sources.toml) that the other data commands and --help do not need
    from vlprompt.data.download import DownloadOptions, describe_sources, download_datasets, resolve_names
    from vlprompt.data.sources import load_sources
    root = data_root(args)
    if root is None:
        raise ConfigError(f"give the data root with --root (or set ${ROOT_ENV}).")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}.")
    if args.retries < 0 or args.timeout <= 0:
        raise ConfigError("--retries must be >= 0 and --timeout > 0.")
    sources = load_sources(args.sources)
    if args.dry_run:
        keys = resolve_names(args.datasets, sources)
        for line in describe_sources(keys, sources, root.expanduser().absolute(), args.downloads):
            print(line)
        return 0
    options = DownloadOptions(downloads_dir=args.downloads, from_files=tuple(args.from_file),
                              keep_archives=args.keep_archives, decode=not args.no_decode, workers=args.workers,
                              progress=False if args.quiet else None, timeout=args.timeout, retries=args.retries)
    with console_logging(args.quiet):
        results = download_datasets(args.datasets, root, sources=sources, options=options,
                                    out=lambda line: print(line, flush=True))
    for result in results:
        if result.report is not None:
            print(f"\n{result.title} ({result.status}):")
            for line in result.report.lines():
                print(f"  {line}")
        for note in result.notes:
            print(f"  {note}")
    if any(name.strip().lower() == "all" for name in args.datasets):
        print(f"\nImageNet needs your own account: `vlprompt data download imagenet --root {root}` prints the steps.")
    return 0 if all(result.ok for result in results) else 1


def run_check(args: argparse.Namespace) -> int:
    """Check a dataset; exit status 1 when something is missing, unreadable or of the wrong size."""
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}.")
    report = check_dataset(args.dataset, data_root(args), decode=not args.no_decode, workers=args.workers,
                           cache_dir=args.cache_dir)
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


def run_split(args: argparse.Namespace) -> int:
    """Create (or re-create) the split of a custom dataset and say where it is."""
    root = data_root(args)
    if lookup(args.dataset) is not None and ":" not in args.dataset:
        raise ConfigError(f"{args.dataset!r} is a built-in dataset: it uses its standard split (shipped, yours, or "
                          "created on first load). `data split` writes the split of your own data.")
    spec = parse_custom_spec(args.dataset, root)
    if spec is None:
        raise ConfigError(f"{args.dataset!r} is not a folder, .csv or .json file; give folder:PATH, csv:FILE or "
                          "json:FILE.")
    cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    candidates = [spec.created_split_file,
                  ReadContext(root or Path("."), cache_dir).split_cache_folder(spec.base_dir) /
                  spec.created_split_file.name]
    if args.force:
        for candidate in candidates:
            candidate.unlink(missing_ok=True)
    splits = load_dataset(args.dataset, root, cache_dir=cache_dir)
    counts = splits.counts()
    print(f"{splits.name}: {counts.classes} classes, {counts.train} train / {counts.val} val / {counts.test} test")
    written = next((c for c in candidates if c.is_file()), None)
    exported = LabelledSplits(splits.train, splits.val, splits.test, splits.classnames, splits.split_source)
    if written is None:
        written = write_split_file(spec.created_split_file, exported, {"created_by": "vlprompt",
                                                                         "procedure": splits.split_source})
        print(f"the split is defined by {splits.split_source}; a copy in split-file form is in {written}")
    else:
        print(f"split file: {written}")
    if args.out is not None:
        print(f"written: {write_split_file(args.out, exported, {'created_by': 'vlprompt'})}")
    return 0


def run_fewshot(args: argparse.Namespace) -> int:
    """Sample a few-shot set, write it, print a summary (or the file with --json)."""
    splits = load_dataset(args.dataset, data_root(args), cache_dir=args.cache_dir)
    result = sample_fewshot(splits, args.shots, args.seed)
    out = args.out or Path(f"fewshot_{splits.name}_{args.shots}shot_seed{args.seed}.json")
    path = save_fewshot(result, out)
    if args.json:
        sys.stdout.write(path.read_text(encoding="utf-8"))
        return 0
    print(f"{splits.name}: {args.shots} shots, seed {args.seed}: {len(result.train)} train / {len(result.val)} val "
          f"images ({result.val_shots} per class, from {result.val_from}), {len(result.test)} test")
    for line in result.short_report():
        print(f"note: {line}")
    print(f"written: {path}")
    return 0
