"""Errors the command line turns into one line on stderr and an exit code."""

from __future__ import annotations

__all__ = ["CLIError", "IncompleteResultsError", "UsageError", "first_line"]


class CLIError(Exception):
    """A failure the user can act on; printed as one line, exit code 1."""

    exit_code = 1


class UsageError(CLIError):
    """Bad arguments or bad input; printed as one line, exit code 2."""

    exit_code = 2


class IncompleteResultsError(CLIError, ValueError):
    """A results folder misses planned runs or holds unreadable files.

    ``problems`` has one line per incomplete run or bad file, each naming it (a path
    relative to the results folder); the message's first line summarises them, and the
    command line prints the list below it (:attr:`details`). A ``ValueError`` for library
    callers, a :class:`CLIError` (exit code 1) for the command line.
    """

    def __init__(self, summary: str, problems: list[str]) -> None:
        super().__init__(summary)
        self.problems = list(problems)

    @property
    def details(self) -> list[str]:
        """The lines the command line prints under its one-line error."""
        return self.problems


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"`` of ``exc``, for one-line error reports.

    >>> first_line(RuntimeError("boom\\nmore detail"))
    'RuntimeError: boom'
    """
    if not isinstance(exc, BaseException):
        raise TypeError(f"exc must be an exception, got {type(exc).__name__}")
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
