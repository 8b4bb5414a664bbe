"""Every rule declares the estimate quantities it reads, and they are enough: a report
estimated with exactly those quantities gives every group a measurement, a finite score and a
finite multiplier."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from layerwise.policies import RULES, SensitivityController, make_rule
from layerwise.policies.rules import CurvatureRule
from layerwise.sensitivity import (
    KNOWN_QUANTITIES,
    QUANTITIES,
    CrossEntropy,
    GroupEstimate,
    SensitivityReport,
    estimate,
)

SPECS = [*RULES, "curvature+noise", "curvature+noise+trust_ratio", "curvature_ggn+noise"]


def _estimated(quantities: tuple[str, ...]) -> SensitivityReport:
    """A report of a small classifier estimated with exactly ``quantities``; with none, the
    quantities every report holds (``num_params``, ``param_norm``) and nothing else."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    # a loss object: every quantity, the Gauss-Newton trace included, can be estimated
    loss = CrossEntropy(lambda m, b: m(b[0]), lambda b: b[1])
    assert loss(net, (x, y)) == F.cross_entropy(net(x), y)
    if quantities:
        return estimate(net, loss, (x, y), quantities=quantities, probes=16, seed=1)
    base = estimate(net, loss, (x, y), quantities=["grad_norm"])
    return SensitivityReport([GroupEstimate(g.group, g.num_params, g.param_norm) for g in base])


def _sufficient(rule) -> list[str]:
    """What is missing when ``rule`` runs on a report with only its declared quantities."""
    report = _estimated(tuple(rule.quantities))
    problems = []
    for group, measured in rule.measure(report).items():
        if isinstance(measured, str):
            problems.append(f"{group}: {measured}")
        elif not math.isfinite(rule.score({k: m.log_value for k, m in measured.items()})):
            problems.append(f"{group}: score not finite")
    ctrl = SensitivityController(rule, alpha=1.0, max_rel_stderr=math.inf)
    decision = ctrl.update(report, step=1)
    problems += [
        f"{g}: multiplier {m!r}" for g, m in decision.multipliers.items() if not math.isfinite(m)
    ]
    problems += [f"{g}: {r}" for g, r in decision.reasons.items() if r.startswith("held")]
    return problems


@pytest.mark.parametrize("spec", SPECS)
def test_declared_quantities_are_known_and_in_canonical_order(spec):
    declared = make_rule(spec).quantities
    assert isinstance(declared, tuple)
    assert declared == tuple(q for q in KNOWN_QUANTITIES if q in declared)


@pytest.mark.parametrize("spec", SPECS)
def test_declared_quantities_are_sufficient(spec):
    assert _sufficient(make_rule(spec)) == []


def test_a_composition_reads_the_union_of_its_parts():
    assert make_rule("curvature+trust_ratio").quantities == ("grad_norm", "hessian_trace")
    assert make_rule("uniform+noise").quantities == ("grad_norm", "grad_variance")
    assert make_rule("curvature_ggn+trust_ratio").quantities == ("grad_norm", "ggn_trace")


@dataclass(frozen=True)
class _Understated(CurvatureRule):
    """Reads the Hessian trace but declares nothing: the contract check must catch it."""

    quantities: ClassVar[tuple[str, ...]] = ()
    name: str = "understated"


def test_the_contract_check_catches_a_rule_that_declares_too_little():
    problems = _sufficient(_Understated())
    assert problems and all("no finite hessian_trace" in p or "held" in p for p in problems)


def test_a_part_without_declared_quantities_makes_the_union_everything():
    class Bare:
        name = "bare"

        def measure(self, report):
            return {g.group: {} for g in report}

        def score(self, logs):
            return 0.0

    assert make_rule([CurvatureRule(), Bare()]).quantities == QUANTITIES
