"""Fair tuning of each policy's base rate: several seeds, failures last, grids bracketed.

Every (task, setting, policy) *cell* tunes its base rate by the same rule:

1. **Score.** Each rate of the cell's grid runs once per tuning seed
   (:attr:`TuningRule.seeds`, at least 2 by default) on the validation split. A run
   *fails* when it diverged (status ``"diverged"``, or a non-finite final validation
   metric) or *collapsed late*: its final validation metric fell from the best it reached
   during the run by more than ``collapse_drop`` of that best
   (``best - final > collapse_drop * |best|``; 0.25 by default).
2. **Rank** (:func:`rank_rates`). A rate that failed on any tuning seed ranks below every
   rate that did not; within each class rates rank by the mean final validation metric
   over the seeds (higher first), then by the mean final validation loss (lower first),
   then by the smaller rate.
3. **Bracket** (:func:`next_rate`). If the best rate sits at an edge of the grid, the grid
   extends geometrically past that edge: the new rate is the edge rate times (or divided
   by) ``extend_factor``, by default the grid's own ratio at that edge
   (``grid[-1] / grid[-2]`` at the top, ``grid[1] / grid[0]`` at the bottom), rounded to
   6 significant digits. The new rate runs on every tuning seed and the cell is ranked
   again, until the best rate is interior (*bracketed*) or ``max_extensions`` rates have
   been added (3 by default; 0 switches extension off). A cell whose best rate is still
   at an edge when the cap is reached is *not bracketed*: ``tuning.json`` and the report
   say so. The rule depends only on the grid and the scores, so every policy is treated
   the same; it is deterministic, so a resumed ablation replays the same decisions from
   the finished runs' done markers and runs only what is missing.

:class:`Tuner` holds the state of every cell while an ablation runs, and
:meth:`Tuner.to_json` is ``tuning.json``: per cell ``"task/setting/policy"`` the
``initial_grid``, the ``grid`` after extension, the ``extensions`` (each added rate and
the side), ``chosen_lr``, ``bracketed``, ``status`` (``"pending"``, ``"done"``,
``"failed"``: a tuning run raised) and ``scores``: per rate the per-seed results
(``val_metric``, ``val_loss``, ``best_val_metric``, ``status``, ``failed``) and the means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "RateScore",
    "Tuner",
    "TuningRule",
    "extended_grids",
    "is_bracketed",
    "next_rate",
    "rank_rates",
    "run_failed",
]


@dataclass(frozen=True)
class TuningRule:
    """How rates are tuned (module docstring); the ``[tuning]`` section of a config."""

    seeds: tuple[int, ...] = (1000, 1001)
    steps: int | None = None
    max_extensions: int = 3
    extend_factor: float | None = None
    collapse_drop: float = 0.25

    def __post_init__(self) -> None:
        seeds = tuple(self.seeds)
        if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
            raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {self.seeds!r}")
        object.__setattr__(self, "seeds", seeds)
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        m = self.max_extensions
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= 20:
            raise ValueError(f"max_extensions must be an integer in [0, 20], got {m!r}")
        f = self.extend_factor
        if f is not None and (
            isinstance(f, bool) or not isinstance(f, int | float) or not 1 < f <= 100
        ):
            raise ValueError(f"extend_factor must be a number in (1, 100], got {f!r}")
        c = self.collapse_drop
        if isinstance(c, bool) or not isinstance(c, int | float) or not 0 < c <= 1:
            raise ValueError(f"collapse_drop must be a number in (0, 1], got {c!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seeds": list(self.seeds)}


def run_failed(outcome: Mapping[str, Any], collapse_drop: float = 0.25) -> bool:
    """Whether a tuning run diverged or collapsed late (module docstring, step 1).

    >>> run_failed({"status": "ok", "val_metric": 0.5, "best_val_metric": 0.9})
    True
    >>> run_failed({"status": "ok", "val_metric": 0.85, "best_val_metric": 0.9})
    False
    """
    final = float(outcome.get("val_metric", math.nan))
    best = float(outcome.get("best_val_metric", final))
    if outcome.get("status", "ok") != "ok" or not math.isfinite(final):
        return True
    return math.isfinite(best) and best - final > collapse_drop * abs(best)


@dataclass(frozen=True)
class RateScore:
    """One rate's tuning results: per seed, and the means over the seeds."""

    lr: float
    per_seed: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any(r["failed"] for r in self.per_seed.values())

    def mean(self, key: str) -> float:
        values = [float(r[key]) for r in self.per_seed.values()]
        return sum(values) / len(values) if values else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "per_seed": {str(s): r for s, r in sorted(self.per_seed.items())},
            "val_metric": self.mean("val_metric"),
            "val_loss": self.mean("val_loss"),
            "failed": self.failed,
            "runs": len(self.per_seed),
        }


