"""Per-group GGN traces against dense float64 Jacobians: G = Jᵀ H_out J with J from
``torch.func.jacrev`` and H_out from ``torch.func.hessian`` of the criterion in the outputs.

``ggn="exact"`` equals the block traces to 1e-8 on every case (an MLP, a CNN, attention
through the fused SDPA kernel, BatchNorm in training mode, a causal language model with
tied embeddings, ignored tokens and label smoothing); ``ggn="mc"`` with many samples lands
within a few of its standard errors; both are the same whatever else is measured and over
several batches they are the size-weighted mean.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from layerwise.sensitivity import default_groups, estimate

from .cases import GGN_CASE_IDS, GGN_CASES, tied_lm
from .reference import ggn_block_traces

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


@pytest.fixture(params=GGN_CASES, ids=GGN_CASE_IDS)
def case(request):
    return request.param()


def _estimate(case, batch=None, **settings):
    return estimate(
        case.model, case.loss_object, case.batch if batch is None else batch,
        quantities=["ggn_trace"], **settings,
    )  # fmt: skip


def test_exact_mode_equals_the_dense_block_traces(case):
    groups = default_groups(case.model)
    expected = ggn_block_traces(case, groups)
    report = _estimate(case, ggn="exact")
    assert report.names == list(groups)
    for g, value in expected.items():
        assert report[g].ggn_trace == pytest.approx(value, rel=1e-8, abs=1e-12), g
        assert report[g].ggn_trace_stderr == 0.0 and report[g].ggn_samples is None
        assert report[g].ggn_curvature == pytest.approx(value / report[g].num_params, rel=1e-8)
    assert report.cost.ggn_passes > 0 and report.cost.hvps == 0


def test_custom_groups_spanning_modules_are_sums_of_blocks():
    case = tied_lm()
    groups = {"attention_and_norm": ["qkv.weight", "norm.bias", "norm.weight"],
              "rest": ["embed.weight", "qkv.bias"]}  # fmt: skip
    expected = ggn_block_traces(case, groups)
    report = _estimate(case, ggn="exact", groups=groups)
    for g, value in expected.items():
        assert report[g].ggn_trace == pytest.approx(value, rel=1e-8), g


def test_many_samples_land_within_a_few_stderr_of_the_exact_trace(case):
    expected = ggn_block_traces(case, default_groups(case.model))
    report = _estimate(case, ggn_samples=400, chunk_size=100, seed=5)
    for g, value in expected.items():
        est = report[g]
        assert est.ggn_samples == 400
        assert abs(est.ggn_trace - value) <= 4.5 * est.ggn_trace_stderr + 1e-12, (g, value)
        assert est.ggn_trace >= 0.0  # a sum of squares


def test_label_smoothing_leaves_the_ggn_unchanged():
    case = tied_lm()
    plain = dataclasses.replace(case.loss_object, label_smoothing=0.0)
    assert plain(case.model, case.batch) != case.loss_object(case.model, case.batch)
    smoothed = _estimate(case, ggn="exact")
    unsmoothed = estimate(case.model, plain, case.batch, quantities=["ggn_trace"], ggn="exact")
    for g in smoothed.names:
        assert smoothed[g].ggn_trace == pytest.approx(unsmoothed[g].ggn_trace, rel=1e-12)


def test_ignored_tokens_count_for_nothing():
    case = tied_lm()
    x, y = case.batch
    keep = (y != -1).any(1)  # drop the example whose tokens are all ignored
    whole = _estimate(case, ggn="exact")
    fewer = _estimate(case, batch=(x[keep], y[keep]), ggn="exact")
    for g in whole.names:  # same tokens, same mean: the same GGN
        assert whole[g].ggn_trace == pytest.approx(fewer[g].ggn_trace, rel=1e-10)


def test_several_batches_are_the_size_weighted_mean():
    case = GGN_CASES[0]()  # the MLP: examples do not interact
    x, y = case.batch
    parts = [(x[:4], y[:4]), (x[4:], y[4:])]
    both = _estimate(case, batch=parts, ggn="exact")
    each = [_estimate(case, batch=p, ggn="exact") for p in parts]
    for g in both.names:
        mean = (4 * each[0][g].ggn_trace + 6 * each[1][g].ggn_trace) / 10
        assert both[g].ggn_trace == pytest.approx(mean, rel=1e-12)
    sampled = _estimate(case, batch=parts, ggn_samples=3)
    assert all(e.ggn_samples == 6 for e in sampled) and sampled.cost.ggn_passes == 6


def test_other_quantities_do_not_change_the_ggn_of_one_batch():
    case = GGN_CASES[0]()
    alone = _estimate(case, ggn_samples=5, seed=2)
    together = estimate(
        case.model, case.loss_object, case.batch, seed=2, ggn_samples=5,
        quantities=["grad_norm", "grad_variance", "ggn_trace"],
    )  # fmt: skip
    for g in alone.names:
        assert together[g].ggn_trace == alone[g].ggn_trace
        assert together[g].grad_variance is not None and together[g].hessian_trace is None


def test_float32_model_agrees_with_float64_exact():
    case = GGN_CASES[0]()
    model32 = case.model.float()
    try:
        x, y = case.batch
        low = estimate(model32, case.loss_object, (x.float(), y), quantities=["ggn_trace"],
                       ggn="exact")  # fmt: skip
        high = estimate(model32, case.loss_object, (x.float(), y), quantities=["ggn_trace"],
                        ggn="exact", dtype=torch.float64)  # fmt: skip
    finally:
        case.model.double()
    for g in low.names:
        assert low[g].ggn_trace == pytest.approx(high[g].ggn_trace, rel=1e-5)
