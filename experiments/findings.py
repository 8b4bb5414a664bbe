"""The project's current findings: ``docs/findings.md`` from an ablation's results folder.

``python -m layerwise.experiments.findings RESULTS --out docs/findings.md`` (what ``make
findings`` runs after the ``findings`` ablation) reads the results strictly (every planned
run must be there), writes the results folder's own report and ``comparisons.csv``, and
writes a findings page: what was run, then per metric where layer-wise rates **helped**,
where they **hurt** and where they were **indistinguishable** from the tuned uniform
rate, each with its minimum detectable effect, the tuning cells that could not be
bracketed, the cost, and the full comparison table. The forest plot and each task's
learning curves are copied next to it (``docs/findings/``). The page states no more than
the statistics do: a difference that is not significant after Holm is reported as
indistinguishable together with the effect this study could have detected.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pandas as pd

from layerwise.experiments.atomic import write_text
from layerwise.experiments.report_family import (
    cost_section,
    family_table,
    fmt,
    mde_text,
    power_section,
)
from layerwise.experiments.reporting import family, unbracketed, write_report
from layerwise.experiments.results import Results, load_results

__all__ = ["main", "render_findings", "write_findings"]

_NAMES = {
    "final_metric": "Final test accuracy",
    "final_loss": "Final test loss",
    "steps_to_target": "Steps to the validation target",
}


def _where(r) -> str:
    return f"{r.policy} on {r.task}" + ("" if r.setting == "default" else f" ({r.setting})")


def _bullets(rows: pd.DataFrame, with_ci: bool = True) -> list[str]:
    out = []
    for r in rows.itertuples():
        ci = f" [{fmt(r.metric, r.ci_low)}, {fmt(r.metric, r.ci_high)}]" if with_ci else ""
        out.append(
            f"- {_where(r)}: Δ {fmt(r.metric, r.delta)}{ci}, Holm p = {r.p_holm:.3g}, "
            f"n = {r.n}, MDE {mde_text(r)}"
        )
    return out


def _verdicts(comparisons: pd.DataFrame) -> list[str]:
    lines = []
    for metric, title in _NAMES.items():
        rows = comparisons[comparisons["metric"] == metric]
        if rows.empty:
            continue
        lines += [f"### {title}", ""]
        for verdict, head in (
            ("better", "**Helped** (significantly better than uniform after Holm)"),
            ("worse", "**Hurt** (significantly worse than uniform after Holm)"),
            (
                "indistinguishable",
                "**Indistinguishable** from uniform (not significant after Holm; an effect "
                "smaller than the MDE would likely go unseen)",
            ),
        ):
            chosen = rows[rows["verdict"] == verdict]
            lines += [f"{head}:", ""]
            lines += _bullets(chosen) if not chosen.empty else ["- none"]
            lines.append("")
    return lines


def _by_policy(comparisons: pd.DataFrame) -> list[str]:
    """One plain sentence per policy: where it helped, hurt, and the MDE range elsewhere."""
    short = {"final_metric": "accuracy", "final_loss": "loss", "steps_to_target": "steps"}
    lines = []
    for policy, rows in comparisons.groupby("policy", sort=False):
        parts = []
        for verdict, word in (("better", "helped"), ("worse", "hurt")):
            hits = rows[rows["verdict"] == verdict]
            if not hits.empty:
                where = ", ".join(
                    f"{short[r.metric]} on {r.task} ({fmt(r.metric, r.delta)})"
                    for r in hits.itertuples()
                )
                parts.append(f"{word}: {where}")
        acc = rows[(rows["verdict"] == "indistinguishable") & (rows["metric"] == "final_metric")]
        if not acc.empty:
            where = ", ".join(f"{r.task} (MDE {mde_text(r)})" for r in acc.itertuples())
            parts.append(f"accuracy indistinguishable on {where}")
        lines.append(f"- **{policy}**: " + ("; ".join(parts) or "no comparison") + ".")
    return lines


def _setup(results: Results) -> list[str]:
    config = results.meta.get("config", {}) if isinstance(results.meta, dict) else {}
    finals = results.finals
    tuning = results.tuning.get("rule", {})
    tasks = ", ".join(dict.fromkeys(finals["task"])) if not finals.empty else "–"
    policies = ", ".join(results.policy_order)
    seeds = config.get("seeds", [])
    versions = results.meta.get("versions", {})
    return [
        "## What was run",
        "",
        f"- Config `{results.meta.get('name', '?')}` (hash "
        f"`{str(results.meta.get('config_hash', '?'))[:12]}`): tasks {tasks}; policies "
        f"{policies}; {len(seeds)} final seeds {seeds}; tuning seeds "
        f"{tuning.get('seeds', '?')}, up to {tuning.get('max_extensions', '?')} grid "
        "extensions per cell.",
        f"- {len(finals)} final runs and {int((results.runs['kind'] == 'tune').sum())} tuning "
        f"runs; layerwise-lr {versions.get('layerwise-lr', '?')}, torch "
        f"{versions.get('torch', '?')}.",
        "- Each policy's base rate was tuned by the same rule; each comparison is paired by "
        "seed against the tuned uniform rate; tests and intervals as in docs/design.md "
        "(paired t for accuracy and loss, exact sign-flip for the censored steps, Holm over "
        "every comparison below).",
        "",
    ]


def render_findings(results: Results, comparisons: pd.DataFrame, figures: list[str]) -> str:
    """The Markdown of the findings page (module docstring)."""
    helped = comparisons[comparisons["verdict"] == "better"]
    hurt = comparisons[comparisons["verdict"] == "worse"]
    same = comparisons[comparisons["verdict"] == "indistinguishable"]
    lines = [
        "# Findings: do layer-wise learning rates beat a tuned uniform rate?",
        "",
        "Generated by `make findings` from the `findings` ablation; do not edit by hand.",
        "",
        *(
            [
                f"**Incomplete:** {len(results.problems)} planned run(s) or file(s) are "
                "missing; every number below is from the runs that finished.",
                "",
            ]
            if results.problems
            else []
        ),
        "## In short",
        "",
        f"Of {len(comparisons)} comparisons (policy x task x metric), {len(helped)} "
        f"significantly helped, {len(hurt)} significantly hurt and {len(same)} were "
        "indistinguishable from the tuned uniform rate at this study's power.",
        "",
        *_by_policy(comparisons),
        "",
        *_setup(results),
    ]
    loose = unbracketed(results)
    if loose:
        lines += [
            f"**Tuning not bracketed** for {', '.join(loose)}: the chosen rate sits at an "
            "edge of its grid after the cap, so a better rate may lie beyond it.",
            "",
        ]
    lines += ["## Where layer-wise rates helped, hurt, or could not be told apart", ""]
    lines += _verdicts(comparisons)
    lines += [f"![{Path(f).stem}](findings/{f})" for f in figures] + [""]
    lines += power_section(comparisons)
    lines += cost_section(comparisons)
    lines += ["## Every comparison", "", *family_table(comparisons), ""]
    return "\n".join(lines).rstrip() + "\n"


def write_findings(
    results_dir: str | Path, out: str | Path, allow_incomplete: bool = False
) -> Path:
    """Report ``results_dir`` and write the findings page ``out`` with its figures in
    ``out``'s folder under ``findings/``; return the page's path. A results folder that
    misses planned runs is refused unless ``allow_incomplete`` (the page then says so)."""
    results_dir, out = Path(results_dir), Path(out)
    write_report(results_dir, allow_incomplete=allow_incomplete)
    results = load_results(results_dir, allow_incomplete=allow_incomplete)
    comparisons = family(results)
    figures_dir = out.parent / "findings"
    figures_dir.mkdir(parents=True, exist_ok=True)
    names = []
    source = results_dir / "figures"
    wanted = ["summary.png", *sorted(p.name for p in source.glob("*__curves.png"))]
    for name in wanted:
        if (source / name).is_file():
            shutil.copyfile(source / name, figures_dir / name)
            names.append(name)
    return write_text(out, render_findings(results, comparisons, names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m layerwise.experiments.findings", description=__doc__.splitlines()[0]
    )
    parser.add_argument("results", help="the findings ablation's results folder")
    parser.add_argument("--out", default="docs/findings.md", help="the page to write")
    parser.add_argument(
        "--allow-incomplete", action="store_true", help="write it from the finished runs"
    )
    args = parser.parse_args(argv)
    try:
        path = write_findings(args.results, args.out, allow_incomplete=args.allow_incomplete)
    except (OSError, ValueError) as exc:
        print(f"findings: error: {exc}", file=sys.stderr)
        return 1
    print(f"findings: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