def rank_rates(scores: Mapping[float, RateScore]) -> list[float]:
    """The rates, best first (module docstring, step 2).

    >>> ok = lambda m, v: {"val_metric": m, "val_loss": v, "failed": False}
    >>> bad = {"val_metric": 0.99, "val_loss": 0.0, "failed": True}
    >>> rank_rates({
    ...     0.1: RateScore(0.1, {0: bad, 1: ok(0.99, 0.0)}),  # failed on one seed: last
    ...     0.01: RateScore(0.01, {0: ok(0.8, 0.5), 1: ok(0.88, 0.5)}),  # mean 0.84
    ...     0.001: RateScore(0.001, {0: ok(0.85, 0.4), 1: ok(0.85, 0.4)}),
    ... })
    [0.001, 0.01, 0.1]
    """
    if not scores:
        raise ValueError("scores: no rates to rank")

    def key(lr: float) -> tuple[bool, float, float, float]:
        s = scores[lr]
        m, v = s.mean("val_metric"), s.mean("val_loss")
        return (
            s.failed,
            -m if math.isfinite(m) else math.inf,
            v if math.isfinite(v) else math.inf,
            lr,
        )

    return sorted(scores, key=key)


def is_bracketed(grid: Sequence[float], chosen: float) -> bool:
    """Whether ``chosen`` has a tried rate on each side of it in ``grid``.

    >>> is_bracketed([0.001, 0.003, 0.01], 0.003), is_bracketed([0.001, 0.003, 0.01], 0.01)
    (True, False)
    """
    return min(grid) < chosen < max(grid)


def next_rate(grid: Sequence[float], chosen: float, extend_factor: float | None = None) -> float:
    """The rate past the edge of ``grid`` at which ``chosen`` sits (module docstring, step 3);
    ``chosen`` must be the smallest or the largest rate of a grid of at least 2 rates.

    >>> next_rate([0.001, 0.003, 0.01], 0.01)
    0.0333333
    >>> next_rate([0.001, 0.003, 0.01], 0.001, extend_factor=10)
    0.0001
    """
    rates = sorted(float(v) for v in grid)
    if len(rates) < 2:
        raise ValueError(f"grid needs at least 2 rates to extend, got {list(grid)!r}")
    if chosen == rates[-1]:
        factor = extend_factor or rates[-1] / rates[-2]
        return float(f"{rates[-1] * factor:.6g}")
    if chosen == rates[0]:
        factor = extend_factor or rates[1] / rates[0]
        return float(f"{rates[0] / factor:.6g}")
    raise ValueError(f"chosen={chosen!r} is not at an edge of the grid {rates!r}")


@dataclass
class _Cell:
    initial_grid: tuple[float, ...]
    grid: list[float]
    scores: dict[float, RateScore] = field(default_factory=dict)
    extensions: list[dict[str, Any]] = field(default_factory=list)
    waiting: set[tuple[float, int]] = field(default_factory=set)
    status: str = "pending"
    chosen_lr: float | None = None
    bracketed: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        ranking = rank_rates(self.scores) if self.scores else []
        return {
            "status": self.status,
            "initial_grid": list(self.initial_grid),
            "grid": sorted(self.grid),
            "extensions": list(self.extensions),
            "chosen_lr": self.chosen_lr,
            "bracketed": self.bracketed,
            "scores": {
                f"{lr:g}": {**self.scores[lr].to_dict(), "rank": ranking.index(lr) + 1}
                for lr in sorted(self.scores)
            },
        }


