"""``layerwise ablate CONFIG --out DIR``: run (or resume) an ablation, then write its report.

CONFIG is a TOML file (see :mod:`layerwise.experiments.config`) or the name of a bundled config
(``quickstart``, ``full``, ``tiny``). Runs are tasks x policies x settings x seeds, each
policy's base rate tuned first on the same grid; ``--workers`` runs them in parallel
processes. Interrupted? Run the same command again: finished runs are skipped. A folder
holding another config's results is refused unless ``--force`` (which moves them aside to
``DIR/superseded/``; nothing is deleted).

``--backend ray`` runs every run as a Ray task (a local Ray of ``--workers`` CPUs, or the
cluster at ``--address``, whose nodes must see DIR at the same path); the results are
those of the default ``--backend local``. SIGTERM or SIGINT (Ctrl-C) at any phase stops
every worker and exits with 128 + the signal number after one line; run the same command
again to resume.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from layerwise.experiments.errors import UsageError

__all__ = ["register", "resolve_config_path", "run"]

EPILOG = """\
examples:
  layerwise ablate quickstart --out runs/quickstart --workers 2
  layerwise ablate experiments/configs/full.toml --out runs/full --workers 8
  layerwise report runs/quickstart

  layerwise ablate full --out /shared/runs/full --backend ray --address head:6379

Exit codes: 0 every run finished, 1 some runs failed (see DIR/errors/) or a backend is
not installed, 2 bad config or arguments, 130 / 143 interrupted by SIGINT / SIGTERM
(resumable).
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def resolve_config_path(text: str) -> Path:
    """A config file path, or the bundled ``experiments/configs/<text>.toml``."""
    path = Path(text)
    if path.is_file():
        return path
    if "/" not in text and not text.endswith(".toml"):
        bundled = resources.files("layerwise.experiments") / "configs" / f"{text}.toml"
        if bundled.is_file():
            return Path(str(bundled))
    names = sorted(
        p.name[:-5]
        for p in (resources.files("layerwise.experiments") / "configs").iterdir()
        if p.name.endswith(".toml")
    )
    raise UsageError(f"config {text!r} is neither a file nor a bundled config ({', '.join(names)})")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ablate",
        help="run an ablation of learning-rate policies over tasks and seeds",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="TOML config file, or a bundled config name (quickstart, full)")
    p.add_argument("--out", required=True, type=Path, help="results folder (created if needed)")
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="parallel worker processes (default 1: run in this process)",
    )
    p.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="where runs execute: local worker processes (default) or Ray tasks "
        "(needs the 'ray' extra)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="with --backend ray: the cluster to join (e.g. head:6379, ray://head:10001, auto); "
        "default: start a local Ray of --workers CPUs",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="use a folder holding another config's results (they are moved aside)",
    )
    p.add_argument("--no-report", action="store_true", help="skip writing report.md")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache folder for generated data and pre-trained weights (default DIR/.cache)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerwise.experiments.signals import Interrupted, stop_on_signals

    try:
        with stop_on_signals():
            return _run(args)
    except Interrupted as exc:
        print(
            f"layerwise ablate: interrupted by {exc.signal_name}; every worker stopped, "
            f"finished runs kept: run the same command to resume",
            file=sys.stderr,
        )
        return exc.exit_code


def _run(args: argparse.Namespace) -> int:
    from layerwise.experiments.backends import check_backend
    from layerwise.experiments.config import load_config
    from layerwise.experiments.reporting import text_summary
    from layerwise.experiments.runner import ablate

    if args.address is not None and args.backend != "ray":
        raise UsageError(f"--address {args.address!r} needs --backend ray")
    check_backend(args.backend, args.address)  # a missing extra: one line, before any work
    path = resolve_config_path(args.config)
    config = load_config(path)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {str(args.out)!r} exists and is not a folder")
    result = ablate(
        config,
        args.out,
        workers=args.workers,
        force=args.force,
        progress=not args.no_progress,
        report=not args.no_report,
        config_text=path.read_text(encoding="utf-8"),
        cache_dir=args.cache,
        backend=args.backend,
        address=args.address,
    )
    if result.superseded is not None:
        print(f"moved the previous results to {result.superseded}", file=sys.stderr)
    print(
        f"{result.total} runs: {result.ran} ran, {result.skipped} already done, "
        f"{len(result.failed)} failed"
    )
    for run_id, message in result.failed:
        print(f"  failed {run_id}: {message}", file=sys.stderr)
    if result.report is not None:
        print(text_summary(args.out, allow_incomplete=bool(result.failed)))
        print(f"report: {result.report}")
    return 1 if result.failed else 0
