"""Every policy against the tuned ``uniform`` baseline, paired by seed: ``comparisons.csv``.

:func:`paired_comparisons` gives one row per (task, setting, policy, metric) for the three
questions "better" and "faster" ask, each a paired difference *policy minus uniform* over
the seeds both ran (a seed fixes the initialisation and the batch order):

* ``final_metric``: the test metric after the last step (higher is better);
* ``final_loss``: the test loss after the last step (lower is better);
* ``steps_to_target``: the first evaluation step at which the validation metric reached
  the task's target (lower is better), censored at the budget when a seed never reached
  it (:func:`layerwise.experiments.statistics.censored_differences`).

Each row holds ``n`` (pairs), the means, ``delta`` with its seeded percentile-bootstrap
interval ``ci_low``/``ci_high`` (exact enumeration up to 5 pairs), the test and its ``p``:
the paired t-test for the final metric and loss, the exact sign-flip permutation test for
steps to target (the censored differences are far from normal); ``p_sign_flip`` is the
sign-flip p-value for every metric, a check that needs no normality. ``p_holm`` is Holm's
adjustment over the whole family (every test of the results folder) and ``significant``
is ``p_holm < alpha``; ``verdict`` is "better", "worse" or "indistinguishable".

Power: ``mde`` is the minimum detectable effect at the run's ``n`` and observed standard
deviation of the differences ``sd`` (paired t, power 0.8, ``alpha`` 0.05,
:mod:`layerwise.experiments.power`); for steps to target it is ``inf`` when even the most
extreme sign pattern cannot reach ``alpha`` (``2 / 2**n > alpha``).
``seeds_for_effect`` is the number of seeds that would detect ``effect`` (1 pp of
accuracy; 5% of the baseline's loss; 10% of the budget in steps) at that ``sd`` (for steps
at least the ``ceil(log2(2 / alpha))`` pairs the sign-flip test needs to reach ``alpha``).
``resolution`` is the smallest change the metric can show (one test example, ``1 / test
size``; ``eval_every`` steps; none for the loss) and ``resolution_warning`` flags a row
where it is at least half the larger of ``|delta|`` and ``mde``.

Cost, per policy (the same on its three rows; means per final run): ``passes`` in
forward+backward passes (training steps plus the estimation's work,
:mod:`layerwise.experiments.costs`), ``passes_ratio`` to uniform's, ``estimation_share``
(of the passes), ``train_s`` (training seconds, evaluation and monitoring excluded) and
``estimation_share_s`` (of those seconds). Runs written before passes were counted leave
these ``nan``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from layerwise.experiments.atomic import write_text
from layerwise.experiments.comparisons import BASELINE
from layerwise.experiments.power import minimum_detectable_effect, seeds_needed
from layerwise.experiments.statistics import (
    bootstrap_ci,
    censored_differences,
    holm,
    paired_test,
    sign_flip_floor,
    sign_flip_test,
)

__all__ = ["BASELINE", "COLUMNS", "METRICS", "paired_comparisons", "write_comparisons"]

#: The metrics compared, and whether higher is better.
METRICS = {"final_metric": True, "final_loss": False, "steps_to_target": False}
COLUMNS = [
    "task",
    "setting",
    "policy",
    "metric",
    "n",
    "baseline_mean",
    "policy_mean",
    "delta",
    "ci_low",
    "ci_high",
    "test",
    "p",
    "p_sign_flip",
    "p_holm",
    "mde",
    "significant",
    "verdict",
    "sd",
    "effect",
    "seeds_for_effect",
    "resolution",
    "resolution_warning",
    "censored_policy",
    "censored_baseline",
    "dropped",
    "passes",
    "passes_ratio",
    "estimation_share",
    "train_s",
    "estimation_share_s",
]


def _test_size(info: Mapping[str, Any]) -> int | None:
    sizes = info.get("data", {}).get("sizes", {}) if isinstance(info, Mapping) else {}
    size = sizes.get("test") if isinstance(sizes, Mapping) else None
    return int(size) if isinstance(size, int | float) and size > 0 else None


def _column(runs: pd.DataFrame, name: str) -> pd.Series:
    return runs[name].astype(float) if name in runs else pd.Series(math.nan, index=runs.index)


def _cost(runs: pd.DataFrame) -> dict[str, float]:
    """Mean cost per run of one policy (module docstring)."""
    train, est = _column(runs, "passes_train"), _column(runs, "passes_estimation")
    seconds, est_s = _column(runs, "train_time"), _column(runs, "estimation_time")
    passes = float((train + est).mean())
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "passes": passes,
            "estimation_share": float(est.mean() / passes) if passes else math.nan,
            "train_s": float(seconds.mean()),
            "estimation_share_s": float(est_s.mean() / seconds.mean())
            if seconds.mean()
            else math.nan,
        }


def _values(runs: pd.DataFrame, metric: str) -> pd.Series:
    column = {"final_metric": "test_metric", "final_loss": "test_loss"}.get(metric, metric)
    return _column(runs, column).set_axis(runs["seed"].to_numpy())


def _row(metric, pol, base, budget, eval_every, test_size, alpha, power, seed) -> dict:
    higher = METRICS[metric]
    a, b = _values(pol, metric), _values(base, metric)
    seeds = sorted(set(a.index) & set(b.index))
    a, b = a.loc[seeds], b.loc[seeds]
    row: dict[str, Any] = {"metric": metric, "censored_policy": 0, "censored_baseline": 0}
    if metric == "steps_to_target":
        keep = ~(a.isna() | b.isna())
        d, row["censored_policy"], row["censored_baseline"] = censored_differences(
            a[keep], b[keep], budget
        )
        capped_b = np.minimum(b[keep].to_numpy(), budget)
        resolution = float(eval_every) if eval_every else math.nan
        effect = 0.1 * budget
    else:
        keep = np.isfinite(a) & np.isfinite(b)
        d = (a[keep] - b[keep]).to_numpy()
        capped_b = b[keep].to_numpy()
        resolution = 1.0 / test_size if metric == "final_metric" and test_size else math.nan
        effect = 0.01 if metric == "final_metric" else 0.05 * abs(float(np.mean(capped_b)))
    n = int(d.size)
    row.update(n=n, dropped=len(seeds) - n, resolution=resolution, effect=effect)
    row["baseline_mean"] = float(np.mean(capped_b)) if n else math.nan
    row["policy_mean"] = row["baseline_mean"] + float(np.mean(d)) if n else math.nan
    row["delta"], row["ci_low"], row["ci_high"] = (
        bootstrap_ci(d, seed=seed) if n else (math.nan,) * 3
    )
    sd = float(np.std(d, ddof=1)) if n >= 2 else math.nan
    row["sd"] = sd
    if n < 2:
        row.update(test="", p=math.nan, p_sign_flip=math.nan, mde=math.inf)
        row["seeds_for_effect"] = math.nan
    else:
        flip = sign_flip_test(d, seed=seed).p_value
        if metric == "steps_to_target":
            row.update(test="sign-flip", p=flip)
            floor_ok = sign_flip_floor(n) <= alpha
            row["mde"] = minimum_detectable_effect(sd, n, alpha, power) if floor_ok else math.inf
        else:
            row.update(test="paired t", p=paired_test(d, np.zeros(n)).p_value)
            row["mde"] = minimum_detectable_effect(sd, n, alpha, power)
        row["p_sign_flip"] = flip
        needed = seeds_needed(effect, sd, alpha, power) if effect > 0 else None
        if needed is not None and metric == "steps_to_target":  # the sign-flip test's floor
            needed = max(needed, math.ceil(math.log2(2 / alpha)))
        row["seeds_for_effect"] = math.nan if needed is None else needed
    scale = max(abs(row["delta"]) if n else 0.0, row["mde"] if math.isfinite(row["mde"]) else 0)
    row["resolution_warning"] = bool(math.isfinite(resolution) and resolution >= 0.5 * scale)
    row["_higher"] = higher
    return row


def paired_comparisons(
    finals: pd.DataFrame,
    task_info: Mapping[str, Mapping[str, Any]] | None = None,
    policy_order: list[str] | None = None,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    seed: int = 0,
) -> pd.DataFrame:
    """The comparison family of the final runs ``finals`` (module docstring), ``COLUMNS``."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if finals is None or finals.empty:
        return pd.DataFrame(columns=COLUMNS)
    rows = []
    order = policy_order or []
    for (task, setting), cell in finals.groupby(["task", "setting"], sort=False):
        base = cell[cell["policy"] == BASELINE]
        if base.empty:
            continue
        info = (task_info or {}).get(task, {})
        plan = info.get("budget", {}) if isinstance(info, Mapping) else {}
        budget = float(_column(cell, "budget_steps").max())
        budget = budget if math.isfinite(budget) else float(plan.get("steps") or math.nan)
        eval_every = plan.get("eval_every")
        base_cost = _cost(base)
        policies = list(cell["policy"].unique())
        ranked = [p for p in order if p in policies] + sorted(p for p in policies if p not in order)
        for policy in ranked:
            if policy == BASELINE:
                continue
            pol = cell[cell["policy"] == policy]
            cost = _cost(pol)
            cost["passes_ratio"] = (
                cost["passes"] / base_cost["passes"] if base_cost["passes"] else math.nan
            )
            for metric in METRICS:
                if metric == "steps_to_target" and not (budget > 0):  # budget unknown
                    continue
                size = _test_size(info)
                row = _row(metric, pol, base, budget, eval_every, size, alpha, power, seed)
                rows.append({"task": task, "setting": setting, "policy": policy, **row, **cost})
    if not rows:
        return pd.DataFrame(columns=COLUMNS)
    for row, p_holm in zip(rows, holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = p_holm
        row["significant"] = bool(math.isfinite(p_holm) and p_holm < alpha)
        good = (row["delta"] > 0) == row.pop("_higher")
        row["verdict"] = (
            ("better" if good else "worse") if row["significant"] else "indistinguishable"
        )
        if not math.isfinite(p_holm):
            row["verdict"] = "not tested"
    return pd.DataFrame(rows)[COLUMNS]


def write_comparisons(table: pd.DataFrame, out: str | Path) -> Path:
    """Write ``table`` to ``out/comparisons.csv`` atomically; return the path."""
    return write_text(Path(out) / "comparisons.csv", table.to_csv(index=False))
