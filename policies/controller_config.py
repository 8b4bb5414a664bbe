"""A controller's settings from plain data: flat config keys or the nested form of ``to_dict``.

:class:`layerwise.policies.SensitivityController` takes ``rule``, ``alpha``, ``ema`` and
``max_rel_stderr`` and two settings objects, ``bounds`` (:class:`layerwise.policies.Bounds`) and
``safety`` (:class:`layerwise.policies.Safety`). Configs (TOML tables, manifests) may spell
the fields of those objects flat, as they were before the objects existed::

    controller = { alpha = 0.5, max_spread = 4, mode = "max" }

or nested, as :meth:`SensitivityController.to_dict` writes them::

    controller = { alpha = 0.5, bounds = { max_spread = 4 }, safety = { mode = "max" } }

Both forms may be mixed as long as no field is given twice. Any other key is a
``ValueError`` that names it and lists the known ones.

>>> args = controller_arguments({"alpha": 1.0, "max_spread": 2.0, "mode": "max"})
>>> args["alpha"], args["bounds"].max_spread, args["safety"].mode
(1.0, 2.0, 'max')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from layerwise.policies.bounds import Bounds
from layerwise.policies.safety_settings import Safety

__all__ = ["CONTROLLER_KEYS", "controller_arguments", "flat_keys", "flatten"]

#: The controller's own keys; the fields of Bounds and Safety are the others.
CONTROLLER_KEYS = ("rule", "alpha", "ema", "max_rel_stderr")
_PARTS: tuple[tuple[str, type], ...] = (("bounds", Bounds), ("safety", Safety))


def flat_keys() -> list[str]:
    """Every key of the flat form, sorted."""
    keys = list(CONTROLLER_KEYS)
    for _, cls in _PARTS:
        keys += [f.name for f in dataclasses.fields(cls)]
    return sorted(keys)


def flatten(data: Any) -> dict[str, Any]:
    """The flat form of a flat, nested or mixed mapping (module docstring), checked for
    unknown keys and for fields given twice; values are not validated here."""
    if not isinstance(data, Mapping):
        raise TypeError(f"controller settings must be a mapping, got {data!r}")
    known = set(flat_keys()) | {name for name, _ in _PARTS}
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        raise ValueError(
            f"controller: unknown key(s) {unknown}; known: {flat_keys()} "
            "(or bounds = {...}, safety = {...})"
        )
    out = {k: v for k, v in data.items() if k not in dict(_PARTS)}
    for name, cls in _PARTS:
        if name not in data:
            continue
        nested = data[name]
        if isinstance(nested, cls):
            nested = dataclasses.asdict(nested)
        elif not isinstance(nested, Mapping):
            raise TypeError(f"{name} must be a {cls.__name__} or a mapping, got {nested!r}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in set(nested) - set(fields))
        if unknown:
            raise ValueError(f"{name}: unknown key(s) {unknown}; known: {sorted(fields)}")
        twice = sorted(set(nested) & set(out))
        if twice:
            raise ValueError(f"controller: {twice} given both flat and under {name!r}")
        out.update(nested)
    return out


def controller_arguments(data: Any) -> dict[str, Any]:
    """Keyword arguments of the controller's constructor from a flat or nested mapping
    (module docstring); ``bounds`` and ``safety`` come out as their objects."""
    flat = flatten(data)
    out = {k: flat[k] for k in CONTROLLER_KEYS if k in flat}
    for name, cls in _PARTS:
        given = {f.name: flat[f.name] for f in dataclasses.fields(cls) if f.name in flat}
        if given:
            out[name] = cls(**given)
    return out
