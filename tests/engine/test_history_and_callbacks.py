"""Every recalibration is logged (DataFrame, callbacks with its rows, TensorBoard-style
writers, skipped ones too); validation reaches the controller; new groups start at
multiplier 1; the history's state round-trips and a bad one is refused."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

from layerwise.engine import (
    HISTORY_COLUMNS,
    History,
    LayerwiseOptimizer,
    ScalarLogger,
    history_frame,
)
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


class _Writer:
    """Anything with add_scalar, as TensorBoard's SummaryWriter."""

    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def test_callback_and_scalar_writer_see_every_recalibration():
    net = mlp(dropout=0.0)
    seen = []
    opt = _engine(net, callback=seen.append)
    _steps(net, opt, 2)
    assert [r.step for r in seen] == [1, 2]
    assert seen[-1].decision.multipliers == opt.multipliers
    assert seen[-1].report.names == ["fc0", "fc1", "fc2"]
    pd.testing.assert_frame_equal(history_frame([row for r in seen for row in r.rows]), opt.history)

    writer, also = _Writer(), []
    opt = _engine(net, callback=[writer, also.append])  # several, called in order
    _steps(net, opt, 1)
    assert [r.step for r in also] == [1]
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
    opt = _engine(net, callback=seen.append)
    opt.observe_validation(1.0)  # before adaptation: the reference value
    _steps(net, opt, 1)
    assert any(m != 1.0 for m in opt.multipliers.values())
    opt.observe_validation(torch.tensor(math.nan))
    assert opt.multipliers == {"fc0": 1.0, "fc1": 1.0, "fc2": 1.0}
    last = opt.history.iloc[-3:]
    assert (
        last["fallback"].all() and last["reason"].str.contains("validation metric not finite").all()
    )
    assert seen[-1].decision.fallback and seen[-1].report is None
    pd.testing.assert_frame_equal(
        history_frame(seen[-1].rows), opt.history.iloc[-3:].reset_index(drop=True)
    )


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


def test_skipped_recalibration_reaches_the_callback_without_a_decision():
    """GradScaler skips a fused optimizer's step (``found_inf``), so the engine skips the
    recalibration that fell due."""
    net = mlp(dropout=0.0)
    seen, writer = [], _Writer()
    controller = SensitivityController("trust_ratio", alpha=1.0, max_rel_stderr=math.inf)
    base = torch.optim.Adam(named_groups(net), lr=0.01, fused=True)
    opt = LayerwiseOptimizer(
        base, model=net, loss_fn=loss_fn, controller=controller, recalibrate_every=1,
        estimator=ESTIMATOR, callback=[seen.append, writer],
    )  # fmt: skip
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batch = data(1)[0]
    opt.zero_grad()
    scaler.scale(loss_fn(net, batch)).backward()
    next(net.parameters()).grad[0, 0] = math.inf
    scaler.step(opt, batch)
    (record,) = seen
    assert record.decision is None and record.report is None and record.step == 1
    assert [row["skipped"] for row in record.rows] == [True, True, True]
    assert record.rows[0]["reason"].startswith("skipped: GradScaler found non-finite gradients")
    assert writer.scalars == []  # nothing was decided, so nothing is logged as a scalar


def test_history_state_round_trips_and_a_bad_one_is_refused():
    net = mlp(dropout=0.0)
    opt = _engine(net)
    _steps(net, opt, 2)
    state = opt.state_dict()["layerwise"]["history"]
    again = History()
    again.load_state_dict(state)
    pd.testing.assert_frame_equal(again.frame, opt.history)
    for bad, match in [
        ([], "must be a mapping with the one key 'rows'"),
        ({"rows": 3}, r"\['rows'\] must be a list of row dicts, got 3"),
        (
            {"rows": [{"step": 1, "colour": "red"}]},
            r"\['rows'\]\[0\] has unknown columns \['colour'\]",
        ),
        ({"rows": [{"step": 1}, 5]}, r"\['rows'\]\[1\] must be a mapping, got 5"),
    ]:
        with pytest.raises(ValueError, match=match):
            again.load_state_dict(bad)
        pd.testing.assert_frame_equal(again.frame, opt.history)  # unchanged
