"""``report.md`` and its figures for an ablation's results folder.

:func:`write_report` loads the finished runs (:mod:`layerwise.experiments.results`), compares
every policy with ``uniform`` per task and setting (:mod:`layerwise.experiments.comparisons`),
draws the figures (:mod:`layerwise.experiments.plots`) into ``figures/`` and writes ``report.md``:
the verdicts at a glance with a forest plot, how the runs were made (tuning, test
protocol, statistics), one section per task with its table, curves, per-group rate
trajectories and sensitivity heat maps, the chosen rates, the fallback events, and any
missing or failed runs. A results folder that misses planned runs or holds damaged files
raises :class:`~layerwise.experiments.errors.IncompleteResultsError` listing them, unless
``allow_incomplete=True``: the report then says at the top that it is incomplete and lists
every missing run and bad file in its last section. Every file is written atomically;
rerunning it on the same results gives the same report.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from layerwise.experiments.atomic import write_text
from layerwise.experiments.comparisons import BASELINE, summarise
from layerwise.experiments.paired_comparisons import paired_comparisons, write_comparisons
from layerwise.experiments.plots import plot_curves, plot_heatmap, plot_rates, plot_summary
from layerwise.experiments.report_family import (
    cost_section,
    family_table,
    markdown_table,
    power_section,
    verdict_lines,
)
from layerwise.experiments.results import Results, load_results

__all__ = ["family", "render_report", "text_summary", "unbracketed", "write_report"]

_MAX_EVENTS = 40


def _fmt(value: float, digits: int = 2, scale: float = 100.0, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{scale * value:{'+' if signed else ''}.{digits}f}"


_table = markdown_table


def _steps(row) -> str:
    n = row["n"] if row["n"] else 0
    median = "never" if not math.isfinite(row["steps_median"]) else f"{row['steps_median']:.0f}"
    return f"{median} ({row['reached']}/{n})"


_TASK_HEADER = [
    "policy",
    "lr",
    "n",
    "test % [95% CI]",
    "Δ vs uniform, pp [95% CI]",
    "test",
    "p",
    "p (Holm)",
    "effect",
    "verdict",
    "steps to target (reached)",
    "train s",
    "fallbacks",
]


def _task_row(r: pd.Series) -> list[str]:
    """One policy's row of a task table (percentages for the metric and its difference)."""
    baseline = r["policy"] == BASELINE
    effect = (
        "–"
        if not math.isfinite(r["effect"])
        else f"{'d_z' if r['test'] == 'paired' else 'g'} = {r['effect']:.2f}"
    )
    delta = (
        "–"
        if baseline
        else f"{_fmt(r['delta'], signed=True)} [{_fmt(r['delta_low'], signed=True)}, "
        f"{_fmt(r['delta_high'], signed=True)}]"
    )
    return [
        f"**{r['policy']}**" if baseline else r["policy"],
        f"{r['lr']:g}",
        str(r["n"]),
        f"{_fmt(r['test_mean'])} [{_fmt(r['test_low'])}, {_fmt(r['test_high'])}]",
        delta,
        r["test"] or "–",
        _fmt(r["p"], 3, 1.0),
        _fmt(r["p_holm"], 3, 1.0),
        effect,
        {"better": "**better**", "worse": "**worse**"}.get(r["verdict"], r["verdict"]),
        _steps(r),
        f"{r['train_time']:.1f}",
        str(r["fallback_events"]),
    ]


def _figure(out: Path, path: Path | None, caption: str) -> list[str]:
    """The Markdown image line of a drawn figure (nothing when it was not drawn)."""
    return [] if path is None else [f"![{caption}]({path.relative_to(out).as_posix()})", ""]


def family(results: Results) -> pd.DataFrame:
    """The comparison family of ``results`` (``comparisons.csv``)."""
    return paired_comparisons(results.finals, results.task_info, results.policy_order)


