"""``group_parameters``: split a model's trainable parameters into named groups.

Strategies (``strategy=``), each over the trainable parameters in registration order:

* ``"depth"``: one group per layer, input to output: ``stem``, ``layer.0``, ``layer.1``, ...,
  ``head`` (see :mod:`layerwise.policies.grouping_depth`); ``num_groups=N`` merges contiguous layers
  into N groups as even in layer count as possible (``layer.0-3``, ``layer.4-head``);
* ``"module"``: one group per module owning parameters, named by its path (``(root)`` for
  parameters of the model itself);
* ``"role"``: ``backbone`` and ``head``; the head is given by ``head=`` patterns, or by
  default is the last module owning parameters when it is Linear-like;
* ``"norm"``: ``decay`` and ``no_decay`` (normalisation weights and biases, plus any
  ``no_decay=`` patterns); combined with another strategy (``"depth+norm"`` or
  ``("depth", "norm")``) it splits each group ``g`` into ``g`` and ``g.no_decay``,
  dropping halves that would be empty;
* ``"patterns"``: ``patterns={group: pattern or [patterns]}`` in order, first match wins;
  a parameter no pattern matches is an error unless ``catch_all`` names a group for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from layerwise.policies.grouping import ParamGroup, ParamGroups
from layerwise.policies.grouping_depth import block_finder, depth_units, merge_units
from layerwise.policies.grouping_patterns import by_patterns, parse_patterns
from layerwise.policies.grouping_rules import (
    SYNTAXES,
    ModelParams,
    Pattern,
    compile_patterns,
    find_default_head,
    is_bias,
    is_norm_module,
    list_names,
    read_parameters,
)

__all__ = ["BASE_STRATEGIES", "STRATEGIES", "group_parameters", "parse_strategy"]

STRATEGIES = ("depth", "module", "role", "norm", "patterns")
BASE_STRATEGIES = ("depth", "module", "role", "patterns")
_Split = list[tuple[str, list[str]]]


def parse_strategy(strategy: object) -> tuple[str | None, bool]:
    """Parse a strategy into ``(base strategy or None, split by norm)``.

    >>> parse_strategy("depth+norm"), parse_strategy(("role",)), parse_strategy("norm")
    (('depth', True), ('role', False), (None, True))
    """
    if isinstance(strategy, str):
        parts = [p.strip() for p in strategy.split("+")]
    elif isinstance(strategy, (tuple, list)) and all(isinstance(p, str) for p in strategy):
        parts = [p.strip() for p in strategy]
    else:
        raise TypeError(f"strategy must be a str or a tuple of str, got {strategy!r}")
    bases = [p for p in parts if p in BASE_STRATEGIES]
    if (
        not parts
        or any(p not in STRATEGIES for p in parts)
        or len(bases) > 1
        or len(set(parts)) != len(parts)
    ):
        raise ValueError(
            f"strategy must be one of {', '.join(map(repr, STRATEGIES))} or one of "
            f"{', '.join(map(repr, BASE_STRATEGIES))} combined with 'norm' (e.g. 'depth+norm'), "
            f"got {strategy!r}"
        )
    return (bases[0] if bases else None), "norm" in parts


def group_parameters(
    model: nn.Module,
    strategy: str | Sequence[str] = "depth",
    *,
    num_groups: int | None = None,
    head: Any = None,
    patterns: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
    catch_all: str | None = None,
    blocks: Any = None,
    no_decay: Any = None,
    syntax: str = "regex",
) -> ParamGroups:
    """Group the trainable parameters of ``model`` into named, ordered groups.

    Every trainable parameter lands in exactly one group, under its first name in
    ``model.named_parameters()`` (tied weights appear once); frozen ones are left out and
    listed in ``.frozen``. Patterns (``head``, ``patterns``, ``blocks``, ``no_decay``) are
    regular expressions searched anywhere in the name, or with ``syntax="glob"`` shell globs
    matched against the full name or a dotted prefix of it.

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    >>> group_parameters(model).mapping()
    {'layer.0': ['0.weight', '0.bias', '1.weight', '1.bias'], 'head': ['3.weight', '3.bias']}
    >>> group_parameters(model, "depth+norm").names
    ('layer.0', 'layer.0.no_decay', 'head', 'head.no_decay')
    >>> group_parameters(model, "patterns", patterns={"first": r"^0\\."}, catch_all="rest").names
    ('first', 'rest')
    >>> group_parameters(model, "role", head=r"^3\\.")["head"].role
    'head'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    base, norm = parse_strategy(strategy)
    _check_options(base, norm, num_groups, patterns, catch_all, no_decay, syntax)
    params = read_parameters(model)
    if not params.trainable:
        raise ValueError(
            f"model {type(model).__name__} has no trainable parameters"
            + (
                f": all {len(params.frozen)} are frozen ({list_names(params.frozen)})"
                if params.frozen
                else ""
            )
        )
    block_pats = _compile(blocks, "blocks", syntax)
    block_of = block_finder(model, block_pats)
    if block_pats and not any(block_of(n) for n in params.names):
        raise ValueError(f"blocks: no module path matches {[p.source for p in block_pats]!r}")
    head_names, why = _find_head(model, params, head, syntax, block_of)
    units = depth_units(model, params, head_names, block_of)
    rules = parse_patterns(patterns, syntax) if patterns is not None else []

    if base is None:
        split: _Split = [("", list(params.trainable))]
    elif base == "depth":
        split = _by_key(params.trainable, lambda n: units.names[units.unit_of[n]])
        # input to output: a tied head's weight may come first in registration order
        split.sort(key=lambda item: units.unit_of[item[1][0]])
        split = merge_units(split, num_groups) if num_groups is not None else split
    elif base == "module":
        split = _by_key(params.trainable, lambda n: params.modules[n] or "(root)")
    elif base == "role":
        split = _by_role(params, head_names, why)
    else:
        split = by_patterns(params, rules, catch_all)
    decays = [(name, members, True) for name, members in split]
    if norm:
        decays = _split_norm(model, params, split, _compile(no_decay, "no_decay", syntax) or ())

    # depth: rank of the shallowest layer a group holds; "norm" alone has no depth order
    firsts = {name: min(units.unit_of[n] for n in m) if base else 0 for name, m, _ in decays}
    rank = {u: r for r, u in enumerate(sorted(set(firsts.values())))}
    head_set = set(head_names)
    groups = [
        ParamGroup(
            name=name,
            param_names=tuple(members),
            depth=rank[firsts[name]],
            role="head" if head_set and head_set.issuperset(members) else "backbone",
            size=sum(params.tensors[n].numel() for n in members),
            weight_decay=decay,
        )
        for name, members, decay in decays
    ]
    options = {
        "num_groups": num_groups,
        "head": _sources(_compile(head, "head", syntax)),
        "head_found": why,
        "patterns": {name: _sources(pats) for name, pats in rules} if rules else None,
        "catch_all": catch_all,
        "blocks": _sources(block_pats),
        "no_decay": _sources(_compile(no_decay, "no_decay", syntax)),
        "syntax": syntax,
    }
    return ParamGroups(
        groups,
        parameters={n: params.tensors[n] for n in params.trainable},
        frozen=params.frozen,
        tied=params.tied,
        strategy="+".join([*([base] if base else []), *(["norm"] if norm else [])]),
        options=options,
    )


