"""The training loop of one run: the per-group rate is ``lr * factor * schedule(t)`` times the
controller's multiplier, a run repeats file for file, a failing monitor is switched off."""

from __future__ import annotations

import contextlib
import functools
import json

import pandas as pd
import pytest

from layerwise.experiments.evaluation import Evaluator, MeanLoss, SensitivityMonitor
from layerwise.experiments.plan import RunSpec
from layerwise.experiments.policy_specs import resolve_policy
from layerwise.experiments.training import execute
from layerwise.policies import schedules

GROUPS = ["layer.0", "layer.1", "head"]
TIMINGS = ["wall_time", "train_time", "estimate_seconds"]


def _spec(policy: str, extra: dict, schedule: dict, monitor: dict | None = None) -> RunSpec:
    return RunSpec(
        kind="final",
        task="digits_mlp",
        task_label="digits_mlp",
        policy=policy,
        setting="default",
        seed=3,
        lr=0.01,
        policy_spec=resolve_policy(policy, extra),
        overrides={"steps": 8, "eval_every": 2, "batch_size": 16},
        schedule=schedule,
        monitor=monitor or {"probes": 0},
    )


def _csv(path) -> pd.DataFrame:
    """A CSV file with its numbers parsed by Python's ``float`` (exact for ``repr`` output,
    which pandas' own parser is not before pandas 3)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in frame.columns:
        with contextlib.suppress(ValueError):  # text columns stay text
            frame[column] = [float(text) if text else float("nan") for text in frame[column]]
    return frame


def test_static_factors_and_the_schedule_set_each_groups_rate(tmp_path):
    schedule = {"name": "step", "step_size": 3, "gamma": 0.5}
    execute(_spec("layer_decay", {"decay": 0.5}, schedule), tmp_path)
    metrics, s = _csv(tmp_path / "metrics.csv"), schedules.from_spec(schedule)
    assert list(metrics["step"]) == [0, 2, 4, 6, 8]
    factors = {"layer.0": 0.25, "layer.1": 0.5, "head": 1.0}
    for _, row in metrics.iterrows():
        for g in GROUPS:  # the rate of the step after row["step"] steps, bit for bit
            assert row[f"lr/{g}"] == 0.01 * factors[g] * s(int(row["step"])), (g, row["step"])
            assert row[f"multiplier/{g}"] == 1.0


def test_the_controllers_multiplier_scales_the_scheduled_rate(tmp_path):
    # The noise rule: its estimate (per-example gradient variance) is deterministic given
    # the batch, so the controller adapts whatever the probe stream; the curvature rule's
    # two-probe Hessian traces pass the confidence gate or not by the luck of the draw.
    schedule = {"name": "cosine", "total_steps": 8, "floor": 0.2}
    extra = {"recalibrate_every": 2, "warmup_steps": 2, "estimator": {"probes": 2}}
    execute(_spec("noise", extra, schedule), tmp_path)
    metrics, s = _csv(tmp_path / "metrics.csv"), schedules.from_spec(schedule)
    assert (metrics[[f"multiplier/{g}" for g in GROUPS]] != 1.0).any().any(), "it adapted"
    for _, row in metrics.iterrows():
        for g in GROUPS:
            base = 0.01 * 1.0 * s(int(row["step"]))
            assert row[f"lr/{g}"] == base * row[f"multiplier/{g}"], (g, row["step"])
    history = _csv(tmp_path / "recalibrations.csv")
    assert sorted(set(history["step"])) == [2, 4, 6, 8]
    # a recalibration runs inside opt.step(), before the schedule advances past that step
    assert (history["base_lr"] == [0.01 * s(int(t) - 1) for t in history["step"]]).all()


def test_a_run_repeats_file_for_file(tmp_path):
    schedule = {"name": "linear_warmup", "steps": 4}
    extra = {"recalibrate_every": 2, "warmup_steps": 2, "estimator": {"probes": 2}}
    spec = _spec("curvature", extra, schedule, {"probes": 2, "batch_size": 16})
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    summaries = [execute(spec, first), execute(spec, second)]
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert {"metrics.csv", "events.csv", "recalibrations.csv", "manifest.json"} <= set(names)
    for name in ("events.csv", "manifest.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    for name in ("metrics.csv", "recalibrations.csv"):
        a, b = (pd.read_csv(d / name, dtype=str, keep_default_na=False) for d in (first, second))
        assert list(a.columns) == list(b.columns)
        timing = [c for c in TIMINGS if c in a.columns]
        pd.testing.assert_frame_equal(a.drop(columns=timing), b.drop(columns=timing))
    a, b = ({k: v for k, v in s.items() if not k.endswith("_time")} for s in summaries)
    assert json.dumps(a) == json.dumps(b)
    assert list(summaries[0]) == list(summaries[1])


def test_a_failing_monitor_is_switched_off_and_logged(tmp_path, monkeypatch):
    import layerwise.sensitivity as sensitivity

    real, calls = sensitivity.estimate, []

    @functools.wraps(real)
    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("probe blew up")
        return real(*args, **kwargs)

    monkeypatch.setattr(sensitivity, "estimate", flaky)
    spec = _spec("uniform", {}, {"name": "constant"}, {"probes": 2, "batch_size": 16})
    summary = execute(spec, tmp_path)
    assert summary["status"] == "ok" and summary["steps"] == 8
    assert len(calls) == 2, "not called again once switched off"
    events = pd.read_csv(tmp_path / "events.csv")
    assert events.to_dict("records") == [
        {"step": 2, "event": "monitor disabled: probe blew up", "fallback": False, "skipped": True}
    ]
    metrics = _csv(tmp_path / "metrics.csv")
    curvature = metrics[[f"curvature/{g}" for g in GROUPS]]
    assert curvature.iloc[0].notna().all() and curvature.iloc[1:].isna().all().all()
    assert list(metrics["events"].fillna("")) == [
        "",
        "2: monitor disabled: probe blew up",
        "",
        "",
        "",
    ]
    assert summary["fallback_events"] == 0


def test_mean_loss_and_bad_arguments():
    import torch

    losses = MeanLoss("cpu")
    assert losses.mean() != losses.mean(), "NaN before any loss"
    losses.add(torch.tensor(1.0))
    losses.add(torch.tensor(2.0))
    assert losses.mean() == 1.5
    losses.reset()
    assert losses.count == 0 and losses.mean() != losses.mean()
    with pytest.raises(TypeError, match=r"loss must be a torch\.Tensor"):
        losses.add(1.0)
    x, y = torch.zeros(4, 2), torch.zeros(4)
    with pytest.raises(TypeError, match="settings must be a mapping"):
        SensitivityMonitor([("probes", 2)], x, y, seed=0)
    with pytest.raises(ValueError, match="differ in length"):
        SensitivityMonitor({"probes": 2}, x, y[:3], seed=0)
    with pytest.raises(ValueError, match=r"settings\['probes'\] must be an integer >= 0"):
        SensitivityMonitor({"probes": -1}, x, y, seed=0)
    with pytest.raises(ValueError, match=r"settings\['batch_size'\] must be an integer >= 1"):
        SensitivityMonitor({"probes": 2, "batch_size": 0}, x, y, seed=0)
    off = SensitivityMonitor({"probes": 0}, x, y, seed=0)
    assert off.batch is None
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        Evaluator(None, "net", None, None, [], off, start=0.0)
    with pytest.raises(TypeError, match="monitor must be a SensitivityMonitor"):
        Evaluator(None, torch.nn.Linear(2, 1), None, None, [], None, start=0.0)
