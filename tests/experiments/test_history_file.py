"""``HistoryFile``, the engine's callback that appends each recalibration's rows to a CSV
(incrementally, continued on resume, a killed writer's partial line cut) or Parquet file
(rewritten atomically), only on rank 0, with named errors for bad paths."""

from __future__ import annotations

import importlib.util
import math

import pandas as pd
import pytest
import torch

from layerwise.engine import HISTORY_COLUMNS, LayerwiseOptimizer
from layerwise.experiments import history_file
from layerwise.experiments.extras import MissingExtraError
from layerwise.experiments.history_file import HistoryFile
from layerwise.policies import SensitivityController

from ..engine.helpers import data, loss_fn, mlp, named_groups

ESTIMATOR = {"probes": 2, "quantities": ["grad_norm", "hessian_trace"], "hvp_mode": "vjp"}
COMPARED = ["step", "group", "multiplier", "grad_norm"]


def _engine(net, callback):
    controller = SensitivityController("trust_ratio", alpha=1.0, max_rel_stderr=math.inf)
    base = torch.optim.SGD(named_groups(net), lr=0.1)
    return LayerwiseOptimizer(
        base, model=net, loss_fn=loss_fn, controller=controller, recalibrate_every=1,
        estimator=ESTIMATOR, callback=callback,
    )  # fmt: skip


def _steps(net, opt, n, seed=1):
    for batch in data(n, seed=seed):
        opt.zero_grad()
        loss_fn(net, batch).backward()
        opt.step(batch)


def test_csv_is_written_incrementally_and_continued(tmp_path):
    path = tmp_path / "history.csv"
    net = mlp(dropout=0.0)
    opt = _engine(net, HistoryFile(path))
    _steps(net, opt, 1)
    assert len(pd.read_csv(path)) == 3
    _steps(net, opt, 1)
    written = pd.read_csv(path)
    assert list(written.columns) == list(HISTORY_COLUMNS)
    pd.testing.assert_frame_equal(written[COMPARED], opt.history[COMPARED], check_dtype=False)
    with open(path, "a") as f:  # a killed writer left half a line
        f.write("3,fc0,0.5")
    again = _engine(net, HistoryFile(path))  # a resumed run continues the same file
    assert path.read_text().endswith("\n") and len(pd.read_csv(path)) == 6  # partial line cut
    _steps(net, again, 1)
    assert len(pd.read_csv(path)) == 9


def test_csv_with_other_columns_is_refused(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="exists with other columns"):
        HistoryFile(path)
    assert path.read_text() == "a,b\n1,2\n"


def test_parquet_without_pyarrow_says_so_in_one_line(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        history_file.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "pyarrow" else real(name, *args),
    )
    with pytest.raises(MissingExtraError) as caught:
        HistoryFile(tmp_path / "h.parquet")
    message = str(caught.value)
    assert "\n" not in message
    assert "needs pyarrow" in message and "pip install 'layerwise-lr[experiments]'" in message


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="needs pyarrow")
def test_parquet_is_rewritten_atomically_and_continued(tmp_path):
    path = tmp_path / "h.parquet"
    net = mlp(dropout=0.0)
    opt = _engine(net, HistoryFile(path))
    _steps(net, opt, 2)
    written = pd.read_parquet(path)
    assert len(written) == 6 and not list(tmp_path.glob(".*.tmp"))
    pd.testing.assert_frame_equal(written, opt.history, check_dtype=False)
    again = _engine(net, HistoryFile(path))
    _steps(net, again, 1)
    assert len(pd.read_parquet(path)) == 9


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    seen = []
    net = mlp(dropout=0.0)
    _steps(net, _engine(net, seen.append), 1)
    path = tmp_path / "h.csv"
    for rank, text in [(1, ",".join(HISTORY_COLUMNS) + "\n1,fc0"), (0, "")]:
        path.write_text(text)  # rank 1 leaves even a partial line alone
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        HistoryFile(path)(seen[0])
        monkeypatch.undo()
        if rank == 1:
            assert path.read_text() == text
        else:
            assert len(pd.read_csv(path)) == 3


@pytest.mark.parametrize(
    ("path", "error", "match"),
    [
        ("log.txt", ValueError, "path must end in .csv or .parquet, got 'log.txt'"),
        ("/no/such/folder/h.csv", ValueError, "folder '/no/such/folder' .* does not exist"),
        (3, TypeError, "path must be a path ending in .csv or .parquet, got 3"),
    ],
)
def test_bad_path_is_named(path, error, match):
    with pytest.raises(error, match=match):
        HistoryFile(path)


def test_a_record_without_rows_is_refused(tmp_path):
    with pytest.raises(TypeError, match=r"record must be a layerwise\.engine\.Recalibration"):
        HistoryFile(tmp_path / "h.csv")({"rows": []})


def test_re_exported_by_the_package():
    import layerwise.experiments

    assert layerwise.experiments.HistoryFile is HistoryFile
