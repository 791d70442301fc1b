"""Which split file a dataset uses, in order of precedence, and creating one where none exists.

1. the user's own standard split file in the dataset folder (``<dataset>/split_zhou_<Name>.json``): it takes
   precedence over the shipped copy, so a user can always pin their own split;
2. the standard split file shipped with vlprompt (seven datasets);
3. a split vlprompt created earlier: ``<dataset>/split_vlprompt_<Name>.json``, or the same name in the cache folder
   when the dataset folder is read-only;
4. otherwise the split is created from the images with the reference procedure (deterministic) and written to (3).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from vlprompt.data.creating import CREATE_SEED
from vlprompt.data.info import ReadContext
from vlprompt.data.splitfile import (
    LabelledSplits,
    parse_split,
    read_shipped_json,
    read_split_json,
    shipped_split_names,
    write_split_file,
)
from vlprompt.errors import DatasetError

log = logging.getLogger(__name__)


def resolve_split(
    *,
    dataset_dir: Path,
    standard_file: str | None,
    created_file: str,
    create: Callable[[], LabelledSplits] | None,
    context: ReadContext,
    what: str,
) -> LabelledSplits:
    """The dataset's split following the precedence above; ``what`` names the dataset in messages.

    ``create`` builds the split from the raw images (None: the dataset cannot be split automatically).
    """
    if standard_file is not None:
        own = dataset_dir / standard_file
        if own.is_file():
            shipped_note = " (it takes precedence over the copy shipped with vlprompt)" \
                if standard_file in shipped_split_names() else ""
            log.info("%s: using your split file %s%s", what, own, shipped_note)
            return parse_split(read_split_json(own), f"split file {own}")
        if standard_file in shipped_split_names():
            log.info("%s: using the split file %s shipped with vlprompt", what, standard_file)
            return parse_split(read_shipped_json(standard_file), f"shipped split file {standard_file}")
    for candidate in (dataset_dir / created_file, context.split_cache_folder(dataset_dir) / created_file):
        if candidate.is_file():
            log.info("%s: using the split file %s created earlier by vlprompt", what, candidate)
            return parse_split(read_split_json(candidate), f"created split file {candidate}")
    if create is None:
        wanted = standard_file or created_file
        raise DatasetError(
            f"no split file for {what}: put {wanted} into {dataset_dir} (vlprompt cannot create this dataset's split "
            "from its images)."
        )
    created = create()
    written = write_created_split(created, dataset_dir / created_file, context.split_cache_folder(dataset_dir))
    log.warning("%s: no split file found; created one from the images with the reference procedure (seed %d) and "
                "wrote it to %s, where later runs will find it", what, CREATE_SEED, written)
    return LabelledSplits(created.train, created.val, created.test, created.raw_classnames,
                          f"created split file {written}")


def write_created_split(splits: LabelledSplits, target: Path, fallback_folder: Path) -> Path:
    """Write a created split to ``target``; if its folder is read-only, to ``fallback_folder`` (same file name)."""
    meta = {"created_by": "vlprompt", "procedure": splits.source, "seed": CREATE_SEED}
    try:
        return write_split_file(target, splits, meta)
    except OSError as exc:
        log.info("cannot write %s (%s); writing the split to the cache folder instead", target, exc)
    fallback = fallback_folder / target.name
    try:
        return write_split_file(fallback, splits, meta)
    except OSError as exc:
        raise DatasetError(
            f"cannot write the created split file to {target} nor to {fallback} ({exc}); make one of them writable or "
            "set VLPROMPT_CACHE to a writable folder."
        ) from None
