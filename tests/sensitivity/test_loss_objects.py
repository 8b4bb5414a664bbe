"""The loss objects: their mean loss is PyTorch's, they are valid loss functions for every
estimator, and the pieces the GGN is made of are right: the sampled cotangents have the
Hessian of the summed loss as their second moment (exactly, summing over the labels with
their probabilities) and sample the labels with the model's probabilities, and the square
root's columns multiply out to that Hessian (``torch.func.hessian`` in the outputs)."""

from __future__ import annotations

import pytest
import torch
from torch.func import hessian
from torch.nn import functional as F

from layerwise.sensitivity import CrossEntropy, MeanSquaredError, estimate, make_generator
from layerwise.sensitivity.label_sampling import SAMPLERS, draw_noise, sampled_cotangents

from .cases import CE, cross_entropy, mlp

DT = torch.float64


def _out(model, batch):
    return model(batch[0])


def _y(batch):
    return batch[1]


def _sequence(seed=0, n=3, t=4, v=5):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, t, v, generator=g, dtype=DT)
    y = torch.randint(0, v, (n, t), generator=g)
    y[0, 1] = y[2, 3] = -7
    return z, y


def test_cross_entropy_is_torchs_mean_over_the_tokens_not_ignored():
    z, y = _sequence()
    loss = CrossEntropy(_out, _y, ignore_index=-7, label_smoothing=0.2)
    got = loss.criterion(z, y)
    keep = y != -7
    q = 0.8 * F.one_hot(y.clamp_min(0), 5).to(DT) + 0.2 / 5
    by_hand = -(q * z.log_softmax(-1)).sum(-1)[keep].sum() / keep.sum()
    assert got == pytest.approx(by_hand.item(), rel=1e-12)
    assert loss.normaliser(y).item() == 10
    flat = CrossEntropy(_out, _y)
    assert flat.criterion(z[:, 0], y[:, 0].clamp_min(0)) == F.cross_entropy(
        z[:, 0], y[:, 0].clamp_min(0)
    )


def test_mean_squared_error_is_torchs_mse_loss():
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(4, 3, 2, generator=g), torch.randn(4, 3, 2, generator=g)
    loss = MeanSquaredError(_out, _y)
    assert loss.criterion(z, y) == F.mse_loss(z, y) and loss.normaliser(y) == 24


def test_a_loss_object_is_a_loss_function_for_every_estimator():
    case = mlp()
    plain = estimate(case.model, case.loss_fn, case.batch, probes=6, seed=4)
    ours = estimate(case.model, CE, case.batch, probes=6, seed=4)
    for g in plain.names:
        for q in ("grad_norm", "grad_variance", "noise_to_signal", "hessian_trace"):
            assert getattr(ours[g], q) == pytest.approx(getattr(plain[g], q), rel=1e-12), q
    assert CE(case.model, case.batch) == cross_entropy(case.model(case.inputs), case.targets)
    assert ours.settings["loss"] == {"loss": "CrossEntropy", "ignore_index": -100,
                                     "label_smoothing": 0.0}  # fmt: skip
    assert "loss" not in plain.settings


def _summed_hessian(loss, z, y):
    """∇²_z (M L): the Hessian of the summed loss in the outputs, flattened."""
    h = hessian(lambda out: loss.criterion(out, y) * loss.normaliser(y))(z)
    return h.reshape(z.numel(), z.numel())


