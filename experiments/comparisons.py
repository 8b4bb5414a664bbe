"""Per task and setting: each policy's final test metric against ``uniform``.

:func:`summarise` gives one row per (task, setting, policy) of final runs:

* ``n``, ``lr`` (the tuned base rate), ``test_mean`` with its percentile-bootstrap
  interval ``test_low``/``test_high`` (:func:`layerwise.experiments.statistics.bootstrap_ci`);
* against ``uniform``: ``delta`` (difference of mean test metric, policy minus uniform)
  and its bootstrap interval, the t-test (``paired`` when both policies ran the same
  seeds, else ``welch``) with ``p`` and the Holm-adjusted ``p_holm`` over the policies of
  the task and setting, the effect size (``d_z`` paired, Hedges' ``g`` otherwise) and
  ``verdict`` ("better", "worse" or "no significant difference" at ``alpha`` after Holm);
* ``steps_median``: median over seeds of the first evaluation step at which the
  validation metric reached the task's target (``inf`` when most seeds never did),
  ``reached`` (how many seeds did), ``train_time`` (mean seconds), ``fallback_events``
  (total), ``diverged`` (runs stopped on a non-finite loss).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from layerwise.experiments.statistics import bootstrap_ci, compare, holm

__all__ = ["BASELINE", "summarise"]

BASELINE = "uniform"


def _order(policies: list[str], preferred: list[str]) -> list[str]:
    ranked = [p for p in preferred if p in policies]
    return ranked + sorted(p for p in policies if p not in ranked)


def summarise(
    finals: pd.DataFrame,
    policy_order: list[str] | None = None,
    confidence: float = 0.95,
    alpha: float = 0.05,
    family: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The comparison table (module docstring) of the final runs ``finals``. With
    ``family`` (:func:`layerwise.experiments.paired_comparisons.paired_comparisons`), the
    Holm p-value and the verdict of each policy are those of its ``final_metric`` row:
    adjusted over the whole family rather than over the policies of one task."""
    if finals is None or finals.empty:
        return pd.DataFrame()
    rows = []
    for (task, setting), cell in finals.groupby(["task", "setting"], sort=False):
        scored = cell[np.isfinite(cell["test_metric"].astype(float))]  # what the tests use
        base = scored[scored["policy"] == BASELINE].sort_values("seed")
        cell_rows = []
        for policy in _order(list(cell["policy"].unique()), policy_order or []):
            runs = cell[cell["policy"] == policy].sort_values("seed")
            values = runs["test_metric"].astype(float).to_numpy()
            values = values[np.isfinite(values)]
            mean, low, high = bootstrap_ci(values, confidence) if len(values) else (math.nan,) * 3
            steps = runs["steps_to_target"].astype(float).to_numpy()
            row = {
                "task": task,
                "setting": setting,
                "policy": policy,
                "n": len(values),
                "metric": str(runs["metric"].iloc[0]),
                "lr": float(runs["lr"].iloc[0]),
                "test_mean": mean,
                "test_low": low,
                "test_high": high,
                "steps_median": float(np.median(steps)) if len(steps) else math.nan,
                "reached": int(np.isfinite(steps).sum()),
                "train_time": float(runs["train_time"].mean()),
                "fallback_events": int(runs["fallback_events"].sum()),
                "diverged": int((runs["status"] == "diverged").sum()),
                "delta": math.nan,
                "delta_low": math.nan,
                "delta_high": math.nan,
                "test": "",
                "statistic": math.nan,
                "p": math.nan,
                "effect": math.nan,
            }
            runs = runs[np.isfinite(runs["test_metric"].astype(float))]
            if policy != BASELINE and len(base) >= 2 and len(runs) >= 2:
                paired = list(runs["seed"]) == list(base["seed"])
                c = compare(
                    runs["test_metric"].astype(float),
                    base["test_metric"].astype(float),
                    paired=paired,
                    confidence=confidence,
                )
                row.update(
                    delta=c.delta,
                    delta_low=c.delta_low,
                    delta_high=c.delta_high,
                    test=c.test.name,
                    statistic=c.test.statistic,
                    p=c.test.p_value,
                    effect=c.effect_size,
                )
            cell_rows.append(row)
        adjusted = holm([r["p"] for r in cell_rows])
        for row, p_holm in zip(cell_rows, adjusted, strict=True):
            row["p_holm"] = p_holm
            if row["policy"] == BASELINE or math.isnan(p_holm):
                row["verdict"] = "baseline" if row["policy"] == BASELINE else "not tested"
            elif p_holm < alpha:
                row["verdict"] = "better" if row["delta"] > 0 else "worse"
            else:
                row["verdict"] = "no significant difference"
        rows.extend(cell_rows)
    table = pd.DataFrame(rows)
    if family is not None and not family.empty and not table.empty:
        _from_family(table, family)
    return table


def _from_family(table: pd.DataFrame, family: pd.DataFrame) -> None:
    """Take ``p_holm`` and ``verdict`` from the family's ``final_metric`` rows."""
    rows = family[family["metric"] == "final_metric"].set_index(["task", "setting", "policy"])
    for i, r in table.iterrows():
        key = (r["task"], r["setting"], r["policy"])
        if r["policy"] == BASELINE or key not in rows.index:
            continue
        p_holm, verdict = rows.loc[key, "p_holm"], rows.loc[key, "verdict"]
        table.at[i, "p_holm"] = p_holm
        plain = "no significant difference" if verdict == "indistinguishable" else verdict
        table.at[i, "verdict"] = plain