class Tuner:
    """The tuning of every cell of an ablation while it runs (module docstring).

    ``grids`` maps each cell key ``(task label, setting, policy)`` to its initial grid;
    cells with a single rate are not tuned. :meth:`start` gives the first tuning runs as
    ``(key, lr, seed)``; :meth:`record` takes each finished one and returns
    ``(new runs, chosen rate or None)``.
    """

    def __init__(self, grids: Mapping[tuple[str, str, str], Sequence[float]], rule: TuningRule):
        if not isinstance(rule, TuningRule):
            raise TypeError(f"rule must be a TuningRule, got {type(rule).__name__}")
        self.rule = rule
        self.cells = {
            key: _Cell(tuple(float(v) for v in grid), sorted(float(v) for v in grid))
            for key, grid in grids.items()
            if len(grid) >= 2
        }

    def _runs(self, key, rates) -> list[tuple[tuple[str, str, str], float, int]]:
        cell = self.cells[key]
        out = [(key, lr, seed) for lr in rates for seed in self.rule.seeds]
        cell.waiting.update((lr, seed) for _, lr, seed in out)
        return out

    def start(self) -> list[tuple[tuple[str, str, str], float, int]]:
        """Every (cell key, rate, seed) of the initial grids."""
        return [run for key, cell in self.cells.items() for run in self._runs(key, cell.grid)]

    def record(
        self, key: tuple[str, str, str], lr: float, seed: int, outcome: Mapping[str, Any] | None
    ) -> tuple[list[tuple[tuple[str, str, str], float, int]], float | None]:
        """Record a finished tuning run (``outcome`` its summary, or ``None`` when it raised).
        Returns the runs to start next and, once the cell is decided, its chosen rate."""
        cell = self.cells[key]
        cell.waiting.discard((float(lr), seed))
        if outcome is None:
            cell.status = "failed"
        else:
            result = {k: outcome.get(k) for k in ("val_metric", "val_loss", "best_val_metric")}
            result["status"] = outcome.get("status", "ok")
            result["failed"] = run_failed(outcome, self.rule.collapse_drop)
            cell.scores.setdefault(float(lr), RateScore(float(lr))).per_seed[seed] = result
        if cell.waiting or cell.status == "failed":
            return [], None
        best = rank_rates(cell.scores)[0]
        if not is_bracketed(cell.grid, best) and len(cell.extensions) < self.rule.max_extensions:
            new = next_rate(cell.grid, best, self.rule.extend_factor)
            side = "up" if new > best else "down"
            cell.extensions.append({"lr": new, "side": side, "best_before": best})
            cell.grid.append(new)
            cell.grid.sort()
            return self._runs(key, [new]), None
        cell.status, cell.chosen_lr = "done", best
        cell.bracketed = is_bracketed(cell.grid, best)
        return [], best

    def grids(self) -> dict[tuple[str, str, str], list[float]]:
        """Each tuned cell's grid so far (extensions included)."""
        return {key: sorted(cell.grid) for key, cell in self.cells.items()}

    def to_json(self) -> dict[str, Any]:
        """The contents of ``tuning.json`` (module docstring)."""
        return {
            "rule": self.rule.to_dict(),
            "cells": {"/".join(key): cell.to_dict() for key, cell in self.cells.items()},
        }


def extended_grids(tuning: Mapping[str, Any]) -> dict[tuple[str, str, str], list[float]]:
    """``{cell key: grid}`` from the contents of a ``tuning.json`` (empty when it has none)."""
    cells = tuning.get("cells", {}) if isinstance(tuning, Mapping) else {}
    out = {}
    for name, cell in cells.items() if isinstance(cells, Mapping) else ():
        parts = tuple(name.split("/"))
        if len(parts) == 3 and isinstance(cell, Mapping) and isinstance(cell.get("grid"), list):
            out[parts] = [float(v) for v in cell["grid"]]
    return out
