"""Per-example squared gradient norms at the cost of one backward pass.

:func:`example_norms` runs the loss once on the whole batch with hooks on the layers
that :mod:`layerwise.sensitivity.layer_terms` covers, takes the gradient of the loss with
respect to the parameters and to those layers' outputs in **one** backward pass, and
turns each layer call's input and output gradient into ‖g_i‖² and g_i·c per example and
parameter (:mod:`layerwise.sensitivity.outer_norms`), never forming the B per-example
gradients. A parameter that one covered call uses is reduced inside the backward pass, as
soon as its gradient c is known (hooks on the call's output and on the parameter's
alias), and the call's input and output gradient are let go there: the peak memory stays
near that of a plain backward pass, which lets go of each layer's activations as it
passes (a weight tied between calls waits for its whole gradient, at the end).

**Convention.** L is the mean loss over the B examples of the batch, c = ∇L, and

    g_i = B · (the part of ∇L that flows through example i's rows),

so that (1/B) Σ_i g_i = c exactly. When L = (1/B) Σ_i ℓ_i (the loss contract), g_i = ∇ℓ_i,
the per-example gradient of the *summed* loss's terms, the same as ``vmap`` of ``grad``
on one-example batches. (For a loss that weights examples unequally, such as a token
mean over sequences of unequal length, g_i is example i's share, scaled by B; for a loss
object the ``vmap`` fallback evaluates exactly that share,
:meth:`layerwise.sensitivity.losses.OutputLoss.share`.)

**Which parameters.** Each measured parameter a covered layer uses is swapped, for that
call only, for a fresh leaf sharing its storage, so the backward pass tells apart the
gradient that flows through covered calls (the aliases) from any other use (the
parameter itself). A parameter with another use -- an uncovered module, a direct use in
``loss_fn`` or in a parent's ``forward``, a layer whose input does not lead with the B
examples -- or whose calls do not combine, is measured by ``vmap`` of ``grad`` instead
(:func:`layerwise.sensitivity.per_example.per_example_gradients`, restricted to those
parameters). Weights tied between covered calls (even an ``Embedding`` and a ``Linear``
head) stay on the fast path: their calls concatenate along the positions, so the cross
terms are exact. Covered layers must see the examples along dimension 0 (batch-first);
a sequence-first layer whose sequence length happens to equal B cannot be told apart.

Examples must not interact (no BatchNorm in training mode: use micro-batches).

>>> from torch import nn
>>> from layerwise.sensitivity.functional import FunctionalLoss
>>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
>>> mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).sum(1).mean()
>>> x, y = torch.randn(5, 3), torch.randn(5, 2)
>>> loss = FunctionalLoss(net, mse, [n for n, _ in net.named_parameters()])
>>> norms = example_norms(loss, (x, y), 5)
>>> norms.factorised, norms.fallback, tuple(norms.sq["0.weight"].shape)
(('0.weight', '0.bias', '2.weight', '2.bias'), (), (5,))
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from layerwise.sensitivity.batching import slice_batch
from layerwise.sensitivity.functional import FunctionalLoss
from layerwise.sensitivity.layer_terms import LINEAR, LayerSpec, spec_for
from layerwise.sensitivity.outer_norms import example_sq_norms_and_dots, linear_sq_norms_and_dots
from layerwise.sensitivity.per_example import per_example_gradients
from layerwise.sensitivity.validation import check_int

__all__ = ["ExampleNorms", "example_norms"]

Params = dict[str, torch.Tensor]
#: The parameters a covered layer's terms describe (any other, such as the ``weight_g``
#: and ``weight_v`` of the old ``weight_norm``, is used as it is: the fallback measures it).
COVERED_NAMES = ("weight", "bias")
#: Per-example gradient entries held at once by the ``vmap`` fallback (chunk default).
FALLBACK_CHUNK_ELEMENTS = 2**25


@dataclass(frozen=True)
class ExampleNorms:
    """Per-example statistics of one batch (module docstring for the convention).

    ``gradient``: c = ∇L per parameter; ``sq`` and ``dot``: ‖g_i‖² and g_i·c, each a (B,)
    tensor per parameter; ``total``: Σ_i g_i for the ``fallback`` parameters (for the
    ``factorised`` ones it is B·c by construction)."""

    gradient: Params
    sq: Params
    dot: Params
    total: Params
    factorised: tuple[str, ...]
    fallback: tuple[str, ...]


class _Call:
    """One covered call of a layer: its parameters' aliases, saved input, output gradient."""

    def __init__(self, spec: LayerSpec, module: nn.Module, names: dict[str, str]) -> None:
        self.spec, self.module, self.names = spec, module, names
        self.aliases: dict[str, torch.Tensor] = {}
        self.originals: dict[str, torch.Tensor] = {}
        self.saved: Any = None
        #: the autograd edge of the call's output: asking a backward pass for it gives the
        #: output gradient δ (taken before any later in-place change of the output) without
        #: running the layer's own backward (kept when the outputs are not hooked)
        self.edge: Any = None
        self.delta: torch.Tensor | None = None
        self.made: dict[str, Any] | None = None  # the terms, once made
        self.finished = 0  # aliases whose norms were taken during the backward pass
        self.released = False  # those of every alias: input and δ let go
        self.elements = 0

    def set_delta(self, grad: torch.Tensor) -> None:
        self.delta = grad


