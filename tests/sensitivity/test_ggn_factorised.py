"""GGN traces through the factorised per-example norms equal those of ``vmap``.

On the GGN cases whose examples do not interact and whose parameters covered layers use
alone (an MLP, a CNN, attention through the fused SDPA kernel), ``ggn_trace`` in both
modes takes the factorised path (:mod:`layerwise.sensitivity.cotangent_norms`) and equals
the ``vmap`` path's to 1e-10 (same sampled labels); the dense-Jacobian references of
:mod:`tests.sensitivity.test_ggn_matches_dense_jacobians` check both against the truth. A
dispatch mode checks that the sampled GGN creates no tensor of B × P elements.
"""

from __future__ import annotations

import pytest
import torch

from layerwise.sensitivity import CrossEntropy, estimate, output_vjp, runner

from .cases import cnn, mlp, sdpa_attention, tied_lm
from .test_factorised_norms import _Largest, _wide_models

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


def _spy(monkeypatch) -> list[bool]:
    used: list[bool] = []
    original = output_vjp.cotangent_norms

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        used.append(out is not None)
        return out

    monkeypatch.setattr(output_vjp, "cotangent_norms", spy)
    return used


@pytest.mark.parametrize(("ggn", "samples"), [("exact", 1), ("mc", 3), ("mc", 1)])
@pytest.mark.parametrize("make", [mlp, cnn, sdpa_attention])
def test_factorised_ggn_equals_the_vmap_path(make, ggn, samples, monkeypatch):
    case = make()

    def run():
        return estimate(case.model, case.loss_object, case.batch, quantities=["ggn_trace"],
                        ggn=ggn, ggn_samples=samples, seed=5)  # fmt: skip

    used = _spy(monkeypatch)
    fast = run()
    assert used and all(used), "every batch took the factorised path"
    monkeypatch.setattr(output_vjp, "cotangent_norms", lambda *args, **kwargs: None)
    slow = run()
    for g in fast.names:
        assert fast[g].ggn_trace == pytest.approx(slow[g].ggn_trace, rel=1e-10, abs=1e-14), g
        if ggn == "mc":
            # with one label set, from the spread of the per-example terms: never 0 here
            assert samples > 1 or fast[g].ggn_trace_stderr > 0
            assert fast[g].ggn_trace_stderr == pytest.approx(slow[g].ggn_trace_stderr, rel=1e-8)


@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("make", [mlp, cnn, sdpa_attention, tied_lm])
def test_grad_norm_beside_the_ggn_shares_its_forward_pass(make, samples, monkeypatch):
    """``grad_norm`` with ``ggn_trace`` takes the mean loss's gradient from the sampled
    terms' forward pass (no pass of its own) where they are factorised, and it is the
    gradient of a pass of its own: bit for bit, except through attention, which the GGN's
    passes run on the math backend (equal to rounding there). The tied language model's
    embedding is also used outside its layer (the head's ``weight.T``): ``vmap`` terms and
    a gradient pass of its own."""
    case = make()
    alone = estimate(case.model, case.loss_object, case.batch, quantities=["grad_norm"])

    def refuse(*args, **kwargs):
        raise AssertionError("the gradient took a pass of its own")

    if make is not tied_lm:
        monkeypatch.setattr(runner, "loss_gradient", refuse)
    both = estimate(case.model, case.loss_object, case.batch,
                    quantities=["grad_norm", "ggn_trace"], ggn_samples=samples, seed=5)  # fmt: skip
    monkeypatch.undo()
    ggn = estimate(case.model, case.loss_object, case.batch, quantities=["ggn_trace"],
                   ggn_samples=samples, seed=5)  # fmt: skip
    for g in alone.names:
        assert both[g].ggn_trace == ggn[g].ggn_trace
        assert both[g].ggn_trace_stderr == ggn[g].ggn_trace_stderr
        if make is sdpa_attention:
            assert both[g].grad_norm == pytest.approx(alone[g].grad_norm, rel=1e-13)
        else:
            assert both[g].grad_norm == alone[g].grad_norm, g


def test_the_sampled_ggn_creates_no_tensor_of_batch_times_parameters(monkeypatch):
    model, x = _wide_models()[0]
    y = torch.randint(0, 10, (x.shape[0],))
    loss = CrossEntropy(lambda m, b: m(b[0]), lambda b: b[1])
    limit = x.shape[0] * sum(p.numel() for p in model.parameters())
    used = _spy(monkeypatch)
    with _Largest() as seen:
        estimate(model, loss, (x, y), quantities=["ggn_trace"], ggn="mc", ggn_samples=2)
    assert used == [True]
    assert seen.largest < limit / 8, (seen.largest, limit)
