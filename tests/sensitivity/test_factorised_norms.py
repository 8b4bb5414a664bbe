"""Factorised per-example norms against a per-example autograd loop, exactly (float64).

For every case of :mod:`tests.sensitivity.factorised_models`: ‖g_i‖² and g_i·c per
parameter from :func:`example_norms` equal those of the gradients of one-example batches
(``autograd.grad`` in a Python loop) to 1e-10, in every chunking; the parameters the case
expects on the fast path are there (not silently handed to ``vmap``); and through
``estimate`` the statistics and ``report.settings`` follow. A dispatch mode checks that
no tensor of B × P elements is created on the fast path (and that it would catch one).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from layerwise.sensitivity import estimate, outer_norms
from layerwise.sensitivity.batching import slice_batch
from layerwise.sensitivity.factorised import example_norms
from layerwise.sensitivity.functional import FunctionalLoss
from layerwise.sensitivity.gradient_stats import GradientSamples
from layerwise.sensitivity.per_example import per_example_gradients

from .factorised_models import CASES, FCase, linear

IDS = [c.__name__ for c in CASES]


def _loop(case: FCase) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(per-example gradients {name: (B, *shape)}, batch gradient) by plain autograd."""
    params = dict(case.model.named_parameters())
    names, tensors = list(params), list(params.values())

    def grads(batch):
        loss = case.loss_fn(case.model, batch)
        return torch.autograd.grad(loss, tensors, allow_unused=True, materialize_grads=True)

    rows = [grads(slice_batch(case.batch, case.size, i, i + 1)) for i in range(case.size)]
    per_example = {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(names)}
    return per_example, dict(zip(names, grads(case.batch), strict=True))


