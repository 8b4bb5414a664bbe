"""Per-example statistics never die in vmap.

A model whose forward pass holds data-dependent code (a ``.item()``, a tensor in an ``if``,
Hugging Face's attention-mask helpers) cannot have ``vmap`` per-example gradients for the
parameters the factorised norms do not cover. ``variance="auto"`` falls back to micro-batch
statistics, exactly those ``variance="micro_batch"`` gives, records why and warns once per
cause; ``variance="per_example"`` raises a named error that names the module. The sampled
and exact GGN traces fall back to the batch function, still exact.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from layerwise.sensitivity import (
    CrossEntropy,
    NotMeasurableError,
    PerExampleFallbackWarning,
    PerExampleGradientError,
    default_groups,
    estimate,
    model_output_loss,
    vmap_fallback,
)

from .test_attention_double_backward import _bert, hf_batch


class Gate(nn.Module):
    """Skips its scale when every input is positive: a Python branch on a tensor (what
    Hugging Face mask helpers do to skip an all-ones mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.5, 0.5, 2.0], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x > 0).all()):
            return x
        return x * self.scale  # a parameter no covered layer owns: vmap measures it


def gated() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), Gate(), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    return model, (x, torch.randint(0, 2, (8,)))


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(vmap_fallback, "_WARNED", set())


def test_auto_falls_back_to_micro_batches_records_why_and_warns_once():
    model, batch = gated()
    with pytest.warns(PerExampleFallbackWarning, match=r"module 1 \(Gate\)") as caught:
        report = estimate(model, ce, batch, quantities=["grad_norm", "grad_variance"])
    assert len(caught) == 1
    assert report.settings["variance"] == "micro_batch"
    assert report.settings["variance_requested"] == "auto"
    why = report.settings["variance_fallback"]
    assert "1 (Gate)" in why and ".item() or data-dependent control flow" in why
    chosen = estimate(model, ce, batch, quantities=["grad_norm", "grad_variance"],
                      variance="micro_batch")  # fmt: skip
    for g in report.names:  # the very statistics micro_batch gives
        assert report[g].grad_variance == chosen[g].grad_variance
        assert report[g].noise_to_signal == chosen[g].noise_to_signal
    with warnings.catch_warnings():  # the same cause again: no second warning
        warnings.simplefilter("error", PerExampleFallbackWarning)
        again = estimate(model, ce, [batch, batch], quantities=["grad_variance"])
    assert again.settings["variance"] == "micro_batch"


def test_explicit_per_example_raises_a_named_error_naming_the_module():
    model, batch = gated()
    with pytest.raises(PerExampleGradientError, match=r"fail in module 1 \(Gate\)") as info:
        estimate(model, ce, batch, quantities=["grad_variance"], variance="per_example")
    assert isinstance(info.value, NotMeasurableError)
    assert "variance='micro_batch'" in str(info.value)
    assert "vmap:" not in str(info.value)  # not vmap's own text
    assert isinstance(info.value.__cause__, RuntimeError)


def test_a_later_batch_that_branches_switches_the_rest_to_micro_batches():
    model, (x, y) = gated()
    positive = (x.abs() + 0.1, y)  # the Linear in front may still make negatives: force it
    model[0].weight.data.abs_()
    model[0].bias.data.abs_()
    with pytest.warns(PerExampleFallbackWarning):
        report = estimate(model, ce, [positive, (x, y)], quantities=["grad_variance"])
    assert report.settings["variance"] == "per_example+micro_batch"


@pytest.mark.parametrize("ggn", ["exact", "mc"])
def test_the_ggn_trace_falls_back_to_the_batch_function(ggn):
    model, batch = gated()
    loss = CrossEntropy(lambda m, b: m(b[0]), lambda b: b[1])
    with pytest.warns(PerExampleFallbackWarning, match="ggn_trace"):
        report = estimate(model, loss, batch, quantities=["ggn_trace"], ggn=ggn, ggn_samples=2)
    assert "batch function" in report.settings["ggn_fallback"]
    if ggn == "exact":  # exact whichever way: the same numbers as the per-example sum
        reference = estimate(nn.Sequential(*model[:1], _Ungated(model[1]), *model[2:]), loss,
                             batch, quantities=["ggn_trace"], ggn="exact")  # fmt: skip
        for g, name in zip(report.names, reference.names, strict=True):
            assert report[g].ggn_trace == pytest.approx(reference[name].ggn_trace, rel=1e-10)


class _Ungated(nn.Module):
    """The same function as a :class:`Gate` on a batch with a negative entry, without the
    branch (so per-example products work)."""

    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self.scale = gate.scale

    def forward(self, x):
        return x * self.scale


def test_hugging_face_bert_with_a_padding_mask():
    torch.manual_seed(0)
    model = _bert().train()
    batch = hf_batch("bert")
    with pytest.warns(PerExampleFallbackWarning, match="BertModel"):
        report = estimate(model, model_output_loss, batch, quantities=["grad_variance"])
    assert report.settings["variance"] == "micro_batch"
    assert set(report.names) == set(default_groups(model))
    with pytest.raises(PerExampleGradientError, match=r"bert \(BertModel\)"):
        estimate(model, model_output_loss, batch, quantities=["grad_variance"],
                 variance="per_example")  # fmt: skip
