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


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` so that options may follow positional arguments (``predict RUN --top-k 2 IMAGE``), and so that
    an error shows the usage of the command it concerns, not the top-level one.

    argparse stops a subcommand's positionals at the first option and leaves what follows to the top-level parser,
    which then rejects it; the command's own parser re-parses its arguments intermixed instead."""
    tokens = list(sys.argv[1:] if argv is None else argv)
    args, extras = parser.parse_known_args(tokens)
    if not extras:
        return args
    command, start = parser, 0
    while True:  # the innermost (sub)command named on the line, and where its own arguments begin
        action = next((a for a in command._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, action.dest, None) if action is not None else None
        if action is None or name is None or name not in tokens[start:]:
            break
        start = tokens.index(name, start) + 1
        command = action.choices[name]
    if command is parser:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    try:
        reparsed = command.parse_intermixed_args(tokens[start:])
    except TypeError:  # a command group with sub-commands cannot be parsed intermixed
        command.error(f"unrecognized arguments: {' '.join(extras)}")
    for key, value in vars(args).items():  # the enclosing levels' choices (command, data_command, ...)
        if not hasattr(reparsed, key):
            setattr(reparsed, key, value)
    return reparsed


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_command_line(parser, argv)
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