def render_report(
    results: Results, out: Path, figures: bool = True, comparisons: pd.DataFrame | None = None
) -> str:
    """The Markdown text of the report; draws the figures into ``out/figures``.
    ``comparisons``: the family (:func:`family`; computed when not given)."""
    if not isinstance(results, Results):
        raise TypeError(f"results must be a Results, got {type(results).__name__}")
    out = Path(out)
    (out / "figures").mkdir(exist_ok=True)
    comparisons = family(results) if comparisons is None else comparisons
    table = summarise(results.finals, results.policy_order, family=comparisons)
    lines = _header(results, out)
    if table.empty:
        lines += ["No final run has finished yet; nothing to compare.", ""]
        return "\n".join([*lines, *_missing_section(results)]).rstrip() + "\n"
    lines += _glance(table, comparisons, out, figures)
    lines += _method()
    lines += ["## Paired comparisons", "", "Also in `comparisons.csv`.", ""]
    lines += [*family_table(comparisons), ""]
    lines += power_section(comparisons)
    lines += cost_section(comparisons)
    for (task, setting), cell in table.groupby(["task", "setting"], sort=False):
        lines += _task_section(results, task, setting, cell, out, figures)
    lines += _tuning_section(results)
    lines += _events_section(results)
    lines += _missing_section(results)
    return "\n".join(lines).rstrip() + "\n"


def _header(results: Results, out: Path) -> list[str]:
    """Title, config hash, how many runs finished, versions."""
    meta = results.meta
    n_tune = 0 if results.runs.empty else int((results.runs["kind"] == "tune").sum())
    versions = meta.get("versions", {})
    planned = "" if results.planned is None else f" of {results.planned} planned"
    lines = [
        f"# Ablation report: {meta.get('name', out.name)}",
        "",
        f"Config hash `{meta.get('config_hash', 'unknown')[:12]}` · {len(results.finals)} final "
        f"runs and {n_tune} tuning runs finished{planned} · layerwise-lr "
        f"{versions.get('layerwise-lr', '?')}, torch {versions.get('torch', '?')}.",
        "",
    ]
    loose = unbracketed(results)
    if loose:
        lines += [
            f"**Tuning not bracketed:** the chosen rate of {', '.join(loose)} sits at an edge "
            "of its grid even after extending it to the cap; a better rate may lie beyond "
            "(see 'Chosen learning rates').",
            "",
        ]
    if results.problems:
        lines += [
            f"**Incomplete:** {len(results.problems)} missing or unreadable run(s) or file(s) "
            "(listed in the last section) are left out of every table and figure; the "
            "verdicts may change once they are in.",
            "",
        ]
    return lines


def _glance(table: pd.DataFrame, comparisons: pd.DataFrame, out: Path, figures: bool) -> list[str]:
    """ "At a glance": the forest plot, the significant wins and losses, one line per policy."""
    lines = ["## At a glance", ""]
    if figures:
        summary = plot_summary(table, out / "figures" / "summary.png")
        lines += _figure(out, summary, "difference to uniform")
    helped = comparisons[comparisons["verdict"] == "better"]
    hurt = comparisons[comparisons["verdict"] == "worse"]
    if helped.empty:
        lines.append(
            "**No policy beat `uniform` significantly** on any task and metric (Holm-adjusted "
            "over every comparison, α = 0.05)."
        )
    else:
        lines.append(f"**Significantly better than `uniform`:** {_listing(helped)}.")
    if not hurt.empty:
        lines.append(f"**Significantly worse than `uniform`:** {_listing(hurt)}.")
    return [*lines, "", *verdict_lines(comparisons), ""]


def _listing(rows: pd.DataFrame) -> str:
    """``policy on task (metric Δ), ...`` for rows of the comparison family."""
    from layerwise.experiments.report_family import fmt

    return ", ".join(
        f"{r.policy} on {r.task} ({r.metric} {fmt(r.metric, r.delta)})" for r in rows.itertuples()
    )


def _method() -> list[str]:
    """ "How the runs were made": tuning, seeds, the test protocol and the statistics."""
    return [
        "## How the runs were made",
        "",
        "- Every policy's base learning rate was tuned by the same rule: the same grid, "
        "tuning seeds and budget, rates ranked by the mean final validation metric over the "
        "tuning seeds (a rate that diverged or collapsed late on any seed last), a best rate "
        "at an edge of the grid extending it geometrically up to a cap; the chosen rates "
        "and whether each is bracketed are listed below.",
        "- Final runs use seeds disjoint from the tuning seeds; a seed fixes the "
        "initialisation and the batch order, so runs with the same seed are paired. The test "
        "split is evaluated once per final run, after its last step.",
        "- Three paired differences, policy minus uniform, per task: the final test metric "
        "(pp), the final test loss, and the steps to the validation target, censored at "
        "the budget when a seed never reached it. Each has a seeded percentile-bootstrap "
        "interval (exact enumeration up to 5 seeds) and a test: the paired t-test for the "
        "metric and the loss, the exact sign-flip permutation test for the steps (its "
        "smallest p-value is 2/2^n); p-values are Holm-adjusted over every comparison of "
        "the report. The sign-flip p-value of every row is in `comparisons.csv` as a check "
        "that needs no normality.",
        "- The task tables show the test metric with its bootstrap interval over seeds, "
        "Δ with the interval of the paired differences, and the median steps to target.",
        "",
    ]


