"""Errors that carry their cause, the fix, and the process exit code.

Every layer raises these; only the CLI turns them into a message and an exit code.
"""
from __future__ import annotations

# Exit codes are part of the CLI contract (documented in README.md).
EXIT_OK = 0
EXIT_VALIDATION_FAILED = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_EXPORT_FAILED = 4
EXIT_BACKEND_UNAVAILABLE = 5
EXIT_INTEGRITY = 6
EXIT_LOCKED = 7
EXIT_INTERNAL = 8  # an unexpected exception (a bug): never confused with a verdict


class DiffprismError(Exception):
    """Base error: `str(err)` is one line naming the cause; `fix` says what to do."""

    exit_code = EXIT_EXPORT_FAILED

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message} ({self.fix})" if self.fix else self.message


class UsageError(DiffprismError):
    exit_code = EXIT_USAGE


class SourceError(DiffprismError):
    """The model source (folder, hub id, preset) cannot be used."""

    exit_code = EXIT_BAD_INPUT


class ShapeError(DiffprismError):
    """A shape request or a feed falls outside a component's spec."""

    exit_code = EXIT_USAGE


class ExportError(DiffprismError):
    exit_code = EXIT_EXPORT_FAILED


class BackendUnavailable(DiffprismError):
    """A target or runtime backend cannot run on this machine."""

    exit_code = EXIT_BACKEND_UNAVAILABLE


class IntegrityError(DiffprismError):
    """Files do not match their manifest."""

    exit_code = EXIT_INTEGRITY


class OutputError(DiffprismError):
    """The output folder cannot be used (holds something else, or is locked)."""

    exit_code = EXIT_BAD_INPUT


class LockedError(DiffprismError):
    exit_code = EXIT_LOCKED
