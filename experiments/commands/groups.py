"""``layerwise groups``: show how a model's parameters split into named groups.

The model is a bundled one (:mod:`layerwise.experiments.models`, default ``cnn``) or the user's,
given as ``package.module:factory``. The grouping is :func:`layerwise.policies.group_parameters`,
chosen by the grouping flags, which ``layerwise analyze`` shares
(:func:`add_grouping_arguments`, :func:`grouping_from_args`, :func:`build_groups`).
Output: a table (drawn with ``rich`` on a terminal, plain text otherwise), CSV of
:meth:`~layerwise.policies.ParamGroups.describe`, or the JSON
:meth:`~layerwise.policies.ParamGroups.manifest`.

``--groups-file PATTERNS.toml`` holds an ordered table ``group name = pattern`` (a string or a
list of them), either at the top level or under ``[groups]`` next to the optional top-level
keys ``syntax = "glob"`` (or ``"regex"``) and ``catch_all = "rest"``, which then replace
``--glob`` and ``--catch-all``. A parameter joins the first group whose pattern matches it::

    syntax = "glob"
    catch_all = "body"

    [groups]
    stem = "conv1"
    head = ["fc", "classifier"]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from layerwise.experiments.errors import UsageError
from layerwise.experiments.models import DEFAULT_MODEL, MODELS, resolve_model
from layerwise.experiments.tables import print_table

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "FORMATS",
    "add_grouping_arguments",
    "build_groups",
    "grouping_from_args",
    "read_groups_file",
    "register",
    "run",
]

FORMATS = ("table", "csv", "json")

EPILOG = f"""\
strategies: depth, module, role, norm, patterns, or one of them combined with norm
(e.g. depth+norm: each layer split into weight-decay and no-decay groups); --groups is
another spelling of --strategy.

examples:
  layerwise groups
  layerwise groups --model transformer --strategy depth+norm
  layerwise groups --model cnn --strategy depth --num-groups 3
  layerwise groups --model mypkg.nets:make_net --strategy role --head classifier
  layerwise groups --pattern stem=stem --pattern head=fc --catch-all body
  layerwise groups --groups-file patterns.toml --format json > groups.json

bundled models: {", ".join(MODELS)}. Patterns are regular expressions searched in the
parameter name (--glob: shell globs matching the name or a dotted prefix of it).
Exit codes: 0 done, 2 bad arguments or input, 1 the model factory failed.
"""


def add_grouping_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the grouping flags (read back by :func:`grouping_from_args`) to ``parser``."""
    g = parser.add_argument_group("grouping")
    g.add_argument(
        "--strategy",
        "--groups",
        dest="strategy",
        metavar="STRATEGY",
        help="grouping strategy (default: depth; patterns with --pattern or --groups-file)",
    )
    g.add_argument("--num-groups", metavar="N", help="depth: merge the layers into N groups")
    g.add_argument(
        "--head", nargs="+", action="extend", metavar="PATTERN", help="patterns naming the head"
    )
    g.add_argument(
        "--pattern",
        action="append",
        metavar="GROUP=PATTERN",
        help="patterns strategy: one group per flag, in order (repeat a group for more patterns)",
    )
    g.add_argument("--groups-file", metavar="PATTERNS.toml", help="the patterns in a TOML file")
    g.add_argument("--catch-all", metavar="GROUP", help="patterns: group for the unmatched")
    g.add_argument("--glob", action="store_true", help="patterns are shell globs")


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


def read_groups_file(path: str) -> dict[str, Any]:
    """``patterns``, and ``syntax``/``catch_all`` when set, from a TOML file (module
    docstring); :func:`layerwise.policies.group_parameters` checks the values."""
    if not isinstance(path, str):
        raise TypeError(f"--groups-file must be a path str, got {type(path).__name__}")
    where = f"--groups-file {path!r}"
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"{where}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{where} cannot be read ({exc.strerror})") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{where} is not valid TOML ({exc})") from None
    if not isinstance(data.get("groups"), dict):
        return {"patterns": data}
    extra = sorted(set(data) - {"groups", "syntax", "catch_all"})
    if extra:
        raise UsageError(
            f"{where}: unknown top-level keys {extra} (expected [groups], syntax, catch_all)"
        )
    return {
        "patterns": data["groups"],
        **{k: data[k] for k in ("syntax", "catch_all") if k in data},
    }


def grouping_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """What the grouping flags ask for: ``strategy`` and the keyword arguments of
    :func:`layerwise.policies.group_parameters`, plus ``file`` (absolute) for --groups-file."""
    how = {
        "num_groups": _num_groups(args.num_groups),
        "head": args.head,
        "patterns": _patterns(args.pattern),
        "catch_all": args.catch_all,
        "syntax": "glob" if args.glob else "regex",
    }
    if args.groups_file is not None:
        if how["patterns"] is not None:
            raise UsageError("give --pattern or --groups-file, not both")
        how.update(read_groups_file(args.groups_file), file=os.path.abspath(args.groups_file))
    how["strategy"] = args.strategy or ("depth" if how["patterns"] is None else "patterns")
    return how


def build_groups(model: Any, how: dict[str, Any]) -> Any:
    """:func:`layerwise.policies.group_parameters` of ``model`` as ``how`` (from
    :func:`grouping_from_args`) says; a bad grouping is one line naming the file, if any."""
    from layerwise.policies import group_parameters

    if not isinstance(how, dict) or "strategy" not in how:
        raise TypeError(f"how must be a dict from grouping_from_args, got {how!r}")
    options = {k: v for k, v in how.items() if k not in ("strategy", "file")}
    try:
        return group_parameters(model, how["strategy"], **options)
    except (ValueError, TypeError) as exc:
        where = f"--groups-file {how['file']!r}: " if "file" in how else ""
        raise UsageError(f"{where}{exc}") from exc


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
    add_grouping_arguments(parser)
    parser.add_argument("--format", default="table", help=f"one of {', '.join(FORMATS)}")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Build the model, group it and print the groups; returns the exit code."""
    if args.format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {args.format!r}")
    how = grouping_from_args(args)
    model = resolve_model(args.model)
    groups = build_groups(model, how)
    if args.format == "csv":
        sys.stdout.write(groups.describe().to_csv(index=False))
    elif args.format == "json":
        record = {"model": args.model, "model_class": type(model).__name__, **groups.manifest()}
        print(json.dumps(record, indent=2))
    else:
        columns = [
            (h, h in ("params", "size", "depth"))
            for h in ("group", "params", "size", "depth", "role", "decay")
        ]
        rows = [
            [
                g.name,
                str(len(g.param_names)),
                f"{g.size:,}",
                str(g.depth),
                g.role,
                "yes" if g.weight_decay else "no",
            ]
            for g in groups
        ]
        title = f"model {args.model} ({type(model).__name__}), strategy {groups.strategy}"
        print_table(title, columns, rows, groups.footer())
    return 0