class _Capture:
    """Forward hooks that swap in aliases and record the covered calls."""

    def __init__(self, live: Params, size: int, hook_outputs: bool = False) -> None:
        self.size = size
        #: hook each covered output for its gradient δ (set on the call as the backward pass
        #: reaches it), at once, before a later in-place change of the output
        self.hook_outputs = hook_outputs
        self.by_id = {id(t): n for n, t in live.items()}
        self.calls: list[_Call] = []
        self.open: dict[int, list[_Call]] = {}
        self.bad: set[str] = set()

    def pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        mine = {
            local: self.by_id[id(t)]
            for local, t in module._parameters.items()
            if local in COVERED_NAMES and t is not None and id(t) in self.by_id
        }
        if not mine or not args:
            return
        spec = spec_for(module, args[0], self.size)
        if spec is None:
            return  # the parameters are used as they are: measured by the fallback
        call = _Call(spec, module, mine)
        for local in mine:
            original = module._parameters[local]
            alias = original.detach().requires_grad_(True)
            call.originals[local], call.aliases[local] = original, alias
            module._parameters[local] = alias
        call.saved = spec.save(module, args[0].detach())
        self.open.setdefault(id(module), []).append(call)

    def post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        stack = self.open.get(id(module))
        if not stack:
            return
        call = stack.pop()
        for local, original in call.originals.items():
            module._parameters[local] = original
        ok = isinstance(output, torch.Tensor) and output.requires_grad
        if not ok or output.dim() == 0 or output.shape[0] != self.size:
            self.bad.update(call.names.values())
            return
        if self.hook_outputs:
            output.register_hook(call.set_delta)
        else:  # (not both: the output's node would hold the hook, the hook the call, the
            # call the node, a reference cycle that keeps the graph until the garbage
            # collector finds it, and makes it run more often)
            call.edge = get_gradient_edge(output)
        call.elements = output.numel() + _numel(call.saved)
        self.calls.append(call)

    @contextmanager
    def hooks(self, loss: FunctionalLoss) -> Iterator[None]:
        """The hooks on every module of ``loss.model`` that owns parameters (from the loss's
        :class:`~layerwise.sensitivity.structure.ModelStructure` when it has one)."""
        handles = []
        if loss.structure is not None:
            modules = loss.structure.param_modules
        else:
            modules = [
                m
                for m in loss.model.modules()
                if any(t is not None for t in m._parameters.values())
            ]
        try:
            for m in modules:
                handles.append(m.register_forward_pre_hook(self.pre))
                handles.append(m.register_forward_hook(self.post))
            yield
        finally:
            for h in handles:
                h.remove()