def _label_distribution(p: torch.Tensor, sampler: str) -> torch.Tensor:
    """The probability of each class of each token under ``sampler``, computed here."""
    if sampler == "predictive":
        return p
    eye = torch.eye(p.shape[-1], dtype=p.dtype)
    share = (p.unsqueeze(-2) - eye).square().sum(-1)  # ‖p − e_c‖²
    q = p * share
    return q / q.sum(-1, keepdim=True)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cross_entropy_cotangents_have_the_hessian_as_second_moment(sampler):
    z, y = _sequence(2)
    loss = CrossEntropy(_out, _y, ignore_index=-7, label_smoothing=0.3)
    q = _label_distribution(z.softmax(-1), sampler).reshape(-1, 5)
    cdf = q.cumsum(-1)
    lower = torch.cat([torch.zeros_like(cdf[:, :1]), cdf[:, :-1]], -1)
    moment = torch.zeros(z.numel(), z.numel(), dtype=DT)
    signs = [(0.25, 0.5), (0.75, 0.5)] if sampler == "importance" else [(None, 1.0)]
    # the label of a token comes from a uniform in [cdf_{c-1}, cdf_c): enumerate the classes
    # of one token at a time (the others at their first class), weighted by q_c (and both
    # signs, each with probability 1/2)
    for token in range(q.shape[0]):
        for c in range(5):
            u = lower[:, 0] + 1e-12
            u[token] = (lower[token, c] + cdf[token, c]) / 2
            for s, weight in signs:
                noise = u if s is None else torch.stack([u, torch.full_like(u, s)], -1)
                noise = noise.reshape(1, *y.shape, *noise.shape[1:])
                h = sampled_cotangents(loss, z, y, noise, sampler)[0].reshape(-1, 5)
                vec = torch.zeros_like(h)
                vec[token] = h[token]
                vec = vec.reshape(-1)
                moment += weight * q[token, c] * torch.outer(vec, vec)
    assert torch.allclose(moment, _summed_hessian(loss, z, y), atol=1e-12)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cross_entropy_samples_labels_from_the_samplers_distribution(sampler):
    z = torch.tensor([[2.0, 0.0, -1.0, 0.5]], dtype=DT)
    y = torch.zeros(1, dtype=torch.long)
    loss = CrossEntropy(_out, _y)
    n = 40000
    noise = draw_noise(loss, y, n, make_generator("cpu", 0), DT, sampler)
    h = sampled_cotangents(loss, z, y, noise, sampler)[:, 0]  # σ √w (p − e_ŷ)
    # p − e_ŷ is negative at ŷ only: ŷ is the entry whose sign differs from the others',
    # and σ is the others' sign
    signs = h.sign()
    sigma = signs.sum(-1).sign()
    label = (signs != sigma.unsqueeze(-1)).to(DT).argmax(-1)
    p = z.softmax(-1)[0]
    q = _label_distribution(p.unsqueeze(0), sampler)[0]
    freq = torch.bincount(label, minlength=4).to(DT) / n
    assert torch.allclose(freq, q, atol=4 * (q * (1 - q) / n).sqrt().max().item())
    if sampler == "predictive":
        assert (sigma == 1).all()  # h = p − e_ŷ, the gradient at the sampled label
    else:  # every cotangent has ‖h‖² = 1 − Σ p², and the signs are balanced
        assert torch.allclose(h.square().sum(-1), 1 - p.square().sum())
        assert abs(sigma.mean().item()) < 4 / n**0.5


def test_a_certain_prediction_gives_zero_cotangents_not_nan():
    z = torch.tensor([[0.0, -1e4, -1e4]], dtype=DT)  # p = e_0 exactly
    y = torch.zeros(1, dtype=torch.long)
    loss = CrossEntropy(_out, _y)
    for sampler in SAMPLERS:
        noise = draw_noise(loss, y, 64, make_generator("cpu", 0), DT, sampler)
        assert torch.equal(sampled_cotangents(loss, z, y, noise, sampler), torch.zeros(64, 1, 3))


def test_mse_cotangents_and_columns_give_twice_the_identity():
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(3, 2, generator=g, dtype=DT), torch.randn(3, 2, generator=g, dtype=DT)
    loss = MeanSquaredError(_out, _y)
    target = _summed_hessian(loss, z, y)
    assert torch.allclose(target, 2 * torch.eye(6, dtype=DT))
    cols = loss.root_columns(z, y, 0, loss.num_columns(z)).reshape(6, 6)
    assert torch.allclose(cols.T @ cols, target, atol=1e-14)
    gaussian = draw_noise(loss, y, 50000, make_generator("cpu", 1), DT, "predictive")
    h = sampled_cotangents(loss, z, y, gaussian, "predictive").reshape(50000, 6)
    assert torch.allclose(h.T @ h / 50000, target, atol=0.1)
    assert abs(h.square().mean().item() - 2.0) < 0.05 and h.abs().std() > 0.5  # not ±√2
    two_point = draw_noise(loss, y, 50000, make_generator("cpu", 1), DT, "importance")
    h = sampled_cotangents(loss, z, y, two_point, "importance").reshape(50000, 6)
    assert torch.equal(h.abs(), torch.full_like(h, 2**0.5))  # ±√2: E[h hᵀ] = 2 I
    assert torch.allclose(h.T @ h / 50000, target, atol=0.05)


@pytest.mark.parametrize("smoothing", [0.0, 0.4])
def test_cross_entropy_columns_multiply_out_to_the_hessian(smoothing):
    z, y = _sequence(4)
    loss = CrossEntropy(_out, _y, ignore_index=-7, label_smoothing=smoothing)
    n = loss.num_columns(z)
    cols = torch.cat([loss.root_columns(z, y, a, min(a + 7, n)) for a in range(0, n, 7)])
    cols = cols.reshape(n, -1)
    assert torch.allclose(cols.T @ cols, _summed_hessian(loss, z, y), atol=1e-12)
