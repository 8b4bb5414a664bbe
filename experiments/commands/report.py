"""``layerwise report DIR``: (re)write ``DIR/report.md`` and its figures from the finished
runs of an ablation (``layerwise ablate`` runs it at the end)."""

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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerwise.experiments.reporting import text_summary, write_report

    if not args.dir.is_dir():
        raise UsageError(f"{str(args.dir)!r} is not a folder")
    if not (args.dir / "runs").is_dir():
        raise UsageError(f"{str(args.dir)!r} holds no ablation results (no runs/ folder)")
    path = write_report(args.dir, figures=not args.no_figures)
    print(text_summary(args.dir))
    print(f"report: {path}")
    return 0
