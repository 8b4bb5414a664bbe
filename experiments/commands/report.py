"""``layerwise report DIR``: (re)write ``DIR/report.md`` and its figures from the finished
runs of an ablation (``layerwise ablate`` runs it at the end).

Every run the ablation's config plans must be there and readable: otherwise the command
writes nothing, prints one line and then one line per missing run or bad file (naming
it), and exits with 1. ``--allow-incomplete`` writes the report from the readable runs,
lists the others in it (the terminal summary counts them), and exits with 0."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from layerwise.experiments.errors import UsageError

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "report",
        help="write report.md and figures for an ablation results folder",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("dir", type=Path, help="the --out folder of `layerwise ablate`")
    p.add_argument("--no-figures", action="store_true", help="tables only, no PNG figures")
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="report the readable runs even if planned runs are missing or files are damaged "
        "(the report lists them)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerwise.experiments.reporting import text_summary, write_report

    if not args.dir.is_dir():
        raise UsageError(f"{str(args.dir)!r} is not a folder")
    if not (args.dir / "runs").is_dir():
        raise UsageError(f"{str(args.dir)!r} holds no ablation results (no runs/ folder)")
    allow = args.allow_incomplete
    path = write_report(args.dir, figures=not args.no_figures, allow_incomplete=allow)
    print(text_summary(args.dir, allow_incomplete=allow))
    print(f"report: {path}")
    return 0
