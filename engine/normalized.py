"""Per-group gradient normalisation: each group's gradient divided by its norm before the step.

For every parameter group ``g`` of the wrapped optimizer the step uses

    ĝ_g = ∇_g L / ‖∇_g L‖₂

(the norm over the group's parameters that have a gradient, in float64), so every
group's gradient has unit norm and the size of its step is set by its rate alone: with
SGD, group ``g`` moves by ``lr_g`` per step whatever the scale of its gradient. This is
the normalised update of LARS and LAMB (You et al. 2017, 2020) without their ``‖w‖``
factor, which the ``trust_ratio`` controller provides where it is wanted; with
momentum it is the "normalised SGD with momentum" of Cutkosky & Mehta (2020), layer by
layer. A group whose gradient norm is zero is left as it is.

The wrapped optimizer sees the normalised gradients; ``.grad`` is given back afterwards
exactly as it was (the raw gradients: what the experiments log as ``grad_norm/g``, and
what a controller's estimate reads, stay the raw ones). Gradients that are not finite are
the engine's to catch (:class:`layerwise.engine.LayerwiseOptimizer` checks them before the
step); a finite gradient whose norm overflows float64 is not possible.

>>> net = torch.nn.Linear(3, 1)  # one group: the step of plain SGD has norm lr exactly
>>> opt = NormalizedGradients(torch.optim.SGD(net.parameters(), lr=0.1))
>>> net(torch.ones(2, 3)).sum().backward()
>>> before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
>>> opt.step()
>>> after = torch.cat([p.detach().flatten() for p in net.parameters()])
>>> round(float(torch.linalg.vector_norm(before - after)), 5)
0.1
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from layerwise.engine.wrapping import OptimizerWrapper

__all__ = ["NormalizedGradients", "normalized_group"]


def normalized_group(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """``grads / ‖grads‖₂`` (one norm over the list, in float64), as new tensors; the
    gradients unchanged when the norm is zero. No host synchronisation.

    >>> [g.tolist() for g in normalized_group([torch.tensor([3.0]), torch.tensor([4.0])])]
    [[0.6000000238418579], [0.800000011920929]]
    """
    if not grads:
        return []
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])
    norm = torch.linalg.vector_norm(norms)
    scale = torch.where(norm > 0, 1.0 / torch.where(norm > 0, norm, 1.0), 1.0)
    return [g * scale.to(g.dtype) for g in grads]


class NormalizedGradients(OptimizerWrapper):
    """Steps of ``optimizer`` on per-group normalised gradients (module docstring).

    ``step(closure)`` evaluates the closure first (as SGD and Adam do), then normalises.
    Under :class:`layerwise.engine.SAM`, wrap this one: ``SAM(NormalizedGradients(base))``
    normalises the gradient at the perturbed point.
    """

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        raw: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for group in self.param_groups:
                    params = [p for p in group["params"] if p.grad is not None]
                    for p, g in zip(
                        params, normalized_group([p.grad for p in params]), strict=True
                    ):
                        raw.append((p, p.grad))
                        p.grad = g
            self.base.step()
        finally:
            for p, g in raw:
                p.grad = g
        return loss
