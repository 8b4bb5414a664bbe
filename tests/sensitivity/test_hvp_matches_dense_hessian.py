"""Hessian-vector products in both modes equal the dense Hessian times the vector."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerwise.sensitivity import hvp
from layerwise.sensitivity.functional import FunctionalLoss, RngReplay
from layerwise.sensitivity.hutchinson import hutchinson_samples
from layerwise.sensitivity.hvp import (
    BATCHED_BELOW_FLOPS,
    HessianProduct,
    batch_probes,
    choose_hvp_mode,
)
from layerwise.sensitivity.probes import draw_probes, make_generator

from .cases import CASE_IDS, CASES
from .reference import dense_hessian


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request):
    return request.param()


@pytest.mark.parametrize("mode, batched", [("jvp", None), ("vjp", True), ("vjp", False)], ids=str)
def test_products_and_quadratic_forms_equal_dense_hessian_times_vector(case, mode, batched):
    names = [n for n, _ in case.model.named_parameters()]
    loss = FunctionalLoss(case.model, case.loss_fn, names)
    h, slices = dense_hessian(case, names)
    gen = torch.Generator().manual_seed(0)
    probes = {
        n: torch.randn(3, *v.shape, generator=gen, dtype=v.dtype) for n, v in loss.values.items()
    }
    product = HessianProduct(
        loss, loss.values, case.batch, mode=mode, fallback=False, batched=batched
    )
    out = product(probes)
    assert product.mode == mode
    flat_v = torch.cat([probes[n].reshape(3, -1) for n in names], 1)
    flat_hv = torch.cat([out[n].reshape(3, -1) for n in names], 1)
    expected = flat_v @ h  # H symmetric
    assert torch.allclose(flat_hv, expected, atol=1e-10, rtol=1e-10)
    # v_kᵀ (H v_k) per parameter, without the products: the same numbers
    forms = product.quadratic_forms(probes)
    exact = torch.stack([(flat_v[:, s] * expected[:, s]).sum(1) for s in slices], 1)
    assert forms.shape == (3, len(names))
    assert torch.allclose(forms, exact, atol=1e-10, rtol=1e-10)


def test_batched_and_probe_by_probe_give_the_same_traces_up_to_round_off():
    """The choice between one batched second backward pass and one per probe changes no
    number beyond float round-off: the Hutchinson terms of the same probes agree."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    names = [n for n, _ in model.named_parameters()]
    loss = FunctionalLoss(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), names)
    terms = {}
    for batched in (True, False):
        product = HessianProduct(loss, loss.values, (x, y), mode="vjp", batched=batched)
        terms[batched] = hutchinson_samples(
            product, loss.values, [0, 0, 1, 1], 2, budget=10, chunk_size=4,
            generator=make_generator("cpu", 7),
        )  # fmt: skip
        assert product.batched is batched
    assert terms[True].shape == (10, 2)
    assert torch.allclose(terms[True], terms[False], rtol=1e-12, atol=1e-14)


def test_the_choice_follows_the_counted_flops_once_per_model_and_batch_shape():
    assert batch_probes("cuda", 1e12) and batch_probes("cpu", None)
    assert batch_probes("cpu", BATCHED_BELOW_FLOPS / 2)
    assert not batch_probes("cpu", BATCHED_BELOW_FLOPS)
    model = nn.Linear(50, 40)
    loss = FunctionalLoss(model, lambda m, b: m(b).square().mean(), ["weight", "bias"])
    probes = draw_probes(loss.values, 2, make_generator("cpu", 0))
    for size, batched in ((4, True), (2000, False)):
        x = torch.randn(size, 50)
        product = HessianProduct(loss, loss.values, x, mode="vjp", model=model)
        product(probes)
        # forward x W^T (2 B 50 40 FLOPs) and the gradient of W (the same again); no
        # gradient of the input is needed
        flops = hvp._FLOPS[model][hvp._signature(loss.values, x)]
        assert flops == 4 * size * 50 * 40
        assert product.batched is batched
    cached = dict(hvp._FLOPS[model])
    again = HessianProduct(loss, loss.values, torch.randn(4, 50), mode="vjp", model=model)
    again(probes)
    assert hvp._FLOPS[model] == cached and again.batched is True
    with pytest.raises(TypeError, match=r"batched must be a bool or None, got 1"):
        HessianProduct(loss, loss.values, x, mode="vjp", batched=1)


