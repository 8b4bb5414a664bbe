"""`layerwise report` writes report.md with its sections and valid PNG figures, and says
which policy helped, from a synthetic results folder with a known answer."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest

from layerwise.experiments.atomic import write_json
from layerwise.experiments.cli import main
from layerwise.experiments.comparisons import summarise
from layerwise.experiments.config import config_hash

PNG = b"\x89PNG\r\n\x1a\n"
GROUPS = ["layer.0", "head"]
# The config the synthetic runs belong to: it plans exactly the final runs written below
# (a single rate, so no tuning run), as `layerwise ablate` would record it.
CONFIG = {
    "name": "toy study",
    "seeds": [0, 1, 2, 3, 4],
    "tasks": [{"name": "digits_mlp", "label": "toy", "lr_grid": [0.01]}],
    "policies": {"uniform": {}, "better": {"kind": "uniform"}, "same": {"kind": "uniform"}},
    "tuning": {"seeds": [100]},
}
CONFIG_HASH = config_hash(CONFIG)


def _fake_run(runs: Path, policy: str, seed: int, test: float, fallback: bool = False) -> None:
    """A finished final run folder, written the way the runner writes one."""
    run_id = f"final__toy__{policy}__default__s{seed}"
    d = runs / run_id
    d.mkdir(parents=True)
    write_json(
        d / "manifest.json",
        {
            "format": 1,
            "run_id": run_id,
            "spec": {},
            "spec_hash": "h" + run_id,
            "config_hash": CONFIG_HASH,
            "task": {
                "name": "toy",
                "description": "a toy task",
                "budget": {"steps": 20, "batch_size": 4, "eval_every": 10, "target": 0.5},
                "metric": "accuracy",
                "data": {"sizes": {}, "sha256": "ab"},
            },
            "groups": {"groups": [{"name": g} for g in GROUPS]},
            "schedule": {},
            "factors": None,
            "controller": None,
            "estimator": None,
            "seed": seed,
            "versions": {},
            "device": "cpu",
        },
    )
    rows = []
    for step, acc in ((0, 0.1), (10, 0.5 + test / 4), (20, test)):
        row = {
            "step": step,
            "train_loss": 1.0 / (step + 1),
            "val_loss": 1.0 - acc,
            "val_accuracy": acc,
        }
        for i, g in enumerate(GROUPS):
            row |= {
                f"lr/{g}": 0.01 * (i + 1),
                f"multiplier/{g}": 1.0,
                f"grad_norm/{g}": 0.1,
                f"curvature/{g}": 10.0 ** -(i + step / 10),
                f"noise/{g}": 0.5,
            }
        rows.append(row)
    pd.DataFrame(rows).to_csv(d / "metrics.csv", index=False)
    events = (
        [{"step": 10, "event": "fallback: spike in head", "fallback": True, "skipped": False}]
        if fallback
        else []
    )
    pd.DataFrame(events, columns=["step", "event", "fallback", "skipped"]).to_csv(
        d / "events.csv", index=False
    )
    write_json(
        d / "done.json",
        {
            "spec_hash": "h" + run_id,
            "run_id": run_id,
            "kind": "final",
            "task": "toy",
            "policy": policy,
            "setting": "default",
            "seed": seed,
            "lr": 0.01,
            "status": "ok",
            "steps": 20,
            "metric": "accuracy",
            "target": 0.5,
            "val_metric": test,
            "val_loss": 1 - test,
            "test_metric": test,
            "test_loss": 1 - test,
            "steps_to_target": 10.0,
            "train_time": 1.0,
            "wall_time": 2.0,
            "fallback_events": int(fallback),
        },
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    runs = out / "runs"
    seeds = range(5)
    for s in seeds:
        _fake_run(runs, "uniform", s, 0.80 + 0.01 * s)
        _fake_run(
            runs, "better", s, 0.85 + 0.01 * s + 0.002 * (s % 2)
        )  # +5 or +5.2 pp per seed: mean +5.08
        _fake_run(runs, "same", s, 0.80 + 0.01 * s + (0.01 if s % 2 else -0.01), fallback=s == 0)
    write_json(
        out / "ablation.json",
        {"name": "toy study", "config_hash": CONFIG_HASH, "config": CONFIG},
    )
    write_json(
        out / "tuning.json",
        {
            "rule": {"seeds": [1000], "max_extensions": 3},
            "cells": {
                "toy/default/better": {
                    "status": "done",
                    "grid": [0.001, 0.01],
                    "extensions": [],
                    "chosen_lr": 0.01,
                    "bracketed": False,
                    "scores": {"0.01": {"val_metric": 0.9, "val_loss": 0.1, "failed": False}},
                }
            },
        },
    )
    return out


def test_report_and_figures_are_written(folder, capsys):
    assert main(["report", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "better" in printed
    assert "tuning not bracketed (best rate at a grid edge): toy/default/better" in printed
    report = (folder / "report.md").read_text()
    for section in (
        "# Ablation report: toy study",
        "## At a glance",
        "## How the runs were made",
        "## toy",
        "## Chosen learning rates",
        "## Fallback and controller events",
    ):
        assert section in report, section
    figures = sorted(p.name for p in (folder / "figures").glob("*.png"))
    assert figures == [
        "summary.png",
        "toy__default__curvature.png",
        "toy__default__curves.png",
        "toy__default__rates.png",
    ]
    for name in figures:
        data = (folder / "figures" / name).read_bytes()
        assert data.startswith(PNG)
        image = matplotlib.image.imread(folder / "figures" / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"(figures/{name})" in report, "every figure is linked from the report"


def test_report_says_who_helped(folder):
    main(["report", str(folder), "--no-figures"])
    report = (folder / "report.md").read_text()
    assert "**Significantly better than `uniform`:** better on toy (final_metric +5.08 pp" in report
    assert "- **same** on toy (n = 5): test metric indistinguishable: Δ -0.20 pp" in report
    assert "fallback: spike in head" in report
    assert "**Tuning not bracketed:** the chosen rate of toy/default/better" in report
    row = "| toy | default | better | 0.001, 0.01 | 0.01 | **no** (top edge at the cap) |"
    assert row in report
    for section in ("## Paired comparisons", "## Power, resolution and seeds"):
        assert section in report
    # 2/2**5 x 6 tests > 0.05: the steps rows cannot reject after Holm, and the report says so
    assert "smallest p-value with 5 seeds, 2/2^5, times the 6 tests" in report
    assert "it needs at least 8 seeds" in report


def test_comparisons_csv(folder):
    import pandas as pd

    main(["report", str(folder), "--no-figures"])
    table = pd.read_csv(folder / "comparisons.csv")
    needed = ["task", "setting", "policy", "metric", "n", "delta", "ci_low", "ci_high"]
    assert {*needed, "p_holm", "mde", "significant"} <= set(table.columns)
    assert len(table) == 2 * 3, "two policies x (final metric, final loss, steps to target)"
    row = table.set_index(["policy", "metric"]).loc[("better", "final_metric")]
    assert row["delta"] == pytest.approx(0.0508) and bool(row["significant"])
    assert row["n"] == 5 and row["mde"] > 0


def test_the_summary_numbers(folder):
    from layerwise.experiments.results import load_results

    results = load_results(folder)
    table = summarise(results.finals, results.policy_order).set_index("policy")
    assert list(table.index) == ["uniform", "better", "same"]
    assert table.loc["uniform", "test_mean"] == pytest.approx(0.82)
    assert table.loc["better", "delta"] == pytest.approx(0.0508)
    assert table.loc["better", "test"] == "paired" and table.loc["better", "verdict"] == "better"
    assert table.loc["same", "verdict"] == "no significant difference"
    # Holm over 2 comparisons: the smaller p doubles, the larger keeps max(itself, that)
    assert table.loc["better", "p_holm"] == pytest.approx(2 * table.loc["better", "p"])
    assert table.loc["same", "p_holm"] == pytest.approx(table.loc["same", "p"])
    # with the family (6 tests), Holm runs over every metric of every policy
    from layerwise.experiments.reporting import family

    rows = family(results)
    table = summarise(results.finals, results.policy_order, family=rows).set_index("policy")
    better = rows[(rows["policy"] == "better") & (rows["metric"] == "final_metric")].iloc[0]
    assert table.loc["better", "p_holm"] == better["p_holm"]
    assert table.loc["same", "fallback_events"] == 1


def test_report_is_deterministic(folder):
    main(["report", str(folder), "--no-figures"])
    first = (folder / "report.md").read_text()
    main(["report", str(folder), "--no-figures"])
    assert (folder / "report.md").read_text() == first


def test_unfinished_runs_are_refused_or_listed_with_allow_incomplete(folder, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    before = (copy / "report.md").read_bytes() if (copy / "report.md").exists() else None
    (copy / "runs" / "final__toy__better__default__s4" / "done.json").unlink()
    assert main(["report", str(copy), "--no-figures"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"layerwise report: error: {copy}: 1 run(s) or file(s) missing")
    assert err[1:] == [
        "  runs/final__toy__better__default__s4/done.json: missing (the run did not finish)"
    ]
    after = (copy / "report.md").read_bytes() if (copy / "report.md").exists() else None
    assert after == before, "a refused report writes nothing"
    assert main(["report", str(copy), "--no-figures", "--allow-incomplete"]) == 0
    report = (copy / "report.md").read_text()
    assert "| better | 0.01 | 4 |" in report
    assert "0 tuning runs finished of 15 planned" in report and "**Incomplete:** 1 " in report
    assert (
        "## Missing or unreadable runs\n\n"
        "- runs/final__toy__better__default__s4/done.json: missing (the run did not finish)"
    ) in report
    json.loads((copy / "ablation.json").read_text())


def test_findings_page(folder, tmp_path, capsys):
    from layerwise.experiments.findings import main as findings

    page = tmp_path / "docs" / "findings.md"
    assert findings([str(folder), "--out", str(page)]) == 0
    text = page.read_text()
    assert "significantly helped, 0 significantly hurt" in text
    assert "- **same**: accuracy indistinguishable on toy (MDE 1.84 pp)." in text
    assert "- **better**: helped: accuracy on toy (+5.08 pp), loss on toy (-0.0508)" in text
    helped = text.split("**Helped**")[1].split("**Hurt**")[0]
    assert "- better on toy: Δ +5.08 pp" in helped and "MDE 0.18 pp" in helped
    same = text.split("**Indistinguishable**")[1]
    assert "- same on toy: Δ -0.20 pp" in same
    assert "**Tuning not bracketed** for toy/default/better" in text
    assert (tmp_path / "docs" / "findings" / "summary.png").read_bytes().startswith(PNG)
    assert "![summary](findings/summary.png)" in text
    assert findings([str(tmp_path / "nowhere"), "--out", str(page)]) == 1
    assert capsys.readouterr().err.startswith("findings: error: ")


def test_findings_page_of_an_incomplete_study(folder, tmp_path):
    import shutil

    from layerwise.experiments.findings import main as findings

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "runs" / "final__toy__same__default__s4" / "done.json").unlink()
    page = tmp_path / "findings.md"
    assert findings([str(copy), "--out", str(page)]) == 1 and not page.exists()
    assert findings([str(copy), "--out", str(page), "--allow-incomplete"]) == 0
    assert "**Incomplete:** 1 planned run(s) or file(s) are missing" in page.read_text()
