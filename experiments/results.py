"""Read an ablation's results folder into tables (only finished runs count).

:func:`load_results` returns a :class:`Results` of pandas DataFrames:

* ``runs``: one row per finished run, its done marker (summary) flattened: ``run_id``,
  ``kind`` ("tune"/"final"), ``task``, ``policy``, ``setting``, ``seed``, ``lr``,
  ``status``, ``val_metric``, ``test_metric`` (final runs), ``steps_to_target``,
  ``target``, ``train_time``, ``wall_time``, ``fallback_events``...;
* ``curves``: one row per evaluation of a final run: ``step``, ``train_loss``,
  ``val_loss``, ``val_metric``, with the run's keys;
* ``groups``: one row per evaluation and group of a final run: ``group``, ``lr``,
  ``multiplier``, ``grad_norm``, ``curvature``, ``noise``, with the run's keys;
* ``events``: the fallback and other controller events of final runs.

``group_order[task]`` lists the task's groups input to output and ``task_info[task]`` is
the task section of a manifest (description, budget, recipe, data sizes and hash).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from layerwise.experiments.atomic import read_json
from layerwise.experiments.manifest import is_finished, read_done, read_manifest
from layerwise.experiments.rundirs import RUNS

__all__ = ["KEYS", "Results", "load_results"]

KEYS = ["run_id", "task", "policy", "setting", "seed"]
_GROUP_QUANTITIES = ("lr", "multiplier", "grad_norm", "curvature", "noise")


@dataclass
class Results:
    """The tables of an ablation (see the module docstring)."""

    runs: pd.DataFrame
    curves: pd.DataFrame
    groups: pd.DataFrame
    events: pd.DataFrame
    group_order: dict[str, list[str]] = field(default_factory=dict)
    task_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    policy_order: list[str] = field(default_factory=list)
    tuning: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def finals(self) -> pd.DataFrame:
        """The final runs only."""
        if self.runs.empty:
            return self.runs
        return self.runs[self.runs["kind"] == "final"]


def _long_groups(frame: pd.DataFrame, keys: dict[str, Any], groups: list[str]) -> pd.DataFrame:
    parts = []
    for group in groups:
        part = pd.DataFrame({"step": frame["step"], "group": group})
        for q in _GROUP_QUANTITIES:
            column = f"{q}/{group}"
            part[q] = frame[column] if column in frame else float("nan")
        parts.append(part)
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    for k, v in keys.items():
        out[k] = v
    return out


def load_results(out: str | Path) -> Results:
    """Load every finished run under ``out/runs`` (module docstring)."""
    out = Path(out)
    runs_dir = out / RUNS
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{out} holds no ablation results (no {RUNS}/ folder)")
    meta = read_json(out / "ablation.json") if (out / "ablation.json").is_file() else {}
    tuning = read_json(out / "tuning.json") if (out / "tuning.json").is_file() else {}
    rows, curves, groups, events = [], [], [], []
    group_order: dict[str, list[str]] = {}
    task_info: dict[str, dict[str, Any]] = {}
    for run_dir in sorted(p for p in runs_dir.iterdir() if not p.name.startswith(".")):
        if not is_finished(run_dir):
            continue
        done, manifest = read_done(run_dir), read_manifest(run_dir)
        rows.append(done)
        if done["kind"] != "final":
            continue
        keys = {k: done[k] for k in KEYS}
        names = [g["name"] for g in manifest["groups"]["groups"]]
        group_order.setdefault(done["task"], names)
        task_info.setdefault(done["task"], manifest["task"])
        metrics = pd.read_csv(run_dir / "metrics.csv")
        metric_col = f"val_{done['metric']}"
        curve = metrics[["step", "train_loss", "val_loss", metric_col]].rename(
            columns={metric_col: "val_metric"}
        )
        curves.append(curve.assign(**keys))
        groups.append(_long_groups(metrics, keys, names))
        if (run_dir / "events.csv").is_file():
            ev = pd.read_csv(run_dir / "events.csv")
            if not ev.empty:
                events.append(ev.assign(**keys))
    config = meta.get("config", {})
    order = list(config.get("policies", [])) if config else []
    runs = pd.DataFrame(rows)
    if not order and not runs.empty:
        order = list(dict.fromkeys(runs["policy"]))
    return Results(
        runs=runs,
        curves=pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(),
        groups=pd.concat(groups, ignore_index=True) if groups else pd.DataFrame(),
        events=pd.concat(events, ignore_index=True)
        if events
        else pd.DataFrame(columns=[*KEYS, "step", "event", "fallback", "skipped"]),
        group_order=group_order,
        task_info=task_info,
        policy_order=order,
        tuning=tuning,
        meta=meta,
    )
