"""The engine's estimator settings: quantities come from the controller's rule, a dict
overrides the engine's defaults, an EstimateOptions is used as it is, runtime callables are
passed through, and the settings reach every recalibration's estimate."""

from __future__ import annotations

import math

import pytest
import torch

from layerwise.engine import (
    DEFAULT_GGN_SAMPLES,
    DEFAULT_PROBES,
    LayerwiseOptimizer,
    required_quantities,
)
from layerwise.policies import RULES, SensitivityController
from layerwise.sensitivity import (
    KNOWN_QUANTITIES,
    QUANTITIES,
    CrossEntropy,
    EstimateOptions,
    GGNLossError,
)

from .helpers import data, mlp, named_groups
from .helpers import loss_fn as plain_loss_fn

# the helpers' loss as a loss object, so that a rule may read the Gauss-Newton trace
loss_fn = CrossEntropy(lambda model, batch: model(batch[0]), lambda batch: batch[1])


def _reports(controller, estimator, steps: int = 2) -> list:
    """The reports of ``steps`` recalibrations (one per step), seen by a callback."""
    net = mlp(dropout=0.0)
    seen = []
    opt = LayerwiseOptimizer(
        torch.optim.SGD(named_groups(net), lr=0.1), model=net, loss_fn=loss_fn,
        controller=controller, recalibrate_every=1, estimator=estimator,
        callback=lambda record: record.report is not None and seen.append(record.report),
    )  # fmt: skip
    for batch in data(steps):
        opt.zero_grad()
        loss_fn(net, batch).backward()
        opt.step(batch)
    return seen


@pytest.mark.parametrize("rule", [*RULES, "curvature+noise"])
def test_quantities_default_to_what_the_rule_declares_plus_grad_norm(rule):
    controller = SensitivityController(rule, max_rel_stderr=math.inf)
    declared = controller.rule.quantities
    expected = tuple(q for q in KNOWN_QUANTITIES if q in {*declared, "grad_norm"})
    # the rule's quantities for this loss: "auto" curvature reads the GGN trace of a loss object
    auto = rule.split("+")[0] == "curvature"
    swap = {"hessian_trace": "ggn_trace"} if auto else {}
    for_object = tuple(q for q in KNOWN_QUANTITIES if q in {swap.get(q, q) for q in expected})
    assert required_quantities(controller) == expected
    if "ggn_trace" not in declared:
        assert required_quantities(controller, plain_loss_fn) == expected
    assert required_quantities(controller, loss_fn) == for_object
    (report, *_) = _reports(controller, None, steps=1)
    assert report.settings["quantities"] == list(for_object)
    assert report.settings["probes"] == DEFAULT_PROBES


def test_the_default_curvature_rule_reads_the_ggn_trace_of_a_loss_object():
    """``curvature`` (source "auto") with a loss object: the engine estimates ``ggn_trace``
    (DEFAULT_GGN_SAMPLES label samples, no Hessian probes) and the rule reads it; with a plain
    callable, ``hessian_trace`` at DEFAULT_PROBES probes; ``curvature_hessian`` keeps the
    Hessian trace whatever the loss."""
    controller = SensitivityController("curvature", max_rel_stderr=math.inf)
    (report, *_) = _reports(controller, None, steps=1)
    assert report.settings["quantities"] == ["grad_norm", "ggn_trace"]
    assert {e.ggn_samples for e in report} == {DEFAULT_GGN_SAMPLES}
    assert all(e.hessian_trace is None and e.ggn_trace > 0 for e in report)
    assert controller.rule.source_of(report) == "ggn"
    net = mlp(dropout=0.0)
    opt = LayerwiseOptimizer(
        torch.optim.SGD(named_groups(net), lr=0.1), model=net, loss_fn=plain_loss_fn,
        controller="curvature", recalibrate_every=10**6,
    )  # fmt: skip
    assert opt._recalibrator.options.quantities == ("grad_norm", "hessian_trace")
    assert opt._recalibrator.options.probes == DEFAULT_PROBES
    old = SensitivityController("curvature_hessian", max_rel_stderr=math.inf)
    (report, *_) = _reports(old, None, steps=1)
    assert report.settings["quantities"] == ["grad_norm", "hessian_trace"]
    assert all(e.ggn_trace is None for e in report)


class _NoRule:
    """A controller without a rule: the engine cannot know what it reads."""

    def update(self, report, *, step):
        from layerwise.policies.controller import Decision

        return Decision(step, dict.fromkeys(report.names, 1.0))

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_a_controller_without_declared_quantities_gets_all():
    assert required_quantities(_NoRule()) == QUANTITIES
    (report, *_) = _reports(_NoRule(), {"probes": 2}, steps=1)
    assert report.settings["quantities"] == list(QUANTITIES)


def test_a_rule_declaring_unknown_quantities_is_refused_at_construction():
    class Odd:
        rule = type("R", (), {"quantities": ("hessian",)})()

    with pytest.raises(ValueError, match=r"declares quantities \('hessian',\)"):
        required_quantities(Odd())


