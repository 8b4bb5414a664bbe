"""Static per-group learning-rate factors: layer-wise decay, discriminative rates, explicit maps.

A factor is a dimensionless positive number that multiplies a group's base learning rate
for the whole run (``lr_g(t) = base_lr_g * factor_g * schedule(t)``, see
:class:`layerwise.policies.LayerwiseLR`). Every function here returns a plain ``{group name:
float}`` dict in the groups' order, ready for a run manifest.

Groups come from :func:`layerwise.policies.group_parameters` (a ``ParamGroups``): each group has a
``name``, a ``depth`` (0 nearest the input, ``groups.max_depth`` the head) and a
``role`` (``"backbone"`` or ``"head"``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from layerwise.policies.schedule_base import check_real

__all__ = ["discriminative", "group_names", "layer_decay", "validate_factors"]

_ROLES = ("backbone", "head")


def group_names(groups_or_names: Any) -> list[str]:
    """Group names of a ``ParamGroups`` (``.names``), a torch optimizer or an iterable of str.

    An optimizer's groups are named by ``group["name"]``, ``"group{i}"`` when absent.
    Names must be unique non-empty strings.
    """
    obj = groups_or_names
    if isinstance(obj, torch.optim.Optimizer):
        names = [g.get("name", f"group{i}") for i, g in enumerate(obj.param_groups)]
    elif hasattr(obj, "names"):
        names = list(obj.names)
    elif isinstance(obj, str | bytes | Mapping) or not isinstance(obj, Iterable):
        raise TypeError(
            "groups_or_names must be a ParamGroups, a torch optimizer or an iterable of "
            f"group names, got {obj!r}"
        )
    else:
        names = list(obj)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"group names must be non-empty strings, got {name!r}")
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"group names must be unique, got duplicates {duplicated}")
    return names


def _groups(groups: Any) -> list[Any]:
    if not hasattr(groups, "max_depth") or not hasattr(groups, "names"):
        raise TypeError(
            f"groups must be a ParamGroups (from policies.group_parameters), got {groups!r}"
        )
    items = list(groups)
    group_names(groups)  # uniqueness and type of the names
    for g in items:
        if g.role not in _ROLES:
            raise ValueError(f"group {g.name!r} has role {g.role!r}; expected one of {_ROLES}")
    return items


def layer_decay(groups: Any, decay: float, min_factor: float = 0.0) -> dict[str, float]:
    """Layer-wise learning-rate decay: ``factor_g = max(decay ** (D - depth_g), min_factor)``.

    ``D = groups.max_depth``, so the factor decays geometrically with the distance from
    the output; head groups (``role == "head"``) get exactly 1. ``0 < decay <= 1``,
    ``0 <= min_factor <= 1``. This is the "layer-wise lr decay" of ELECTRA (Clark et al.,
    ICLR 2020) and BEiT (Bao et al., ICLR 2022), ``timm``'s ``layer_decay``. A factor that
    underflows to 0 raises ``ValueError``; raise ``min_factor`` then.

    >>> from layerwise import policies
    >>> from torch import nn
    >>> groups = policies.group_parameters(
    ...     nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    ... )
    >>> layer_decay(groups, 0.5)
    {'layer.0': 0.25, 'layer.1': 0.5, 'head': 1.0}
    >>> layer_decay(groups, 0.1, min_factor=0.05)
    {'layer.0': 0.05, 'layer.1': 0.1, 'head': 1.0}
    """
    items = _groups(groups)
    decay = check_real("decay", decay, low=0.0, high=1.0, low_open=True)
    min_factor = check_real("min_factor", min_factor, low=0.0, high=1.0)
    max_depth = groups.max_depth
    factors = {}
    for g in items:
        depth = g.depth
        if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= max_depth:
            raise ValueError(
                f"group {g.name!r} has depth {depth!r}; expected an integer in [0, {max_depth}]"
            )
        factor = 1.0 if g.role == "head" else max(decay ** (max_depth - depth), min_factor)
        if factor <= 0.0:
            raise ValueError(
                f"layer_decay: factor of group {g.name!r} underflows to 0 "
                f"(decay={decay!r} ** {max_depth - depth}); set min_factor > 0"
            )
        factors[g.name] = factor
    return factors


def discriminative(groups: Any, head: float = 10.0, backbone: float = 1.0) -> dict[str, float]:
    """Discriminative rates by role: ``factor_g = head`` for head groups, else ``backbone``.

    Freshly initialised layers (the head) learn faster than pre-trained ones; both factors
    finite and > 0. Howard & Ruder, "ULMFiT", ACL 2018 (discriminative fine-tuning).

    >>> from layerwise import policies
    >>> from torch import nn
    >>> groups = policies.group_parameters(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)))
    >>> discriminative(groups, head=5.0)
    {'layer.0': 1.0, 'head': 5.0}
    """
    items = _groups(groups)
    rates = {
        "head": check_real("head", head, low=0.0, low_open=True),
        "backbone": check_real("backbone", backbone, low=0.0, low_open=True),
    }
    return {g.name: rates[g.role] for g in items}


def validate_factors(
    groups_or_names: Any, mapping: Mapping[str, float], *, default: float | None = None
) -> dict[str, float]:
    """Check an explicit ``{group name: factor}`` mapping and return it as plain floats.

    Every factor must be a finite real number > 0 and every key a known group name.
    Groups missing from ``mapping`` raise ``ValueError`` unless ``default`` (itself a
    valid factor) is given, which they then get. The result follows the groups' order.

    >>> validate_factors(["a", "b"], {"b": 2}, default=1)
    {'a': 1.0, 'b': 2.0}
    """
    names = group_names(groups_or_names)
    if not isinstance(mapping, Mapping):
        raise TypeError(f"mapping must be a mapping of group name to factor, got {mapping!r}")
    unknown = [key for key in mapping if key not in names]
    if unknown:
        raise ValueError(f"factors given for unknown group(s) {unknown}; known groups: {names}")
    if default is not None:
        default = check_real("default", default, low=0.0, low_open=True)
    missing = [name for name in names if name not in mapping]
    if missing and default is None:
        raise ValueError(f"no factor for group(s) {missing} and no default given")
    out = {}
    for name in names:
        if name in mapping:
            value = mapping[name]
            out[name] = check_real(f"factor of group {name!r}", value, low=0.0, low_open=True)
        else:
            out[name] = default
    return out