def _early(
    call: _Call,
    local: str,
    size: int,
    chunk: int | None,
    into: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> Any:
    """The hook on the alias ``local`` of ``call``: its norms and dots from its gradient (the
    parameter's whole gradient c: it has no other call), into ``into``; once every alias of
    the call has its own, the call's input and δ are released."""

    def hook(grad: torch.Tensor) -> None:
        if call.delta is None:
            return
        done = None
        if call.spec is LINEAR and call.made is None:  # the common case, without the terms
            done = linear_sq_norms_and_dots(
                call.saved, call.delta.detach(), local, grad, size, call.elements, chunk
            )
        if done is None:
            if call.made is None:
                call.made = call.spec.terms(call.module, call.saved, call.delta.detach())
            done = example_sq_norms_and_dots([call.made[local]], grad, size, call.elements, chunk)
        if done is not None:
            into[call.names[local]] = done
        call.finished += 1
        if call.finished == len(call.names):
            call.saved = call.delta = call.made = None
            call.released = True

    return hook


def _numel(t: Any) -> int:
    return t.numel() if isinstance(t, torch.Tensor) else 0


def example_norms(
    loss: FunctionalLoss, batch: Any, size: int, chunk: int | None = None
) -> ExampleNorms:
    """Per-example ‖g_i‖² and g_i·c of every parameter of ``loss`` on ``batch`` of ``size``
    examples, and the gradient c (module docstring). ``chunk`` caps the examples handled
    at once (default: temporaries as large as the layer's activations, at least 2**20
    elements; the fallback at most 2**25 gradient entries at once)."""
    if not isinstance(loss, FunctionalLoss):
        raise TypeError(f"loss must be a FunctionalLoss, got {type(loss).__name__}")
    check_int("size", size, 1)
    check_int("chunk", chunk, 1, optional=True)
    values = loss.values
    live = {n: v.detach().requires_grad_(True) for n, v in values.items()}
    capture = _Capture(live, size, hook_outputs=True)
    with capture.hooks(loss), torch.enable_grad():
        out = loss(live, batch)
    aliases = [(c, local, t) for c in capture.calls for local, t in c.aliases.items()]
    calls = capture.calls
    # A parameter of one covered call is reduced to its norms inside the backward pass, as
    # soon as its gradient is known (its output gradient δ came first): that layer's input
    # and δ are then let go, as a plain backward pass lets go of its activations, instead
    # of every layer's being held until the pass ends (the peak memory of an MLP).
    uses = Counter(call.names[local] for call, local, _ in aliases)
    early: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    if out.requires_grad:
        for call in calls:
            pending = [local for local, name in call.names.items() if uses[name] == 1]
            if len(pending) == len(call.names) and not (set(call.names.values()) & capture.bad):
                for local in pending:
                    hook = _early(call, local, size, chunk, early)
                    handles.append(call.aliases[local].register_hook(hook))
        inputs = [*live.values(), *(t for _, _, t in aliases)]
        try:
            grads = torch.autograd.grad(out, inputs, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
    else:
        grads = (None,) * (len(live) + len(aliases))
    direct = dict(zip(live, grads[: len(live)], strict=True))
    gradient: dict[str, torch.Tensor | None] = dict(direct)
    terms: dict[str, list[Any]] = {n: [] for n in live}
    budget: dict[str, int] = dict.fromkeys(live, 0)
    for (call, local, _), g in zip(aliases, grads[len(live) :], strict=True):
        name = call.names[local]
        if g is not None:
            have = gradient[name]
            gradient[name] = g if have is None else have + g
    for n, g in gradient.items():
        if g is None:  # the loss does not use the parameter
            gradient[n] = torch.zeros_like(values[n])
    for call in capture.calls:
        if call.delta is None or call.released:
            continue  # the output does not reach the loss (no contribution), or done early
        made = call.spec.terms(call.module, call.saved, call.delta.detach())
        for local, name in call.names.items():
            terms[name].append(made[local])
            budget[name] += call.elements
    sq, dot, fallback = {}, {}, []
    for n in live:
        done = None
        if direct[n] is None and n not in capture.bad:
            if n in early:
                done = early[n]
            else:
                done = example_sq_norms_and_dots(terms[n], gradient[n], size, budget[n], chunk)
        if done is None:
            fallback.append(n)
        else:
            sq[n], dot[n] = done
    del capture, terms
    if sq:  # δ is that of the mean loss: g_i = B × (example i's part), scaled all at once
        fast = list(sq)
        sq = dict(zip(fast, torch.stack(list(sq.values())).mul_(size**2).unbind(0), strict=True))
        dot = dict(zip(fast, torch.stack(list(dot.values())).mul_(size).unbind(0), strict=True))
    with loss.slices_of(batch, size):  # g_i = B × example i's share, as factorised
        total = _fallback(loss, gradient, batch, size, fallback, chunk, sq, dot)
    order = list(live)
    return ExampleNorms(
        gradient={n: gradient[n] for n in order},
        sq={n: sq[n] for n in order},
        dot={n: dot[n] for n in order},
        total=total,
        factorised=tuple(n for n in order if n not in total),
        fallback=tuple(fallback),
    )


def _fallback(
    loss: FunctionalLoss,
    centre: Params,
    batch: Any,
    size: int,
    names: list[str],
    chunk: int | None,
    sq: Params,
    dot: Params,
) -> Params:
    """``vmap`` per-example gradients of ``names`` only; fills ``sq`` and ``dot``."""
    if not names:
        return {}
    values = {n: loss.values[n] for n in names}
    restricted = loss.restricted(names)
    numel = sum(v.numel() for v in values.values())
    step = chunk or max(1, min(size, FALLBACK_CHUNK_ELEMENTS // max(1, numel)))
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
    total = {n: torch.zeros_like(v) for n, v in values.items()}
    for start in range(0, size, step):
        stop = min(start + step, size)
        grads = per_example_gradients(
            restricted, values, slice_batch(batch, size, start, stop), stop - start
        )
        for n in names:
            flat = grads[n].reshape(stop - start, -1)
            parts[n].append((flat.square().sum(1), flat @ centre[n].reshape(-1)))
            total[n] += grads[n].sum(0)
    for n in names:
        sq[n] = torch.cat([p[0] for p in parts[n]])
        dot[n] = torch.cat([p[1] for p in parts[n]])
    return total
