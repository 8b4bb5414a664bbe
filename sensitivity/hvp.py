"""Hessian-vector products of a functional loss, for chunks of probes.

For a loss L(θ) with gradient ∇L, the product with the Hessian H = ∇²L is

    H v = d/dε ∇L(θ + ε v) |_{ε=0}           (forward over reverse: ``jvp`` of ``grad``)
        = ∇_θ ⟨∇L(θ), v⟩ = vᵀ H              (reverse over reverse: ``vjp`` of ``grad``)

(Pearlmutter 1994), equal because H is symmetric. Both cost a small constant times one
forward + backward pass and never form H.

* ``"jvp"`` (forward over reverse): each call evaluates the loss and its gradient once,
  with the tangents of a whole chunk of probes carried alongside by ``vmap``; nothing
  outlives the call, so memory is bounded by the chunk.
* ``"vjp"`` (reverse over reverse): the forward pass and the first backward pass run once,
  on the first call, in plain reverse mode with ``create_graph=True``, and their graph is
  kept (as PyHessian does); every chunk then costs second backward passes through it:
  one batched pass for the whole chunk (``is_grads_batched``), or one pass per probe.
  Cheaper when there are many chunks, at the memory cost of holding the graph of the first
  backward pass until the product object is released.

  **Batched or probe by probe** (:func:`batch_probes`). On accelerators, batched. On the
  CPU a batched pass does the same arithmetic in fewer, larger operators: it wins where a
  pass is dominated by the fixed cost of each operator, and loses where it is dominated by
  the arithmetic (a batched weight turns convolutions into grouped ones and writes
  chunk × parameters tensors). The first product of a model and batch signature counts the
  FLOPs of its forward and first backward pass (matrix products and convolutions, as
  :mod:`torch.utils.flop_counter` counts them; about 1-5 ms of Python, once per model and
  batch signature), and chunks are batched below :data:`BATCHED_BELOW_FLOPS` (12 MFLOP).
  Measured on one CPU thread, 32 probes, forward+backward units per probe (batched
  against per probe): MLPs of 8-64 units 0.5-1.0 against 1.3-1.5 below the threshold; a
  128-unit MLP at batch 128 (15 MFLOP) 1.10 against 1.05; the benchmark's 256-unit MLP
  at batch 32 (21 MFLOP) 1.7 against 1.3, its 1024-unit MLP 3.5-7 against 1.8-2.3, its CNN
  at batch 128 1.6 against 1.2. The choice is a deterministic function of the shapes, and
  the two give the same products up to float round-off.
* ``"auto"``: ``"vjp"`` on CPU, where it measured faster in every configuration of
  ``python -m layerwise.experiments.benchmarks.sensitivity`` (MLP and CNN, batch 32 and 128:
  0.85-1.6
  against 1.2-2.1 forward+backward units per probe at 32 probes); on other devices ``"jvp"``
  when all probes of a batch fit in one call (the two then do the same passes and forward
  mode holds less memory) and ``"vjp"`` when there are several chunks (it shares the
  forward and first backward pass between them). Whatever the choice, ``"vjp"`` whenever
  forward mode fails on the first call (an operator without a forward-mode derivative,
  or PyTorch bugs such as ``F.mse_loss`` under ``jvp`` of ``grad``, pytorch#123996).

Hutchinson's estimator needs only ``v_kᵀ (H v_k)`` per parameter:
:meth:`HessianProduct.quadratic_forms` gives them, probe by probe without ever holding a
chunk's products together (a chunk × parameters tensor of fresh memory costs more to
allocate on a CPU than the products' arithmetic on a large model).

Attention runs on the math backend during every product, whatever backend the caller
selected (restored afterwards): :mod:`layerwise.sensitivity.attention`.

Random layers (dropout) draw their masks once per evaluation (in ``"vjp"`` mode once per
product object: the forward pass runs once) and ``vmap`` runs with
``randomness="same"``, so every probe of a chunk sees the same mask; with an
:class:`~layerwise.sensitivity.functional.RngReplay` every chunk sees the same mask too, and both
modes give the same products.

For L(θ) = Σ θ³/3 the Hessian is diag(2θ), so H v = 2 θ ⊙ v, in both modes:

>>> loss = lambda p, batch: (p["w"] ** 3).sum() / 3
>>> theta = {"w": torch.tensor([1.0, -2.0, 3.0])}
>>> probes = {"w": torch.eye(3)}  # three probes, the columns of H
>>> HessianProduct(loss, theta, None, mode="jvp")(probes)["w"].diagonal()
tensor([ 2., -4.,  6.])
>>> hp = HessianProduct(loss, theta, None, mode="vjp")
>>> hp(probes)["w"].diagonal(), hp.gradient["w"]
(tensor([ 2., -4.,  6.]), tensor([1., 4., 9.]))
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad, jvp, vmap
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from layerwise.sensitivity.attention import twice_differentiable_attention
from layerwise.sensitivity.batching import flatten_batch
from layerwise.sensitivity.errors import explain, is_double_backward_error
from layerwise.sensitivity.functional import RngReplay

__all__ = [
    "BATCHED_BELOW_FLOPS",
    "HVP_MODES",
    "HessianProduct",
    "batch_probes",
    "choose_hvp_mode",
    "loss_gradient",
]

HVP_MODES = ("auto", "jvp", "vjp")

Params = dict[str, torch.Tensor]


def choose_hvp_mode(mode: str, calls: int, device: torch.device | str = "cpu") -> str:
    """Resolve ``"auto"`` for a product called ``calls`` times on ``device`` (see above)."""
    if mode not in HVP_MODES:
        raise ValueError(f"hvp_mode must be one of {HVP_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    if torch.device(device).type == "cpu":
        return "vjp"
    return "jvp" if calls <= 1 else "vjp"


#: On the CPU, a chunk of probes is one batched second backward pass when one forward and
#: backward pass of the loss takes fewer floating-point operations than this (counted as
#: :mod:`torch.utils.flop_counter` counts them: matrix products and convolutions), and one
#: second backward pass per probe otherwise (module docstring).
BATCHED_BELOW_FLOPS = 12e6


def batch_probes(device: torch.device | str, flops: float | None) -> bool:
    """Whether a chunk of probes runs as one batched second backward pass (``True``) or as
    one pass per probe (``False``) in ``"vjp"`` mode, on ``device`` for a loss whose
    forward and first backward pass take ``flops`` floating-point operations (module
    docstring). Batched on accelerators; on the CPU batched below
    :data:`BATCHED_BELOW_FLOPS` (or when ``flops`` is ``None``, unknown)."""
    if torch.device(device).type != "cpu" or flops is None:
        return True
    return flops < BATCHED_BELOW_FLOPS


class _FlopCount(TorchDispatchMode):
    """Counts the floating-point operations of the operators
    :mod:`torch.utils.flop_counter` knows (matrix products, convolutions, attention) run
    inside it; a lighter :class:`torch.utils.flop_counter.FlopCounterMode` (no per-module
    breakdown)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.flops += count(*args, **kwargs, out_val=out)
        return out


