"""`layerwise analyze` end to end, through real subprocesses: the bundled default, and a user
model given by import path with a checkpoint written here; every output file's schema, and the
plots are valid PNG files."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pytest
import torch
from filelock import FileLock
from matplotlib import image as mpimg

from layerwise.experiments.analysis import OUTPUT_FILES
from layerwise.sensitivity import COLUMNS, SensitivityReport

PLOTS = [name for name in OUTPUT_FILES if name.endswith(".png")]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[2]

#: torch's forward-mode AD loads decompositions through the deprecated torch.jit.script.
TORCH_JIT_WARNING = "ignore:`torch.jit.script` is deprecated:DeprecationWarning"

#: The user's own code, importable as ``lw_user_models`` through PYTHONPATH.
USER_MODULE = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch import nn


    def make_model():
        return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))


    def broken_model():
        raise RuntimeError("boom: the factory cannot build the model")


    def batches():
        g = torch.Generator().manual_seed(1)
        return [
            (torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
            for _ in range(3)
        ]


    def no_batches():
        return iter(())


    def per_example_loss(model, batch):
        inputs, targets = batch
        return F.cross_entropy(model(inputs), targets, reduction="none")


    def loss(model, batch):
        inputs, targets = batch
        return F.cross_entropy(model(inputs), targets)
    """
)


#: Groups by glob patterns; "norm" is left to the catch-all (the LayerNorm, module "1").
PATTERNS = 'syntax = "glob"\ncatch_all = "norm"\n\n[groups]\nstem = "0"\nhead = "3"\n'


def user_workspace(root: Path) -> Path:
    """Write the user module and a checkpoint of its model (weights differ from the
    factory's: every tensor scaled by 1.5, so using them is visible in ``param_norm``)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "lw_user_models.py").write_text(USER_MODULE)
    sys.path.insert(0, str(root))
    try:
        import lw_user_models

        torch.manual_seed(123)
        state = {k: v * 1.5 for k, v in lw_user_models.make_model().state_dict().items()}
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("lw_user_models", None)
    torch.save({"model": state, "epoch": 7}, root / "checkpoint.pt")
    return root


class Run(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def once(
    tmp_path_factory, name: str, produce: Callable[[Path], dict[str, Run]]
) -> tuple[dict[str, Run], Path]:
    """``produce(folder)`` run once per test session, even across pytest-xdist workers (which
    share the parent of their temporary folders); later callers read the stored runs."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    root = base / name
    with FileLock(str(root) + ".lock"):
        stored = root / "run.json"
        if not stored.exists():
            root.mkdir(parents=True, exist_ok=True)
            runs = produce(root)
            stored.write_text(json.dumps({k: r._asdict() for k, r in runs.items()}))
        return {k: Run(**r) for k, r in json.loads(stored.read_text()).items()}, root


