"""Read an ablation's results folder into tables, and say which planned runs are not there.

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

**Nothing is dropped silently.** The planned runs are those of the config recorded in
``ablation.json`` (:func:`layerwise.experiments.plan.planned_run_ids`: every tuning run,
on the grids as extended in ``tuning.json``, and every final run; a final run's id does
not depend on the tuned rate). Each planned
run must be in ``runs/`` and readable (:mod:`layerwise.experiments.run_files`).
``Results.problems`` lists, one line each, every planned run that is missing (or failed:
``errors/<run id>.txt``), every run folder with a damaged or missing file (the line names
the file; the run is left out of the tables), every run folder the config does not plan,
and an unreadable ``ablation.json`` or ``tuning.json``; paths are relative to the results
folder. :func:`load_results` raises
:class:`~layerwise.experiments.errors.IncompleteResultsError` listing them, unless
``allow_incomplete=True``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from layerwise.experiments.atomic import read_json
from layerwise.experiments.errors import IncompleteResultsError
from layerwise.experiments.run_files import GROUP_QUANTITIES, read_events, read_metrics, read_run
from layerwise.experiments.rundirs import RUNS

__all__ = ["KEYS", "Results", "load_results"]

KEYS = ["run_id", "task", "policy", "setting", "seed"]
_EVENTS = [*KEYS, "step", "event", "fallback", "skipped"]


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
    problems: list[str] = field(default_factory=list)
    planned: int | None = None  # how many runs the config plans (None: unknown)

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
        for q in GROUP_QUANTITIES:
            column = f"{q}/{group}"
            part[q] = frame[column] if column in frame else float("nan")
        parts.append(part)
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    for k, v in keys.items():
        out[k] = v
    return out


class _Problems(list):
    """Problem lines, each with the results folder's prefix taken off its paths."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.prefix = f"{out}{os.sep}"

    def add(self, problem: BaseException | str) -> None:
        text = str(problem).strip() or type(problem).__name__
        self.append(text.replace(self.prefix, ""))


def _optional_json(out: Path, name: str, problems: _Problems) -> dict[str, Any]:
    path = out / name
    if not path.is_file():
        return {}
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        problems.add(exc)
        return {}
    if not isinstance(data, dict):
        problems.add(f"{name}: not a JSON object (a {type(data).__name__})")
        return {}
    return data


def _planned(
    out: Path, meta: dict[str, Any], tuning: dict[str, Any], problems: _Problems
) -> list[str] | None:
    """The run ids the config in ``ablation.json`` plans, on the tuning grids as extended in
    ``tuning.json`` (None, with a problem, if unknown)."""
    from layerwise.experiments.config import parse_config
    from layerwise.experiments.plan import planned_run_ids
    from layerwise.experiments.tuning import extended_grids

    if not (out / "ablation.json").is_file():
        problems.add("ablation.json: missing, so the planned runs are unknown")
        return None
    if not meta:
        return None  # unreadable: already a problem
    try:
        config = parse_config(meta.get("config"), source="ablation.json")
        return planned_run_ids(config, extended_grids(tuning))
    except Exception as exc:  # a user task that no longer imports, a changed schema...
        problems.add(f"ablation.json: cannot list the planned runs ({exc})")
        return None


def load_results(out: str | Path, *, allow_incomplete: bool = False) -> Results:
    """Load every finished run under ``out/runs`` (module docstring). Raises
    :class:`~layerwise.experiments.errors.IncompleteResultsError` when a planned run is
    missing or a file is damaged, unless ``allow_incomplete`` (then ``Results.problems``
    lists them and the tables hold the readable runs)."""
    if not isinstance(allow_incomplete, bool):
        raise TypeError(f"allow_incomplete must be a bool, got {allow_incomplete!r}")
    out = Path(out)
    runs_dir = out / RUNS
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{out} holds no ablation results (no {RUNS}/ folder)")
    problems = _Problems(out)
    meta = _optional_json(out, "ablation.json", problems)
    tuning = _optional_json(out, "tuning.json", problems)
    planned = _planned(out, meta, tuning, problems)
    rows, curves, groups, events = [], [], [], []
    group_order: dict[str, list[str]] = {}
    task_info: dict[str, dict[str, Any]] = {}
    present = sorted(p for p in runs_dir.iterdir() if not p.name.startswith(".") and p.is_dir())
    expected = None if planned is None else set(planned)
    for run_dir in present:
        if expected is not None and run_dir.name not in expected:
            problems.add(f"{RUNS}/{run_dir.name}: not a run of the config in ablation.json")
            continue
        try:
            done, manifest = read_run(run_dir, meta.get("config_hash"))
            names = [g["name"] for g in manifest["groups"]["groups"]]
            if done["kind"] == "final":
                metrics = read_metrics(run_dir / "metrics.csv", done, names)
                ev = read_events(run_dir / "events.csv")
        except (OSError, ValueError) as exc:
            problems.add(exc)
            continue
        rows.append(done)
        if done["kind"] != "final":
            continue
        keys = {k: done[k] for k in KEYS}
        group_order.setdefault(done["task"], names)
        task_info.setdefault(done["task"], manifest["task"])
        metric_col = f"val_{done['metric']}"
        curve = metrics[["step", "train_loss", "val_loss", metric_col]].rename(
            columns={metric_col: "val_metric"}
        )
        curves.append(curve.assign(**keys))
        groups.append(_long_groups(metrics, keys, names))
        if not ev.empty:
            events.append(ev.assign(**keys))
    _missing_runs(out, planned, {p.name for p in present}, problems)
    if problems and not allow_incomplete:
        raise IncompleteResultsError(
            f"{out}: {len(problems)} run(s) or file(s) missing or unreadable (listed below); "
            "run the same `layerwise ablate` again to finish missing runs (remove a damaged "
            "run's folder to have it redone), or report the rest with --allow-incomplete",
            list(problems),
        )
    config = meta.get("config", {})
    order = list(config.get("policies", [])) if isinstance(config, dict) else []
    runs = pd.DataFrame(rows)
    if not order and not runs.empty:
        order = list(dict.fromkeys(runs["policy"]))
    return Results(
        runs=runs,
        curves=pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(),
        groups=pd.concat(groups, ignore_index=True) if groups else pd.DataFrame(),
        events=pd.concat(events, ignore_index=True) if events else pd.DataFrame(columns=_EVENTS),
        group_order=group_order,
        task_info=task_info,
        policy_order=order,
        tuning=tuning,
        meta=meta,
        problems=list(problems),
        planned=None if planned is None else len(planned),
    )


def _missing_runs(
    out: Path, planned: list[str] | None, present: set[str], problems: _Problems
) -> None:
    """A line per planned run that has no folder: failed (its error file) or not run."""
    for run_id in planned or []:
        if run_id in present:
            continue
        if (out / "errors" / f"{run_id}.txt").is_file():
            problems.add(f"{RUNS}/{run_id}: missing; the run failed (see errors/{run_id}.txt)")
        else:
            problems.add(f"{RUNS}/{run_id}: missing (not run yet, or interrupted)")
