"""The Markdown sections of ``report.md`` drawn from the comparison family.

The family is :func:`layerwise.experiments.paired_comparisons.paired_comparisons`: one row
per (task, setting, policy, metric). :func:`verdict_lines` says per policy and task
where it helped, hurt or was indistinguishable, each with its minimum detectable effect;
:func:`family_table` is ``comparisons.csv`` as a table; :func:`power_section` the power,
resolution and seeds advice; :func:`cost_section` the cost per policy.
"""

from __future__ import annotations

import math

import pandas as pd

__all__ = [
    "cost_section",
    "family_table",
    "markdown_table",
    "mde_text",
    "power_section",
    "verdict_lines",
]

_UNITS = {"final_metric": "pp", "final_loss": "", "steps_to_target": "steps"}
_NAMES = {
    "final_metric": "test metric",
    "final_loss": "test loss",
    "steps_to_target": "steps to target",
}


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a Markdown table.

    >>> markdown_table(["a", "b"], [["1", "2"]])
    ['| a | b |', '|---|---|', '| 1 | 2 |']
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def fmt(metric: str, value: float, signed: bool = True) -> str:
    """``value`` in the metric's units: pp for the metric, steps, raw loss."""
    if value is None or not isinstance(value, int | float) or math.isnan(value):
        return "–"
    if math.isinf(value):
        return "∞"
    sign = "+" if signed else ""
    if metric == "final_metric":
        return f"{100 * value:{sign}.2f} pp"
    if metric == "steps_to_target":
        return f"{value:{sign}.0f} steps"
    return f"{value:{sign}.4f}"


def mde_text(row) -> str:
    """The MDE of a family row; below the metric's resolution it says so: the
    differences had no spread at the granularity the metric can show."""
    m, mde, res = row.metric, row.mde, row.resolution
    if isinstance(res, float) and math.isfinite(res) and math.isfinite(mde) and mde < res:
        return f"below the resolution, {fmt(m, res, False)}"
    return fmt(m, mde, False)


def _where(row) -> str:
    return row.task + ("" if row.setting == "default" else f" ({row.setting})")


def verdict_lines(family: pd.DataFrame) -> list[str]:
    """One Markdown bullet per (task, setting, policy): helped, hurt or indistinguishable on
    each metric, each with Δ, its interval, Holm p and the MDE."""
    lines = []
    if family is None or family.empty:
        return lines
    for (_, _, policy), rows in family.groupby(["task", "setting", "policy"], sort=False):
        parts = []
        for r in rows.itertuples():
            m = r.metric
            what = {"better": "**helped**", "worse": "**hurt**"}.get(r.verdict, r.verdict)
            parts.append(
                f"{_NAMES[m]} {what}: Δ {fmt(m, r.delta)} [{fmt(m, r.ci_low)}, "
                f"{fmt(m, r.ci_high)}], Holm p = {r.p_holm:.3g}, MDE {mde_text(r)}"
            )
        first = rows.iloc[0]
        head = f"- **{policy}** on {_where(first)} (n = {first['n']}): "
        lines.append(head + "; ".join(parts) + ".")
    return lines


def family_table(family: pd.DataFrame) -> list[str]:
    """``comparisons.csv`` as a Markdown table (the columns the issue asks for)."""
    if family is None or family.empty:
        return []
    header = ["task", "setting", "policy", "metric", "n", "Δ", "95% CI", "test", "p", "p (Holm)"]
    header += ["MDE", "significant"]
    rows = []
    for r in family.itertuples():
        m = r.metric
        rows.append(
            [
                r.task,
                r.setting,
                r.policy,
                m,
                str(r.n),
                fmt(m, r.delta),
                f"[{fmt(m, r.ci_low)}, {fmt(m, r.ci_high)}]",
                r.test or "–",
                "–" if math.isnan(r.p) else f"{r.p:.3g}",
                "–" if math.isnan(r.p_holm) else f"{r.p_holm:.3g}",
                mde_text(r),
                "**yes**" if r.significant else "no",
            ]
        )
    return markdown_table(header, rows)