def run_cli(*args: str, pythonpath: Path | None = None, timeout: float = 180) -> Run:
    """``python -m layerwise.experiments.cli <args>`` with stdout not a terminal (plain output), in
    the folder ``pythonpath`` (also put on PYTHONPATH) or the project root."""
    env = dict(os.environ)
    paths = [str(ROOT), *([str(pythonpath)] if pythonpath else []), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.pop("FORCE_COLOR", None)
    env["OMP_NUM_THREADS"] = "1"  # tiny models; spare a shared CPU from thread contention
    proc = subprocess.run(
        [sys.executable, "-m", "layerwise.experiments.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=pythonpath or ROOT,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, pixels.shape


def assert_report_json(doc: dict, *, probes: int, batches: int) -> SensitivityReport:
    assert set(doc) == {"groups", "cost", "settings", "policy", "manifest"}
    report = SensitivityReport.from_dict(doc)  # the report round-trips
    assert report.cost.batches == batches and report.cost.examples > 0
    for g in report:
        assert g.hessian_probes == probes * batches  # probes per batch, summed
        assert g.is_finite() and g.num_params > 0
        assert g.param_norm > 0 and g.grad_norm >= 0 and g.hessian_trace_stderr >= 0
    policy = doc["policy"]
    assert set(policy) >= {"policy", "multipliers", "reasons", "bounds", "fallback", "event"}
    assert set(policy["multipliers"]) == set(report.names) == set(policy["reasons"])
    bounds = policy["bounds"]
    values = list(policy["multipliers"].values())
    assert all(bounds["min_multiplier"] <= v <= bounds["max_multiplier"] for v in values)
    assert max(values) / min(values) <= bounds["max_spread"] * (1 + 1e-9)
    m = doc["manifest"]
    for key in (
        "model",
        "checkpoint",
        "data",
        "loss",
        "groups",
        "estimator",
        "policy",
        "seed",
        "device",
        "dtype",
        "versions",
        "created",
    ):
        assert key in m, key
    assert m["estimator"]["probes"] == probes and m["estimator"]["batches"] == batches
    assert m["versions"]["torch"] == torch.__version__
    assert {"layerwise-lr", "python"} <= set(m["versions"])
    assert [g["name"] for g in m["groups"]["groups"]] == report.names
    assert m["groups"]["num_params"] == sum(g.num_params for g in report)
    return report


def assert_report_csv(text: str, report: SensitivityReport) -> pd.DataFrame:
    frame = pd.read_csv(io.StringIO(text), dtype={"group": str})
    assert list(frame.columns) == [*COLUMNS, "multiplier", "reason"]
    assert frame["group"].tolist() == report.names
    assert frame["num_params"].tolist() == [g.num_params for g in report]
    assert frame["hessian_trace"].tolist() == pytest.approx([g.hessian_trace for g in report])
    return frame


# -- the bundled default --------------------------------------------------------------------
@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    def produce(root: Path) -> Run:
        argv = ["--probes", "4", "--batches", "1", "--out", str(root / "out"), "--format", "json"]
        return {"default": run_cli("analyze", *argv)}

    runs, root = once(tmp_path_factory, "analyze-default", produce)
    proc = runs["default"]
    assert proc.returncode == 0, proc.stderr
    return proc, root / "out"


def test_default_run_writes_every_output_file_and_nothing_else(default_run):
    proc, out = default_run
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    assert "Traceback" not in proc.stderr


def test_default_report_json_schema_and_stdout_json_match(default_run):
    proc, out = default_run
    doc = json.loads((out / "report.json").read_text())
    assert json.loads(proc.stdout) == doc
    report = assert_report_json(doc, probes=4, batches=1)
    assert report.names == ["layer.0", "layer.1", "head"]  # the MLP's layers, by depth
    training = doc["manifest"]["model"]["training"]
    assert training["val_accuracy"] > 0.9  # briefly trained, so the numbers mean something
    assert doc["manifest"]["checkpoint"] is None
    assert len(doc["manifest"]["data"]["sha256"]) == 64


def test_default_report_csv_schema(default_run):
    _, out = default_run
    report = SensitivityReport.from_dict(json.loads((out / "report.json").read_text()))
    frame = assert_report_csv((out / "report.csv").read_text(), report)
    assert frame["multiplier"].gt(0).all()


@pytest.mark.parametrize("name", PLOTS)
def test_default_plots_are_valid_png_files(default_run, name):
    assert_png(default_run[1] / name)


# -- the user's own model, by import path, with a checkpoint ---------------------------------
@pytest.fixture(scope="session")
def user_run(tmp_path_factory):
    def produce(root: Path) -> Run:
        user_workspace(root)
        (root / "patterns.toml").write_text(PATTERNS)
        proc = run_cli(
            "analyze", "--model", "lw_user_models:make_model", "--checkpoint", "checkpoint.pt",
            "--data", "lw_user_models:batches", "--loss", "lw_user_models:loss",
            "--groups-file", "patterns.toml", "--policy", "noise", "--probes", "4",
            "--batches", "2", "--dtype", "float64", "--device", "cpu", "--out", "out",
            pythonpath=root,
        )  # fmt: skip
        return {"user": proc}

    runs, root = once(tmp_path_factory, "analyze-user", produce)
    proc = runs["user"]
    assert proc.returncode == 0, proc.stderr
    return proc, root / "out"


@pytest.fixture(scope="session")
def user_dir(user_run):
    """The user's folder: their module, checkpoint and patterns file."""
    return user_run[1].parent


def test_user_model_report_uses_the_checkpoint_weights(user_dir, user_run):
    _, out = user_run
    doc = json.loads((out / "report.json").read_text())
    report = assert_report_json(doc, probes=4, batches=2)
    assert report.names == ["stem", "head", "norm"]
    state = torch.load(user_dir / "checkpoint.pt", weights_only=True)["model"]
    for group, prefix in [("stem", "0."), ("norm", "1."), ("head", "3.")]:
        norm = math.sqrt(
            sum(float(v.double().pow(2).sum()) for k, v in state.items() if k.startswith(prefix))
        )
        assert report[group].param_norm == pytest.approx(norm, rel=1e-9)  # float64 run


def test_user_model_manifest_records_checkpoint_hash_groups_and_settings(user_dir, user_run):
    _, out = user_run
    m = json.loads((out / "report.json").read_text())["manifest"]
    digest = hashlib.sha256((user_dir / "checkpoint.pt").read_bytes()).hexdigest()
    assert m["checkpoint"]["sha256"] == digest and m["checkpoint"]["key"] == "model"
    assert m["model"]["source"] == "lw_user_models:make_model"
    assert m["data"]["source"] == "lw_user_models:batches" and m["data"]["batches"] == 2
    assert len(m["data"]["sha256"]) == 64
    assert m["loss"] == "lw_user_models:loss"
    assert m["groups"]["strategy"] == "patterns"
    assert m["groups"]["patterns"] == {"stem": "0", "head": "3"}
    assert (m["groups"]["syntax"], m["groups"]["catch_all"]) == ("glob", "norm")
    assert (m["dtype"], m["device"], m["policy"]["rule"]) == ("float64", "cpu", "noise")


def test_user_model_table_is_plain_text_when_stdout_is_not_a_terminal(user_run):
    proc, out = user_run
    assert "\x1b[" not in proc.stdout  # no ANSI escapes
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("group"))
    assert "multiplier" in header and "tr(H) ± se" in header
    for group in ("stem", "norm", "head"):
        assert any(line.startswith(group + " ") for line in lines), group
    assert any(line.startswith("policy 'noise'") for line in lines)
    assert_report_csv(
        (out / "report.csv").read_text(),
        SensitivityReport.from_dict(json.loads((out / "report.json").read_text())),
    )
    for name in PLOTS:
        assert_png(out / name)


@pytest.mark.filterwarnings(TORCH_JIT_WARNING)
def test_user_model_csv_on_stdout_without_out(user_dir, monkeypatch, capsys):
    """In-process through the dispatcher (the subprocess runs above cover the entry point)."""
    from layerwise.experiments.cli import main

    monkeypatch.syspath_prepend(str(user_dir))
    monkeypatch.chdir(user_dir)
    try:
        code = main(["analyze", "--model", "lw_user_models:make_model", "--data",
                     "lw_user_models:batches", "--groups", "module", "--probes", "2",
                     "--batches", "1", "--format", "csv"])  # fmt: skip
    finally:
        sys.modules.pop("lw_user_models", None)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    frame = pd.read_csv(io.StringIO(captured.out), dtype={"group": str})
    assert list(frame.columns) == [*COLUMNS, "multiplier", "reason"]
    assert frame["group"].tolist() == ["0", "1", "3"]  # one group per module
    assert frame["hessian_probes"].eq(2).all() and frame["multiplier"].gt(0).all()
    assert captured.err == ""  # nothing written, so nothing said
