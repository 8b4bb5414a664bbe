"""Per-example gradients with ``vmap`` over ``grad``, in chunks of examples.

For a batch of B examples and a mean loss L = (1/B) Σ_i ℓ_i, the per-example gradient is
g_i = ∇ℓ_i, obtained by evaluating ``loss_fn`` on a batch of one example (each example
keeps a leading dimension of size 1) under ``torch.func.vmap(torch.func.grad(...))``.
They are defined only when examples do not interact inside the model: not for BatchNorm
in training mode (use the micro-batch estimator, :mod:`layerwise.sensitivity.microbatch`).

Scaling: g_i is the gradient of the loss of one example, so the mean gradient is
(1/B) Σ_i g_i and the per-example covariance Σ has the units of a squared gradient;
:class:`layerwise.sensitivity.gradient_stats.GradientSamples` turns the g_i into tr(Σ̂) with Bessel's
1/(B−1) correction. Dropout draws an independent mask per example
(``randomness="different"``), as in a training batch. Memory: one chunk holds
``chunk x (number of parameters)`` gradient entries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad, vmap

from layerwise.sensitivity.attention import twice_differentiable_attention
from layerwise.sensitivity.batching import example_in_dims, flatten_batch, slice_batch
from layerwise.sensitivity.gradient_stats import GradientSamples
from layerwise.sensitivity.validation import check_int

__all__ = ["accumulate_per_example", "per_example_gradients"]

Params = dict[str, torch.Tensor]


def per_example_gradients(
    loss: Callable[[Params, Any], torch.Tensor], values: Params, batch: Any, size: int
) -> Params:
    """``{name: (B, *shape)}``: the gradient of the loss of each example of ``batch``.

    >>> w = {"w": torch.tensor([1.0, 2.0])}
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    >>> per_example_gradients(lambda p, b: (b @ p["w"]).mean(), w, x, 2)["w"]
    tensor([[1., 0.],
            [0., 3.]])
    """
    check_int("size", size, 1)
    leaves, rebuild = flatten_batch(batch)
    dims = example_in_dims(batch, size)
    if 0 not in dims:
        raise ValueError(f"batch has no tensor with {size} rows (size={size}) to split")

    def one(p: Params, *example: Any) -> torch.Tensor:
        rows = [t.unsqueeze(0) if d == 0 else t for t, d in zip(example, dims, strict=True)]
        return loss(p, rebuild(rows))

    with twice_differentiable_attention():  # vmap-able attention (no fused kernel)
        return vmap(grad(one), in_dims=(None, *dims), randomness="different")(values, *leaves)


def accumulate_per_example(
    samples: GradientSamples,
    loss: Callable[[Params, Any], torch.Tensor],
    values: Params,
    batch: Any,
    size: int,
    chunk: int,
) -> None:
    """Add the per-example gradients of ``batch`` to ``samples``, ``chunk`` at a time."""
    for start in range(0, size, chunk):
        stop = min(start + chunk, size)
        part = slice_batch(batch, size, start, stop)
        samples.add(per_example_gradients(loss, values, part, stop - start))
