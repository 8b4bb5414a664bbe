"""The ``layerwise`` command line.

Every subcommand lives in :mod:`layerwise.experiments.commands` as a module with
``register(subparsers)`` (adds its parser and sets ``func``) and a ``run(args) -> int``.
Errors a user can act on (``ValueError``, ``TypeError``, :class:`CLIError`, a missing
optional dependency) become one line on stderr and a non-zero exit code (2 for usage
errors), followed by one indented line per item when the error lists several (each
missing run of ``layerwise report``); ``--debug`` shows the traceback.

Like ``python -m``, the command puts the current folder first on ``sys.path``, so
``--model mymodule:factory`` finds the user's ``mymodule.py`` without ``PYTHONPATH``. Our
own code lives under ``layerwise.*``, so a user's ``engine.py`` or ``experiments/`` there
shadows nothing of ours.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from layerwise.experiments import __version__
from layerwise.experiments.errors import CLIError
from layerwise.experiments.extras import missing_extra

__all__ = ["build_parser", "main"]

#: Subcommand modules under experiments.commands, in the order ``--help`` lists them.
COMMANDS = ("groups", "analyze", "ablate", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerwise",
        description="Layer-wise learning rates for PyTorch: group, measure, adapt, ablate.",
    )
    parser.add_argument("--version", action="version", version=f"layerwise-lr {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"layerwise.experiments.commands.{name}").register(sub)
    return parser


def _put_cwd_on_path() -> None:
    """Put the current folder first on ``sys.path``, as ``python -m`` does."""
    cwd = os.getcwd()
    if not any(os.path.abspath(p or ".") == cwd for p in sys.path):
        sys.path.insert(0, cwd)


def main(argv: Sequence[str] | None = None) -> int:
    _put_cwd_on_path()
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("layerwise: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, FileNotFoundError, KeyError) as exc:
        if args.debug:
            raise
        code = getattr(exc, "exit_code", 2 if not isinstance(exc, CLIError) else 1)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"layerwise {args.command}: error: {message}", file=sys.stderr)
        for line in getattr(exc, "details", ()):  # e.g. each missing run of a report
            print(f"  {line}", file=sys.stderr)
        return code
    except ImportError as exc:
        if args.debug or missing_extra(exc) is None:
            return _unexpected(args, exc)
        print(f"layerwise {args.command}: error: {missing_extra(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # an unexpected failure still prints one line
        return _unexpected(args, exc)


def _unexpected(args: argparse.Namespace, exc: Exception) -> int:
    if args.debug:
        raise exc
    print(
        f"layerwise {args.command}: error: {type(exc).__name__}: {exc} (rerun with --debug "
        "for the traceback)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
