"""The runs of an ablation: one :class:`RunSpec` per tuning run and per final run.

A run spec is plain data that determines a run completely (task and its overrides,
policy, setting, seed, base rate, schedule, grouping, monitor); its SHA-256 over
canonical JSON is the *spec hash* recorded in the manifest, and its :attr:`RunSpec.run_id`
names its folder. The grid is tasks x policies x settings, then

* tuning: every rate of the task's grid x ``tuning.seeds`` (skipped when the grid has a
  single rate), evaluated on the validation split only;
* final: every seed at the rate the tuning chose, with the test split evaluated once at
  the end.

Tuning picks, per (task, setting, policy), the rate with the highest mean final
validation metric over the tuning seeds; ties go to the lower mean final validation loss,
then to the smaller rate. Every policy gets the same grid and the same tuning budget.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from layerwise.experiments.config import AblationConfig, substitute_budget

__all__ = ["RunSpec", "choose_lr", "final_specs", "lr_grid", "planned_run_ids", "tuning_specs"]


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one run (see the module docstring)."""

    kind: str
    task: str
    task_label: str
    policy: str
    setting: str
    seed: int
    lr: float
    policy_spec: dict[str, Any]
    task_options: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=lambda: {"name": "constant"})
    grouping: dict[str, Any] = field(default_factory=lambda: {"strategy": "depth"})
    monitor: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.kind not in ("tune", "final"):
            raise ValueError(f"kind must be 'tune' or 'final', got {self.kind!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        object.__setattr__(self, "lr", float(self.lr))

    @property
    def evaluate_test(self) -> bool:
        """Final runs evaluate the test split once, at the end; tuning runs never."""
        return self.kind == "final"

    @property
    def group_key(self) -> tuple[str, str, str]:
        """(task label, setting, policy): the runs that share a tuned rate."""
        return (self.task_label, self.setting, self.policy)

    @property
    def run_id(self) -> str:
        """Stable folder name, e.g. ``final__digits_cnn__curvature__default__s0``."""
        parts = [self.kind, self.task_label, self.policy, self.setting]
        if self.kind == "tune":
            parts.append(f"lr{self.lr:g}")
        return "__".join([*parts, f"s{self.seed}"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSpec:
        """Inverse of :meth:`to_dict` (unknown or missing keys are an error)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a mapping, got {type(data).__name__}")
        return cls(**dict(data))

    @property
    def hash(self) -> str:
        """SHA-256 of :meth:`to_dict` as canonical JSON."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _cells(config: AblationConfig) -> Iterable[tuple[Any, str, dict, str, dict, Any]]:
    from layerwise.experiments.config_sections import setting_parts
    from layerwise.experiments.tasks import get_task

    for entry in config.tasks:
        for setting, variant in config.settings.items():
            parts = setting_parts(variant)
            overrides = {**entry.overrides, **parts.overrides}
            options = {**entry.options, **parts.options}
            task = get_task(entry.name, **options).with_overrides(**overrides)
            schedule = variant.get("schedule", config.schedule)
            grouping = variant.get("grouping", config.grouping)
            for policy, spec in config.policies.items():
                spec = {**spec, **parts.update}
                yield entry, setting, overrides, policy, spec, (task, schedule, grouping, options)


def lr_grid(config: AblationConfig) -> dict[tuple[str, str, str], tuple[float, ...]]:
    """The rate grid of every (task label, setting, policy)."""
    return {(e.label, s, p): extra[0].recipe.lr_grid for e, s, _, p, _, extra in _cells(config)}


def _spec(config, entry, setting, overrides, policy, spec, extra, kind, seed, lr, steps):
    task, schedule, grouping, options = extra
    overrides = dict(overrides)
    if steps is not None:
        overrides["steps"] = steps
    return RunSpec(
        kind=kind,
        task=entry.name,
        task_label=entry.label,
        policy=policy,
        setting=setting,
        seed=seed,
        lr=lr,
        policy_spec=spec,
        task_options=dict(options),
        overrides=overrides,
        schedule=substitute_budget(schedule, overrides.get("steps", task.budget.steps)),
        grouping=dict(grouping),
        monitor=dict(config.monitor),
        device=config.device,
    )


def tuning_specs(config: AblationConfig) -> list[RunSpec]:
    """Every tuning run (none for a cell whose grid has a single rate)."""
    out = []
    for entry, setting, overrides, policy, spec, extra in _cells(config):
        grid = extra[0].recipe.lr_grid
        if len(grid) < 2:
            continue
        for lr in grid:
            for seed in config.tuning_seeds:
                out.append(
                    _spec(
                        config,
                        entry,
                        setting,
                        overrides,
                        policy,
                        spec,
                        extra,
                        "tune",
                        seed,
                        lr,
                        config.tuning_steps,
                    )
                )
    return out


def final_specs(
    config: AblationConfig,
    chosen: Mapping[tuple[str, str, str], float],
    only: tuple[str, str, str] | None = None,
) -> list[RunSpec]:
    """The final runs at the ``chosen`` rate of each cell (of cell ``only`` if given)."""
    out = []
    for entry, setting, overrides, policy, spec, extra in _cells(config):
        key = (entry.label, setting, policy)
        if only is not None and key != only:
            continue
        grid = extra[0].recipe.lr_grid
        lr = grid[0] if len(grid) == 1 else chosen[key]
        for seed in config.seeds:
            out.append(
                _spec(
                    config, entry, setting, overrides, policy, spec, extra, "final", seed, lr, None
                )
            )
    return out


def planned_run_ids(config: AblationConfig) -> list[str]:
    """The run id of every run ``config`` plans: the tuning runs, then the final runs. A
    final run's id does not depend on the rate its tuning chooses, so the whole list is
    known before any run has finished (``layerwise report`` checks it against the
    results folder)."""
    ids = [spec.run_id for spec in tuning_specs(config)]
    any_rate = {key: grid[0] for key, grid in lr_grid(config).items()}  # ids ignore the rate
    return ids + [spec.run_id for spec in final_specs(config, any_rate)]


def choose_lr(results: Iterable[tuple[float, float, float]]) -> tuple[float, dict[float, dict]]:
    """Pick a rate from ``(lr, final val metric, final val loss)`` triples (one per tuning
    run). Returns the rate and, per rate, the mean metric and loss. Non-finite metrics
    (diverged runs) rank last.

    >>> choose_lr([(0.1, 0.8, 0.5), (0.01, 0.8, 0.4), (0.001, 0.7, 0.3)])[0]
    0.01
    """
    table: dict[float, list[tuple[float, float]]] = {}
    for lr, metric, loss in results:
        table.setdefault(float(lr), []).append((float(metric), float(loss)))
    if not table:
        raise ValueError("results: no tuning results to choose from")
    scores = {}
    for lr, values in table.items():
        metric = sum(m for m, _ in values) / len(values)
        loss = sum(v for _, v in values) / len(values)
        scores[lr] = {"val_metric": metric, "val_loss": loss, "runs": len(values)}

    def key(lr: float) -> tuple[float, float, float]:
        m, v = scores[lr]["val_metric"], scores[lr]["val_loss"]
        return (-(m if math.isfinite(m) else -math.inf), v if math.isfinite(v) else math.inf, lr)

    return min(scores, key=key), scores
