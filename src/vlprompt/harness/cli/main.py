"""The `vlprompt` command line: one subcommand group per module, listed in one explicit dict.

Each command module exposes ``add_parser(subparsers)`` which registers its subcommand(s) and sets ``func`` (a callable
taking the parsed ``argparse.Namespace`` and returning an exit code). Command modules keep heavy imports (torch,
transformers) inside their functions, so ``vlprompt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from vlprompt import __version__
from vlprompt.errors import VlpromptError

# subcommand module registry, in the order shown by --help
COMMAND_MODULES: tuple[str, ...] = (
    "vlprompt.harness.cli.data_cmd",
    "vlprompt.harness.cli.report_cmd",
    "vlprompt.harness.cli.cache_cmd",
    "vlprompt.harness.cli.bench_cmd",
    "vlprompt.harness.cli.run_cmds",
    "vlprompt.harness.cli.predict_cmds",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlprompt",
        description="Prompt learning (CoOp, CoCoOp) and baselines for CLIP-style vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"vlprompt {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # the reader of our output went away (`vlprompt predict ... | head`): stop quietly, as other CLI tools do
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps Python's exit flush from raising again
        except OSError:
            pass
        return 141
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except VlpromptError as exc:
        print(f"vlprompt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
