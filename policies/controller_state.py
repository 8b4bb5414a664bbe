"""Checks of a controller's saved state: the entries that belong to the controller itself.

:meth:`layerwise.policies.SensitivityController.state_dict` writes plain data with the keys
:data:`KEYS`; the state machines (smoothing, spike monitor, fallback gate, validation watch)
check their own entries, :func:`check_state` the rest: the format version, the settings (they
must equal the loading controller's, key by key), the step and update counts, and the
multipliers (each inside the bounds' interval).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from layerwise.policies.bounds import Bounds
from layerwise.policies.checks import int_at_least

__all__ = ["KEYS", "VERSION", "check_state"]

#: Format version of the controller's state dict. Version 2 added the collapse watch
#: (``validation`` holds ``peak`` and ``collapses``; the settings ``collapse_drop`` and
#: ``collapse_patience``); a version-1 state is refused with its version named.
VERSION = 2
#: The keys of the controller's state dict.
KEYS = (
    "version",
    "settings",
    "step",
    "updates",
    "multipliers",
    "smoothing",
    "spike",
    "gate",
    "validation",
)


def check_state(
    state: Any, settings: Mapping[str, Any], bounds: Bounds
) -> tuple[int | None, int, dict[str, float]]:
    """Validate the controller-level entries of ``state`` against the loading controller's
    flat ``settings`` and ``bounds``; return ``(step, updates, multipliers)`` converted. Each
    problem is a ``ValueError`` naming the entry and the values."""
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a mapping from state_dict(), got {type(state).__name__}")
    if set(state) != set(KEYS):
        raise ValueError(
            f"state keys differ: missing {sorted(set(KEYS) - set(state))}, "
            f"unexpected {sorted(set(state) - set(KEYS))}"
        )
    if state["version"] != VERSION:
        raise ValueError(
            f"state version must be {VERSION}, got {state['version']!r} (a controller state of "
            "another layerwise-lr version; version 1 predates the collapse watch)"
        )
    theirs = state["settings"]
    if not isinstance(theirs, Mapping):
        raise ValueError(f"state settings must be a mapping, got {theirs!r}")
    diff = [
        f"{k}: saved {theirs.get(k)!r}, here {settings.get(k)!r}"
        for k in sorted(set(settings) | set(theirs))
        if theirs.get(k) != settings.get(k)
    ]
    if diff:
        raise ValueError(f"state was saved with other settings ({'; '.join(diff)})")
    step, updates = state["step"], state["updates"]
    if step is not None:
        step = int_at_least("state step", step, 0)
    updates = int_at_least("state updates", updates, 0)
    lo, hi = bounds.interval()
    if not isinstance(state["multipliers"], Mapping):
        raise ValueError(f"state multipliers must be a mapping, got {state['multipliers']!r}")
    multipliers = {}
    for name, v in state["multipliers"].items():
        if not (isinstance(name, str) and isinstance(v, int | float) and lo <= v <= hi):
            raise ValueError(
                f"state multiplier of group {name!r} must be a float in "
                f"[{lo:.4g}, {hi:.4g}] under these bounds, got {v!r}"
            )
        multipliers[name] = float(v)
    return step, updates, multipliers
