"""Per-group squared norms of vector-Jacobian products of a model's outputs.

With z(θ) the outputs of ``forward(model, batch)`` (a loss object's forward) and
cotangents c_1..c_K shaped like z (made from z itself, e.g. sampled labels), this computes
per group g

* per example (:meth:`OutputVJP.example_norms`): Σ_i ‖(J_iᵀ c_k,i)_g‖², J_i = ∂z_i/∂θ the
  Jacobian of example i's outputs on its own (``vmap`` over the examples of one forward
  pass each, then ``vmap`` over the K cotangents of that pass's backward), for models whose
  examples do not interact;
* of the batch function (:meth:`OutputVJP.batch_norms`): ‖(Jᵀ c_k)_g‖², J the Jacobian of
  the whole batch's outputs (one forward pass, then batched backward passes over the
  cotangents, ``chunk_size`` at a time), e.g. under BatchNorm in training mode.

Per example, the norms are factorised over the layers' inputs and output gradients
(Goodfellow 2015; :mod:`layerwise.sensitivity.cotangent_norms`: one forward pass and one
backward pass per cotangent, no per-example gradient) when every measured parameter is
used by covered layers alone; ``method`` then reads ``"factorised"``. Otherwise
(``method`` ``"vmap"``) only the (K, G) sums leave a ``vmap`` call: the per-example
gradients of a chunk of examples (``example_chunk_size``, default 2**25 entries at once) are
reduced to squared norms per group at once.

>>> from torch import nn
>>> net = nn.Linear(2, 1, bias=False)
>>> vjps = OutputVJP(lambda m, b: m(b), net, ["weight"], [0], 1)
>>> x = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
>>> ones = lambda out, *rest: torch.ones(1, *out.shape)  # one cotangent: all ones
>>> vjps.example_norms({"weight": net.weight.detach()}, x, 2, 1, ones)  # ‖x_1‖² + ‖x_2‖²
tensor([[14.]])
>>> vjps.batch_norms({"weight": net.weight.detach()}, x, lambda out: 1, ones)  # ‖x_1 + x_2‖²
tensor([[20.]])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import vjp, vmap

from layerwise.sensitivity.batching import example_in_dims, flatten_batch, slice_batch
from layerwise.sensitivity.cotangent_norms import cotangent_norms
from layerwise.sensitivity.functional import FunctionalLoss

if TYPE_CHECKING:
    from layerwise.sensitivity.structure import ModelStructure

__all__ = ["OutputNorms", "OutputVJP"]

Params = dict[str, torch.Tensor]
#: Per-example gradient entries held at once when ``example_chunk_size`` is None.
CHUNK_ELEMENTS = 2**25


def _outputs_of(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"forward(model, batch) must return a tensor, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class OutputNorms:
    """Squared norms per group of one batch's per-example products: ``sums`` (C, G) over
    the examples, ``per_example`` (C, B, G), and the ``gradient`` of a criterion when the
    factorised pass gave it (:meth:`OutputVJP.factorised`)."""

    sums: torch.Tensor
    per_example: torch.Tensor
    gradient: Params | None = None


class OutputVJP:
    """Squared norms per group of J_iᵀ c (per example) or Jᵀ c (whole batch); see the
    module docstring. ``params`` are the parameter names measured, ``group_of[i]`` the
    group of the i-th."""

    def __init__(
        self,
        forward: Callable[[nn.Module, Any], torch.Tensor],
        model: nn.Module,
        params: Sequence[str],
        group_of: Sequence[int] | torch.Tensor,
        num_groups: int,
        *,
        dtype: torch.dtype | None = None,
        example_chunk_size: int | None = None,
        chunk_size: int = 8,
        structure: ModelStructure | None = None,
    ) -> None:
        self.function = FunctionalLoss(model, forward, params, dtype, structure=structure)
        first = next(iter(self.function.values.values()))
        index = torch.as_tensor(group_of, dtype=torch.long, device=first.device)
        groups = torch.arange(num_groups, device=first.device)
        self.onehot = (index.unsqueeze(-1) == groups).to(first.dtype)  # (params, G)
        self.numel = sum(v.numel() for v in self.function.values.values())
        self.example_chunk_size, self.chunk_size = example_chunk_size, chunk_size
        self.method: str | None = None  # how the last example_norms call ran

    def _group_sq(self, grads: Params) -> torch.Tensor:
        """(K, G): squared norms per group of gradients ``{name: (K, *shape)}``."""
        sq = [torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=-1).square()
              for g in grads.values()]  # fmt: skip
        return torch.stack(sq, -1) @ self.onehot.to(sq[0].dtype)

    def _pullback(self, values: Params, batch: Any) -> tuple[torch.Tensor, Any]:
        out, pull = vjp(lambda v: _outputs_of(self.function.evaluate(v, batch)), values)
        return out, pull

    def first_outputs(self, values: Params, batch: Any, size: int) -> torch.Tensor:
        """The outputs of the batch's first example alone (no gradients), with the examples
        along dimension 0 (checked): the output shape before any per-example work."""
        with torch.no_grad():
            first = _outputs_of(self.function.evaluate(values, slice_batch(batch, size, 0, 1)))
        if first.dim() == 0 or first.shape[0] != 1:
            raise ValueError(
                "forward(model, batch) must return the examples along dimension 0, got shape "
                f"{tuple(first.shape)} for a batch of one example"
            )
        return first

    def batch_norms(
        self,
        values: Params,
        batch: Any,
        count: Callable[[torch.Tensor], int],
        cotangents: Callable[[torch.Tensor, int, int], torch.Tensor],
    ) -> torch.Tensor:
        """(C, G): ‖(Jᵀ c_k)_g‖² for the ``C = count(z)`` cotangents ``cotangents(z, a, b)``
        (those of indices a..b−1, shaped ``[b − a, *z.shape]``) of the batch's outputs z."""
        out, pull = self._pullback(values, batch)
        total = count(out)
        parts = []
        for a in range(0, total, self.chunk_size):
            b = min(a + self.chunk_size, total)
            parts.append(self._group_sq(vmap(pull)(cotangents(out, a, b))[0]))
        return torch.cat(parts)

    def example_norms(
        self,
        values: Params,
        batch: Any,
        size: int,
        count: int,
        cotangents: Callable[..., torch.Tensor],
        extra: Sequence[tuple[torch.Tensor, int]] = (),
    ) -> torch.Tensor:
        """(C, G): Σ_i ‖(J_iᵀ c_k,i)_g‖² over the ``size`` examples for the ``count``
        cotangents ``cotangents(z_i, *extra_i)`` of each example's outputs z_i (shaped
        ``[count, *z_i.shape]``, z_i with a leading dimension of 1); ``extra`` holds tensors
        with the examples along the given dimension, sliced per example. The sums of
        :meth:`factorised` where it applies, else of :meth:`vmapped`."""
        found = self.factorised(values, batch, size, cotangents, extra)
        if found is None:
            found = self.vmapped(values, batch, size, count, cotangents, extra)
        return found.sums

    def vmapped(
        self,
        values: Params,
        batch: Any,
        size: int,
        count: int,
        cotangents: Callable[..., torch.Tensor],
        extra: Sequence[tuple[torch.Tensor, int]] = (),
    ) -> OutputNorms:
        """:meth:`example_norms` by ``vmap`` over the examples (any model whose examples do
        not interact); ``method`` then reads ``"vmap"``."""
        self.method = "vmap"
        chunk = self.example_chunk_size or max(1, CHUNK_ELEMENTS // max(1, count * self.numel))

        def one(v: Params, example: Any, *moving: torch.Tensor) -> torch.Tensor:
            out, pull = self._pullback(v, example)
            return self._group_sq(vmap(pull)(cotangents(out, *moving))[0])

        total = None
        parts = []
        for a in range(0, size, chunk):
            b = min(a + chunk, size)
            part = slice_batch(batch, size, a, b)
            leaves, rebuild = flatten_batch(part)
            dims = example_in_dims(part, b - a)

            def call(v: Params, *args: Any, rebuild: Any = rebuild, dims: list = dims) -> Any:
                moving, leaves = args[: len(extra)], args[len(extra) :]
                rows = [t.unsqueeze(0) if d == 0 else t for t, d in zip(leaves, dims, strict=True)]
                return one(v, rebuild(rows), *moving)

            pieces = [t.narrow(d, a, b - a) for t, d in extra]
            in_dims = (None, *(d for _, d in extra), *dims)
            norms = vmap(call, in_dims=in_dims, randomness="different")(values, *pieces, *leaves)
            total = norms.sum(0) if total is None else total + norms.sum(0)
            parts.append(norms)
        return OutputNorms(total, torch.cat(parts).movedim(0, 1))

    def factorised(
        self,
        values: Params,
        batch: Any,
        size: int,
        cotangents: Callable[..., torch.Tensor],
        extra: Sequence[tuple[torch.Tensor, int]],
        *,
        check: Callable[[torch.Tensor], Any] | None = None,
        criterion: Callable[[torch.Tensor], torch.Tensor] | None = None,
        batched: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> OutputNorms | None:
        """:meth:`example_norms` by :func:`cotangent_norms` (one forward pass, one backward
        pass per cotangent), or ``None`` where it does not apply; ``method`` then reads
        ``"factorised"``. The per-example cotangents are made for the whole batch at once
        by ``vmap``, after ``check(z)`` of the whole batch's outputs, or by ``batched(z)``
        when given (``[C, *z.shape]``, the same cotangents made for the whole batch at once,
        without the per-example ``vmap``). ``criterion(z)``: a loss of the outputs whose
        gradient the same forward pass also gives (:func:`cotangent_norms`)."""

        def one(z: torch.Tensor, *moving: torch.Tensor) -> torch.Tensor:
            return cotangents(z.unsqueeze(0), *moving).squeeze(1)  # (C, *z_i.shape[1:])

        def batch_cotangents(z: torch.Tensor) -> torch.Tensor:
            if check is not None:
                check(z)
            if batched is not None:
                return batched(z)
            in_dims = (0, *(d for _, d in extra))
            per = vmap(one, in_dims=in_dims)(z, *(t for t, _ in extra))  # (B, C, ...)
            return per.movedim(0, 1)

        found = cotangent_norms(
            self.function, values, batch, size, batch_cotangents, self.example_chunk_size,
            criterion,
        )  # fmt: skip
        if found is None:
            return None
        self.method = "factorised"
        names = list(self.function.values)
        onehot = self.onehot.to(found.sums[names[0]].dtype)
        stacked = torch.stack([found.sums[n] for n in names], -1)  # (C, params)
        each = torch.stack([found.per_example[n] for n in names], -1)  # (C, B, params)
        return OutputNorms(stacked @ onehot, each @ onehot, found.gradient)
