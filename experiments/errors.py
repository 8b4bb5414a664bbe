"""Errors the command line turns into one line on stderr and an exit code."""

from __future__ import annotations

__all__ = ["CLIError", "UsageError"]


class CLIError(Exception):
    """A failure the user can act on; printed as one line, exit code 1."""

    exit_code = 1


class UsageError(CLIError):
    """Bad arguments or bad input; printed as one line, exit code 2."""

    exit_code = 2
