"""Every zoo model through the library as a user would take it: grouping by depth (blocks in
order, head last), ``estimate`` at default options (finite, leaves no trace), ten engine
steps under every registered rule, and ``layerwise analyze`` on one of them."""

from __future__ import annotations

import math
import re

import pytest
import torch

from layerwise.engine import LayerwiseOptimizer
from layerwise.policies import RULES, SensitivityController, group_parameters
from layerwise.sensitivity import estimate
from tests.sensitivity.test_estimate_leaves_no_trace import _assert_unchanged, _snapshot

from .cases import CASES, REPLICA_OF, ZooCase

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # transformers' own notices


def _ready(case: ZooCase):
    reason = case.skip_reason()
    if reason:
        pytest.skip(reason)
    return case.build()


def _batch(case: ZooCase, seed: int = 0):
    return case.batch(torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_depth_groups_run_from_the_embeddings_through_the_blocks_to_the_head(case):
    model = _ready(case)
    groups = group_parameters(model, "depth", head=case.head)
    assert groups.names == case.groups
    assert groups["head"].param_names == case.head_params and groups[-1].role == "head"
    assert [g.depth for g in groups] == list(range(len(groups)))
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    blocks = [g for g in groups if g.name.startswith("layer.")]
    firsts = [order[g.param_names[0]] for g in blocks]
    assert firsts == sorted(firsts)  # blocks in registration order, i.e. input to output
    paths = [{re.match(r"(.*?\.\d+)\.", n)[1] for n in g.param_names} for g in blocks]
    assert all(len(p) == 1 for p in paths), paths  # each layer is one numbered block
    assert len({p.pop() for p in paths}) == len(blocks)
    role = group_parameters(model, "role", head=case.head)
    assert role.names == ("backbone", "head") and role["head"].param_names == case.head_params


@pytest.mark.parametrize("real", sorted(REPLICA_OF))
def test_each_replica_has_the_parameter_names_of_the_real_model(real):
    case = next(c for c in CASES if c.name == real)
    model = _ready(case)
    replica = REPLICA_OF[real]()
    assert [(n, p.shape) for n, p in replica.named_parameters()] == [
        (n, p.shape) for n, p in model.named_parameters()
    ]
    assert [n for n, _ in replica.named_buffers()] == [n for n, _ in model.named_buffers()]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_estimate_at_default_options_is_finite_and_leaves_no_trace(case):
    model = _ready(case)
    groups = group_parameters(model, "depth", head=case.head)
    model.train()
    before = _snapshot(model)
    report = estimate(model, case.loss, _batch(case), groups=groups.mapping(), **case.estimator)
    assert report.names == list(groups.names)
    frame = report.to_frame().dropna(axis="columns", how="all")  # ggn_trace: not asked for
    nsr = frame.pop("noise_to_signal")  # +inf by definition where noise swamps the signal
    assert frame.select_dtypes("number").map(math.isfinite).all().all(), frame
    assert (nsr >= 0).all(), nsr
    assert all(g.grad_norm > 0 and g.hessian_probes == 32 for g in report)
    _assert_unchanged(model, before)


def _engine_run(case: ZooCase, rule: str, steps: int = 10) -> tuple[LayerwiseOptimizer, tuple]:
    model = _ready(case)
    groups = group_parameters(model, "depth", head=case.head)
    controller = SensitivityController(rule, max_rel_stderr=math.inf)
    opt = LayerwiseOptimizer(
        torch.optim.AdamW(groups.to_optimizer_groups(lr=1e-3)), model=model,
        loss_fn=case.loss, controller=controller, recalibrate_every=4,
        estimator={"probes": 2, **case.estimator},
    )  # fmt: skip
    model.train()
    for step in range(steps):
        batch = _batch(case, seed=step)
        opt.zero_grad()
        case.loss(model, batch).backward()
        opt.step(batch)
    return opt, groups.names


def _case_rules():
    for case in CASES:
        for rule in sorted(RULES):
            why = case.failing_rules.get(rule)
            marks = [pytest.mark.xfail(raises=RuntimeError, strict=True, reason=why)] if why else []
            yield pytest.param(case, rule, marks=marks, id=f"{case.name}-{rule}")


@pytest.mark.slow
@pytest.mark.parametrize(("case", "rule"), list(_case_rules()))
def test_ten_engine_steps_under_every_rule(case, rule):
    opt, names = _engine_run(case, rule)
    history = opt.history
    assert list(opt.multipliers) == list(names)
    assert sorted(set(history["step"])) == [4, 8]  # recalibrated at steps 4 and 8
    assert all(math.isfinite(m) and m > 0 for m in opt.multipliers.values())
    params = [p for g in opt.param_groups for p in g["params"]]
    assert all(torch.isfinite(p).all() for p in params)
    moved = any(abs(m - 1.0) > 1e-9 for m in opt.multipliers.values())  # 1 up to rounding
    if rule == "uniform":
        assert not moved
    elif rule == "noise" and (history["noise_to_signal"] == math.inf).all():
        assert not moved  # noise swamps the signal everywhere: no group is told apart
    else:  # the other rules read the estimates and move
        assert moved, history
