"""Ablation configs: a TOML file, validated up front, hashed for the results folder.

Schema (every key but ``tasks``, ``policies`` and ``seeds`` is optional)::

    name = "quickstart"                 # a label for the report
    seeds = [0, 1, 2]                   # final-run seeds
    device = "cpu"                      # or "cuda" (falls back to an error if absent)
    tasks = ["digits_cnn"]              # names, or [[tasks]] tables (below)
    policies = ["uniform", "curvature"] # preset names, or [policies.NAME] tables

    [[tasks]]                           # one table per task
    name = "mnist1d_mlp"                # registry name or "package.module:factory"
    label = "mlp"                       # optional: the name used in run ids and the report
    steps = 1000                        # budget/recipe overrides: steps, batch_size,
    lr_grid = [1e-3, 3e-3]              #   eval_every, target, optimizer, lr_grid,
    options = { val_fraction = 0.2 }    #   weight_decay, momentum; factory options

    [policies.layer_decay]              # a preset with keys overridden, or a new policy
    decay = 0.6                         # (kind = ..., see experiments.policy_specs)

    [tuning]
    seeds = [1000]                      # tuning seeds, disjoint from the final seeds
    steps = 500                         # tuning budget (default: the task's steps)

    [schedule]                          # the base schedule (policies.schedules.from_spec);
    name = "cosine"                     # the string "budget" stands for the run's steps
    total_steps = "budget"

    [grouping]                          # policies.group_parameters options; the task's
    strategy = "depth"                  # head patterns unless "head" is given

    [monitor]                           # per-group sensitivity at every evaluation
    probes = 8                          # (0 switches it off)

    [settings.NAME]                     # optional variants crossed with everything else:
    schedule = { name = "constant" }    #   schedule, grouping and task overrides,
    options = { label_noise = 0.2 }     #   task factory options (a data regime), and the
    sam = { rho = 0.05 }                #   update keys every policy takes (sam,
                                        #   normalize_grads; experiments.policy_specs)

Every problem raises :class:`~layerwise.experiments.errors.UsageError` with one line naming the
file, the key and the value. The config hash is the SHA-256 of the parsed TOML as
canonical JSON, so comments and formatting do not change it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerwise.experiments.config_sections import (
    TaskEntry,
    as_table,
    check_grouping,
    check_schedule,
    fail,
    int_list,
    parse_policies,
    parse_settings,
    parse_tasks,
    setting_parts,
    substitute_budget,
)
from layerwise.experiments.errors import UsageError

__all__ = [
    "AblationConfig",
    "TaskEntry",
    "config_hash",
    "load_config",
    "parse_config",
    "substitute_budget",
]

_TOP = {
    "name",
    "description",
    "seeds",
    "device",
    "tasks",
    "policies",
    "tuning",
    "schedule",
    "grouping",
    "monitor",
    "settings",
}
_MONITOR_DEFAULT = {
    "probes": 8,
    "quantities": ["hessian_trace", "grad_variance"],
    "batch_size": 128,
}


@dataclass(frozen=True)
class AblationConfig:
    """A validated ablation config (see the module docstring)."""

    name: str
    seeds: tuple[int, ...]
    tasks: tuple[TaskEntry, ...]
    policies: dict[str, dict[str, Any]]
    tuning_seeds: tuple[int, ...]
    tuning_steps: int | None
    schedule: dict[str, Any]
    grouping: dict[str, Any]
    monitor: dict[str, Any]
    settings: dict[str, dict[str, Any]]
    device: str
    raw: dict[str, Any]
    hash: str
    description: str = ""


def config_hash(raw: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of ``raw`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(raw, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def load_config(path: str | Path) -> AblationConfig:
    """Read and validate the TOML file at ``path``."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError as exc:
            raise UsageError("reading TOML on Python 3.10 needs the 'tomli' package") from exc
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config {str(path)!r} does not exist")
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config {path.name}: not valid TOML ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"config {path.name}: not UTF-8 text ({exc.reason})") from exc
    return parse_config(raw, source=path.name)


