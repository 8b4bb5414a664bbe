"""Σ_i ‖(J_iᵀ c_k,i)_θ‖² for several cotangents of a model's outputs, factorised.

For outputs z(θ) of a batch whose examples do not interact and cotangents c_1..c_K shaped
like z, the gradient of ⟨z, c_k⟩ splits over the examples: example i's part is
J_iᵀ c_k,i, J_i = ∂z_i/∂θ. :func:`cotangent_sq_norms` runs the forward pass once with the
hooks of :mod:`layerwise.sensitivity.factorised` (covered layers' inputs kept, each
measured parameter swapped for an alias per call), then one backward pass of ⟨z, c_k⟩ per
cotangent (the graph kept between them; a call's bias, not its weight, is what the pass
asks for, so the weights' own gradient products are skipped), and turns each layer call's
input and output
gradient into the per-example squared norms (:mod:`layerwise.sensitivity.outer_norms`,
no dots), summed over the examples: no per-example gradient is formed. This is what the
sampled and exact GGN traces need (:mod:`layerwise.sensitivity.output_vjp`,
:mod:`layerwise.sensitivity.ggn`).

It answers only when every measured parameter is used by covered calls alone (no other
use, every call leading with the ``size`` examples): else ``None``, and the caller takes
``vmap`` per-example gradients instead.

>>> from torch import nn
>>> from layerwise.sensitivity.functional import FunctionalLoss
>>> net = nn.Linear(2, 1, bias=False)
>>> outputs = FunctionalLoss(net, lambda m, b: m(b), ["weight"])
>>> x = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
>>> ones = lambda z: torch.ones(1, *z.shape)  # one cotangent, all ones
>>> cotangent_sq_norms(outputs, outputs.values, x, 2, ones)["weight"]  # ‖x_1‖² + ‖x_2‖²
tensor([14.])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from layerwise.sensitivity.factorised import _Capture
from layerwise.sensitivity.functional import FunctionalLoss
from layerwise.sensitivity.outer_norms import example_sq_norms_and_dots
from layerwise.sensitivity.validation import check_int

__all__ = ["cotangent_sq_norms"]

Params = dict[str, torch.Tensor]


def cotangent_sq_norms(
    function: FunctionalLoss,
    values: Params,
    batch: Any,
    size: int,
    cotangents: Callable[[torch.Tensor], torch.Tensor],
    chunk: int | None = None,
) -> Params | None:
    """``{name: (K,)}``: Σ_i ‖(J_iᵀ c_k,i)_name‖² for the K cotangents
    ``cotangents(z)`` (shaped ``[K, *z.shape]``) of the outputs z of
    ``function.evaluate(values, batch)``; ``None`` when a parameter is not covered (module
    docstring). ``chunk`` caps the examples handled at once."""
    if not isinstance(function, FunctionalLoss):
        raise TypeError(f"function must be a FunctionalLoss, got {type(function).__name__}")
    check_int("size", size, 1)
    live = {n: v.detach().requires_grad_(True) for n, v in values.items()}
    capture = _Capture(live, size)
    with capture.hooks(function), torch.enable_grad():
        out = function.evaluate(live, batch)
    calls = capture.calls
    ok = isinstance(out, torch.Tensor) and out.requires_grad and out.dim() > 0
    if not ok or out.shape[0] != size or capture.bad:
        return None
    covered = {name for call in calls for name in call.names.values()}
    if set(live) - covered:  # a parameter no covered call uses: unused, or used elsewhere
        return None
    cots = cotangents(out.detach())
    # Only the gradients that flow into the layers' outputs are needed, not the parameters'
    # own: asking for a call's bias (a sum) rather than its weight (a matrix product) still
    # carries the gradient through every covered output and skips the weight's product.
    drive = [
        t
        for call in calls
        for t in ([call.aliases["bias"]] if "bias" in call.aliases else call.aliases.values())
    ]
    inputs = [*live.values(), *drive]
    sums: dict[str, list[torch.Tensor]] = {n: [] for n in live}
    # per parameter: what depends on the layers' inputs alone, the same for every cotangent
    memos: dict[str, dict[Any, Any]] = {n: {} for n in live}
    for k in range(cots.shape[0]):
        for call in calls:
            call.delta = None
        grads = torch.autograd.grad(
            out, inputs, grad_outputs=cots[k], retain_graph=k + 1 < cots.shape[0],
            allow_unused=True,
        )  # fmt: skip
        if any(g is not None for g in grads[: len(live)]):  # another use of a parameter
            return None
        terms: dict[str, list[Any]] = {n: [] for n in live}
        budget = dict.fromkeys(live, 0)
        for call in calls:
            if call.delta is None:
                continue
            made = call.spec.terms(call.module, call.saved, call.delta.detach())
            for local, name in call.names.items():
                terms[name].append(made[local])
                budget[name] += call.elements
        for n, v in live.items():
            done = example_sq_norms_and_dots(
                terms[n], v, size, budget[n], chunk, dots=False, memo=memos[n]
            )
            if done is None:
                return None
            sums[n].append(done[0].sum())
    return {n: torch.stack(s) for n, s in sums.items()}
