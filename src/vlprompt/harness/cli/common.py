"""Options and helpers shared by the run commands (train, eval, zeroshot, linear-probe, predict, interpret).

Nothing heavy is imported here: torch loads only when a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlprompt.common.io import read_text
from vlprompt.common.progress import BESIDE_BAR
from vlprompt.errors import ConfigError

ROOT_ENV = "VLPROMPT_DATA_ROOT"


def add_root_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, run_default: bool = False) -> None:
    """``--root DIR``: the data root (default ``$VLPROMPT_DATA_ROOT``; for a trained run, its recorded root)."""
    default = f"${ROOT_ENV}, else the run's recorded root" if run_default else f"${ROOT_ENV}"
    parser.add_argument("--root", type=Path, default=None,
                        help=f"data root holding the dataset folders (default: {default})")


def data_root(args: argparse.Namespace) -> Path | None:
    """``--root``, else ``$VLPROMPT_DATA_ROOT``, else None."""
    if args.root is not None:
        return Path(args.root)
    env = os.environ.get(ROOT_ENV)
    return Path(env) if env else None


def add_cache_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--cache-dir DIR`` / ``--no-cache``: where image features are cached."""
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="feature cache folder (default: $VLPROMPT_CACHE/features, else the user cache folder)")
    parser.add_argument("--no-cache", action="store_true",
                        help="do not read or write the feature cache (features are computed every time)")
    parser.add_argument("--cache-read-only", action="store_true",
                        help="read the feature cache without writing to it (missing features are computed, not "
                             "stored): for a cache on a shared network file system that one job filled, see "
                             "docs/cluster.md")


def feature_cache_arg(args: argparse.Namespace) -> Any:
    """What ``run_experiment(feature_cache=...)`` takes for the cache options: False, a folder, a read-only
    :class:`~vlprompt.features.cache.FeatureCache`, or None (the default cache)."""
    if args.no_cache:
        if args.cache_dir is not None or args.cache_read_only:
            raise ConfigError("--no-cache excludes --cache-dir and --cache-read-only")
        return False
    if args.cache_read_only:
        from vlprompt.features.cache import FeatureCache

        return FeatureCache(args.cache_dir, read_only=True)
    return args.cache_dir


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """``--json`` and ``--quiet``."""
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print no progress messages or bars on stderr (warnings and errors only)")


@contextlib.contextmanager
def console_logging(quiet: bool) -> Iterator[None]:
    """Show vlprompt's INFO messages on stderr during a command (warnings only with ``quiet``).

    Progress lines written while a terminal bar shows the same progress are left out here (they still reach
    ``log.txt``); off a terminal, the lines are the progress display."""
    logger = logging.getLogger("vlprompt")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    handler.addFilter(lambda record: not getattr(record, BESIDE_BAR, False))
    old_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def read_templates(path: Path) -> tuple[str, ...]:
    """Prompt templates from a text file, one per line (blank lines and '#' comments ignored)."""
    if not path.is_file():
        raise ConfigError(f"--ensemble {str(path)!r} is neither a template set (coop7, clip80) nor a file")
    lines = read_text(path, "the template file", ConfigError).splitlines()
    templates = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not templates:
        raise ConfigError(f"the template file {path} holds no templates (one per line, with '{{}}' for the class)")
    return templates


def percent(value: float) -> str:
    """``46.67%``."""
    return f"{value:.2f}%"
