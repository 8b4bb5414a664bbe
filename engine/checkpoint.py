"""The engine's part of a checkpoint, composed from its components' own state dicts.

``LayerwiseOptimizer.state_dict()`` is the base optimizer's state dict, whose groups carry
``"name"`` and ``"lr_multiplier"``, plus one extra top-level entry ``"layerwise"`` of
plain data:

==================  ===================================================================
``version``         format version (:data:`FORMAT_VERSION`)
``step``            optimizer steps taken through the engine
``group_names``     the groups' names, in order (checked on load)
``base``            the base optimizer's class and each parameter's shape
                    (:func:`layerwise.engine.base_state.describe`)
``settings``        ``recalibrate_every``, ``warmup_steps`` and ``max_nonfinite_steps``
                    (a difference only warns)
``recalibrator``    :meth:`layerwise.engine.recalibration.Recalibrator.state_dict`: the
                    controller's state, the probe generator's and the seed (``None``
                    without a controller)
``batches``         :meth:`layerwise.engine.batches.BatchSource.state_dict` (``None``
                    without ``batches=``)
``history``         :meth:`layerwise.engine.history.History.state_dict`: the rows
``nonfinite``       :meth:`layerwise.engine.nonfinite.NonFiniteSteps.state_dict`: the
                    steps skipped on non-finite gradients, in all and in a row
==================  ===================================================================

So saving the optimizer's state saves everything the engine owns, and resuming (model,
optimizer, and the user's own scheduler, e.g. :class:`layerwise.policies.LayerwiseLR`, and
data order) continues bit for bit. :func:`load_state` checks every entry first (the
engine's own, each component's, and whether the base optimizer's part fits the wrapped
optimizer: :func:`layerwise.engine.base_state.check_fits`), then loads the recalibrator
(whose controller checks its own entry before it changes anything) and the base optimizer,
undoing the first if the second fails, and only then the history and the counts, which
cannot fail. Any problem is a ``ValueError`` naming it, and nothing has changed.

Format 3 added ``base`` and ``nonfinite`` (and the controller's collapse watch). A format-2
checkpoint is refused with its version named: it records neither the optimizer's class nor
the shapes, so whether it fits cannot be checked. Its base optimizer's part still loads on
its own, at the user's risk: ``engine.base.load_state_dict({k: v for k, v in
state.items() if k != "layerwise"})``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from layerwise.engine.base_state import check_fits, describe
from layerwise.engine.batches import BatchSource
from layerwise.engine.history import History
from layerwise.engine.multipliers import MULTIPLIER_KEY, check_multiplier
from layerwise.engine.nonfinite import NonFiniteSteps
from layerwise.engine.recalibration import Recalibrator
from layerwise.policies.schedule_base import check_int

__all__ = ["ENGINE_KEY", "FORMAT_VERSION", "load_state", "pack_state"]

ENGINE_KEY = "layerwise"
FORMAT_VERSION = 3
_KEYS = ("version", "step", "group_names", "base", "settings", "recalibrator", "batches",
         "history", "nonfinite")  # fmt: skip
_WHERE = f"state_dict[{ENGINE_KEY!r}]"
#: What to say about the formats this engine refuses.
_OLD = {
    2: (
        " (format 2 records neither the base optimizer's class nor the parameter shapes, so "
        "whether it fits cannot be checked; resume with the layerwise-lr that saved it, or "
        "load its base optimizer's part alone with engine.base.load_state_dict, at your risk)"
    ),
}


def pack_state(
    *,
    step: int,
    names: list[str],
    base: torch.optim.Optimizer,
    settings: Mapping[str, Any],
    recalibrator: Recalibrator | None,
    batches: BatchSource | None,
    history: History,
    nonfinite: NonFiniteSteps,
) -> dict[str, Any]:
    """The ``"layerwise"`` entry: the engine's own data and each component's state dict."""
    return {
        "version": FORMAT_VERSION,
        "step": step,
        "group_names": list(names),
        "base": describe(base),
        "settings": dict(settings),
        "recalibrator": None if recalibrator is None else recalibrator.state_dict(),
        "batches": None if batches is None else batches.state_dict(),
        "history": history.state_dict(),
        "nonfinite": nonfinite.state_dict(),
    }


def load_state(
    state_dict: Any,
    *,
    base: torch.optim.Optimizer,
    names: list[str],
    settings: Mapping[str, Any],
    recalibrator: Recalibrator | None,
    batches: BatchSource | None,
    history: History,
    nonfinite: NonFiniteSteps,
) -> int:
    """Check ``state_dict`` (the engine's own entries, each component's, and whether it
    fits ``base``), then load it into ``base`` and the components; return the saved step.
    On error nothing changes.

    A checkpoint saved without ``batches=`` resumes a source from draw 0; one saved with
    it, into an engine without, has its count checked and not used."""
    entry = _check_entry(state_dict, names)
    check_fits(entry["base"], state_dict, base, names)
    counts = NonFiniteSteps.check_state_dict(entry["nonfinite"])
    saved, own = entry["recalibrator"], recalibrator
    if (saved is None) != (own is None):
        raise ValueError(
            f"{_WHERE} {'has no' if saved is None else 'has'} recalibrator state but this "
            f"engine {'has' if own is not None else 'has no'} controller; build the engine "
            "as it was saved"
        )
    history.check_state_dict(entry["history"])
    if entry["batches"] is not None:
        BatchSource.check_state_dict(entry["batches"])
    if recalibrator is not None:
        recalibrator.check_state_dict(saved)
    _warn_settings(entry["settings"], settings)
    backup = None if recalibrator is None else recalibrator.state_dict()
    try:
        if recalibrator is not None:
            recalibrator.load_state_dict(saved)
        base.load_state_dict({k: v for k, v in state_dict.items() if k != ENGINE_KEY})
    except BaseException:
        if recalibrator is not None:
            recalibrator.load_state_dict(backup)
        raise
    for group in base.param_groups:
        group[MULTIPLIER_KEY] = float(group.get(MULTIPLIER_KEY, 1.0))
    history.load_state_dict(entry["history"])
    nonfinite.load_state_dict(counts)
    if batches is not None:
        batches.load_state_dict(entry["batches"] or {"drawn": 0})
    return entry["step"]


def _check_entry(state_dict: Any, names: list[str]) -> dict[str, Any]:
    """The ``"layerwise"`` entry, its keys, version, step and group names checked against
    ``names`` and the state dict's groups (names and multipliers)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    if ENGINE_KEY not in state_dict:
        raise ValueError(
            f"state_dict has no {ENGINE_KEY!r} entry: it is a plain optimizer's state dict; "
            "load it into the base optimizer (engine.base.load_state_dict) instead"
        )
    entry = state_dict[ENGINE_KEY]
    if not isinstance(entry, Mapping):
        raise ValueError(f"{_WHERE} must be a mapping, got {entry!r:.80}")
    version = entry.get("version", FORMAT_VERSION)  # a missing version is named below
    if version != FORMAT_VERSION:
        note = _OLD.get(version, "") if isinstance(version, int) else ""
        raise ValueError(
            f"{_WHERE} has version {version!r}, this engine reads version {FORMAT_VERSION}{note}"
        )
    missing = [k for k in _KEYS if k not in entry]
    unknown = sorted(map(str, set(entry) - set(_KEYS)))
    if missing or unknown:
        raise ValueError(f"{_WHERE}: missing keys {missing}, unknown {unknown}")
    entry = dict(entry)
    try:
        entry["step"] = check_int(f"{_WHERE}['step']", entry["step"], minimum=0)
    except TypeError as err:
        raise ValueError(str(err)) from err
    saved, groups = entry["group_names"], state_dict.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(names):
        raise ValueError(
            f"state_dict has {groups!r:.80} param_groups; this optimizer has groups {names}"
        )
    if not isinstance(saved, list | tuple):
        raise ValueError(
            f"{_WHERE}['group_names'] must be a list of group names, got {saved!r:.80}"
        )
    for i, g in enumerate(groups):
        if not isinstance(g, Mapping):
            raise ValueError(f"state_dict['param_groups'][{i}] must be a mapping, got {g!r:.80}")
    if list(saved) != names or [g.get("name") for g in groups] != names:
        raise ValueError(
            f"state_dict is for groups {list(saved)}; this optimizer has groups {names}"
        )
    for g in groups:
        try:
            check_multiplier(
                f"multiplier of group {g['name']!r} in state_dict", g.get(MULTIPLIER_KEY, 1.0)
            )
        except TypeError as err:
            raise ValueError(str(err)) from err
    if not isinstance(entry["settings"], Mapping):
        raise ValueError(f"{_WHERE}['settings'] must be a mapping, got {entry['settings']!r:.80}")
    return entry


def _warn_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    changed = {k: (v, current.get(k)) for k, v in saved.items() if current.get(k) != v}
    if changed:
        warnings.warn(
            f"load_state_dict: the engine's settings differ from the checkpoint's "
            f"(saved, now): {changed}",
            UserWarning,
            stacklevel=4,
        )
