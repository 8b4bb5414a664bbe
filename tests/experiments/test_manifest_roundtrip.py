"""A run's manifest records what the run was, and rebuilds it: spec, groups, data hash,
factors, controller and estimator settings, versions; finished-run detection is strict."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from layerwise.experiments import __version__
from layerwise.experiments.manifest import (
    DONE,
    is_finished,
    read_manifest,
    write_done,
    write_manifest,
)
from layerwise.experiments.plan import RunSpec
from layerwise.experiments.policy_specs import resolve_policy
from layerwise.experiments.tasks import get_task
from layerwise.experiments.training import execute
from layerwise.policies import SensitivityController


def _spec(policy: str, **extra) -> RunSpec:
    return RunSpec(
        kind="final",
        task="digits_mlp",
        task_label="digits_mlp",
        policy=policy,
        setting="default",
        seed=5,
        lr=0.01,
        policy_spec=resolve_policy(policy, extra),
        overrides={"steps": 6, "eval_every": 3, "batch_size": 16},
        schedule={"name": "cosine", "total_steps": 6, "floor": 0.1},
        monitor={"probes": 0},
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for policy, extra in (
        ("layer_decay", {"decay": 0.5}),
        ("curvature", {"recalibrate_every": 2, "warmup_steps": 2}),
    ):
        spec = _spec(policy, **extra)
        run_dir = tmp_path_factory.mktemp(policy)
        summary = execute(spec, run_dir, config_hash="c0ffee")
        write_done(run_dir, spec.hash, summary)
        out[policy] = (spec, run_dir)
    return out


def test_spec_round_trips_through_the_manifest(runs):
    for spec, run_dir in runs.values():
        manifest = read_manifest(run_dir)
        rebuilt = RunSpec.from_dict(json.loads(json.dumps(manifest["spec"])))
        assert rebuilt == spec and rebuilt.hash == spec.hash == manifest["spec_hash"]
        assert manifest["run_id"] == spec.run_id and manifest["config_hash"] == "c0ffee"
        assert manifest["seed"] == 5 and manifest["lr"] == 0.01
        assert manifest["schedule"] == {"name": "cosine", "total_steps": 6, "floor": 0.1}


def test_manifest_records_groups_data_and_versions(runs):
    _, run_dir = runs["layer_decay"]
    manifest = read_manifest(run_dir)
    task = get_task("digits_mlp")
    model = task.build_model(5)
    groups = manifest["groups"]["groups"]
    assert [g["name"] for g in groups] == ["layer.0", "layer.1", "head"]
    assert sum(g["size"] for g in groups) == sum(p.numel() for p in model.parameters())
    names = [n for g in groups for n in g["parameters"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert manifest["task"]["data"]["sha256"] == task.data().sha256()
    assert manifest["task"]["budget"]["steps"] == 6
    assert manifest["factors"] == {"layer.0": 0.25, "layer.1": 0.5, "head": 1.0}
    assert manifest["controller"] is None and manifest["estimator"] is None
    assert manifest["versions"]["layerwise-lr"] == __version__
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["device"] == "cpu"


def test_manifest_records_controller_and_estimator(runs):
    _, run_dir = runs["curvature"]
    manifest = read_manifest(run_dir)
    # the study's curvature arm is the Hessian-trace controller (the rule "curvature" would
    # read the GGN trace of the task's loss object)
    assert manifest["controller"]["rule"] == "curvature_hessian"
    assert manifest["controller"]["max_spread"] > 1
    rebuilt = SensitivityController.from_dict(manifest["controller"])
    assert rebuilt.settings == manifest["controller"]
    assert manifest["estimator"] == {"recalibrate_every": 2, "warmup_steps": 2, "probes": 8}
    assert manifest["factors"] is None


def test_rerunning_a_spec_from_its_manifest_reproduces_it(runs, tmp_path):
    _, run_dir = runs["curvature"]
    again = RunSpec.from_dict(read_manifest(run_dir)["spec"])
    execute(again, tmp_path, config_hash="c0ffee")
    first = (run_dir / "metrics.csv").read_text().splitlines()
    second = (tmp_path / "metrics.csv").read_text().splitlines()
    strip = lambda rows: [",".join(r.split(",")[:-2]) for r in rows]  # noqa: E731 - no timings
    assert strip(first) == strip(second)


def test_finished_detection(runs, tmp_path):
    spec, run_dir = runs["layer_decay"]
    assert is_finished(run_dir) and is_finished(run_dir, spec.hash)
    assert not is_finished(run_dir, _spec("uniform").hash), "another spec's hash"
    assert not is_finished(tmp_path), "no files"
    write_manifest(tmp_path, read_manifest(run_dir))
    assert not is_finished(tmp_path), "no done marker"
    (tmp_path / DONE).write_text('{"spec_hash": "other"}')
    assert not is_finished(tmp_path), "the marker must carry the manifest's hash"
    (tmp_path / DONE).write_text("{")
    assert not is_finished(tmp_path), "a truncated marker is not finished"


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="missing key"):
        write_manifest(tmp_path, {"run_id": "x"})
    with pytest.raises(ValueError, match="kind must be"):
        RunSpec(
            kind="best",
            task="t",
            task_label="t",
            policy="p",
            setting="s",
            seed=0,
            lr=0.1,
            policy_spec={},
        )
    with pytest.raises(ValueError, match="lr must be a positive number"):
        RunSpec(
            kind="final",
            task="t",
            task_label="t",
            policy="p",
            setting="s",
            seed=0,
            lr=0.0,
            policy_spec={},
        )
    with pytest.raises(TypeError):
        RunSpec.from_dict({"kind": "final", "unknown": 1})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        execute(_spec("uniform"), tmp_path / "missing")


def test_a_diverging_run_finishes_as_diverged(tmp_path):
    spec = RunSpec(
        kind="final",
        task="digits_mlp",
        task_label="digits_mlp",
        policy="curvature",
        setting="default",
        seed=0,
        lr=1e6,
        policy_spec=resolve_policy("curvature", {"recalibrate_every": 2, "warmup_steps": 2}),
        overrides={"steps": 40, "eval_every": 2, "batch_size": 16, "optimizer": "sgd"},
        monitor={"probes": 0},
    )
    summary = execute(spec, tmp_path)
    assert summary["status"] == "diverged" and summary["steps"] < 40
    assert "test_metric" in summary, "a final run still reports its (poor) test result"
    assert (tmp_path / "metrics.csv").is_file()


def test_a_run_whose_gradients_stay_non_finite_finishes_as_diverged(tmp_path):
    """No evaluation falls within the run's first steps, so it is the engine that stops it:
    ten skipped steps in a row (NonFiniteGradientError), then one more evaluation row."""
    spec = RunSpec(
        kind="final",
        task="digits_mlp",
        task_label="digits_mlp",
        policy="curvature",
        setting="default",
        seed=0,
        lr=1e6,
        policy_spec=resolve_policy("curvature", {"recalibrate_every": 2, "warmup_steps": 2}),
        overrides={"steps": 40, "eval_every": 40, "batch_size": 16, "optimizer": "sgd"},
        monitor={"probes": 0},
    )
    summary = execute(spec, tmp_path)
    assert summary["status"] == "diverged" and summary["steps"] == 12
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert list(metrics["step"]) == [0, 12]
    events = pd.read_csv(tmp_path / "events.csv")
    assert events["skipped"].sum() == 10 and (events["step"] == 2).all()
    assert events["event"].iloc[-1].startswith("fallback: non-finite gradients in group(s)")
    assert events["event"].iloc[-1].endswith("after step 2 (10 in a row, 10 in all)")
