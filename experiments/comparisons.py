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

__all__ = ["BASELINE", "summarise", "verdict_lines"]

BASELINE = "uniform"


def _order(policies: list[str], preferred: list[str]) -> list[str]:
    ranked = [p for p in preferred if p in policies]
    return ranked + sorted(p for p in policies if p not in ranked)


def summarise(
    finals: pd.DataFrame,
    policy_order: list[str] | None = None,
    confidence: float = 0.95,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """The comparison table (module docstring) of the final runs ``finals``."""
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
    return pd.DataFrame(rows)


def _pp(value: float) -> str:
    return f"{100 * value:+.2f} pp"


def verdict_lines(table: pd.DataFrame, alpha: float = 0.05) -> list[str]:
    """One Markdown bullet per (task, setting, policy) saying what the policy did."""
    lines = []
    if table.empty:
        return lines
    for _, row in table[table["policy"] != BASELINE].iterrows():
        where = row["task"] + ("" if row["setting"] == "default" else f" ({row['setting']})")
        if row["verdict"] == "not tested":
            lines.append(
                f"- **{row['policy']}** on {where}: too few runs to test "
                f"(mean {100 * row['test_mean']:.2f}%)."
            )
            continue
        name = "d_z" if row["test"] == "paired" else "g"
        effect = (
            f"{name} = {row['effect']:.2f}"
            if math.isfinite(row["effect"])
            else f"{name} undefined (no spread)"
        )
        detail = (
            f"{_pp(row['delta'])} test {row['metric']} vs uniform (95% CI {_pp(row['delta_low'])}"
            f" to {_pp(row['delta_high'])}; {row['test']} t-test p = {row['p']:.3g}, Holm "
            f"p = {row['p_holm']:.3g}; {effect}, n = {row['n']})"
        )
        if row["verdict"] == "better":
            head = f"**helped**, significantly at {alpha:g} after Holm"
        elif row["verdict"] == "worse":
            head = f"**hurt**, significantly at {alpha:g} after Holm"
        else:
            head = "no significant difference"
        lines.append(f"- **{row['policy']}** on {where}: {head}: {detail}.")
    return lines
