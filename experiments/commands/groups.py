"""``layerwise groups``: show how a model's parameters split into named groups.

The model is a bundled one (:mod:`layerwise.experiments.models`, default ``cnn``) or the user's,
given as ``package.module:factory``. The grouping is :func:`layerwise.policies.group_parameters`.
Output: a table (drawn with ``rich`` on a terminal, plain text otherwise), CSV of
:meth:`~layerwise.policies.ParamGroups.describe`, or the JSON
:meth:`~layerwise.policies.ParamGroups.manifest`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from layerwise.experiments.errors import UsageError
from layerwise.experiments.models import DEFAULT_MODEL, MODELS, resolve_model

__all__ = ["FORMATS", "register", "run"]

FORMATS = ("table", "csv", "json")

EPILOG = f"""\
strategies: depth, module, role, norm, patterns, or one of them combined with norm
(e.g. depth+norm: each layer split into weight-decay and no-decay groups).

examples:
  layerwise groups
  layerwise groups --model transformer --strategy depth+norm
  layerwise groups --model cnn --strategy depth --num-groups 3
  layerwise groups --model mypkg.nets:make_net --strategy role --head classifier
  layerwise groups --strategy patterns --pattern stem=stem --pattern head=fc --catch-all body
  layerwise groups --format json > groups.json

bundled models: {", ".join(MODELS)}. Patterns are regular expressions searched in the
parameter name (--glob: shell globs matching the name or a dotted prefix of it).
Exit codes: 0 done, 2 bad arguments or input, 1 the model factory failed.
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``groups`` subcommand to ``subparsers``."""
    parser = subparsers.add_parser(
        "groups",
        help="print the parameter groups of a model",
        description="Print how a model's trainable parameters split into named groups.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="NAME|MODULE:FACTORY",
        help=f"a bundled model ({', '.join(MODELS)}; default {DEFAULT_MODEL}) or a factory path",
    )
    parser.add_argument("--strategy", default="depth", help="grouping strategy (default depth)")
    parser.add_argument("--num-groups", metavar="N", help="depth: merge the layers into N groups")
    parser.add_argument(
        "--head", nargs="+", action="extend", metavar="PATTERN", help="patterns naming the head"
    )
    parser.add_argument(
        "--pattern",
        action="append",
        metavar="GROUP=PATTERN",
        help="patterns strategy: one group per flag, in order (repeat a group for more patterns)",
    )
    parser.add_argument("--catch-all", metavar="GROUP", help="patterns: group for the unmatched")
    parser.add_argument("--glob", action="store_true", help="patterns are shell globs")
    parser.add_argument("--format", default="table", help=f"one of {', '.join(FORMATS)}")
    parser.set_defaults(func=run)
    return parser


def _num_groups(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"--num-groups must be a positive integer, got {text!r}") from None
    if value < 1:
        raise UsageError(f"--num-groups must be a positive integer, got {text!r}")
    return value


def _patterns(items: list[str] | None) -> dict[str, list[str]] | None:
    if not items:
        return None
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, pattern = item.partition("=")
        if not sep or not name or not pattern:
            raise UsageError(f"--pattern must look like GROUP=PATTERN, got {item!r}")
        out.setdefault(name, []).append(pattern)
    return out


def run(args: argparse.Namespace) -> int:
    """Build the model, group it and print the groups; returns the exit code."""
    from layerwise.policies import group_parameters

    if args.format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {args.format!r}")
    num_groups = _num_groups(args.num_groups)
    patterns = _patterns(args.pattern)
    model = resolve_model(args.model)
    groups = group_parameters(
        model,
        args.strategy,
        num_groups=num_groups,
        head=args.head,
        patterns=patterns,
        catch_all=args.catch_all,
        syntax="glob" if args.glob else "regex",
    )
    title = f"model {args.model} ({type(model).__name__}), strategy {groups.strategy}"
    if args.format == "csv":
        sys.stdout.write(groups.describe().to_csv(index=False))
    elif args.format == "json":
        record = {"model": args.model, "model_class": type(model).__name__, **groups.manifest()}
        print(json.dumps(record, indent=2))
    elif sys.stdout.isatty():
        _print_rich(groups, title)
    else:
        print(title)
        print(groups)
    return 0


def _print_rich(groups: Any, title: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    caption = escape("\n".join(groups.footer()))
    table = Table(title=escape(title), caption=caption, caption_justify="left")
    for column, justify in [
        ("group", "left"),
        ("params", "right"),
        ("size", "right"),
        ("depth", "right"),
        ("role", "left"),
        ("decay", "left"),
    ]:
        table.add_column(column, justify=justify)
    for g in groups:
        decay = "yes" if g.weight_decay else "[dim]no[/dim]"
        role = "[bold]head[/bold]" if g.role == "head" else g.role
        table.add_row(
            escape(g.name), str(len(g.param_names)), f"{g.size:,}", str(g.depth), role, decay
        )
    Console().print(table)