def test_modes_agree_on_gradient_and_products_with_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 2)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))

    def ce(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1])

    names = [n for n, _ in model.named_parameters()]
    loss = FunctionalLoss(model, ce, names)
    probes = {n: torch.randn(4, *v.shape, dtype=v.dtype) for n, v in loss.values.items()}
    rng = RngReplay([torch.device("cpu")])
    results = {}
    for mode in ("jvp", "vjp"):
        product = HessianProduct(loss, loss.values, (x, y), mode=mode, rng=rng, fallback=False)
        first = product({n: v[:2] for n, v in probes.items()})
        second = product({n: v[2:] for n, v in probes.items()})
        results[mode] = (product.gradient, first, second)
    for a, b in zip(results["jvp"], results["vjp"], strict=True):
        for n in names:
            assert torch.allclose(a[n], b[n], atol=1e-12), n
    # without replaying the RNG the masks differ, so the agreement above is not trivial
    other = HessianProduct(loss, loss.values, (x, y), mode="vjp", fallback=False)
    other_first = other({n: v[:2] for n, v in probes.items()})
    assert not all(torch.allclose(other_first[n], results["vjp"][1][n]) for n in names)


def test_auto_mode_resolves_by_device_and_number_of_calls_and_rejects_unknown():
    assert choose_hvp_mode("auto", 1, "cpu") == "vjp"  # measured faster on CPU
    assert choose_hvp_mode("auto", 1, "cuda") == "jvp"
    assert choose_hvp_mode("auto", 4, "cuda") == "vjp"
    assert choose_hvp_mode("jvp", 4) == "jvp"
    with pytest.raises(ValueError, match=r"hvp_mode must be one of .* got 'fwd'"):
        choose_hvp_mode("fwd", 1)
    loss = FunctionalLoss(nn.Linear(2, 1), lambda m, b: m(b).sum(), ["weight"])
    with pytest.raises(ValueError, match=r"mode must be 'jvp' or 'vjp', got 'auto'"):
        HessianProduct(loss, loss.values, torch.ones(1, 2), mode="auto")


@pytest.mark.parametrize("batched", [True, False])
def test_a_parameter_no_gradient_depends_on_gets_zero_products(batched):
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)}).double()
    names = [n for n, _ in model.named_parameters()]
    loss = FunctionalLoss(model, lambda m, x: m["used"](x).tanh().square().mean(), names)
    x = torch.randn(5, 3, dtype=torch.float64)
    probes = draw_probes(loss.values, 3, make_generator("cpu", 0))
    product = HessianProduct(loss, loss.values, x, mode="vjp", batched=batched)
    out, forms = product(probes), product.quadratic_forms(probes)
    for i, n in enumerate(names):
        assert out[n].shape == probes[n].shape
        assert (out[n].abs().sum() == 0) == n.startswith("unused"), n
        assert (forms[:, i].abs().sum() == 0) == n.startswith("unused"), n
    assert product.gradient["unused.weight"].abs().sum() == 0


class _Square(torch.autograd.Function):
    """x², whose derivative 2 g x is itself a Function with a data-dependent backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _Twice.apply(g, x)


class _Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, x):
        ctx.save_for_backward(g, x)
        return 2 * g * x

    @staticmethod
    def backward(ctx, c):
        g, x = ctx.saved_tensors
        if c.abs().sum().item() < 0:  # .item(): vmap cannot batch this
            raise AssertionError("unreachable")
        return 2 * c * x, 2 * c * g


def test_a_backward_pass_vmap_cannot_batch_falls_back_to_one_pass_per_probe():
    w = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    probes = {"w": torch.eye(3, dtype=torch.float64)}
    product = HessianProduct(
        lambda p, b: _Square.apply(p["w"]).sum(), {"w": w}, None, mode="vjp", batched=True
    )
    assert torch.equal(product(probes)["w"], 2 * torch.eye(3, dtype=torch.float64))
    assert product.batched is False  # and stays so for the next chunks
    assert torch.equal(product.quadratic_forms(probes), torch.full((3, 1), 2.0).double())


def test_the_flop_cache_tells_batches_apart_by_their_tensors_shapes():
    """The FLOP count is cached per batch signature: the shapes of the batch's tensors, found
    in dataclasses and mappings too (a Hugging Face BatchEncoding is one), so another
    sequence length is counted afresh."""
    import dataclasses

    from layerwise.sensitivity.hvp import _signature

    @dataclasses.dataclass
    class Inputs:
        ids: torch.Tensor

    class Encoding(dict):
        pass

    for wrap in (Inputs, lambda t: Encoding(ids=t), lambda t: {"x": [t]}):
        short, long = wrap(torch.zeros(2, 5)), wrap(torch.zeros(2, 7))
        assert _signature({}, short) != _signature({}, long)
        assert _signature({}, short) == _signature({}, wrap(torch.ones(2, 5)))