def power_section(family: pd.DataFrame, alpha: float = 0.05) -> list[str]:
    """Per task, setting and metric: the MDE range, the seeds a stated effect needs, and a
    warning where the metric's resolution is about the size of the effects."""
    if family is None or family.empty:
        return []
    rows, warnings = [], []
    for (task, setting, metric), g in family.groupby(["task", "setting", "metric"], sort=False):
        finite = g["mde"][g["mde"].apply(lambda v: math.isfinite(v))]
        mde = (
            "∞"
            if finite.empty
            else f"{fmt(metric, finite.min(), False)} to {fmt(metric, finite.max(), False)}"
        )
        seeds = g["seeds_for_effect"].dropna()
        need = "–" if seeds.empty else f"{int(seeds.median())} (median over policies)"
        rows.append(
            [
                task,
                setting,
                metric,
                str(int(g["n"].max())),
                mde,
                fmt(metric, float(g["effect"].iloc[0]), False),
                need,
            ]
        )
        flagged = g[g["resolution_warning"].astype(bool)]
        if not flagged.empty:
            res = fmt(metric, float(flagged["resolution"].iloc[0]), False)
            warnings.append(
                f"- **Resolution:** on {task} ({setting}) the {_NAMES[metric]} moves in "
                f"increments of {res}, at least half the difference or the MDE of "
                f"{', '.join(flagged['policy'])}: effects that small are at the limit of "
                "what this metric can show."
            )
    header = ["task", "setting", "metric", "n", "MDE (power 0.8, α = 0.05, paired)", "effect"]
    header += ["seeds to detect it"]
    lines = [
        "## Power, resolution and seeds",
        "",
        "The minimum detectable effect (MDE) is the smallest true difference the paired test "
        f"would detect with probability 0.8 at α = {alpha:g}, at this run's number of seeds "
        "and observed spread of the per-seed differences; a difference smaller than it "
        "going undetected is no evidence that there is none. 'Seeds to detect it' is the "
        "number of paired seeds that would detect the stated effect at that spread.",
        "",
        *markdown_table(header, rows),
        "",
    ]
    warnings += _floor_note(family, alpha)
    return lines + warnings + ([""] if warnings else [])


def _floor_note(family: pd.DataFrame, alpha: float) -> list[str]:
    """A line when the exact sign-flip tests cannot reach significance after Holm: their
    smallest p-value ``2 / 2**n`` times the family size ``m`` is above ``alpha``."""
    tested = family[family["p"].apply(lambda v: isinstance(v, float) and not math.isnan(v))]
    flips = tested[tested["test"] == "sign-flip"]
    if flips.empty:
        return []
    m, n = len(tested), int(flips["n"].max())
    if 2.0 / 2**n * m <= alpha:
        return []
    need = math.ceil(math.log2(2 * m / alpha))
    return [
        f"- **Steps to target cannot be significant here:** the exact sign-flip test's "
        f"smallest p-value with {n} seeds, 2/2^{n}, times the {m} tests of the Holm family "
        f"exceeds α = {alpha:g}, whatever the effect; it needs at least {need} seeds. Read "
        "its Δ and interval as estimates."
    ]


def cost_section(family: pd.DataFrame) -> list[str]:
    """Per task, setting and policy: forward+backward passes, the ratio to uniform, the
    estimation share, training seconds and their estimation share."""
    if family is None or family.empty:
        return []
    cost = family.drop_duplicates(["task", "setting", "policy"])
    if cost["passes"].isna().all():
        return []
    header = ["task", "setting", "policy", "passes / run", "× uniform", "estimation share"]
    header += ["train s / run", "estimation share of s"]
    rows = [
        [
            r.task,
            r.setting,
            r.policy,
            "–" if math.isnan(r.passes) else f"{r.passes:,.0f}",
            "–" if math.isnan(r.passes_ratio) else f"{r.passes_ratio:.2f}",
            "–" if math.isnan(r.estimation_share) else f"{100 * r.estimation_share:.1f}%",
            f"{r.train_s:.1f}",
            "–" if math.isnan(r.estimation_share_s) else f"{100 * r.estimation_share_s:.1f}%",
        ]
        for r in cost.itertuples()
    ]
    return [
        "## Cost",
        "",
        "Forward+backward passes per final run, counted in the training loop (one per step, "
        "plus the estimation's work: one per estimated batch, two per Hessian-vector "
        "product, one per Gauss-Newton backward pass), so they do not depend on the "
        "machine's load; uniform's passes are its steps. Seconds are training seconds "
        "(evaluation and the sensitivity monitor excluded) on a shared machine: noisy.",
        "",
        *markdown_table(header, rows),
        "",
    ]
