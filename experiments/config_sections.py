"""Validation of the sections of an ablation config (see :mod:`layerwise.experiments.config`).

Each function takes the parsed TOML value of one section and the config's file name
(``source``, for messages) and returns it validated, or raises
:class:`~layerwise.experiments.errors.UsageError` with one line naming the file, the key and the
value. Schedules and groupings are checked by building them (a schedule with a horizon
of 1,000 steps for ``"budget"``, a grouping of a three-layer probe model).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from layerwise.experiments.errors import UsageError

__all__ = [
    "LABEL",
    "TASK_OVERRIDES",
    "TaskEntry",
    "as_table",
    "check_grouping",
    "check_label",
    "check_schedule",
    "fail",
    "int_list",
    "parse_policies",
    "parse_settings",
    "parse_tasks",
    "setting_parts",
    "substitute_budget",
]

TASK_OVERRIDES = {
    "steps",
    "batch_size",
    "eval_every",
    "target",
    "optimizer",
    "lr_grid",
    "weight_decay",
    "momentum",
}
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
#: Keys of a setting that change every policy's update (see experiments.policy_specs).
SETTING_UPDATE_KEYS = ("sam", "normalize_grads")


@dataclass(frozen=True)
class TaskEntry:
    """One task of the grid: its registry name or import path, label, options, overrides."""

    name: str
    label: str
    options: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)


def fail(source: str, message: str) -> UsageError:
    return UsageError(f"config {source}: {message}")


def int_list(source: str, key: str, value: Any) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or not value
        or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63 for v in value)
    ):
        raise fail(
            source, f"{key} must be a non-empty list of integers in [0, 2**63), got {value!r}"
        )
    if len(set(value)) != len(value):
        raise fail(source, f"{key} has duplicates: {value!r}")
    return tuple(value)


def as_table(source: str, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise fail(source, f"{key} must be a table, got {value!r}")
    return dict(value)


def check_label(source: str, what: str, value: Any) -> str:
    if not isinstance(value, str) or not LABEL.match(value):
        raise fail(source, f"{what} must be letters, digits and _ . + - only, got {value!r}")
    return value


def parse_tasks(source: str, value: Any) -> tuple[TaskEntry, ...]:
    from layerwise.experiments.tasks import get_task

    if not isinstance(value, list) or not value:
        raise fail(source, f"tasks must be a non-empty list, got {value!r}")
    entries = []
    for i, item in enumerate(value):
        table = {"name": item} if isinstance(item, str) else as_table(source, f"tasks[{i}]", item)
        if "name" not in table:
            raise fail(source, f"tasks[{i}] has no 'name'")
        name = table.pop("name")
        options = as_table(source, f"tasks[{i}].options", table.pop("options", {}))
        label = table.pop("label", None)
        unknown = set(table) - TASK_OVERRIDES
        if unknown:
            raise fail(
                source,
                f"tasks[{i}] ({name!r}): unknown key(s) {sorted(unknown)}; "
                f"known: name, label, options, {', '.join(sorted(TASK_OVERRIDES))}",
            )
        try:
            task = get_task(name, **options).with_overrides(**table)
        except (UsageError, ValueError, TypeError) as exc:
            raise fail(source, f"tasks[{i}]: {exc}") from exc
        label = check_label(source, f"tasks[{i}].label", label or task.name)
        entries.append(TaskEntry(name=name, label=label, options=options, overrides=table))
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise fail(source, f"task labels must be unique, got {labels}; set 'label'")
    return tuple(entries)


def parse_policies(source: str, value: Any) -> dict[str, dict[str, Any]]:
    from layerwise.experiments.policy_specs import resolve_policy

    if isinstance(value, list):
        items = [(name, {}) for name in value]
    elif isinstance(value, Mapping):
        items = [(name, as_table(source, f"policies.{name}", t)) for name, t in value.items()]
    else:
        raise fail(source, f"policies must be a list of names or a table, got {value!r}")
    if not items:
        raise fail(source, "policies is empty")
    out = {}
    for name, table in items:
        check_label(source, "policy name", name)
        if name in out:
            raise fail(source, f"policy {name!r} is listed twice")
        try:
            out[name] = resolve_policy(name, table)
        except (ValueError, TypeError) as exc:
            raise fail(source, str(exc)) from exc
    if "uniform" not in out:
        raise fail(source, "policies must include 'uniform', the baseline of every comparison")
    return out


def check_schedule(source: str, key: str, spec: dict[str, Any]) -> None:
    from layerwise.policies import schedules

    try:
        schedules.from_spec(substitute_budget(spec, 1000))
    except (TypeError, ValueError) as exc:
        raise fail(source, f"{key}: {exc}") from exc


def check_grouping(source: str, key: str, options: dict[str, Any]) -> None:
    from torch import nn

    from layerwise import policies

    probe = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2), nn.Linear(2, 2))
    opts = dict(options)
    opts.pop("head", None)
    try:
        policies.group_parameters(probe, **opts)
    except (TypeError, ValueError) as exc:
        raise fail(source, f"{key}: {exc}") from exc


def parse_settings(source: str, value: Any) -> dict[str, dict[str, Any]]:
    settings = as_table(source, "settings", value)
    if not settings:
        raise fail(source, "settings is empty; leave it out for a single default setting")
    out = {}
    for name, table in settings.items():
        check_label(source, "setting name", name)
        table = as_table(source, f"settings.{name}", table)
        known = {"schedule", "grouping", "options", *SETTING_UPDATE_KEYS, *TASK_OVERRIDES}
        unknown = set(table) - known
        if unknown:
            known_text = ", ".join(sorted(known))
            raise fail(
                source, f"settings.{name}: unknown key(s) {sorted(unknown)}; known: {known_text}"
            )
        if "options" in table:
            as_table(source, f"settings.{name}.options", table["options"])
        _check_setting_update(source, name, table)
        if "schedule" in table:
            check_schedule(
                source,
                f"settings.{name}.schedule",
                as_table(source, f"settings.{name}.schedule", table["schedule"]),
            )
        if "grouping" in table:
            check_grouping(
                source,
                f"settings.{name}.grouping",
                as_table(source, f"settings.{name}.grouping", table["grouping"]),
            )
        out[name] = table
    return out


def _check_setting_update(source: str, name: str, table: Mapping[str, Any]) -> None:
    from layerwise.experiments.policy_specs import resolve_policy

    update = {k: table[k] for k in SETTING_UPDATE_KEYS if k in table}
    if update:
        try:
            resolve_policy("uniform", update)
        except ValueError as exc:
            message = str(exc).replace("policy 'uniform': ", "")
            raise fail(source, f"settings.{name}: {message}") from exc


@dataclass(frozen=True)
class SettingParts:
    """A setting split by what it changes: the task's ``options`` (its factory's keyword
    arguments, e.g. a data regime), its budget and recipe ``overrides``, and ``update``,
    the update keys merged into every policy's spec (``sam``, ``normalize_grads``)."""

    options: dict[str, Any]
    overrides: dict[str, Any]
    update: dict[str, Any]


def setting_parts(variant: Mapping[str, Any]) -> SettingParts:
    """Split a validated setting table (schedule and grouping are read separately).

    >>> parts = setting_parts({"options": {"label_noise": 0.2}, "steps": 100, "sam": {"rho": 0.1}})
    >>> parts.options, parts.overrides, parts.update
    ({'label_noise': 0.2}, {'steps': 100}, {'sam': {'rho': 0.1}})
    """
    return SettingParts(
        options=dict(variant.get("options", {})),
        overrides={k: v for k, v in variant.items() if k in TASK_OVERRIDES},
        update={k: v for k, v in variant.items() if k in SETTING_UPDATE_KEYS},
    )


def substitute_budget(spec: Any, steps: int) -> Any:
    """``spec`` with every string ``"budget"`` replaced by ``steps`` (nested too).

    >>> substitute_budget({"name": "cosine", "total_steps": "budget"}, 500)
    {'name': 'cosine', 'total_steps': 500}
    """
    if spec == "budget":
        return steps
    if isinstance(spec, Mapping):
        return {k: substitute_budget(v, steps) for k, v in spec.items()}
    if isinstance(spec, list):
        return [substitute_budget(v, steps) for v in spec]
    return spec
