"""Errors the command line turns into one line on stderr and an exit code."""

from __future__ import annotations

__all__ = ["CLIError", "UsageError", "first_line"]


class CLIError(Exception):
    """A failure the user can act on; printed as one line, exit code 1."""

    exit_code = 1


class UsageError(CLIError):
    """Bad arguments or bad input; printed as one line, exit code 2."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"`` of ``exc``, for one-line error reports.

    >>> first_line(RuntimeError("boom\\nmore detail"))
    'RuntimeError: boom'
    """
    if not isinstance(exc, BaseException):
        raise TypeError(f"exc must be an exception, got {type(exc).__name__}")
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
