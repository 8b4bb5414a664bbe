"""A torch ``LRScheduler`` applying a base schedule and a static factor to each named group.

For plain training loops, Lightning and the Hugging Face Trainer: anything that drives a
``torch.optim.lr_scheduler.LRScheduler`` drives :class:`LayerwiseLR`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from layerwise.policies.factors import group_names, validate_factors
from layerwise.policies.schedule_base import Schedule, check_int, from_spec

__all__ = ["LayerwiseLR"]

_STATE_KEYS = ("group_names", "schedules", "factors", "last_epoch", "_step_count", "base_lrs")


def _schedules_by_name(names: list[str], schedule: Any) -> dict[str, Schedule]:
    hint = "a policies.schedules.Schedule (serialisable; use torch's LambdaLR for a lambda)"
    if isinstance(schedule, Schedule):
        return dict.fromkeys(names, schedule)
    if not isinstance(schedule, Mapping):
        raise TypeError(
            f"schedule must be {hint} or a {{group name: Schedule}} mapping, got {schedule!r}"
        )
    unknown = [key for key in schedule if key not in names]
    missing = [name for name in names if name not in schedule]
    if unknown or missing:
        raise ValueError(
            f"schedule mapping must name every optimizer group exactly once: missing "
            f"{missing}, unknown {unknown}; optimizer groups: {names}"
        )
    for name in names:
        if not isinstance(schedule[name], Schedule):
            raise TypeError(f"schedule of group {name!r} must be {hint}, got {schedule[name]!r}")
    return {name: schedule[name] for name in names}


class LayerwiseLR(LRScheduler):
    """Per-group learning rate ``lr_g(t) = initial_lr_g * factor_g * schedule_g(t)``.

    ``t`` is the scheduler's ``last_epoch`` (0 after construction, +1 per :meth:`step`),
    ``initial_lr_g`` the group's ``"initial_lr"`` (set from ``"lr"`` when
    ``last_epoch == -1``, torch's convention), ``schedule_g`` a :class:`Schedule` (one for
    every group, or a ``{group name: Schedule}`` mapping naming every group) and
    ``factor_g`` a static factor (``factors``: ``{group name: float}`` naming every group,
    e.g. from :func:`layerwise.policies.layer_decay`; ``None`` means 1 everywhere). Groups are named
    by ``group["name"]``, ``"group{i}"`` when absent. The rate is always the closed form,
    so :meth:`get_lr` and ``_get_closed_form_lr`` agree and are pure.

    :meth:`state_dict` holds plain data (schedule specs, factors, counters);
    :meth:`load_state_dict` validates it and restores the checkpoint's schedules and
    factors, warning when they differ from the ones this scheduler was built with.

    >>> import torch
    >>> from layerwise.policies import schedules
    >>> w, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    >>> groups = [{"params": [w], "name": "body"}, {"params": [b], "name": "head"}]
    >>> opt = torch.optim.SGD(groups, lr=0.1)
    >>> sched = LayerwiseLR(opt, schedules.step(2, gamma=0.5), {"body": 0.5, "head": 1.0})
    >>> for _ in range(2):
    ...     opt.step()
    ...     sched.step()
    >>> sched.get_last_lr()
    [0.025, 0.05]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        schedule: Schedule | Mapping[str, Schedule],
        factors: Mapping[str, float] | None = None,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
        last_epoch = check_int("last_epoch", last_epoch, minimum=-1)
        self.group_names: tuple[str, ...] = tuple(group_names(optimizer))
        self.schedules: dict[str, Schedule] = _schedules_by_name(list(self.group_names), schedule)
        names = list(self.group_names)
        self.factors: dict[str, float] = (
            dict.fromkeys(names, 1.0) if factors is None else validate_factors(names, factors)
        )
        super().__init__(optimizer, last_epoch)

    def _check_groups(self) -> None:
        current = tuple(group_names(self.optimizer))
        if current != self.group_names:
            raise ValueError(
                f"the optimizer's groups are now {list(current)} but LayerwiseLR was built for "
                f"{list(self.group_names)}; build a new LayerwiseLR after add_param_group"
            )

    def get_lr(self) -> list[Any]:
        """The rates at ``last_epoch``: the closed form (pure, so safe to call any time)."""
        return self._get_closed_form_lr()

    def _get_closed_form_lr(self) -> list[Any]:
        self._check_groups()
        t = self.last_epoch
        return [
            base_lr * self.factors[name] * self.schedules[name](t)
            for name, base_lr in zip(self.group_names, self.base_lrs, strict=True)
        ]

    def get_last_lr_by_group(self) -> dict[str, Any]:
        """:meth:`get_last_lr` as ``{group name: lr}``."""
        return dict(zip(self.group_names, self.get_last_lr(), strict=True))

    def state_dict(self) -> dict[str, Any]:
        """Plain data: group names, schedule specs, factors, ``last_epoch``, ``base_lrs``."""
        return {
            "group_names": list(self.group_names),
            "schedules": {name: s.spec for name, s in self.schedules.items()},
            "factors": dict(self.factors),
            "last_epoch": self.last_epoch,
            "_step_count": self._step_count,
            "base_lrs": list(self.base_lrs),
            "_last_lr": list(self.get_last_lr()),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Validate a :meth:`state_dict` and restore it; ``ValueError`` says what did not match."""
        state = _parse_state(list(self.group_names), state_dict)
        changed = [
            name
            for name in self.group_names
            if state["schedules"][name] != self.schedules[name]
            or state["factors"][name] != self.factors[name]
        ]
        if changed:
            warnings.warn(
                f"LayerwiseLR.load_state_dict: the checkpoint's schedule or factor replaces the "
                f"one this scheduler was built with for group(s) {changed}",
                UserWarning,
                stacklevel=2,
            )
        self.schedules, self.factors = state["schedules"], state["factors"]
        self.last_epoch, self._step_count = state["last_epoch"], state["_step_count"]
        self.base_lrs = state["base_lrs"]
        self._last_lr = state.get("_last_lr") or self._get_closed_form_lr()


def _parse_state(names: list[str], state_dict: Any) -> dict[str, Any]:
    """Check a :meth:`LayerwiseLR.state_dict` against the group ``names``; rebuild schedules."""
    where = "LayerwiseLR state_dict"
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{where} must be a mapping, got {type(state_dict).__name__}")
    missing = [key for key in _STATE_KEYS if key not in state_dict]
    unknown = sorted(map(str, set(state_dict) - {*_STATE_KEYS, "_last_lr"}))
    if missing or unknown:
        raise ValueError(f"{where}: missing keys {missing}, unknown keys {unknown}")
    saved = state_dict["group_names"]
    if not isinstance(saved, list | tuple) or list(saved) != names:
        raise ValueError(f"{where} is for groups {saved!r} but the optimizer has groups {names}")
    specs = state_dict["schedules"]
    if not isinstance(specs, Mapping) or sorted(specs) != sorted(names):
        raise ValueError(f"{where}: 'schedules' must map each of {names} to a spec, got {specs!r}")
    state: dict[str, Any] = {"schedules": {}}
    for name in names:
        try:
            state["schedules"][name] = from_spec(specs[name])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: schedule of group {name!r}: {err}") from err
    state["factors"] = validate_factors(names, state_dict["factors"])
    for key in ("last_epoch", "_step_count"):
        state[key] = check_int(f"{where}[{key!r}]", state_dict[key], minimum=0)
    for key in ("base_lrs", "_last_lr"):
        values = state_dict.get(key)
        if key not in state_dict:
            continue
        if not isinstance(values, list | tuple) or len(values) != len(names):
            raise ValueError(
                f"{where}: {key!r} must be a list of {len(names)} rates, got {values!r}"
            )
        state[key] = list(values)
    return state
