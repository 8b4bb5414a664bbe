"""``report.md`` and its figures for an ablation's results folder.

:func:`write_report` loads the finished runs (:mod:`layerwise.experiments.results`), compares
every policy with ``uniform`` per task and setting (:mod:`layerwise.experiments.comparisons`),
draws the figures (:mod:`layerwise.experiments.plots`) into ``figures/`` and writes ``report.md``:
the verdicts at a glance with a forest plot, how the runs were made (tuning, test
protocol, statistics), one section per task with its table, curves, per-group rate
trajectories and sensitivity heat maps, the chosen rates, the fallback events, and any
missing or failed runs. Every file is written atomically; rerunning it on the same
results gives the same report.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from layerwise.experiments.atomic import write_text
from layerwise.experiments.comparisons import BASELINE, summarise, verdict_lines
from layerwise.experiments.plots import plot_curves, plot_heatmap, plot_rates, plot_summary
from layerwise.experiments.results import Results, load_results

__all__ = ["render_report", "text_summary", "write_report"]

_MAX_EVENTS = 40


def _fmt(value: float, digits: int = 2, scale: float = 100.0, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{scale * value:{'+' if signed else ''}.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _steps(row) -> str:
    n = row["n"] if row["n"] else 0
    median = "never" if not math.isfinite(row["steps_median"]) else f"{row['steps_median']:.0f}"
    return f"{median} ({row['reached']}/{n})"


def _task_table(cell: pd.DataFrame) -> list[str]:
    rows = []
    for _, r in cell.iterrows():
        effect = (
            ""
            if not math.isfinite(r["effect"])
            else (f"{'d_z' if r['test'] == 'paired' else 'g'} = {r['effect']:.2f}")
        )
        verdict = {"better": "**better**", "worse": "**worse**"}.get(r["verdict"], r["verdict"])
        rows.append(
            [
                f"**{r['policy']}**" if r["policy"] == BASELINE else r["policy"],
                f"{r['lr']:g}",
                str(r["n"]),
                f"{_fmt(r['test_mean'])} [{_fmt(r['test_low'])}, {_fmt(r['test_high'])}]",
                "–"
                if r["policy"] == BASELINE
                else f"{_fmt(r['delta'], signed=True)} [{_fmt(r['delta_low'], signed=True)}, "
                f"{_fmt(r['delta_high'], signed=True)}]",
                r["test"] or "–",
                _fmt(r["p"], 3, 1.0),
                _fmt(r["p_holm"], 3, 1.0),
                effect or "–",
                verdict,
                _steps(r),
                f"{r['train_time']:.1f}",
                str(r["fallback_events"]),
            ]
        )
    header = [
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
    return _table(header, rows)


def _figure(lines: list[str], out: Path, path: Path | None, caption: str) -> None:
    if path is not None:
        lines += [f"![{caption}]({path.relative_to(out).as_posix()})", ""]


def render_report(results: Results, out: Path, figures: bool = True) -> str:
    """The Markdown text of the report; draws the figures into ``out/figures``."""
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    finals = results.finals
    table = summarise(finals, results.policy_order)
    meta = results.meta
    name = meta.get("name", out.name)
    n_tune = 0 if results.runs.empty else int((results.runs["kind"] == "tune").sum())
    versions = meta.get("versions", {})
    lines = [
        f"# Ablation report: {name}",
        "",
        f"Config hash `{meta.get('config_hash', 'unknown')[:12]}` · {len(finals)} final "
        f"runs and {n_tune} tuning runs finished · layerwise-lr "
        f"{versions.get('layerwise-lr', '?')}, torch {versions.get('torch', '?')}.",
        "",
    ]
    if table.empty:
        lines += ["No final run has finished yet; nothing to compare.", ""]
        return "\n".join(lines)

    helped = table[table["verdict"] == "better"]
    hurt = table[table["verdict"] == "worse"]
    lines += ["## At a glance", ""]
    if figures:
        _figure(lines, out, plot_summary(table, fig_dir / "summary.png"), "difference to uniform")
    if helped.empty:
        lines.append(
            "**No policy beat `uniform` significantly** (paired t-test over seeds, "
            "Holm-adjusted, α = 0.05) on any task."
        )
    else:
        wins = ", ".join(
            f"{r.policy} on {r.task} ({_fmt(r.delta, signed=True)} pp)" for r in helped.itertuples()
        )
        lines.append(f"**Significantly better than `uniform`:** {wins}.")
    if not hurt.empty:
        losses = ", ".join(
            f"{r.policy} on {r.task} ({_fmt(r.delta, signed=True)} pp)" for r in hurt.itertuples()
        )
        lines.append(f"**Significantly worse than `uniform`:** {losses}.")
    lines += ["", *verdict_lines(table), ""]

    lines += [
        "## How the runs were made",
        "",
        "- Every policy's base learning rate was tuned on the same grid, with the same tuning "
        "seeds and budget, by the final validation metric (ties: lower validation loss, then "
        "the smaller rate); the chosen rates are listed below.",
        "- Final runs use seeds disjoint from the tuning seeds; a seed fixes the "
        "initialisation and the batch order, so runs with the same seed are paired. The test "
        "split is evaluated once per final run, after its last step.",
        "- Test metric: mean and 95% percentile-bootstrap interval over seeds (exact "
        "enumeration for up to 5 seeds). Δ: policy minus uniform, in percentage points, with "
        "the bootstrap interval of the paired differences; paired t-test when the seeds match "
        "(Welch otherwise); p-values Holm-adjusted over the policies of a task; effect size "
        "d_z (paired) or Hedges' g.",
        "- Steps to target: the first evaluation step at which validation accuracy reached "
        "the task's target, median over seeds (reached/seeds); 'never' when most seeds "
        "did not reach it within the budget.",
        "",
    ]

    for (task, setting), cell in table.groupby(["task", "setting"], sort=False):
        title = task if setting == "default" else f"{task} ({setting})"
        info = results.task_info.get(task, {})
        budget = info.get("budget", {})
        lines += [f"## {title}", "", info.get("description", ""), ""]
        if budget:
            lines += [
                f"Budget: {budget.get('steps')} steps of {budget.get('batch_size')} "
                f"examples, evaluation every {budget.get('eval_every')} steps, target "
                f"validation {info.get('metric', 'metric')} {budget.get('target')}; data "
                f"{info.get('data', {}).get('sizes')} (sha256 "
                f"`{info.get('data', {}).get('sha256', '')[:12]}`).",
                "",
            ]
        lines += [*_task_table(cell), ""]
        if figures:
            policies = list(cell["policy"])
            order = results.group_order.get(task, [])
            sel = (results.curves["task"] == task) & (results.curves["setting"] == setting)
            gsel = (results.groups["task"] == task) & (results.groups["setting"] == setting)
            stem = f"{task}__{setting}"
            metric = str(cell["metric"].iloc[0])
            _figure(
                lines,
                out,
                plot_curves(
                    results.curves[sel],
                    policies,
                    fig_dir / f"{stem}__curves.png",
                    title=title,
                    metric=metric,
                ),
                "curves",
            )
            _figure(
                lines,
                out,
                plot_rates(
                    results.groups[gsel],
                    policies,
                    order,
                    fig_dir / f"{stem}__rates.png",
                    title=title,
                ),
                "rates",
            )
            _figure(
                lines,
                out,
                plot_heatmap(
                    results.groups[gsel],
                    policies,
                    order,
                    fig_dir / f"{stem}__curvature.png",
                    title=title,
                ),
                "curvature heat map",
            )
    lines += _tuning_section(results)
    lines += _events_section(results)
    lines += _missing_section(results, out)
    return "\n".join(lines).rstrip() + "\n"


def _tuning_section(results: Results) -> list[str]:
    chosen = results.tuning.get("chosen", {})
    if not chosen:
        return []
    rows = []
    for key, entry in chosen.items():
        task, setting, policy = key.split("/")
        scores = ", ".join(
            f"{lr}: {100 * s['val_metric']:.1f}%" for lr, s in entry["scores"].items()
        )
        rows.append([task, setting, policy, f"{entry['lr']:g}", scores])
    return [
        "## Chosen learning rates",
        "",
        *_table(["task", "setting", "policy", "chosen lr", "mean final val metric per lr"], rows),
        "",
    ]


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


def _missing_section(results: Results, out: Path) -> list[str]:
    errors = sorted((out / "errors").glob("*.txt")) if (out / "errors").is_dir() else []
    finished = set(results.runs["run_id"]) if not results.runs.empty else set()
    failed = [p.stem for p in errors if p.stem not in finished]
    if not failed:
        return []
    return ["## Failed runs", "", *[f"- `{r}` (see `errors/{r}.txt`)" for r in failed], ""]


def write_report(out: str | Path, figures: bool = True) -> Path:
    """Write ``out/report.md`` (and ``out/figures/*.png``); return the report's path."""
    out = Path(out)
    results = load_results(out)
    text = render_report(results, out, figures=figures)
    return write_text(out / "report.md", text)


def text_summary(out: str | Path) -> str:
    """A plain-text table of every policy against uniform (for the terminal)."""
    results = load_results(Path(out))
    table = summarise(results.finals, results.policy_order)
    if table.empty:
        return "no finished final runs"
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
    return "\n".join(lines)
