"""`vlprompt cache`: inspect or empty the on-disk feature cache."""

from __future__ import annotations

import argparse
import sys

from vlprompt.errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="inspect or clear the on-disk image-feature cache",
        description="The feature cache holds frozen image-tower features keyed by backbone, image content, transform "
                    "and view, shared by runs, methods and seeds. Location: $VLPROMPT_CACHE/features, else the user "
                    "cache folder.",
    )
    actions = parser.add_subparsers(dest="cache_action", metavar="ACTION", required=True)
    stats = actions.add_parser("stats", help="print the cache location, number of stored features and size")
    stats.add_argument("--dir", default=None, help="cache folder (default: the standard location)")
    stats.set_defaults(func=_stats)
    clear = actions.add_parser("clear", help="delete every stored feature (they are recomputed when needed)")
    clear.add_argument("--dir", default=None, help="cache folder (default: the standard location)")
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    clear.set_defaults(func=_clear)


def _stats(args: argparse.Namespace) -> int:
    from vlprompt.features.cache import FeatureCache

    with FeatureCache(args.dir) as cache:
        info = cache.stats()
    print(f"cache:          {info.path}")
    print(f"features:       {info.rows}")
    print(f"feature bytes:  {info.payload_bytes}")
    print(f"file size:      {info.file_bytes}")
    print(f"hashed images:  {info.hashed_files}")
    return 0


def _clear(args: argparse.Namespace) -> int:
    from vlprompt.features.cache import FeatureCache

    if not args.yes:
        if not sys.stdin.isatty():
            raise ConfigError("refusing to clear the feature cache without confirmation: pass --yes")
        answer = input("delete every cached feature? [y/N] ")
        if answer.strip().lower() not in {"y", "yes"}:
            print("nothing deleted")
            return 1
    with FeatureCache(args.dir) as cache:
        deleted = cache.clear()
        path = cache.path
    print(f"deleted {deleted} cached features from {path}")
    return 0
