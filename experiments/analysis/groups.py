"""Parameter groups for ``layerwise analyze``: a strategy name, or patterns from a TOML file.

``--groups-file PATTERNS.toml`` holds an ordered table ``group name = pattern`` (either at the
top level, or under a ``[groups]`` table next to the optional keys ``syntax = "glob"`` or
``"regex"`` (the default: searched anywhere in the name) and ``catch_all = "rest"`` (the group
of the parameters no pattern matches); a pattern is a string or a list of strings. Order
matters: a parameter joins the first group whose pattern matches it (see
:func:`layerwise.policies.group_parameters`, strategy ``"patterns"``)::

    # patterns.toml
    syntax = "glob"
    catch_all = "body"

    [groups]
    stem = "conv1"
    head = ["fc", "classifier"]
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from layerwise.experiments.errors import UsageError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["STRATEGIES", "build_groups", "read_patterns"]

#: Top-level keys a patterns file may set next to its ``[groups]`` table.
OPTIONS = ("syntax", "catch_all")

#: What ``--groups`` accepts.
STRATEGIES = ("depth", "module", "role", "norm")


def read_patterns(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The options for :func:`layerwise.policies.group_parameters` with strategy ``"patterns"``
    read from
    a TOML file (see the module docstring): ``patterns``, the ordered ``{group name: pattern}``
    table, and ``syntax``/``catch_all`` when the file sets them.

    A pattern is a string or a list of strings; anything else, an empty table, a missing or
    unparsable file is a :class:`~layerwise.experiments.errors.UsageError` naming the file.
    """
    where = f"--groups-file {str(path)!r}"
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{where} is a folder, not a TOML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{where} cannot be read ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{where} is not valid TOML ({exc})") from exc
    nested = isinstance(data.get("groups"), Mapping)
    table = data["groups"] if nested else data
    if nested:
        extra = sorted(set(data) - {"groups", *OPTIONS})
        if extra:
            raise UsageError(
                f"{where}: unknown top-level keys {extra} (expected [groups], {', '.join(OPTIONS)})"
            )
    if not table:
        raise UsageError(f"{where} holds no 'group = pattern' entries")
    patterns: dict[str, Any] = {}
    for name, pattern in table.items():
        ok = (isinstance(pattern, str) and pattern) or (
            isinstance(pattern, list) and pattern and all(isinstance(p, str) for p in pattern)
        )
        if not ok:
            raise UsageError(
                f"{where}: group {name!r} must map to a pattern string or a list of them, "
                f"got {pattern!r}"
            )
        patterns[name] = pattern
    options: dict[str, Any] = {"patterns": patterns}
    if nested:
        options.update({k: data[k] for k in OPTIONS if k in data})
    if options.get("syntax", "regex") not in ("glob", "regex"):
        raise UsageError(f"{where}: syntax must be 'glob' or 'regex', got {options['syntax']!r}")
    catch_all = options.get("catch_all")
    if catch_all is not None and not (isinstance(catch_all, str) and catch_all):
        raise UsageError(f"{where}: catch_all must be a group name, got {catch_all!r}")
    return options


def build_groups(
    model: nn.Module, *, strategy: str | None, patterns_file: str | None
) -> tuple[Any, dict[str, Any]]:
    """The :class:`layerwise.policies.ParamGroups` of ``model`` and a manifest entry saying how they
    were made. ``strategy`` and ``patterns_file`` are exclusive; neither means ``"depth"``."""
    from layerwise.policies import group_parameters

    if strategy is not None and patterns_file is not None:
        raise UsageError("give --groups or --groups-file, not both")
    if patterns_file is not None:
        options = read_patterns(patterns_file)
        try:
            groups = group_parameters(model, "patterns", **options)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--groups-file {patterns_file!r}: {exc}") from exc
        how = {"strategy": "patterns", "file": os.path.abspath(patterns_file), **options}
    else:
        strategy = strategy or "depth"
        if strategy not in STRATEGIES:
            raise UsageError(f"--groups must be one of {list(STRATEGIES)}, got {strategy!r}")
        try:
            groups = group_parameters(model, strategy)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--groups {strategy!r}: {exc}") from exc
        how = {"strategy": strategy}
    if len(groups) == 0:
        raise UsageError("the grouping left no parameter groups (are all parameters frozen?)")
    return groups, how