@pytest.mark.parametrize("route", ["cheaper", "gram", "materialised"])
@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("make", CASES, ids=IDS)
def test_norms_and_dots_equal_the_per_example_loop(make, chunk, route, monkeypatch):
    """Every case in the route the cost model picks, and forced into each route."""
    if route != "cheaper":
        gram = route == "gram"
        monkeypatch.setattr(outer_norms, "_gram_is_cheaper", lambda *args: gram)
    case = make()
    per_example, centre = _loop(case)
    loss = FunctionalLoss(case.model, case.loss_fn, list(per_example))
    norms = example_norms(loss, case.batch, case.size, chunk)
    assert set(norms.fallback) == set(case.fallback)
    assert set(norms.factorised) == set(per_example) - set(case.fallback)
    for n, g in per_example.items():
        flat = g.reshape(case.size, -1)
        c = centre[n].reshape(-1)
        torch.testing.assert_close(norms.gradient[n], centre[n], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(norms.sq[n], flat.square().sum(1), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(norms.dot[n], flat @ c, rtol=1e-10, atol=1e-14)
        if n in norms.total:
            torch.testing.assert_close(norms.total[n], g.sum(0), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("make", CASES, ids=IDS)
def test_estimate_statistics_equal_those_of_the_vmap_samples(make):
    """The whole per-group statistic (trace of Σ̂, its standard error, the projected
    variance behind grad_norm's standard error) through add_norms equals GradientSamples.add
    fed the per-example gradients themselves."""
    case = make()
    per_example, centre = _loop(case)
    names = list(per_example)
    groups = [i % 3 for i in range(len(names))]
    fast = GradientSamples(centre, groups, 3)
    norms = example_norms(FunctionalLoss(case.model, case.loss_fn, names), case.batch, case.size)
    fast.add_norms(norms.sq, norms.dot, norms.total)
    slow = GradientSamples(centre, groups, 3)
    slow.add({n: g.clone() for n, g in per_example.items()})
    a, b = fast.finish(), slow.finish()
    for key in ("trace_sigma", "trace_sigma_var", "projected_var"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-9, atol=1e-13)


def test_estimate_records_the_method_and_matches_the_vmap_path():
    case = linear()
    report = estimate(case.model, case.loss_fn, case.batch, quantities="grad_variance")
    assert report.settings["per_example"] == "factorised"
    assert report.settings["per_example_vmap"] == []
    names = [n for n, _ in case.model.named_parameters()]
    loss = FunctionalLoss(case.model, case.loss_fn, names)
    grads = per_example_gradients(loss, loss.values, case.batch, case.size)
    for module in ("0", "2"):
        parts = [grads[f"{module}.{p}"].reshape(case.size, -1) for p in ("weight", "bias")]
        rows = torch.cat(parts, 1)
        trace = (rows - rows.mean(0)).square().sum() / (case.size - 1)
        expected = (trace / rows.shape[1]).item()
        assert report[module].grad_variance == pytest.approx(expected, rel=1e-10)


def test_estimate_records_a_partial_fallback():
    from .factorised_models import outside

    case = outside()
    report = estimate(case.model, case.loss_fn, case.batch, quantities="grad_variance")
    assert report.settings["per_example"] == "factorised+vmap"
    assert set(report.settings["per_example_vmap"]) == set(case.fallback)


class _Largest(TorchDispatchMode):
    """The largest number of elements of any tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _wide_models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, 10))  # fmt: skip
    cnn = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3),
                        nn.ReLU(), nn.Flatten(), nn.Linear(64 * 6 * 6, 64), nn.ReLU(),
                        nn.Linear(64, 10))  # fmt: skip
    return [(mlp, torch.randn(64, 64)), (cnn, torch.randn(64, 3, 8, 8))]


@pytest.mark.parametrize("which", [0, 1], ids=["mlp", "cnn"])
def test_no_tensor_of_batch_times_parameters_on_the_fast_path(which):
    model, x = _wide_models()[which]
    y = torch.randint(0, 10, (x.shape[0],))
    params = sum(p.numel() for p in model.parameters())
    limit = x.shape[0] * params  # B × P
    assert limit > 2**22  # well above the 2**20 floor of the chunking budget

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    with _Largest() as fast:
        report = estimate(model, loss_fn, (x, y), quantities=["grad_norm", "grad_variance"])
    assert report.settings["per_example"] == "factorised"
    assert fast.largest < limit / 8, (fast.largest, limit)
    names = [n for n, _ in model.named_parameters()]
    loss = FunctionalLoss(model, loss_fn, names)
    with _Largest() as slow:  # the check catches what vmap materialises
        per_example_gradients(loss, loss.values, (x, y), x.shape[0])
    assert slow.largest >= x.shape[0] * max(p.numel() for p in model.parameters())


@pytest.mark.parametrize("which", [0, 1], ids=["mlp", "cnn"])
def test_peak_memory_is_at_most_twice_that_of_a_plain_pass(which):
    """The variance's peak memory above what was allocated before (the memory events of
    ``torch.profiler``, deterministic: no timing) is at most twice a plain forward+backward
    pass's: a layer used by one call is reduced during the backward pass and lets go of its
    input and output gradient there, as the plain pass lets go of its activations
    (measured 1.35 and 1.05; held to the end of the pass they took 2.0 and 4.1)."""
    from layerwise.experiments.benchmarks.sensitivity import peak_memory

    model, x = _wide_models()[which]
    y = torch.randint(0, 10, (x.shape[0],))

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    def plain():
        model.zero_grad(set_to_none=True)
        loss_fn(model, (x, y)).backward()
        model.zero_grad(set_to_none=True)

    def variance():
        estimate(model, loss_fn, (x, y), quantities=["grad_norm", "grad_variance"])

    plain(), variance()  # first calls allocate what stays (caches)
    ratio = peak_memory(variance) / peak_memory(plain)
    assert ratio <= 2, ratio


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("size", "rows", "cols"), [(1, 1, 1), (2, 5, 3), (7, 16, 33)])
def test_the_linear_shortcut_gives_the_very_same_numbers_as_the_terms(dtype, size, rows, cols):
    """``linear_sq_norms_and_dots`` (a ``Linear`` call without positions, in the backward
    pass) equals the general path on the layer's terms bit for bit, and declines what it
    does not take (positions, a transposed input, several chunks)."""
    from layerwise.sensitivity.layer_terms import LINEAR

    gen = torch.Generator().manual_seed(size + rows + cols)
    layer = nn.Linear(cols, rows).to(dtype)
    x = torch.randn(size, cols, generator=gen, dtype=dtype)
    delta = torch.randn(size, rows, generator=gen, dtype=dtype)
    terms = LINEAR.terms(layer, x, delta)
    for local, shape in (("weight", (rows, cols)), ("bias", (rows,))):
        centre = torch.randn(shape, generator=gen, dtype=dtype)
        fast = outer_norms.linear_sq_norms_and_dots(x, delta, local, centre, size)
        slow = outer_norms.example_sq_norms_and_dots([terms[local]], centre, size)
        assert fast is not None and slow is not None
        assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
        memo: dict = {}  # without dots, the inputs' norms kept (as the GGN's cotangents do)
        for _ in range(2):
            fast = outer_norms.linear_sq_norms_and_dots(
                x, delta, local, centre, size, dots=False, memo=memo
            )
            slow = outer_norms.example_sq_norms_and_dots(
                [terms[local]], centre, size, dots=False, memo={}
            )
            assert fast is not None and torch.equal(fast[0], slow[0])
            assert torch.equal(fast[1], slow[1]) and not fast[1].any()
    centre = torch.randn(rows, cols, generator=gen, dtype=dtype)
    seq = torch.randn(size, 2, cols, dtype=dtype)
    assert outer_norms.linear_sq_norms_and_dots(seq, delta, "weight", centre, size) is None
    if size > 1:
        wide = torch.randn(cols, size, dtype=dtype).t()  # not contiguous
        assert outer_norms.linear_sq_norms_and_dots(wide, delta, "weight", centre, size) is None
        assert (
            outer_norms.linear_sq_norms_and_dots(x, delta, "weight", centre, size, chunk=1) is None
        )


@pytest.mark.parametrize("make", CASES, ids=IDS)
def test_the_norms_leave_no_reference_cycle(make):
    """Everything :func:`example_norms` makes is freed by reference counting: a cycle (such
    as a hooked output's node holding the hook, the hook its call, the call the node)
    would keep each call's graph and saved input alive until the garbage collector ran,
    and make it run more often. ``gc.collect()`` counts the unreachable objects it finds
    (cases with a ``vmap`` fallback are skipped: ``torch.func`` makes cycles of its own)."""
    import gc

    case = make()
    loss = FunctionalLoss(case.model, case.loss_fn, [n for n, _ in case.model.named_parameters()])
    example_norms(loss, case.batch, case.size)  # warm: caches made once are not garbage
    enabled = gc.isenabled()
    gc.disable()
    try:
        gc.collect()
        norms = example_norms(loss, case.batch, case.size)
        found = gc.collect()
    finally:
        if enabled:
            gc.enable()
    if norms.fallback:  # torch.func's own transforms leave cycles (not this module's)
        pytest.skip(f"vmap fallback for {list(norms.fallback)}")
    assert found == 0, f"{found} objects in reference cycles"
