"""Per-group Hutchinson traces of ``estimate`` against the dense Hessian's diagonal blocks.

Exactness: with the same probe draws, ``estimate`` returns exactly the Hutchinson mean and
standard error computed from the dense float64 Hessian, on every model, for shared and
isolated probes and both product modes. Unbiasedness: with many probes the estimate is
within a few standard errors of the exact block trace.
"""

from __future__ import annotations

import pytest
import torch

from layerwise.sensitivity import default_groups, estimate, make_generator

from .cases import CASE_IDS, CASES, mlp
from .reference import block_traces, dense_hessian, hutchinson_reference


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request):
    return request.param()


def _reference(case, groups, *, probes, chunk, seed, isolated):
    order = [n for n, _ in case.model.named_parameters() if any(n in m for m in groups.values())]
    like = {n: p.detach() for n, p in case.model.named_parameters() if n in order}
    h, slices = dense_hessian(case, order)
    gen = make_generator("cpu", seed)
    return hutchinson_reference(
        h, order, slices, groups, like, probes=probes, chunk=chunk, generator=gen,
        isolated=isolated,
    )  # fmt: skip


@pytest.mark.parametrize(
    "isolated, hvp_mode", [(False, "jvp"), (False, "vjp"), (True, "auto")], ids=str
)
def test_traces_equal_dense_hutchinson_with_the_same_probes(case, isolated, hvp_mode):
    groups = default_groups(case.model)
    report = estimate(
        case.model, case.loss_fn, case.batch, quantities=["hessian_trace"], probes=6,
        chunk_size=4, seed=3, isolated=isolated, hvp_mode=hvp_mode,
    )  # fmt: skip
    expected = _reference(case, groups, probes=6, chunk=4, seed=3, isolated=isolated)
    assert report.names == list(groups)
    for g, (mean, stderr) in expected.items():
        assert report[g].hessian_trace == pytest.approx(mean, rel=1e-9, abs=1e-11)
        assert report[g].hessian_trace_stderr == pytest.approx(stderr, rel=1e-9, abs=1e-11)
        assert report[g].hessian_probes == 6
    assert report.cost.hvps == 6 * (len(groups) if isolated else 1)


def test_custom_groups_spanning_modules_match_dense_blocks():
    case = mlp()
    groups = {"weights": ["0.weight", "2.weight"], "biases": ["2.bias", "0.bias"]}
    report = estimate(case.model, case.loss_fn, case.batch, groups=groups, probes=5, seed=1)
    expected = _reference(case, groups, probes=5, chunk=8, seed=1, isolated=False)
    for g, (mean, _) in expected.items():
        assert report[g].hessian_trace == pytest.approx(mean, rel=1e-9)
        assert report[g].num_params == sum(case.model.get_parameter(n).numel() for n in groups[g])


def test_many_probes_land_within_a_few_stderr_of_the_exact_block_trace(case):
    groups = default_groups(case.model)
    exact = block_traces(case, groups)
    report = estimate(
        case.model, case.loss_fn, case.batch, quantities=["hessian_trace"], probes=256,
        chunk_size=128, seed=11,
    )  # fmt: skip
    for g, value in exact.items():
        est = report[g]
        assert abs(est.hessian_trace - value) <= 4.5 * est.hessian_trace_stderr + 1e-12, g


def test_stderr_shrinks_like_one_over_sqrt_probes():
    case = mlp()
    small = estimate(case.model, case.loss_fn, case.batch, probes=32, chunk_size=32, seed=5)
    large = estimate(case.model, case.loss_fn, case.batch, probes=512, chunk_size=256, seed=5)
    for g in small.names:
        ratio = small[g].hessian_trace_stderr / large[g].hessian_trace_stderr
        assert 2.5 < ratio < 6.5, (g, ratio)  # sqrt(512/32) = 4


def test_curvature_is_the_trace_per_parameter():
    case = mlp()
    report = estimate(case.model, case.loss_fn, case.batch, probes=4)
    for est in report:
        assert est.curvature == pytest.approx(est.hessian_trace / est.num_params)
    assert torch.isfinite(torch.tensor(report.to_frame()["curvature"].to_numpy())).all()