def _compile(value: Any, argument: str, syntax: str) -> tuple[Pattern, ...] | None:
    return None if value is None else compile_patterns(value, argument=argument, syntax=syntax)


def _sources(patterns: tuple[Pattern, ...] | None) -> list[str] | None:
    return None if patterns is None else [p.source for p in patterns]


def _check_options(
    base: str | None,
    norm: bool,
    num_groups: object,
    patterns: object,
    catch_all: object,
    no_decay: object,
    syntax: object,
) -> None:
    shown = "+".join(filter(None, [base, "norm" if norm else None]))
    needs = {"num_groups": "depth", "patterns": "patterns", "catch_all": "patterns"}
    given = {"num_groups": num_groups, "patterns": patterns, "catch_all": catch_all}
    for option, value in given.items():
        if value is not None and base != needs[option]:
            raise ValueError(
                f"{option} applies only to the {needs[option]!r} strategy, got {option}={value!r} "
                f"with strategy={shown!r}"
            )
    if no_decay is not None and not norm:
        raise ValueError(
            f"no_decay applies only with the 'norm' strategy, got no_decay={no_decay!r}"
        )
    if base == "patterns" and patterns is None:
        raise ValueError("strategy 'patterns' needs patterns={group name: pattern, ...}, got None")
    if syntax not in SYNTAXES:
        raise ValueError(f"syntax must be one of {SYNTAXES}, got {syntax!r}")
    if num_groups is not None and (isinstance(num_groups, bool) or not isinstance(num_groups, int)):
        raise TypeError(f"num_groups must be an int, got {num_groups!r}")
    if num_groups is not None and num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups!r}")
    if catch_all is not None and (not isinstance(catch_all, str) or not catch_all):
        raise ValueError(f"catch_all must be a non-empty group name or None, got {catch_all!r}")


