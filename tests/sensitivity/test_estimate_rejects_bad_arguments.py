"""Every error path: each bad argument raises ValueError/TypeError naming it and its value;
a layer without a second derivative raises DoubleBackwardError naming the module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerwise.sensitivity import DoubleBackwardError, estimate, two_batch_noise
from layerwise.sensitivity.batching import as_batches, batch_size_of
from layerwise.sensitivity.probes import draw_probes, make_generator

from .cases import Attention, cross_entropy, mlp


def _ce(model, batch):
    return cross_entropy(model(batch[0]), batch[1])


BAD = [
    ({"probes": 0}, ValueError, r"probes must be >= 1, got 0"),
    ({"probes": 2.5}, TypeError, r"probes must be an int, got 2.5"),
    ({"chunk_size": 0}, ValueError, r"chunk_size must be >= 1, got 0"),
    ({"micro_batches": 1}, ValueError, r"micro_batches must be >= 2, got 1"),
    ({"example_chunk_size": 0}, ValueError, r"example_chunk_size must be >= 1, got 0"),
    ({"seed": -1}, ValueError, r"seed must be >= 0, got -1"),
    ({"isolated": "yes"}, TypeError, r"isolated must be a bool, got 'yes'"),
    ({"dtype": torch.int64}, TypeError, r"dtype must be None or a floating torch.dtype"),
    ({"tolerance": 0.0}, ValueError, r"tolerance must be a finite number > 0, got 0.0"),
    ({"tolerance": float("nan")}, ValueError, r"tolerance must be a finite number > 0, got nan"),
    ({"max_probes": 64}, ValueError, r"max_probes=64 .* needs a tolerance"),
    ({"tolerance": 0.1, "max_probes": 1}, ValueError, r"max_probes must be >= 2, got 1"),
    ({"progress": 3}, TypeError, r"progress must be callable, got 3"),
    ({"batch_size": "x"}, TypeError, r"batch_size must be callable, got 'x'"),
    ({"generator": 7}, TypeError, r"generator must be a torch.Generator or None, got 7"),
    ({"hvp_mode": "fwd"}, ValueError, r"hvp_mode must be one of .* got 'fwd'"),
    ({"variance": "loop"}, ValueError, r"variance must be one of .* got 'loop'"),
    ({"distribution": "normal"}, ValueError, r"distribution must be one of .* got 'normal'"),
    ({"quantities": ["grad_norm", "hessian"]}, ValueError, r"unknown names \['hessian'\]"),
    ({"quantities": []}, ValueError, r"quantities is empty"),
    ({"quantities": 3}, TypeError, r"quantities must be 'all' or an iterable of names, got 3"),
    (
        {"groups": {"a": ["0.weight", "9.bias"]}}, ValueError,
        r"groups\['a'\] names unknown parameters \['9.bias'\]; the model's parameters are "
        r"\['0.weight'",
    ),
    (
        {"groups": {"a": "0.weight"}}, TypeError,
        r"groups\['a'\] must be a list of parameter names, got '0.weight'",
    ),
    ({"groups": {"a": []}}, ValueError, r"groups\['a'\] is empty"),
    (
        {"groups": {"a": [["0.weight"]]}}, TypeError,
        r"groups\['a'\] must list parameter names \(strings\), got \[\['0.weight'\]\]",
    ),
    ({"seed": 2**64}, ValueError, r"seed must be an int in \[0, 2\*\*64\), got 1844674407370"),
    ({"groups": {"": ["0.weight"]}}, ValueError, r"group names must be non-empty strings, got ''"),
    ({"groups": {}}, ValueError, r"groups is empty"),
    ({"groups": [("a", ["0.weight"])]}, TypeError, r"groups must be a mapping"),
    (
        {"groups": {"a": ["0.weight"], "b": ["0.weight"]}}, ValueError,
        r"'0.weight' is in groups 'a' and 'b'",
    ),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, error, message", BAD, ids=[str(k) for k, _, _ in BAD])
def test_bad_option_names_argument_and_value(kwargs, error, message):
    case = mlp()
    with pytest.raises(error, match=message):
        estimate(case.model, _ce, case.batch, **kwargs)


def test_bad_model_loss_and_batches():
    case = mlp()
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got function"):
        estimate(_ce, _ce, case.batch)
    with pytest.raises(TypeError, match=r"loss_fn must be callable, got 1"):
        estimate(case.model, 1, case.batch)
    with pytest.raises(ValueError, match=r"batches yielded no batch"):
        estimate(case.model, _ce, [])
    with pytest.raises(
        TypeError, match=r"batches must be a batch or an iterable of batches, got None"
    ):
        estimate(case.model, _ce, None)
    with pytest.raises(TypeError, match=r"got int"):
        list(as_batches(5))
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar .* shape \(10, 3\)"):
        estimate(case.model, lambda m, b: m(b[0]), case.batch)
    with pytest.raises(TypeError, match=r"loss_fn must return a tensor, got float"):
        estimate(case.model, lambda m, b: 1.0, case.batch)
    with pytest.raises(ValueError, match=r"batch_size\(batch\) must return an int >= 1, got 0"):
        estimate(case.model, _ce, case.batch, batch_size=lambda b: 0)
    with pytest.raises(ValueError, match=r"pass batch_size=callable"):
        batch_size_of({"text": "abc"})


def test_variance_needs_two_examples_and_per_example_rejects_batchnorm():
    case = mlp()
    x, y = case.batch
    with pytest.raises(
        ValueError, match=r"variance='per_example' needs batches of >= 2 examples, batch 0 has 1"
    ):
        estimate(case.model, _ce, (x[:1], y[:1]))
    with pytest.raises(ValueError, match=r"variance='micro_batch' needs batches of >= 2"):
        estimate(case.model, _ce, (x[:1], y[:1]), variance="micro_batch")
    estimate(case.model, _ce, (x[:1], y[:1]), quantities=["grad_norm", "hessian_trace"])
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double()
    with pytest.raises(ValueError, match=r"variance='per_example' is undefined .* BatchNorm"):
        estimate(bn, _ce, case.batch, variance="per_example")
    # BatchNorm cannot normalise a micro-batch of one example: a clear error, not torch's
    for variance in ("auto", "micro_batch", "two_batch"):
        with pytest.raises(
            ValueError,
            match=r"micro_batches=4 on a model with BatchNorm in training mode needs batches of "
            r">= 8 examples \(>= 2 per micro-batch\), batch 0 has 6; lower micro_batches",
        ):
            estimate(bn, _ce, (x[:6], y[:6]), variance=variance)
    assert estimate(bn, _ce, (x[:6], y[:6]), micro_batches=3)["1"].grad_variance >= 0
    estimate(bn, _ce, (x[:6], y[:6]), quantities=["grad_norm", "hessian_trace"])


def test_model_without_trainable_parameters():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"model Linear has no trainable parameters"):
        estimate(frozen, lambda m, b: m(b).sum(), torch.ones(3, 2))


def test_generator_on_another_device_is_rejected():
    model = nn.Linear(2, 2, device="meta")  # parameters on another device than the generator
    gen = make_generator("cpu", 0)
    with pytest.raises(
        ValueError, match=r"generator is on device cpu, but the parameters are on \['meta'\]"
    ):
        estimate(model, lambda m, b: m(b).sum(), torch.ones(3, 2, device="meta"), generator=gen)


def test_layer_without_double_backward_is_named_with_advice():
    # nn.MultiheadAttention(need_weights=False) runs fused SDPA, which the estimator now
    # switches to the math backend itself (tests/sensitivity/test_attention_double_backward);
    # a fused kernel called directly still has no second derivative and is named
    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(3, 9)

        def forward(self, x):
            q, k, v = self.qkv(x).unsqueeze(1).chunk(3, -1)
            attend = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            return attend(q, k, v)[0].mean((1, 2))

    torch.manual_seed(0)
    model = nn.Sequential(Fused(), nn.Linear(3, 1))
    x, y = torch.randn(4, 3, 3), torch.randn(4, 1)

    def loss(m, b):
        return (m(b[0]) - b[1]).square().mean()

    with pytest.raises(DoubleBackwardError, match=r"0 \(Fused\)") as info:
        estimate(model, loss, (x, y), probes=2)
    assert "plain PyTorch equivalent" in str(info.value)
    grads_only = estimate(model, loss, (x, y), quantities=["grad_norm", "grad_variance"])
    assert grads_only["0.qkv"].grad_norm > 0
    assert estimate(Attention(need_weights=False), loss, (x, y), probes=2)["attn"].hessian_trace


def test_probe_and_two_batch_helpers_validate():
    gen = make_generator("cpu", 0)
    with pytest.raises(ValueError, match=r"seed must be an int >= 0, got -3"):
        make_generator("cpu", -3)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\), got 18446"):
        make_generator("cpu", 2**64)
    with pytest.raises(ValueError, match=r"count must be an int >= 1, got 0"):
        draw_probes({"w": torch.zeros(2)}, 0, gen)
    with pytest.raises(ValueError, match=r"distribution must be one of .* got 'uniform'"):
        draw_probes({"w": torch.zeros(2)}, 1, gen, "uniform")
    with pytest.raises(
        ValueError, match=r"b_small must be smaller than b_big, got b_small=8\.0, b_big=8\.0"
    ):
        two_batch_noise(1.0, 1.0, 8, 8)
    with pytest.raises(ValueError, match=r"b_small must be a finite number > 0, got 0"):
        two_batch_noise(1.0, 1.0, 0, 8)
    with pytest.raises(TypeError, match=r"b_big must be a number of examples, got '8'"):
        two_batch_noise(1.0, 1.0, 2, "8")
    with pytest.raises(ValueError, match=r"must name the same groups, got \['a'\] and \['b'\]"):
        two_batch_noise({"a": 1.0}, {"b": 1.0}, 2, 8)
    with pytest.raises(TypeError, match=r"both be mappings or both tensors/floats"):
        two_batch_noise({"a": 1.0}, 1.0, 2, 8)
    with pytest.raises(
        TypeError, match=r"small_sq_norms must be a mapping, a tensor or a float, got 'x'"
    ):
        two_batch_noise("x", 1.0, 2, 8)


def test_building_blocks_validate():
    from layerwise.sensitivity import (
        FunctionalLoss,
        default_groups,
        hutchinson_samples,
        per_example_gradients,
        resolve_groups,
        trace_estimate,
    )

    case = mlp()
    like = {"w": torch.zeros(2)}
    gen = make_generator("cpu", 0)

    def run(**kw):
        options = {"budget": 2, "chunk_size": 1, "generator": gen, **kw}
        return hutchinson_samples(lambda v: v, like, [0], 1, **options)

    with pytest.raises(ValueError, match="budget must be >= 1, got 0"):
        run(budget=0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        run(chunk_size=0)
    with pytest.raises(ValueError, match="tolerance must be a number > 0 or None, got -1"):
        run(tolerance=-1)
    with pytest.raises(ValueError, match="group_of has 2 entries for 1 parameters"):
        hutchinson_samples(lambda v: v, like, [0, 0], 1, budget=1, chunk_size=1, generator=gen)
    with pytest.raises(ValueError, match=r"samples must have shape \(probes >= 1, groups\)"):
        trace_estimate(torch.zeros(0, 2))
    with pytest.raises(ValueError, match=r"params names unknown parameters \['nope'\]"):
        FunctionalLoss(case.model, _ce, ["nope"])
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got int"):
        default_groups(3)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        resolve_groups("m", None)
    loss = FunctionalLoss(case.model, _ce, ["0.weight"])
    with pytest.raises(ValueError, match="size must be >= 1, got 0"):
        per_example_gradients(loss, loss.values, case.batch, 0)
    with pytest.raises(ValueError, match=r"batch has no tensor with 7 rows \(size=7\)"):
        per_example_gradients(loss, loss.values, case.batch, 7)
