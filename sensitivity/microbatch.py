"""Micro-batch gradient noise: for models whose examples interact (BatchNorm in training
mode), or when per-example gradients do not fit in memory.

Split the batch of B examples into M contiguous micro-batches of sizes b_j (as equal as
possible) and take the mean-loss gradient m_j of each, evaluated exactly as training
would evaluate a batch of b_j examples. If the examples are independent draws, m_j has
covariance Σ/b_j, so :class:`layerwise.sensitivity.gradient_stats.GradientSamples` with weights
b_j gives the unbiased tr(Σ̂) = Σ_j b_j ‖m_j − m̄‖² / (M − 1). With BatchNorm, Σ is the
per-example covariance that reproduces the gradient noise of batches of size ~B/M
(noise extrapolated as 1/b, the usual assumption). M−1 degrees of freedom make this
noisier than the per-example estimate; average over batches for a steadier figure.
Cost: one forward and backward pass over the whole batch, in M pieces. For a loss object
the estimator evaluates each piece on the batch's scale
(:meth:`layerwise.sensitivity.functional.FunctionalLoss.slices_of`): m_j is (B/b_j) times
the piece's share of the batch's loss, so a token mean whose pieces count different
numbers of tokens stays exact and a piece whose tokens are all ignored gives m_j = 0.

For the loss mean_i (θ − x_i)²/2 the gradient of a micro-batch is θ − mean(x_j); with
θ = 0 and four examples in two pieces of two, m_1 = −1.5 and m_2 = −3.5, so
tr(Σ̂) = Σ_j b_j (m_j − m̄)² / (M − 1) = 2·1 + 2·1 = 4:

>>> loss = lambda p, x: ((p["t"] - x) ** 2).mean() / 2
>>> theta = {"t": torch.zeros(())}
>>> x = torch.tensor([1.0, 2.0, 3.0, 4.0])
>>> samples = GradientSamples(loss_gradient(loss, theta, x), [0], num_groups=1)
>>> accumulate_micro_batches(samples, loss, theta, x, size=4, pieces=2)
>>> samples.finish("micro_batch").trace_sigma
tensor([4.])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from layerwise.sensitivity.batching import split_batch
from layerwise.sensitivity.gradient_stats import GradientSamples
from layerwise.sensitivity.hvp import loss_gradient

__all__ = ["accumulate_micro_batches"]

Params = dict[str, torch.Tensor]


def accumulate_micro_batches(
    samples: GradientSamples,
    loss: Callable[[Params, Any], torch.Tensor],
    values: Params,
    batch: Any,
    size: int,
    pieces: int,
) -> None:
    """Add the gradients of ``min(pieces, size)`` micro-batches of ``batch`` to ``samples``."""
    for part, b in split_batch(batch, size, min(pieces, size)):
        g = loss_gradient(loss, values, part)
        samples.add({n: t.unsqueeze(0) for n, t in g.items()}, weights=[b])
