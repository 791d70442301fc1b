"""Where vlprompt keeps files between runs: one cache root, one sub-folder per kind of file.

``$VLPROMPT_CACHE`` moves the root; otherwise it is the platform's user cache folder (platformdirs), e.g.
``~/.cache/vlprompt`` on Linux. Sub-folders: ``clip/`` (downloaded checkpoints), ``features/`` (the image-feature
cache), ``splits/`` (split files created for read-only datasets).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "VLPROMPT_CACHE"


def cache_root() -> Path:
    """``$VLPROMPT_CACHE`` if set, else the user cache folder for vlprompt."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    import platformdirs  # ~25 ms, kept off `vlprompt --help` (data.info imports this module)

    return Path(platformdirs.user_cache_dir("vlprompt", appauthor=False))


def cache_dir(kind: str) -> Path:
    """The cache sub-folder for one kind of file ("clip", "features", "splits")."""
    return cache_root() / kind
