"""What ``ggn_trace`` refuses, each with a named error: a plain loss function
(GGNLossError, pointing to the loss objects), an exact GGN over too many outputs
(GGNSizeError), targets that do not fit the outputs, and bad loss-object or option
arguments, each naming the argument and the value. Nothing is computed before a refusal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerwise.sensitivity import (
    CrossEntropy,
    EstimateOptions,
    GGNLossError,
    GGNSizeError,
    MeanSquaredError,
    estimate,
)
from layerwise.sensitivity.ggn import EXACT_MAX_COLUMNS

from .cases import CE, MSE, batchnorm_train, cross_entropy, mlp


def test_a_plain_loss_function_is_refused_with_a_pointer_to_the_loss_objects():
    case = mlp()
    calls = []

    def plain(model, batch):
        calls.append(1)
        return cross_entropy(model(batch[0]), batch[1])

    pointer = r"ggn_trace needs .*sensitivity.CrossEntropy\(forward, target\)"
    with pytest.raises(GGNLossError, match=pointer):
        estimate(case.model, plain, case.batch, quantities=["grad_norm", "ggn_trace"])
    assert calls == []  # refused before any work
    assert issubclass(GGNLossError, TypeError)
    # without ggn_trace the same function is fine, and "all" does not ask for the GGN
    report = estimate(case.model, plain, case.batch, quantities="all", probes=2)
    assert all(e.ggn_trace is None and e.hessian_trace is not None for e in report)


@pytest.mark.parametrize("per_example", [True, False], ids=["per_example", "batch_function"])
def test_exact_mode_refuses_outputs_above_the_limit(per_example):
    wide = EXACT_MAX_COLUMNS // (1 if per_example else 8) + 1
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, wide))
    net.train(not per_example)
    if per_example:
        net.eval()
    x = torch.randn(8, 3)
    batch = (x, torch.zeros(8, wide))
    where = "of an example" if per_example else r"of the batch \(BatchNorm in training mode\)"
    count = wide if per_example else 8 * wide
    with pytest.raises(
        GGNSizeError,
        match=rf"one backward pass per output entry {where}: "
        rf"{count} .* above the limit of {EXACT_MAX_COLUMNS}; use ggn='mc'",
    ):
        estimate(net, MSE, batch, quantities=["ggn_trace"], ggn="exact")
    report = estimate(net, MSE, batch, quantities=["ggn_trace"], ggn_samples=2)  # mc is fine
    assert report.is_finite()


def test_batchnorm_in_training_mode_is_measured_through_the_batch_function():
    case = batchnorm_train()
    report = estimate(case.model, case.loss_object, case.batch, quantities=["ggn_trace"])
    assert report.is_finite() and report.cost.ggn_passes == EstimateOptions().ggn_samples


@pytest.mark.parametrize(
    ("loss", "batch", "error", "match"),
    [
        (CE, (torch.randn(6, 4), torch.randn(6)), TypeError,
         r"CrossEntropy: target must return class indices \(an integer tensor\), got dtype "
         r"torch.float32"),
        (CE, (torch.randn(6, 4), torch.zeros(6, 2, dtype=torch.long)), ValueError,
         r"outputs of shape \(6, 3\) need targets of shape \(6,\) .* got \(6, 2\)"),
        (MSE, (torch.randn(6, 4), torch.randn(6)), ValueError,
         r"MeanSquaredError: outputs of shape \(6, 3\) and targets of shape \(6,\) differ"),
        (CrossEntropy(lambda m, b: m(b[0]), lambda b: b[1][:3]),
         (torch.randn(6, 4), torch.zeros(6, dtype=torch.long)), ValueError,
         r"target\(batch\) must have the batch's 6 examples along dimension 0, got shape "
         r"\(3,\)"),
        (CrossEntropy(lambda m, b: m(b[0]), lambda b: b[1].tolist()),
         (torch.randn(6, 4), torch.zeros(6, dtype=torch.long)), TypeError,
         r"target\(batch\) must return a tensor, got list"),
    ],
    ids=["float_targets", "ce_shape", "mse_shape", "target_rows", "target_not_tensor"],
)  # fmt: skip
def test_targets_that_do_not_fit_are_refused(loss, batch, error, match):
    net = nn.Linear(4, 3)
    with pytest.raises(error, match=match):
        estimate(net, loss, batch, quantities=["ggn_trace"])


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: CrossEntropy(3, lambda b: b), TypeError,
         r"forward must be callable as forward\(model, batch\), got 3"),
        (lambda: MeanSquaredError(lambda m, b: b, "y"), TypeError,
         r"target must be callable as target\(batch\), got 'y'"),
        (lambda: CrossEntropy(len, len, ignore_index=1.5), TypeError,
         r"ignore_index must be an int, got 1.5"),
        (lambda: CrossEntropy(len, len, label_smoothing=1.5), ValueError,
         r"label_smoothing must be in \[0, 1\], got 1.5"),
        (lambda: CrossEntropy(len, len, label_smoothing="0.1"), TypeError,
         r"label_smoothing must be a number, got '0.1'"),
        (lambda: CrossEntropy(len, len, -1), TypeError, r"takes 3 positional arguments"),
        (lambda: EstimateOptions(ggn="dense"), ValueError,
         r"ggn must be one of \('mc', 'exact'\), got 'dense'"),
        (lambda: EstimateOptions(ggn_samples=0), ValueError, r"ggn_samples must be >= 1, got 0"),
    ],
    ids=["forward", "target", "ignore_index", "smoothing_range", "smoothing_type", "keywords",
         "ggn", "ggn_samples"],
)  # fmt: skip
def test_bad_arguments_name_the_argument_and_the_value(make, error, match):
    with pytest.raises(error, match=match):
        make()
