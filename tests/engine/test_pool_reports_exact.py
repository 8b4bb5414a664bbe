"""Pooling per-rank reports (the DDP path, without processes) gives the concatenated
batch's estimates exactly where the maths says it must: Hutchinson traces with shared
probes, the mean gradient's norm, the per-example (and aligned micro-batch) variance; the
between-rank noise equals McCandlish's two-batch estimator."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from layerwise.engine.distributed import local_mean_gradient, pool_reports
from layerwise.sensitivity import CrossEntropy, estimate, two_batch_noise

from .helpers import loss_fn, mlp, named_groups

OPTIONS = {"probes": 5, "quantities": "all"}


def _setup(total: int = 12):
    net = mlp(dropout=0.0, dtype=torch.float64)
    mapping = {
        g["name"]: [n for n, p in net.named_parameters() if any(p is q for q in g["params"])]
        for g in named_groups(net)
    }
    g = torch.Generator().manual_seed(2)
    x = torch.randn(total, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (total,), generator=g)
    return net, mapping, x, y


def _ranks(net, mapping, x, y, sizes, **options):
    """What each rank computes locally: its report, ‖G_r‖² per group, and b_r G_r."""
    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    names = [n for ns in mapping.values() for n in ns]
    reports, local_sq, weighted = [], [], []
    for a, b in itertools.pairwise(bounds):
        batch = (x[a:b], y[a:b])
        gen = torch.Generator().manual_seed(7)  # the same probe seed on every rank
        reports.append(estimate(net, loss_fn, batch, groups=mapping, generator=gen, **options))
        grads = local_mean_gradient(net, loss_fn, batch, names)
        local_sq.append(
            {k: math.fsum(float(grads[n].square().sum()) for n in v) for k, v in mapping.items()}
        )
        weighted.append({n: (b - a) * grads[n] for n in names})
    total = sum(sizes)
    mean = {n: sum(w[n] for w in weighted) / total for n in names}
    global_sq = {k: math.fsum(float(mean[n].square().sum()) for n in v) for k, v in mapping.items()}
    return reports, local_sq, global_sq


@pytest.mark.parametrize("sizes", [(6, 6), (3, 4, 5)], ids=["equal", "unequal"])
def test_pooled_per_example_report_equals_concatenated_batch(sizes):
    net, mapping, x, y = _setup(sum(sizes))
    reports, local_sq, global_sq = _ranks(
        net, mapping, x, y, sizes, variance="per_example", **OPTIONS
    )
    pooled = pool_reports(reports, local_sq, global_sq, list(sizes), [None] * len(sizes))
    whole = estimate(
        net, loss_fn, (x, y), groups=mapping, generator=torch.Generator().manual_seed(7),
        variance="per_example", **OPTIONS,
    )  # fmt: skip
    for name in mapping:
        p, w = pooled[name], whole[name]
        for field in ("hessian_trace", "grad_norm", "grad_variance", "noise_to_signal"):
            assert getattr(p, field) == pytest.approx(getattr(w, field), rel=1e-10), field
        assert p.param_norm == w.param_norm and p.num_params == w.num_params
        # shared probes: the pooled stderr bounds the stderr of the pooled estimate from above
        assert p.hessian_trace_stderr >= w.hessian_trace_stderr * (1 - 1e-12)
    assert pooled.cost.examples == sum(sizes) and pooled.settings["distributed"][
        "world_size"
    ] == len(sizes)


def test_pooled_micro_batch_report_equals_aligned_concatenated_batch():
    net, mapping, x, y = _setup(12)
    opts = {**OPTIONS, "variance": "micro_batch", "micro_batches": 3}
    reports, local_sq, global_sq = _ranks(net, mapping, x, y, (6, 6), **opts)
    pooled = pool_reports(reports, local_sq, global_sq, [6, 6], [3, 3])
    whole = estimate(
        net, loss_fn, (x, y), groups=mapping, generator=torch.Generator().manual_seed(7),
        **{**opts, "micro_batches": 6},
    )  # fmt: skip
    for name in mapping:
        assert pooled[name].grad_variance == pytest.approx(whole[name].grad_variance, rel=1e-10)


def test_between_rank_noise_is_the_two_batch_estimator():
    net, mapping, x, y = _setup(12)
    opts = {"probes": 2, "quantities": ["grad_norm", "hessian_trace"]}
    reports, local_sq, global_sq = _ranks(net, mapping, x, y, (4, 4, 4), **opts)
    pooled = pool_reports(reports, local_sq, global_sq, [4, 4, 4], [1, 1, 1])
    small = {k: math.fsum(sq[k] for sq in local_sq) / 3 for k in mapping}
    reference = two_batch_noise(small, global_sq, b_small=4, b_big=12)
    for name in mapping:
        n = pooled[name].num_params
        assert pooled[name].grad_variance * n == pytest.approx(
            reference[name].trace_sigma, rel=1e-10
        )
        assert pooled[name].grad_variance_stderr is None


def test_noise_left_out_when_not_asked():
    net, mapping, x, y = _setup(8)
    opts = {"probes": 2, "quantities": ["grad_norm"]}
    reports, local_sq, global_sq = _ranks(net, mapping, x, y, (4, 4), **opts)
    pooled = pool_reports(reports, local_sq, global_sq, [4, 4], [None, None], noise=False)
    assert all(g.grad_variance is None and g.noise_to_signal is None for g in pooled)
    assert all(g.hessian_trace is None and g.grad_norm is not None for g in pooled)


def test_pool_reports_needs_two_ranks():
    net, mapping, x, y = _setup(8)
    reports, local_sq, global_sq = _ranks(
        net, mapping, x, y, (8,), probes=2, quantities=["grad_norm"]
    )
    with pytest.raises(ValueError, match=">= 2 ranks"):
        pool_reports(reports, local_sq, global_sq, [8], [None])


def test_pooled_ggn_is_the_concatenated_batchs_with_a_bounding_stderr():
    net, mapping, x, y = _setup(12)
    ce = CrossEntropy(lambda model, batch: model(batch[0]), lambda batch: batch[1])
    sizes = [3, 4, 5]
    bounds = list(itertools.pairwise([0, 3, 7, 12]))

    def ranks(**options):
        return [
            estimate(net, ce, (x[a:b], y[a:b]), groups=mapping, quantities=["ggn_trace"],
                     generator=torch.Generator().manual_seed(7), **options)
            for a, b in bounds
        ]  # fmt: skip

    pooled = pool_reports(ranks(ggn="exact"), [{}] * 3, {}, sizes, [None] * 3, noise=False)
    whole = estimate(net, ce, (x, y), groups=mapping, quantities=["ggn_trace"], ggn="exact")
    for name in mapping:
        assert pooled[name].ggn_trace == pytest.approx(whole[name].ggn_trace, rel=1e-10)
        assert pooled[name].ggn_trace_stderr == 0.0 and pooled[name].grad_norm is None
    sampled = ranks(ggn_samples=3)
    pooled = pool_reports(sampled, [{}] * 3, {}, sizes, [None] * 3, noise=False)
    for name in mapping:
        ses = [r[name].ggn_trace_stderr for r in sampled]
        assert pooled[name].ggn_trace_stderr == pytest.approx(
            sum(b / 12 * s for b, s in zip(sizes, ses, strict=True)), rel=1e-12
        )
        assert pooled[name].ggn_samples == 3
    assert pooled.cost.ggn_passes == 3