def _find_head(
    model: nn.Module, params: ModelParams, head: Any, syntax: str, block_of: Any
) -> tuple[tuple[str, ...], str]:
    if head is None:
        _, names, why = find_default_head(model, params, block_of)
        return names, why
    pats = compile_patterns(head, argument="head", syntax=syntax)
    shown = [p.source for p in pats]
    # a tied head (an output layer sharing the input embedding) is named by its alias:
    # the shared tensor, grouped under its first name, goes to the head
    via_alias = {params.tied[a] for a in params.tied if any(p.matches(a) for p in pats)}
    names = tuple(n for n in params.names if n in via_alias or any(p.matches(n) for p in pats))
    if not names:
        raise ValueError(f"head: no parameter matches {shown!r}")
    ties = [f"{a!r} is {params.tied[a]!r}" for a in params.tied if params.tied[a] in names]
    return names, f"head patterns {shown!r}" + (f" (tied: {', '.join(ties)})" if ties else "")


def _by_key(names: Sequence[str], key: Any) -> _Split:
    out: dict[str, list[str]] = {}
    for name in names:
        out.setdefault(key(name), []).append(name)
    return list(out.items())


def _by_role(params: ModelParams, head_names: tuple[str, ...], why: str) -> _Split:
    head_set = set(head_names)
    if not head_set:
        raise ValueError(f"strategy 'role' found no head: {why}; name it with head=[patterns]")
    head = [n for n in params.trainable if n in head_set]
    if not head:
        raise ValueError(
            f"strategy 'role': every head parameter is frozen ({list_names(head_names)}); "
            "name a trainable head with head=[patterns]"
        )
    backbone = [n for n in params.trainable if n not in head_set]
    return ([("backbone", backbone)] if backbone else []) + [("head", head)]


def _split_norm(
    model: nn.Module, params: ModelParams, split: _Split, extra: tuple[Pattern, ...]
) -> list[tuple[str, list[str], bool]]:
    modules = dict(model.named_modules(remove_duplicate=False))

    def exempt(n: str) -> bool:
        module = modules[params.modules[n]]
        return is_norm_module(module) or is_bias(n) or any(p.matches(n) for p in extra)

    out = []
    for name, members in split:
        decay = [n for n in members if not exempt(n)]
        free = [n for n in members if exempt(n)]
        if decay:
            out.append((name or "decay", decay, True))
        if free:
            out.append((f"{name}.no_decay" if name else "no_decay", free, False))
    return out