#: FLOPs of one forward and backward pass, per model (or loss) and per signature of the
#: parameters and the batch: counted once, on the first product of that signature.
_FLOPS: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], float]] = weakref.WeakKeyDictionary()


#: Batch signatures remembered per model (batches whose shapes vary, e.g. sequence lengths,
#: would otherwise grow the cache without bound).
_SIGNATURES = 64


def _signature(values: Params, batch: Any) -> tuple[Any, ...]:
    leaves = flatten_batch(batch)[0]  # dicts, BatchEncoding, dataclasses: their tensors
    return (
        tuple((n, tuple(v.shape), v.dtype) for n, v in values.items()),
        tuple(
            (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
            for x in leaves
        ),
    )


def loss_gradient(
    loss: Callable[[Params, Any], torch.Tensor], values: Params, batch: Any
) -> Params:
    """The gradient ``{name: ∂L/∂θ_name}`` of ``loss(values, batch)`` (zeros for unused
    parameters). Plain reverse mode on fresh leaves sharing the values' storage: a first
    derivative needs no ``torch.func`` transform, whose wrapping costs more than the
    backward pass itself on small models."""
    live = {n: v.detach().requires_grad_(True) for n, v in values.items()}
    with torch.enable_grad():
        out = loss(live, batch)
    if not out.requires_grad:  # the loss does not depend on these parameters at all
        return {n: torch.zeros_like(v) for n, v in values.items()}
    grads = torch.autograd.grad(out, list(live.values()), materialize_grads=True)
    return dict(zip(live, grads, strict=True))


def _unit_dots(probe: Params, product: Params | tuple[torch.Tensor, ...], names: list[str]):
    """``[vᵀ(Hv)]`` per parameter of one probe (1-D tensors of one element each)."""
    if isinstance(product, dict):
        product = tuple(product[n] for n in names)
    device = probe[names[0]].device
    return [
        torch.dot(probe[n].reshape(-1), hv.reshape(-1)).to(device)
        for n, hv in zip(names, product, strict=True)
    ]


class HessianProduct:
    """``hp(V)``: the products ``H v`` for a chunk of probes ``V = {name: (c, *shape)}``;
    ``hp.quadratic_forms(V)``: the terms ``v_kᵀ (H v_k)_name`` (c, names) without keeping
    the products (what Hutchinson's estimator needs).

    ``H`` is the Hessian of ``loss(values, batch)`` with respect to ``values``;
    ``hp.gradient`` is the gradient at ``values`` (available after the first call);
    ``hp.mode`` is the mode actually used (``"jvp"`` or ``"vjp"``): with ``fallback``,
    a ``"jvp"`` product whose first call fails switches to ``"vjp"`` and records why in
    ``hp.fell_back``. ``batched``: in ``"vjp"`` mode, whether a chunk is one batched
    second backward pass (``True``) or one per probe (``False``); ``None`` (default)
    decides by :func:`batch_probes`. Either way the products are the same up to float
    round-off. An operator that has no second derivative at all raises
    :class:`~layerwise.sensitivity.errors.DoubleBackwardError` naming the module that runs it.
    """

    def __init__(
        self,
        loss: Callable[[Params, Any], torch.Tensor],
        values: Params,
        batch: Any,
        mode: str = "jvp",
        rng: RngReplay | None = None,
        model: torch.nn.Module | None = None,
        fallback: bool = True,
        batched: bool | None = None,
    ) -> None:
        if mode not in ("jvp", "vjp"):
            raise ValueError(f"mode must be 'jvp' or 'vjp', got {mode!r}")
        if batched is not None and not isinstance(batched, bool):
            raise TypeError(f"batched must be a bool or None, got {batched!r}")
        self.mode, self.fallback, self.fell_back = mode, fallback, None
        self.batched = batched
        self.gradient: Params | None = None
        self._loss, self._values, self._batch = loss, values, batch
        self._rng, self._model = rng, model
        self._names = list(values)
        self._graph: tuple[list[torch.Tensor], list[torch.Tensor], list[int]] | None = None
        self._grad_fn = grad(lambda p: loss(p, batch))

    def __call__(self, probes: Params) -> Params:
        return self._guarded(self._product, probes)

    def quadratic_forms(self, probes: Params) -> torch.Tensor:
        """``(c, len(values))``: ``v_kᵀ (H v_k)_name`` for each probe k and parameter, in the
        order of ``values``. Probe by probe (``batched`` false) the products of a chunk are
        never held together: a (c × parameters) tensor is neither allocated nor written."""
        return self._guarded(self._forms, probes)

    def _guarded(self, run: Callable[[Params], Any], probes: Params) -> Any:
        try:
            with twice_differentiable_attention():
                return run(probes)
        except (RuntimeError, NotImplementedError) as exc:
            if self.mode == "jvp" and self.fallback and self.gradient is None:
                # forward mode failed on the first call: an operator without a forward-mode
                # derivative, or a PyTorch bug such as pytorch/pytorch#123996 (F.mse_loss
                # under jvp of grad); reverse over reverse needs neither
                self.mode, self.fell_back = "vjp", f"{type(exc).__name__}: {exc}"[:200]
                return self._guarded(run, probes)
            if is_double_backward_error(exc):
                raise self._explain(exc) from exc
            raise

    def _forms(self, probes: Params) -> torch.Tensor:
        names = self._names
        if self.mode == "vjp":
            leaves, grads, live = self._first_order()
            if not self.batched:
                rows = []
                for k in range(next(iter(probes.values())).shape[0]):
                    probe = {n: probes[n][k] for n in names}
                    hv = self._second(leaves, grads, live, probe)
                    rows.append(torch.stack(_unit_dots(probe, hv, names)))
                return torch.stack(rows)
        products = self._product(probes)
        count = next(iter(probes.values())).shape[0]
        return torch.stack(
            [
                torch.linalg.vecdot(
                    probes[n].reshape(count, -1), products[n].reshape(count, -1)
                ).to(probes[names[0]].device)
                for n in names
            ],
            dim=1,
        )

    def _flops(self) -> tuple[dict[tuple[Any, ...], float] | None, tuple[Any, ...]]:
        """The cache of counted FLOPs for this model or loss (``None`` when neither can
        be weakly referenced), and the key of this product's parameters and batch."""
        owner = self._model if self._model is not None else self._loss
        try:
            cache = _FLOPS.setdefault(owner, {})
        except TypeError:
            cache = None
        return cache, _signature(self._values, self._batch)

    def _first_order(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
        """The forward and first backward pass, once, their graph kept (``create_graph``):
        fresh leaves sharing the values' storage, the gradients that depend on them, and
        the positions of those gradients among the parameters. Resolves ``batched`` when
        it is ``None``: on the CPU this pass counts its FLOPs, the first time a model and
        batch signature is seen (:func:`batch_probes`)."""
        if self._graph is None:
            if self._rng is not None:
                self._rng.replay()
            device = next(iter(self._values.values())).device
            counter, cache, key = None, None, None
            if self.batched is None and device.type == "cpu":
                cache, key = self._flops()
                if cache is None or key not in cache:
                    counter = _FlopCount()
            leaves = [self._values[n].detach().requires_grad_(True) for n in self._names]
            with torch.enable_grad(), counter or contextlib.nullcontext():
                out = self._loss(dict(zip(self._names, leaves, strict=True)), self._batch)
                grads = (
                    torch.autograd.grad(out, leaves, create_graph=True, materialize_grads=True)
                    if out.requires_grad
                    else tuple(torch.zeros_like(v) for v in leaves)
                )
            if self.batched is None:
                flops = None
                if counter is not None:
                    flops = float(counter.flops)
                    if cache is not None:
                        if len(cache) >= _SIGNATURES:  # shapes that vary: forget the oldest
                            del cache[next(iter(cache))]
                        cache[key] = flops
                elif cache is not None:
                    flops = cache[key]
                self.batched = batch_probes(device, flops)
            self.gradient = {n: g.detach() for n, g in zip(self._names, grads, strict=True)}
            live = [i for i, g in enumerate(grads) if g.requires_grad]
            self._graph = (leaves, [grads[i] for i in live], live)
        return self._graph

    def _second(
        self,
        leaves: list[torch.Tensor],
        grads: list[torch.Tensor],
        live: list[int],
        probe: Params,
        batched: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """One second backward pass: ``H v`` for ``probe`` (a chunk with ``batched``)."""
        if not grads:  # no gradient depends on the parameters: H = 0
            return tuple(torch.zeros_like(probe[n]) for n in self._names)
        vs = [probe[self._names[i]] for i in live]
        with torch.enable_grad():
            out = torch.autograd.grad(
                grads, leaves, vs, retain_graph=True, allow_unused=True,
                is_grads_batched=batched,
            )  # fmt: skip
        # a parameter no gradient depends on: a zero row (and column) of H
        return tuple(
            torch.zeros_like(probe[n]) if hv is None else hv
            for n, hv in zip(self._names, out, strict=True)
        )

    def _product(self, probes: Params) -> Params:
        if self.mode == "jvp":
            if self._rng is not None:
                self._rng.replay()

            def one(v: Params) -> tuple[Params, Params]:
                return jvp(self._grad_fn, (self._values,), (v,))

            grads, products = vmap(one, randomness="same")(probes)
            if self.gradient is None:
                self.gradient = {n: g[0] for n, g in grads.items()}
            return products
        leaves, grads, live = self._first_order()
        if self.batched:
            out = self._batched_second(leaves, grads, live, probes)
            if out is not None:
                return dict(zip(self._names, out, strict=True))
        count = next(iter(probes.values())).shape[0]
        rows = [
            self._second(leaves, grads, live, {n: v[k] for n, v in probes.items()})
            for k in range(count)
        ]
        return {n: torch.stack([row[i] for row in rows]) for i, n in enumerate(self._names)}

    def _batched_second(
        self,
        leaves: list[torch.Tensor],
        grads: list[torch.Tensor],
        live: list[int],
        probes: Params,
    ) -> tuple[torch.Tensor, ...] | None:
        """The chunk's products in one batched pass, or ``None`` (and probe by probe from
        then on) when ``vmap`` cannot batch an operator of the backward pass: the same
        products, one pass per probe."""
        try:
            return self._second(leaves, grads, live, probes, batched=True)
        except (RuntimeError, NotImplementedError) as exc:
            if is_double_backward_error(exc):
                raise
            self.batched = False
            return None

    def _explain(self, exc: BaseException) -> Exception:
        if self._model is None:
            return exc if isinstance(exc, Exception) else RuntimeError(str(exc))

        def run() -> None:
            live = {n: v.detach().requires_grad_(True) for n, v in self._values.items()}
            with torch.enable_grad():
                self._loss(live, self._batch)

        return explain(exc, self._model, run)
