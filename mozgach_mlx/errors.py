"""Exception types for errors a user can cause.

Every error raised for bad input (a path, a format, a config field, a shape, a memory
budget) is one of these, carries one sentence naming the file/field and the fix, and
never loses data.
"""

from __future__ import annotations


class MozgachError(Exception):
    """Base class: catching it catches every user-facing error of the library."""


class ConfigError(MozgachError, ValueError):
    """A configuration value (config.json field, dataclass field, CLI flag) is invalid."""


class CheckpointError(MozgachError):
    """A model checkpoint is missing, unreadable, truncated or of the wrong shape."""


class TokenizerError(MozgachError):
    """A tokenizer cannot be found or loaded."""


class DataError(MozgachError, ValueError):
    """A dataset file is missing, empty or malformed."""


class AdapterError(MozgachError):
    """An adapter directory is missing, malformed or made for a different base."""


class KernelError(MozgachError):
    """An attention kernel was forced but cannot run on this backend."""


class TrainingError(MozgachError):
    """Training cannot continue (non-finite loss, corrupt resume state)."""
