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

from layerwise.sensitivity import CrossEntropy, estimate, output_vjp

from .cases import cnn, mlp, sdpa_attention
from .test_factorised_norms import _Largest, _wide_models

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


def _spy(monkeypatch) -> list[bool]:
    used: list[bool] = []
    original = output_vjp.cotangent_sq_norms

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        used.append(out is not None)
        return out

    monkeypatch.setattr(output_vjp, "cotangent_sq_norms", spy)
    return used


@pytest.mark.parametrize("ggn", ["exact", "mc"])
@pytest.mark.parametrize("make", [mlp, cnn, sdpa_attention])
def test_factorised_ggn_equals_the_vmap_path(make, ggn, monkeypatch):
    case = make()

    def run():
        return estimate(case.model, case.loss_object, case.batch, quantities=["ggn_trace"],
                        ggn=ggn, ggn_samples=3, seed=5)  # fmt: skip

    used = _spy(monkeypatch)
    fast = run()
    assert used and all(used), "every batch took the factorised path"
    monkeypatch.setattr(output_vjp, "cotangent_sq_norms", lambda *args, **kwargs: None)
    slow = run()
    for g in fast.names:
        assert fast[g].ggn_trace == pytest.approx(slow[g].ggn_trace, rel=1e-10, abs=1e-14), g
        if ggn == "mc":
            assert fast[g].ggn_trace_stderr == pytest.approx(slow[g].ggn_trace_stderr, rel=1e-8)


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