def test_a_dict_overrides_the_engine_defaults_and_reaches_every_estimate():
    controller = SensitivityController("curvature_hessian", max_rel_stderr=math.inf)
    reports = _reports(controller, {"probes": 3, "hvp_mode": "jvp", "chunk_size": 2})
    assert len(reports) == 2
    for report in reports:
        assert report.settings["probes"] == 3 and report.settings["chunk_size"] == 2
        assert report.settings["hvp_mode_requested"] == "jvp"
        assert report.settings["quantities"] == ["grad_norm", "hessian_trace"]
        assert report.settings["seed"] is None  # the engine's generator, not a seed
        assert {e.hessian_probes for e in report} == {3}


def test_an_estimate_options_object_is_used_as_it_is():
    options = EstimateOptions(probes=5, quantities=["grad_norm"])
    controller = SensitivityController("trust_ratio", max_rel_stderr=math.inf)
    (report, *_) = _reports(controller, options, steps=1)
    assert report.settings["quantities"] == ["grad_norm"]
    assert report.settings["probes"] == 5
    assert all(e.hessian_trace is None for e in report)


def test_runtime_callables_are_passed_through():
    sizes = []

    def batch_size(batch):
        sizes.append(len(batch[0]))
        return len(batch[0])

    controller = SensitivityController("trust_ratio", max_rel_stderr=math.inf)
    _reports(controller, {"probes": 2, "batch_size": batch_size}, steps=2)
    assert sizes == [12, 12, 12]  # the first batch's dry run, then two recalibrations


def test_bad_options_fail_at_construction_not_at_the_first_recalibration():
    net = mlp()
    with pytest.raises(ValueError, match="max_probes=8 is a budget for the stopping rule"):
        LayerwiseOptimizer(
            torch.optim.SGD(named_groups(net), lr=0.1), model=net, loss_fn=loss_fn,
            controller="curvature", recalibrate_every=10**6, estimator={"max_probes": 8},
        )  # fmt: skip


def test_a_rule_reading_the_ggn_trace_gets_it_and_a_plain_loss_is_refused_at_once():
    controller = SensitivityController("curvature_ggn", max_rel_stderr=math.inf)
    (report, *_) = _reports(controller, {"ggn_samples": 3}, steps=1)
    assert report.settings["quantities"] == ["grad_norm", "ggn_trace"]
    assert {e.ggn_samples for e in report} == {3} and all(e.hessian_trace is None for e in report)
    net = mlp()
    with pytest.raises(GGNLossError, match="ggn_trace needs the split"):
        LayerwiseOptimizer(
            torch.optim.SGD(named_groups(net), lr=0.1), model=net, loss_fn=plain_loss_fn,
            controller="curvature_ggn", recalibrate_every=10**6,
        )  # fmt: skip


def _bn_reports(estimator=None, train: bool = True) -> list:
    """Two recalibrations of the default controller on an MLP with BatchNorm (in training
    mode unless ``train`` is False), through a loss object."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 10), torch.nn.BatchNorm1d(10), torch.nn.Tanh(), torch.nn.Linear(10, 3)
    )
    net.train(train)
    groups = [{"params": list(m.parameters()), "name": f"g{i}"} for i, m in enumerate(net)
              if list(m.parameters())]  # fmt: skip
    seen = []
    opt = LayerwiseOptimizer(
        torch.optim.SGD(groups, lr=0.1), model=net, loss_fn=loss_fn, controller="curvature",
        recalibrate_every=1, estimator=estimator,
        callback=lambda record: record.report is not None and seen.append(record),
    )  # fmt: skip
    for batch in data(2):
        opt.zero_grad()
        loss_fn(net, batch).backward()
        opt.step(batch)
    return seen


def test_the_default_label_samples_follow_the_model():
    """One label set where the per-example spread gives ggn_trace its standard error; two
    under BatchNorm in training mode, where one would leave it NaN and the controller's
    confidence gate would hold every group; an explicit ggn_samples is the user's."""
    from layerwise.engine import DEFAULT_GGN_SAMPLES_BATCH_STATISTICS

    assert DEFAULT_GGN_SAMPLES == 1 and DEFAULT_GGN_SAMPLES_BATCH_STATISTICS == 2
    for record in _bn_reports():
        assert {e.ggn_samples for e in record.report} == {2}
        assert all(math.isfinite(e.ggn_trace_stderr) for e in record.report)
        assert not any("stderr of ggn_curvature inf" in row["reason"] for row in record.rows)
        assert any(row["reason"].startswith("curvature: ggn_curvature") for row in record.rows)
    for record in _bn_reports(train=False):  # running statistics: per example again
        assert {e.ggn_samples for e in record.report} == {1}
        assert all(math.isfinite(e.ggn_trace_stderr) for e in record.report)
    for record in _bn_reports({"ggn_samples": 1}):
        assert {e.ggn_samples for e in record.report} == {1}
        assert all(math.isnan(e.ggn_trace_stderr) for e in record.report)