def _check_setting_overrides(
    source: str, tasks: tuple[TaskEntry, ...], settings: dict[str, dict[str, Any]]
) -> None:
    """Build every task under every setting's overrides now, so that a bad value is refused
    before the results folder is claimed (not when the runs are planned or executed)."""
    from layerwise.experiments.tasks import get_task

    for name, variant in settings.items():
        parts = setting_parts(variant)
        if not (parts.overrides or parts.options):
            continue
        for i, entry in enumerate(tasks):
            try:
                get_task(entry.name, **{**entry.options, **parts.options}).with_overrides(
                    **{**entry.overrides, **parts.overrides}
                )
            except (UsageError, ValueError, TypeError) as exc:
                raise fail(source, f"settings.{name} on tasks[{i}] ({entry.label}): {exc}") from exc


def parse_config(raw: Mapping[str, Any], source: str = "<config>") -> AblationConfig:
    """Validate the parsed TOML ``raw`` (see the module docstring) into a config."""
    if not isinstance(raw, Mapping):
        raise fail(source, f"must be a table, got {type(raw).__name__}")
    raw = copy.deepcopy(dict(raw))
    unknown = set(raw) - _TOP
    if unknown:
        raise fail(source, f"unknown key(s) {sorted(unknown)}; known: {sorted(_TOP)}")
    for key in ("seeds", "tasks", "policies"):
        if key not in raw:
            raise fail(source, f"missing key {key!r}")
    name = raw.get("name", Path(source).stem)
    if not isinstance(name, str):
        raise fail(source, f"name must be a string, got {name!r}")
    seeds = int_list(source, "seeds", raw["seeds"])
    tasks = parse_tasks(source, raw["tasks"])
    policies = parse_policies(source, raw["policies"])
    tuning = as_table(source, "tuning", raw.get("tuning", {}))
    bad = set(tuning) - {"seeds", "steps"}
    if bad:
        raise fail(source, f"unknown key(s) {sorted(bad)} in [tuning]; known: seeds, steps")
    tuning_seeds = int_list(source, "tuning.seeds", tuning.get("seeds", [1000]))
    if set(tuning_seeds) & set(seeds):
        raise fail(source, f"tuning.seeds {list(tuning_seeds)} overlap seeds {list(seeds)}")
    tuning_steps = tuning.get("steps")
    if tuning_steps is not None and (
        isinstance(tuning_steps, bool) or not isinstance(tuning_steps, int) or tuning_steps < 1
    ):
        raise fail(source, f"tuning.steps must be a positive integer, got {tuning_steps!r}")
    schedule = as_table(source, "schedule", raw.get("schedule", {"name": "constant"}))
    check_schedule(source, "schedule", schedule)
    grouping = as_table(source, "grouping", raw.get("grouping", {"strategy": "depth"}))
    check_grouping(source, "grouping", grouping)
    monitor = {**_MONITOR_DEFAULT, **as_table(source, "monitor", raw.get("monitor", {}))}
    bad = set(monitor) - set(_MONITOR_DEFAULT)
    if bad:
        raise fail(
            source, f"unknown key(s) {sorted(bad)} in [monitor]; known: {sorted(_MONITOR_DEFAULT)}"
        )
    for key in ("probes", "batch_size"):
        v = monitor[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise fail(source, f"monitor.{key} must be an integer >= 0, got {v!r}")
    settings = parse_settings(source, raw.get("settings", {"default": {}}))
    _check_setting_overrides(source, tasks, settings)
    device = raw.get("device", "cpu")
    if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise fail(source, f"device must be 'cpu', 'cuda[:N]' or 'mps', got {device!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise fail(source, f"description must be a string, got {description!r}")
    return AblationConfig(
        name=name,
        seeds=seeds,
        tasks=tasks,
        policies=policies,
        tuning_seeds=tuning_seeds,
        tuning_steps=tuning_steps,
        schedule=schedule,
        grouping=grouping,
        monitor=monitor,
        settings=settings,
        device=device,
        raw=raw,
        hash=config_hash(raw),
        description=description,
    )
