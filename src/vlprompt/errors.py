"""Error types shared by the whole package.

Every error a user can cause (bad path, bad file, bad option, wrong checkpoint) raises a subclass of
:class:`VlpromptError` with a message that says what is wrong and how to fix it. The CLI prints these without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class VlpromptError(Exception):
    """Base class of user-facing errors."""


class ConfigError(VlpromptError, ValueError):
    """An option or configuration value is invalid."""


class CheckpointError(VlpromptError):
    """A model checkpoint is missing, corrupt, truncated, of an unknown format, or fails its checksum."""


class DatasetError(VlpromptError):
    """A dataset folder, split file or image does not match what is expected."""


class RunError(VlpromptError):
    """A run folder is in use, finished, or holds a different configuration."""


class OutputError(VlpromptError, OSError):
    """A file could not be written (read-only folder, no permission, disk full); nothing written before is lost."""


class NonFiniteError(VlpromptError):
    """A computation gave NaN or infinite values (a diverged training, a damaged learned prompt)."""
