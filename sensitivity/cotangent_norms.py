"""Σ_i ‖(J_iᵀ c_k,i)_θ‖² for several cotangents of a model's outputs, factorised.

For outputs z(θ) of a batch whose examples do not interact and cotangents c_1..c_K shaped
like z, the gradient of ⟨z, c_k⟩ splits over the examples: example i's part is
J_iᵀ c_k,i, J_i = ∂z_i/∂θ. :func:`cotangent_norms` runs the forward pass once with the
hooks of :mod:`layerwise.sensitivity.factorised` (covered layers' inputs kept, each
measured parameter swapped for an alias per call), then one backward pass of ⟨z, c_k⟩ per
cotangent (the graph kept between them; the pass asks for the autograd edges of the
covered calls' outputs, not for any parameter, so no layer's parameter gradients are
computed, and the first layer's backward does not run at all), and turns each layer call's
input and output gradient into the per-example squared norms
(:mod:`layerwise.sensitivity.outer_norms`, no dots), kept per example and summed over the
examples: no per-example gradient is formed. Given a ``criterion`` of the outputs (the
mean loss of a loss object), one more backward pass before the cotangents' gives its
gradient from the same forward pass (:func:`cotangent_norms`). This is what the
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
>>> cotangent_norms(outputs, outputs.values, x, 2, ones).sums["weight"]  # ‖x_1‖² + ‖x_2‖²
tensor([14.])
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from layerwise.sensitivity.factorised import _Capture
from layerwise.sensitivity.functional import FunctionalLoss
from layerwise.sensitivity.layer_terms import LINEAR
from layerwise.sensitivity.outer_norms import example_sq_norms_and_dots, linear_sq_norms_and_dots
from layerwise.sensitivity.validation import check_int

__all__ = ["CotangentNorms", "cotangent_norms"]

Params = dict[str, torch.Tensor]
#: Most covered calls of one parameter whose gradients :func:`cotangent_norms` adds up itself
#: for ``criterion``: with two, a + b is the sum autograd forms in either order (bit for bit);
#: with more, the order of the additions could round differently, so it declines.
MAX_SHARED_CALLS = 2


@dataclass(frozen=True)
class CotangentNorms:
    """What :func:`cotangent_norms` measured on one forward pass.

    ``sums``: ``{name: (K,)}``, Σ_i ‖(J_iᵀ c_k,i)_name‖²; ``per_example``: ``{name: (K, B)}``,
    the terms ‖(J_iᵀ c_k,i)_name‖² themselves; ``gradient``: the gradient of
    ``criterion(z)`` (zeros for a parameter it does not reach) when one was asked for and
    could be shared, else ``None``."""

    sums: Params
    per_example: Params
    gradient: Params | None = None


def cotangent_norms(
    function: FunctionalLoss,
    values: Params,
    batch: Any,
    size: int,
    cotangents: Callable[[torch.Tensor], torch.Tensor],
    chunk: int | None = None,
    criterion: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> CotangentNorms | None:
    """``sums``: ``{name: (K,)}``, Σ_i ‖(J_iᵀ c_k,i)_name‖² for the K cotangents
    ``cotangents(z)`` (shaped ``[K, *z.shape]``) of the outputs z of
    ``function.evaluate(values, batch)``, and the per-example terms; ``None`` when a
    parameter is not covered (module docstring). ``chunk`` caps the examples handled at
    once. Given a ``criterion(z)`` (a scalar loss of the outputs, e.g. the mean loss of a
    loss object), also its gradient from the same forward pass: one more backward pass,
    for the parameters and the covered calls' aliases, before the cotangents' (the graph is
    kept). The
    gradient is ``None`` when the criterion does not depend on the parameters or a
    parameter has more than :data:`MAX_SHARED_CALLS` covered calls (the caller then takes
    it from a pass of its own); it is the one a separate pass gives, bit for bit."""
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
    gradient = None
    if criterion is not None:
        with torch.enable_grad():
            loss = criterion(out)
        if loss.requires_grad:
            gradient = _shared_gradient(loss, live, calls)
    # Only the gradients that flow into the layers' outputs are needed, not the parameters'
    # own: asking for the outputs' autograd edges carries the gradient to every covered
    # output and runs no layer's parameter gradients (nor the first layer's backward at all).
    inputs = [*live.values(), *(call.edge for call in calls)]
    sums: dict[str, list[torch.Tensor]] = {n: [] for n in live}
    terms_of: dict[str, list[torch.Tensor]] = {n: [] for n in live}
    # per parameter: what depends on the layers' inputs alone, the same for every cotangent
    memos: dict[str, dict[Any, Any]] = {n: {} for n in live}
    for k in range(cots.shape[0]):
        grads = torch.autograd.grad(
            out, inputs, grad_outputs=cots[k], retain_graph=k + 1 < cots.shape[0],
            allow_unused=True,
        )  # fmt: skip
        if any(g is not None for g in grads[: len(live)]):  # another use of a parameter
            return None
        for call, delta in zip(calls, grads[len(live) :], strict=True):
            call.delta = delta
        reaching: dict[str, list[tuple[Any, str]]] = {n: [] for n in live}
        budget = dict.fromkeys(live, 0)
        for call in calls:
            if call.delta is None:
                continue
            call.made = None
            for local, name in call.names.items():
                reaching[name].append((call, local))
                budget[name] += call.elements
        for n, v in live.items():
            done = None
            if len(reaching[n]) == 1 and reaching[n][0][0].spec is LINEAR:  # no terms needed
                call, local = reaching[n][0]
                done = linear_sq_norms_and_dots(
                    call.saved, call.delta.detach(), local, v, size, budget[n], chunk,
                    dots=False, memo=memos[n],
                )  # fmt: skip
            if done is None:
                done = example_sq_norms_and_dots(
                    [_terms(call)[local] for call, local in reaching[n]], v, size, budget[n],
                    chunk, dots=False, memo=memos[n],
                )  # fmt: skip
            if done is None:
                return None
            terms_of[n].append(done[0])
            sums[n].append(done[0].sum())
    return CotangentNorms(
        {n: torch.stack(s) for n, s in sums.items()},
        {n: torch.stack(t) for n, t in terms_of.items()},
        gradient,
    )


def _terms(call: Any) -> dict[str, Any]:
    """The terms of a covered call for its current output gradient, made once."""
    if call.made is None:
        call.made = call.spec.terms(call.module, call.saved, call.delta.detach())
    return call.made


def _shared_gradient(loss: torch.Tensor, live: Params, calls: list[Any]) -> Params | None:
    """The gradient of ``loss`` through the covered calls' aliases (the graph kept), summed
    per parameter in call order; ``None`` past :data:`MAX_SHARED_CALLS` calls of one."""
    aliases = [(call.names[local], t) for call in calls for local, t in call.aliases.items()]
    uses = Counter(name for name, _ in aliases)
    if max(uses.values(), default=0) > MAX_SHARED_CALLS:
        return None
    grads = torch.autograd.grad(loss, [t for _, t in aliases], retain_graph=True, allow_unused=True)
    gradient: dict[str, torch.Tensor | None] = dict.fromkeys(live)
    for (name, _), g in zip(aliases, grads, strict=True):
        if g is not None:
            have = gradient[name]
            gradient[name] = g if have is None else have + g
    return {n: torch.zeros_like(v) if g is None else g for (n, v), g in
            zip(live.items(), gradient.values(), strict=True)}  # fmt: skip
