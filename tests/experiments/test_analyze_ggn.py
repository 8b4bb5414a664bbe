"""`layerwise analyze` with the Gauss-Newton trace: ``--quantities``, ``--ggn``, a ``--loss``
given as a loss object or a factory returning one, the ``curvature_ggn`` policy (whose
quantities are added to what is estimated), and one-line refusals of a plain loss function
and of bad factories. In-process through the dispatcher, on a small user module."""

from __future__ import annotations

import io
import json
import sys
import textwrap

import pandas as pd
import pytest

from layerwise.experiments.cli import main
from layerwise.sensitivity import COLUMNS, SensitivityReport

from .test_analyze_bad_input import assert_one_line
from .test_analyze_end_to_end import TORCH_JIT_WARNING

MODULE = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    from layerwise.sensitivity import CrossEntropy


    def make_model():
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


    def batches():
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
                for _ in range(2)]


    def outputs(model, batch):
        return model(batch[0])


    def targets(batch):
        return batch[1]


    def make_loss():
        return CrossEntropy(outputs, targets, label_smoothing=0.1)


    LOSS = CrossEntropy(outputs, targets)


    def plain(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])


    def make_nothing():
        return 3


    def make_broken():
        raise RuntimeError("no loss today")
    """
)
USER = ("--model", "lw_ggn_models:make_model", "--data", "lw_ggn_models:batches")
SMALL = ("--probes", "2", "--batches", "2", "--dtype", "float64")

pytestmark = pytest.mark.filterwarnings(TORCH_JIT_WARNING)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    (tmp_path / "lw_ggn_models.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("lw_ggn_models", None)


def _json(capsys, *argv: str) -> dict:
    code = main(["analyze", *USER, *SMALL, "--format", "json", *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_a_loss_factory_and_the_ggn_policy_give_ggn_traces(workspace, capsys):
    doc = _json(capsys, "--loss", "lw_ggn_models:make_loss", "--policy", "curvature_ggn",
                "--ggn", "exact")  # fmt: skip
    report = SensitivityReport.from_dict(doc)
    assert doc["settings"]["quantities"] == [
        "grad_norm",
        "grad_variance",
        "hessian_trace",
        "ggn_trace",
    ]  # all, and what the policy reads
    assert doc["settings"]["loss"] == {"loss": "CrossEntropy", "ignore_index": -100,
                                       "label_smoothing": 0.1}  # fmt: skip
    assert all(g.ggn_trace > 0 and g.ggn_trace_stderr == 0.0 for g in report)
    assert all(
        r.startswith("curvature_ggn: ggn_curvature") for r in doc["policy"]["reasons"].values()
    )
    estimator = doc["manifest"]["estimator"]
    assert (estimator["quantities"], estimator["ggn"]) == (["all"], "exact")


def test_quantities_csv_holds_the_ggn_columns(workspace, capsys):
    code = main(["analyze", *USER, *SMALL, "--loss", "lw_ggn_models:LOSS", "--quantities",
                 "ggn_trace", "--ggn-samples", "3", "--format", "csv"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    frame = pd.read_csv(io.StringIO(captured.out), dtype={"group": str})
    assert list(frame.columns) == [*COLUMNS, "multiplier", "reason"]
    assert frame["ggn_trace"].gt(0).all() and frame["ggn_samples"].eq(6).all()
    assert frame["grad_norm"].isna().all() and frame["grad_variance"].isna().all()
    # the default policy reads the GGN trace of a loss object, as the engine does: no Hessian
    assert frame["hessian_trace"].isna().all()
    assert (frame["ggn_curvature"] * frame["num_params"]).tolist() == pytest.approx(
        frame["ggn_trace"].tolist()
    )
    # the default policy, curvature (auto), follows the GGN trace when the report has one
    assert frame["reason"].str.startswith("curvature: ggn_curvature").all()


def test_the_table_shows_the_ggn_trace(workspace, capsys):
    code = main(["analyze", *USER, *SMALL, "--quantities", "ggn_trace", "hessian_trace"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    header = next(line for line in captured.out.splitlines() if line.startswith("group"))
    assert "tr(H) ± se" in header and "GGN tr ± se" in header


@pytest.mark.parametrize(
    ("argv", "code", "expected"),
    [
        (["--loss", "lw_ggn_models:plain", "--policy", "curvature_ggn"], 2,
         ["ggn_trace (asked for by --policy curvature_ggn) needs --loss to give a loss object",
          "--loss 'lw_ggn_models:plain' gives a plain function"]),
        (["--loss", "lw_ggn_models:plain", "--quantities", "ggn_trace"], 2,
         ["ggn_trace (asked for by --quantities) needs --loss to give a loss object"]),
        (["--loss", "lw_ggn_models:make_nothing"], 2,
         ["--loss 'lw_ggn_models:make_nothing' is a factory that returned a int, not a loss "
          "object or a function loss(model, batch)"]),
        (["--loss", "lw_ggn_models:make_broken"], 1,
         ["--loss 'lw_ggn_models:make_broken' raised RuntimeError", "no loss today"]),
        (["--quantities", "fisher"], 2, ["--quantities", "invalid choice: 'fisher'"]),
        (["--ggn", "dense"], 2, ["--ggn", "invalid choice: 'dense'"]),
        (["--ggn-samples", "0"], 2, ["--ggn-samples", "positive integer"]),
    ],
    ids=["plain-loss-ggn-policy", "plain-loss-ggn-quantity", "factory-returns-int",
         "factory-raises", "unknown-quantity", "unknown-ggn-mode", "bad-ggn-samples"],
)  # fmt: skip
def test_bad_ggn_input_gives_one_line_and_exit_code(workspace, capsys, argv, code, expected):
    try:
        got = main(["analyze", *USER, *SMALL, *argv])
    except SystemExit as exc:  # argparse's own usage errors
        got = exc.code
    captured = capsys.readouterr()
    assert_one_line(got, captured.out, captured.err, code, expected)


def test_the_default_policy_reads_the_hessian_trace_of_a_plain_loss(workspace, capsys):
    code = main(["analyze", *USER, *SMALL, "--loss", "lw_ggn_models:plain", "--quantities",
                 "grad_norm", "--format", "csv"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    frame = pd.read_csv(io.StringIO(captured.out), dtype={"group": str})
    assert frame["hessian_trace"].notna().all() and frame["ggn_trace"].isna().all()
    assert frame["reason"].str.startswith("curvature: curvature").all()
