"""Sharpness-aware minimisation (Foret et al. 2021, "Sharpness-Aware Minimization for
Efficiently Improving Generalization", Algorithm 1) as a wrapper of any torch optimizer.

One SAM step, with ``g = ∇L(w)`` already in ``.grad`` (the caller's ``loss.backward()``):

1. ``ε = rho * g / ‖g‖₂``, the norm over every parameter of the wrapped groups that has a
   gradient (the whole-model norm of the paper, so that ``‖ε‖₂ = rho``); ``ε = 0`` when
   ``‖g‖`` is zero or not finite;
2. ``w ← w + ε``, then ``closure()`` re-evaluates the loss and puts ``∇L(w + ε)`` into
   ``.grad`` (the gradients are zeroed first);
3. ``w`` is put back exactly (a copy, not ``w + ε - ε``), also when the closure raises;
4. the wrapped optimizer steps from ``w`` with ``∇L(w + ε)``, at whatever rates its groups
   hold: under :class:`layerwise.engine.LayerwiseOptimizer` the per-group rates and
   multipliers apply to this step as to any other.

Cost: a second forward and backward pass per step and one copy of the parameters.

Why a wrapper of the base optimizer, under the engine, rather than a wrapper of the
engine or a change to the training loop: the engine's step already takes a closure and
checks the gradients it returns, so ``LayerwiseOptimizer(SAM(base, rho))`` checks the
gradient the update uses (the one at ``w + ε``) for NaN and inf, applies its multipliers
to the update and not to the perturbation (``rho`` is a radius, not a rate), and
recalibrates on the parameters after the SAM step; the base optimizer's state and
checkpoints are unchanged. A first gradient that is not finite gives ``ε = 0``: the
closure then recomputes the gradient at ``w``, and the engine skips the step as it
would any other.

>>> torch.manual_seed(0) is not None
True
>>> net = torch.nn.Linear(3, 1)
>>> opt = SAM(torch.optim.SGD(net.parameters(), lr=0.1), rho=0.05)
>>> x, y = torch.randn(8, 3), torch.randn(8, 1)
>>> def closure():
...     loss = torch.nn.functional.mse_loss(net(x), y)
...     loss.backward()
...     return loss
>>> closure() is not None  # the gradient at w
True
>>> opt.step(closure) is not None  # the loss at w + eps
True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from layerwise.engine.wrapping import OptimizerWrapper

__all__ = ["SAM", "sam_perturbation"]


def sam_perturbation(grads: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """``ε = rho * g / ‖g‖₂`` for the gradients ``grads`` taken together (norm in float64);
    zeros when ``‖g‖`` is zero or not finite. No host synchronisation.

    >>> eps = sam_perturbation([torch.tensor([3.0]), torch.tensor([4.0])], rho=0.5)
    >>> [round(float(e), 6) for e in eps]
    [0.3, 0.4]
    """
    if not grads:
        return []
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float64) for g in grads])
    norm = torch.linalg.vector_norm(norms)
    usable = torch.isfinite(norm) & (norm > 0)
    scale = torch.where(usable, rho / torch.where(usable, norm, 1.0), 0.0)
    zero = torch.zeros((), dtype=scale.dtype, device=scale.device)
    return [torch.where(usable, g.detach() * scale.to(g.dtype), zero.to(g.dtype)) for g in grads]


class SAM(OptimizerWrapper):
    """Sharpness-aware steps of ``optimizer`` with radius ``rho`` (module docstring).

    ``step(closure)`` needs the closure: it must re-evaluate the loss and call
    ``backward()`` (as for ``torch.optim.LBFGS``) and is called once, at ``w + ε``. It
    returns the closure's loss (the loss at the perturbed point). After the step,
    ``.grad`` holds the gradient at ``w + ε``, the one the update used.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, rho: float = 0.05) -> None:
        super().__init__(optimizer)
        if isinstance(rho, bool) or not isinstance(rho, int | float):
            raise TypeError(f"rho must be a real number, got {rho!r}")
        if not (math.isfinite(rho) and rho > 0):
            raise ValueError(f"rho must be a positive finite number, got {rho!r}")
        self.rho = float(rho)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if closure is None:
            raise ValueError(
                "SAM.step needs a closure that re-evaluates the loss and calls backward() "
                "(the gradient at the perturbed parameters)"
            )
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        eps = sam_perturbation([p.grad for p in params], self.rho)
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, e in zip(params, eps, strict=True):
                    p.add_(e)
            self.base.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = closure()
        finally:
            with torch.no_grad():
                for p, w in zip(params, saved, strict=True):
                    p.copy_(w)
        self.base.step()
        return loss

    def __repr__(self) -> str:
        return f"SAM({self.base!r}, rho={self.rho!r})"
