"""The ``patterns`` strategy: ordered ``{group: patterns}``, first match wins.

A trainable parameter goes to the first group with a pattern that matches its name
(see :mod:`layerwise.policies.grouping_rules` for the regex and glob conventions). A parameter no
pattern matches is an error naming it, unless ``catch_all`` names a group to collect
such parameters (dropped when nothing is left over). A pattern group that ends up empty
is an error that says why: its patterns match nothing, only frozen parameters, only
tied aliases, or only parameters that earlier groups took.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from layerwise.policies.grouping_rules import ModelParams, Pattern, compile_patterns, list_names

__all__ = ["by_patterns", "parse_patterns"]


def parse_patterns(patterns: Any, syntax: str) -> list[tuple[str, tuple[Pattern, ...]]]:
    """Validate and compile ``{group: pattern(s)}`` or ``[(group, pattern(s)), ...]``.

    >>> [(name, [p.source for p in pats]) for name, pats in parse_patterns(
    ...     {"stem": "conv1", "head": ["fc", "classifier"]}, "glob")]
    [('stem', ['conv1']), ('head', ['fc', 'classifier'])]
    """
    if isinstance(patterns, Mapping):
        items = list(patterns.items())
    elif isinstance(patterns, Sequence) and not isinstance(patterns, str):
        items = list(patterns)
        if not all(isinstance(i, (tuple, list)) and len(i) == 2 for i in items):
            raise TypeError(
                f"patterns must be a mapping or (name, pattern) pairs, got {patterns!r}"
            )
    else:
        raise TypeError(f"patterns must be a mapping {{group name: pattern}}, got {patterns!r}")
    if not items:
        raise ValueError(f"patterns must name at least one group, got {patterns!r}")
    out, seen = [], set()
    for name, pats in items:
        if not isinstance(name, str) or not name:
            raise ValueError(f"patterns: a group name must be a non-empty str, got {name!r}")
        if name in seen:
            raise ValueError(f"patterns: duplicate group name {name!r}")
        seen.add(name)
        out.append((name, compile_patterns(pats, argument=f"patterns[{name!r}]", syntax=syntax)))
    return out


def by_patterns(
    params: ModelParams, rules: list[tuple[str, tuple[Pattern, ...]]], catch_all: str | None
) -> list[tuple[str, list[str]]]:
    """Assign each trainable parameter to the first group whose patterns match it."""
    if catch_all in {name for name, _ in rules}:
        raise ValueError(f"catch_all: duplicate group name {catch_all!r} (also a pattern group)")
    members: dict[str, list[str]] = {name: [] for name, _ in rules}
    unmatched = []
    for n in params.trainable:
        name = next((g for g, pats in rules if any(p.matches(n) for p in pats)), None)
        (members[name] if name is not None else unmatched).append(n)
    for name, pats in rules:
        if not members[name]:
            raise ValueError(f"patterns: group {name!r} is empty: {_why_empty(params, pats)}")
    if unmatched and catch_all is None:
        raise ValueError(
            f"patterns: no pattern matches {len(unmatched)} trainable parameters: "
            f"{list_names(unmatched)}; add a pattern or pass catch_all='rest'"
        )
    return list(members.items()) + ([(catch_all, unmatched)] if unmatched else [])


def _why_empty(params: ModelParams, pats: tuple[Pattern, ...]) -> str:
    shown = [p.source for p in pats]
    hits = [n for n in params.names if any(p.matches(n) for p in pats)]
    trainable_set = set(params.trainable)
    trainable = [n for n in hits if n in trainable_set]
    if trainable:
        return f"{shown!r} only match parameters of earlier groups ({list_names(trainable)})"
    if hits:
        return f"{shown!r} only match frozen parameters ({list_names(hits)})"
    aliases = [a for a in params.tied if any(p.matches(a) for p in pats)]
    if aliases:
        return f"{shown!r} only match tied aliases ({list_names(aliases)}), grouped by first name"
    return f"{shown!r} match no parameter"
