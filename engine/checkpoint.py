"""The engine's part of a checkpoint, inside the base optimizer's state dict.

``LayerwiseOptimizer.state_dict()`` is the base optimizer's state dict, whose groups carry
``"name"`` and ``"lr_multiplier"`` (and ``"initial_lr"`` with a schedule), plus one extra
top-level entry ``"layerwise"`` of plain data:

==================  ===================================================================
``version``         format version (1)
``step``            optimizer steps taken through the engine
``group_names``     the groups' names, in order (checked on load)
``settings``        ``recalibrate_every`` and ``warmup_steps`` (a difference only warns)
``recalibrator``    ``{"controller": controller.state_dict(), "generator": uint8 tensor,
                    "seed": int}`` (``None`` without a controller)
``batches_drawn``   estimation batches drawn from ``batches=`` so far
``scheduler``       the internal :class:`layerwise.policies.LayerwiseLR` state (``None`` without
one)
``history``         the recalibration rows (the file, if any, is left as it is)
==================  ===================================================================

So saving the optimizer's state saves everything, and resuming (model, optimizer, and the
user's own scheduler and data order) continues bit for bit. Loading validates every entry
first, then loads the controller, the scheduler and the base optimizer, rolling the first
two back if a later one fails, so a failed load changes nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from layerwise.engine.multipliers import MULTIPLIER_KEY, check_multiplier
from layerwise.policies.schedule_base import check_int

if TYPE_CHECKING:
    from layerwise.engine.optimizer import LayerwiseOptimizer

__all__ = ["ENGINE_KEY", "FORMAT_VERSION", "pack_state", "unpack_state"]

ENGINE_KEY = "layerwise"
FORMAT_VERSION = 1
_KEYS = (
    "version",
    "step",
    "group_names",
    "settings",
    "recalibrator",
    "batches_drawn",
    "scheduler",
    "history",
)


def pack_state(engine: LayerwiseOptimizer) -> dict[str, Any]:
    """The ``"layerwise"`` entry of ``engine.state_dict()``."""
    recal, source, sched = engine._recalibrator, engine._source, engine._scheduler
    return {
        "version": FORMAT_VERSION,
        "step": engine._step,
        "group_names": list(engine._names),
        "settings": {
            "recalibrate_every": engine.recalibrate_every,
            "warmup_steps": engine.warmup_steps,
        },
        "recalibrator": None if recal is None else recal.state_dict(),
        "batches_drawn": 0 if source is None else source.drawn,
        "scheduler": None if sched is None else sched.state_dict(),
        "history": engine._history.state(),
    }


def _check_entry(engine: LayerwiseOptimizer, state_dict: Any) -> dict[str, Any]:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    if ENGINE_KEY not in state_dict:
        raise ValueError(
            f"state_dict has no {ENGINE_KEY!r} entry: it is a plain optimizer's state dict; "
            "load it into the base optimizer (engine.base.load_state_dict) instead"
        )
    entry = state_dict[ENGINE_KEY]
    if not isinstance(entry, Mapping):
        raise ValueError(f"state_dict[{ENGINE_KEY!r}] must be a mapping, got {entry!r}")
    missing = [k for k in _KEYS if k not in entry]
    unknown = sorted(map(str, set(entry) - set(_KEYS)))
    if missing or unknown:
        raise ValueError(f"state_dict[{ENGINE_KEY!r}]: missing keys {missing}, unknown {unknown}")
    if entry["version"] != FORMAT_VERSION:
        raise ValueError(
            f"state_dict[{ENGINE_KEY!r}] has version {entry['version']!r}, "
            f"this engine reads version {FORMAT_VERSION}"
        )
    check_int(f"state_dict[{ENGINE_KEY!r}]['step']", entry["step"], minimum=0)
    check_int(f"state_dict[{ENGINE_KEY!r}]['batches_drawn']", entry["batches_drawn"], minimum=0)
    names = list(engine._names)
    saved = entry["group_names"]
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(names):
        raise ValueError(
            f"state_dict has {groups!r:.80} param_groups; this optimizer has groups {names}"
        )
    if not isinstance(saved, list | tuple):
        raise ValueError(
            f"state_dict[{ENGINE_KEY!r}]['group_names'] must be a list of group names, "
            f"got {saved!r:.80}"
        )
    for i, g in enumerate(groups):
        if not isinstance(g, Mapping):
            raise ValueError(f"state_dict['param_groups'][{i}] must be a mapping, got {g!r:.80}")
    if list(saved) != names or [g.get("name") for g in groups] != names:
        raise ValueError(
            f"state_dict is for groups {list(saved)}; this optimizer has groups {names}"
        )
    for g in groups:
        check_multiplier(
            f"multiplier of group {g['name']!r} in state_dict", g.get(MULTIPLIER_KEY, 1.0)
        )
    for key, own in (("recalibrator", engine._recalibrator), ("scheduler", engine._scheduler)):
        if (entry[key] is None) != (own is None):
            has = "has" if entry[key] is not None else "has no"
            raise ValueError(
                f"state_dict[{ENGINE_KEY!r}] {has} {key} state but this engine "
                f"{'has' if own is not None else 'has no'} {key}; build the engine as it was saved"
            )
    settings = entry["settings"]
    if not isinstance(settings, Mapping):
        raise ValueError(
            f"state_dict[{ENGINE_KEY!r}]['settings'] must be a mapping, got {settings!r}"
        )
    changed = {
        k: (v, getattr(engine, k, None))
        for k, v in settings.items()
        if getattr(engine, k, None) != v
    }
    if changed:
        warnings.warn(
            f"load_state_dict: the engine's settings differ from the checkpoint's "
            f"(saved, now): {changed}",
            UserWarning,
            stacklevel=3,
        )
    return dict(entry)


def unpack_state(engine: LayerwiseOptimizer, state_dict: Mapping[str, Any]) -> None:
    """Validate ``state_dict`` and load it into ``engine``; on error nothing changes."""
    entry = _check_entry(engine, state_dict)
    history_check = type(engine._history)()
    history_check.load_state(entry["history"])
    recal, sched = engine._recalibrator, engine._scheduler
    recal_backup = None if recal is None else recal.state_dict()
    sched_backup = None if sched is None else sched.state_dict()
    try:
        if recal is not None:
            recal.load_state_dict(entry["recalibrator"])
        if sched is not None:
            sched.load_state_dict(entry["scheduler"])
        base_state = {k: v for k, v in state_dict.items() if k != ENGINE_KEY}
        engine.base.load_state_dict(base_state)
    except Exception:
        if recal is not None:
            recal.load_state_dict(recal_backup)
        if sched is not None:
            sched.load_state_dict(sched_backup)
        raise
    for g in engine.base.param_groups:
        g[MULTIPLIER_KEY] = float(g.get(MULTIPLIER_KEY, 1.0))
    engine._step = int(entry["step"])
    if engine._source is not None:
        engine._source.drawn = int(entry["batches_drawn"])
    engine._history.load_state(entry["history"])
    if recal is not None:
        recal.refresh_mapping()