def _task_section(results: Results, task, setting, cell, out: Path, figures: bool) -> list[str]:
    """One task and setting: description, budget, the comparison table, the figures."""
    title = task if setting == "default" else f"{task} ({setting})"
    info = results.task_info.get(task, {})
    lines = [f"## {title}", "", info.get("description", ""), ""]
    budget = info.get("budget", {})
    if budget:
        data = info.get("data", {})
        lines += [
            f"Budget: {budget.get('steps')} steps of {budget.get('batch_size')} "
            f"examples, evaluation every {budget.get('eval_every')} steps, target "
            f"validation {info.get('metric', 'metric')} {budget.get('target')}; data "
            f"{data.get('sizes')} (sha256 `{data.get('sha256', '')[:12]}`).",
            "",
        ]
    lines += [*_table(_TASK_HEADER, [_task_row(r) for _, r in cell.iterrows()]), ""]
    if figures:
        lines += _task_figures(results, task, setting, cell, out, title)
    return lines


def _task_figures(results: Results, task, setting, cell, out: Path, title: str) -> list[str]:
    """Learning curves, per-group rate trajectories and the curvature heat map of a cell."""
    policies = list(cell["policy"])
    order = results.group_order.get(task, [])
    curves = results.curves[
        (results.curves["task"] == task) & (results.curves["setting"] == setting)
    ]
    groups = results.groups[
        (results.groups["task"] == task) & (results.groups["setting"] == setting)
    ]
    stem = out / "figures" / f"{task}__{setting}"
    metric = str(cell["metric"].iloc[0])
    curves_png = plot_curves(curves, policies, _png(stem, "curves"), title=title, metric=metric)
    rates_png = plot_rates(groups, policies, order, _png(stem, "rates"), title=title)
    heat_png = plot_heatmap(groups, policies, order, _png(stem, "curvature"), title=title)
    return [
        *_figure(out, curves_png, "curves"),
        *_figure(out, rates_png, "rates"),
        *_figure(out, heat_png, "curvature heat map"),
    ]


def _png(stem: Path, kind: str) -> Path:
    return stem.with_name(f"{stem.name}__{kind}.png")


def _tuning_section(results: Results) -> list[str]:
    """Every tuned cell: its grid (extensions marked +), the chosen rate, whether it is
    bracketed, and the mean validation metric of every rate (✗: failed on a seed)."""
    cells = results.tuning.get("cells", {})
    if not cells:
        return []
    rule = results.tuning.get("rule", {})
    rows = []
    for key, cell in cells.items():
        task, setting, policy = key.split("/")
        added = {float(e["lr"]) for e in cell.get("extensions", [])}
        grid = ", ".join(f"{v:g}{'+' if v in added else ''}" for v in cell.get("grid", []))
        scores = ", ".join(
            f"{lr}: {100 * s['val_metric']:.1f}%{' ✗' if s.get('failed') else ''}"
            for lr, s in cell.get("scores", {}).items()
        )
        chosen = cell.get("chosen_lr")
        rows.append(
            [
                task,
                setting,
                policy,
                grid,
                "–" if chosen is None else f"{chosen:g}",
                _bracket_text(cell),
                scores,
            ]
        )
    return [
        "## Chosen learning rates",
        "",
        f"Tuning seeds {rule.get('seeds', '?')}; rates ranked by the mean final validation "
        "metric over them, a rate that diverged or collapsed late on any seed (✗) last; a best "
        "rate at an edge of the grid extends it geometrically (+), up to "
        f"{rule.get('max_extensions', '?')} added rates per cell.",
        "",
        *_table(
            ["task", "setting", "policy", "grid", "chosen lr", "bracketed", "mean val per lr"],
            rows,
        ),
        "",
    ]


