"""User-facing error classes; each maps to one exit code and prints as one line."""

from __future__ import annotations


class EoraError(Exception):
    """Base of every error the CLI reports as a one-line message."""

    exit_code = 1


class UsageError(EoraError):
    """Flags that contradict each other or are out of range."""

    exit_code = 2


class MissingInput(EoraError):
    """A model, file or folder that does not exist where the user pointed."""

    exit_code = 3


class BadInput(EoraError):
    """Input that exists but cannot be used (corrupt, NaN, wrong shape, too short)."""

    exit_code = 4


class MissingDependency(EoraError):
    """A tool or library this step needs is absent (TensorRT, a GPU, nvcc)."""

    exit_code = 5


class Interrupted(EoraError):
    """Ctrl-C or SIGTERM; outputs were left as they were before the run."""

    exit_code = 130


INTERNAL_ERROR_EXIT_CODE = 70
