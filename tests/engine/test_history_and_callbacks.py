"""Every recalibration is logged (DataFrame, incremental CSV, callbacks, TensorBoard-style
writers); validation reaches the controller; new groups start at multiplier 1."""

from __future__ import annotations

import importlib.util
import math

import pandas as pd
import pytest
import torch
from torch import nn

from layerwise.engine import HISTORY_COLUMNS, LayerwiseOptimizer, ScalarLogger
from layerwise.policies import SensitivityController

from .helpers import data, loss_fn, mlp, named_groups

ESTIMATOR = {"probes": 2, "quantities": ["grad_norm", "hessian_trace"], "hvp_mode": "vjp"}


def _engine(net, **kwargs):
    controller = SensitivityController("trust_ratio", alpha=1.0, max_rel_stderr=math.inf)
    base = torch.optim.SGD(named_groups(net), lr=0.1)
    return LayerwiseOptimizer(
        base, model=net, loss_fn=loss_fn, controller=controller, recalibrate_every=1,
        estimator=ESTIMATOR, **kwargs,
    )  # fmt: skip


def _steps(net, opt, n, seed=1):
    for batch in data(n, seed=seed):
        opt.zero_grad()
        loss_fn(net, batch).backward()
        opt.step(batch)


def test_history_frame_has_one_row_per_group_and_recalibration():
    net = mlp(dropout=0.0)
    opt = _engine(net)
    _steps(net, opt, 2)
    h = opt.history
    assert list(h.columns) == list(HISTORY_COLUMNS)
    assert (
        h["step"].tolist() == [1, 1, 1, 2, 2, 2]
        and h["group"].tolist() == ["fc0", "fc1", "fc2"] * 2
    )
    assert (h["effective_lr"] == h["base_lr"] * h["multiplier"]).all()
    last = h[h["step"] == 2].set_index("group")["multiplier"].to_dict()
    assert last == opt.multipliers
    assert h.loc[3:, "previous_multiplier"].tolist() == h.loc[:2, "multiplier"].tolist()
    assert h["reason"].str.startswith("trust_ratio").all() and not h["fallback"].any()
    assert opt.get_last_lr() == {name: 0.1 * m for name, m in opt.multipliers.items()}


def test_csv_is_written_incrementally_and_continued(tmp_path):
    path = tmp_path / "history.csv"
    net = mlp(dropout=0.0)
    opt = _engine(net, history=path)
    _steps(net, opt, 1)
    assert len(pd.read_csv(path)) == 3
    _steps(net, opt, 1)
    written = pd.read_csv(path)
    pd.testing.assert_frame_equal(
        written[["step", "group", "multiplier", "grad_norm"]],
        opt.history[["step", "group", "multiplier", "grad_norm"]],
        check_dtype=False,
    )
    with open(path, "a") as f:  # a killed writer left half a line
        f.write("3,fc0,0.5")
    again = _engine(net, history=path)  # a resumed run continues the same file
    assert path.read_text().endswith("\n") and len(pd.read_csv(path)) == 6  # partial line cut
    _steps(net, again, 1)
    assert len(pd.read_csv(path)) == 9


def test_csv_with_other_columns_is_refused(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="exists with other columns"):
        _engine(mlp(), history=path)
    assert path.read_text() == "a,b\n1,2\n"


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow installed")
def test_parquet_without_pyarrow_says_so(tmp_path):
    with pytest.raises(ValueError, match="needs pyarrow, which is not installed"):
        _engine(mlp(), history=tmp_path / "h.parquet")


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="needs pyarrow")
def test_parquet_is_rewritten_atomically(tmp_path):
    path = tmp_path / "h.parquet"
    net = mlp(dropout=0.0)
    opt = _engine(net, history=path)
    _steps(net, opt, 2)
    assert len(pd.read_parquet(path)) == 6 and not list(tmp_path.glob(".*.tmp"))


class _Writer:
    """Anything with add_scalar, as TensorBoard's SummaryWriter."""

    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def test_callback_and_scalar_writer_see_every_recalibration():
    net = mlp(dropout=0.0)
    seen = []
    opt = _engine(
        net, callback=lambda decision, report, step: seen.append((decision, report, step))
    )
    _steps(net, opt, 2)
    assert [s for _, _, s in seen] == [1, 2]
    assert seen[-1][0].multipliers == opt.multipliers and seen[-1][1].names == ["fc0", "fc1", "fc2"]

    writer = _Writer()
    opt = _engine(net, callback=writer)
    _steps(net, opt, 1)
    tags = {tag for tag, _, _ in writer.scalars}
    for group in ("fc0", "fc1", "fc2"):
        assert {f"layerwise/multiplier/{group}", f"layerwise/lr/{group}"} <= tags
        assert {f"layerwise/grad_norm/{group}", f"layerwise/hessian_trace/{group}"} <= tags
    assert "layerwise/fallback" in tags and all(step == 1 for *_, step in writer.scalars)
    with pytest.raises(TypeError, match="add_scalar"):
        ScalarLogger(object())


def test_validation_fallback_reaches_controller_and_is_applied_at_once():
    net = mlp(dropout=0.0)
    seen = []
    opt = _engine(net, callback=lambda d, r, s: seen.append((d, r)))
    opt.observe_validation(1.0)  # before adaptation: the reference value
    _steps(net, opt, 1)
    assert any(m != 1.0 for m in opt.multipliers.values())
    opt.observe_validation(torch.tensor(math.nan))
    assert opt.multipliers == {"fc0": 1.0, "fc1": 1.0, "fc2": 1.0}
    last = opt.history.iloc[-3:]
    assert (
        last["fallback"].all() and last["reason"].str.contains("validation metric not finite").all()
    )
    assert seen[-1][0].fallback and seen[-1][1] is None


def test_new_group_starts_at_multiplier_one_and_joins_recalibration():
    net = mlp(dropout=0.0)
    extra = nn.Linear(3, 3)
    model = nn.ModuleDict({"net": net, "extra": extra})

    def loss(m, batch):
        return loss_fn(m["net"], batch) + m["extra"](torch.ones(1, 3)).square().mean()

    base = torch.optim.SGD(named_groups(net), lr=0.1)
    controller = SensitivityController("trust_ratio", alpha=1.0, max_rel_stderr=math.inf)
    opt = LayerwiseOptimizer(base, model=model, loss_fn=loss, controller=controller,
                             recalibrate_every=1, estimator=ESTIMATOR)  # fmt: skip
    batch = data(1)[0]
    opt.zero_grad()
    loss(model, batch).backward()
    opt.step(batch)
    opt.add_param_group({"params": list(extra.parameters()), "lr": 0.05})
    assert opt.group_names == ["fc0", "fc1", "fc2", "group3"] and opt.multipliers["group3"] == 1.0
    opt.zero_grad()
    loss(model, batch).backward()
    opt.step(batch)
    assert "group3" in set(opt.history["group"]) and opt.multipliers["group3"] != 1.0