def _bracket_text(cell: dict) -> str:
    if cell.get("status") != "done":
        return str(cell.get("status", "?"))
    if cell.get("bracketed"):
        return "yes"
    grid = cell.get("grid", [])
    edge = "top" if grid and cell.get("chosen_lr") == max(grid) else "bottom"
    return f"**no** ({edge} edge at the cap)"


def unbracketed(results: Results) -> list[str]:
    """``task/setting/policy`` of every tuned cell whose chosen rate is at an edge."""
    cells = results.tuning.get("cells", {})
    return [k for k, c in cells.items() if c.get("status") == "done" and not c.get("bracketed")]


def _events_section(results: Results) -> list[str]:
    events = results.events
    lines = ["## Fallback and controller events", ""]
    if events.empty:
        return [*lines, "None: no controller fell back to the uniform rate in any final run.", ""]
    rows = [
        [str(r.task), str(r.policy), str(r.seed), str(r.step), str(r.event).replace("|", "/")]
        for r in events.head(_MAX_EVENTS).itertuples()
    ]
    lines += _table(["task", "policy", "seed", "step", "event"], rows)
    if len(events) > _MAX_EVENTS:
        lines.append(f"\n… and {len(events) - _MAX_EVENTS} more (see each run's events.csv).")
    counts = events[events["fallback"].astype(bool)].groupby(["task", "policy"]).size()
    if not counts.empty:
        lines += [
            "",
            "Fallbacks per task and policy: "
            + ", ".join(f"{t}/{p}: {n}" for (t, p), n in counts.items())
            + ".",
        ]
    return [*lines, ""]


def _missing_section(results: Results) -> list[str]:
    """Every missing or failed planned run and every unreadable file, one line each."""
    if not results.problems:
        return []
    return [
        "## Missing or unreadable runs",
        "",
        *[f"- {problem}" for problem in results.problems],
        "",
    ]


def write_report(out: str | Path, figures: bool = True, allow_incomplete: bool = False) -> Path:
    """Write ``out/report.md`` (and ``out/figures/*.png``); return the report's path.
    Missing runs or bad files raise, unless ``allow_incomplete`` (module docstring)."""
    out = Path(out)
    results = load_results(out, allow_incomplete=allow_incomplete)
    comparisons = family(results)
    write_comparisons(comparisons, out)
    text = render_report(results, out, figures=figures, comparisons=comparisons)
    return write_text(out / "report.md", text)


def text_summary(out: str | Path, allow_incomplete: bool = False) -> str:
    """A plain-text table of every policy against uniform (for the terminal); last lines
    count the missing or unreadable runs when ``allow_incomplete`` let them pass, and name
    the tuning cells whose chosen rate is at an edge of its grid."""
    results = load_results(Path(out), allow_incomplete=allow_incomplete)
    table = summarise(results.finals, results.policy_order, family=family(results))
    incomplete = (
        [f"incomplete: {len(results.problems)} missing or unreadable run(s) or file(s) left out"]
        if results.problems
        else []
    )
    loose = unbracketed(results)
    if loose:
        incomplete.append(f"tuning not bracketed (best rate at a grid edge): {', '.join(loose)}")
    if table.empty:
        return "\n".join(["no finished final runs", *incomplete])
    header = (
        f"{'task':<20} {'policy':<16} {'lr':>8} {'n':>2}  {'test % [95% CI]':<22} "
        f"{'Δ pp [95% CI]':<24} {'p Holm':>7}  verdict"
    )
    lines = [header, "-" * len(header)]
    for _, r in table.iterrows():
        task = r["task"] if r["setting"] == "default" else f"{r['task']}/{r['setting']}"
        test = f"{_fmt(r['test_mean'])} [{_fmt(r['test_low'])}, {_fmt(r['test_high'])}]"
        delta = (
            ""
            if r["policy"] == BASELINE
            else (
                f"{_fmt(r['delta'], signed=True)} [{_fmt(r['delta_low'], signed=True)}, "
                f"{_fmt(r['delta_high'], signed=True)}]"
            )
        )
        lines.append(
            f"{task:<20} {r['policy']:<16} {r['lr']:>8g} {r['n']:>2}  {test:<22} "
            f"{delta:<24} {_fmt(r['p_holm'], 3, 1.0):>7}  {r['verdict']}"
        )
    return "\n".join([*lines, *incomplete])
