"""Per-example ‖g_i‖² and g_i·C from factorised terms, without a B × P tensor.

For one parameter whose per-example gradient is a sum of the terms of
:mod:`layerwise.sensitivity.layer_terms` (one per call of a layer that uses it; the calls
of a tied weight concatenate along the positions t), in each block k:

    g_i = Σ_t a_it ⊗ b_it + Σ_s e_{id_is} ⊗ β_is

    ‖g_i‖² = Σ_{t,t'} (a_it·a_it')(b_it·b_it') + Σ_{s,s'} [id_is = id_is'] (β_is·β_is')
             + 2 Σ_{t,s} a_it[id_is] (b_it·β_is)                                 (Gram form)
    g_i·C  = Σ_t a_itᵀ C b_it + Σ_s C[id_is]·β_is

The Gram form holds (T × T) numbers per example and block, materialising g_i holds
rows × cols; :func:`example_sq_norms_and_dots` takes the one that does less work
(:func:`_gram_is_cheaper`: the Gram form without positions, T = 1, and for embeddings;
materialising for convolutions and long sequences through wide layers), and works
through the examples in chunks so that no temporary exceeds ``budget``
elements (the layer's activations, or 2**20, whichever is larger), so no tensor has
B × (number of parameters) elements. Direct terms (biases, norm weights: a (B, *shape)
gradient, small) are summed and reduced as they are.

>>> a, b = torch.randn(3, 2, 4), torch.randn(3, 2, 5)  # 3 examples, 2 positions
>>> term = Outer(1, 4, 5, 2, lambda s, e: (a[s:e, None], b[s:e, None]))
>>> g = torch.einsum("btr,btc->brc", a, b)  # the per-example gradients, materialised
>>> C = torch.randn(4, 5)
>>> sq, dot = example_sq_norms_and_dots([term], C, 3)
>>> torch.allclose(sq, g.square().sum((1, 2))), torch.allclose(dot, (g * C).sum((1, 2)))
(True, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from layerwise.sensitivity.layer_terms import Direct, Index, Outer

__all__ = ["MIN_BUDGET", "example_sq_norms_and_dots", "linear_sq_norms_and_dots"]

#: The smallest temporary budget (elements): tiny layers run in one chunk.
MIN_BUDGET = 2**20

Term = Outer | Index | Direct


def example_sq_norms_and_dots(
    terms: Sequence[Term],
    centre: torch.Tensor,
    size: int,
    budget: int | None = None,
    chunk: int | None = None,
    dots: bool = True,
    memo: dict[Any, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(‖g_i‖², g_i·``centre``) for i < ``size``, or ``None`` when the terms do not combine
    (different kinds or shapes: the caller falls back to per-example gradients).

    ``chunk`` caps the examples per step (``None``: as many as ``budget`` allows). With
    ``dots=False`` only the norms are computed (``centre`` then gives the parameter's shape
    and the dots are zeros). ``memo``: a dict the caller keeps for this parameter while its
    terms' inputs stay the same (the cotangents of one forward pass: only the output
    gradients change), in which the inputs' squared norms ‖b_i‖² (no positions) are
    kept per chunk of examples and reused, the very same numbers, and so are the inputs
    b themselves (a convolution's patches), chunk by chunk while what is kept stays within
    the budget."""
    if not terms:
        zero = centre.new_zeros(size)
        return zero, zero.clone()
    if all(isinstance(t, Direct) for t in terms):
        g = terms[0].grad if len(terms) == 1 else torch.stack([t.grad for t in terms]).sum(0)
        if g.shape[1:] != centre.shape:
            return None
        flat = g.reshape(size, -1)
        sq = flat.square().sum(1)
        return sq, flat @ centre.reshape(-1) if dots else torch.zeros_like(sq)
    dense = [t for t in terms if isinstance(t, Outer)]
    index = [t for t in terms if isinstance(t, Index)]
    if len(dense) + len(index) != len(terms):
        return None
    shapes = {(t.blocks, t.rows, t.cols) for t in dense} | {(1, t.rows, t.cols) for t in index}
    if len(shapes) != 1:
        return None
    blocks, rows, cols = shapes.pop()
    if blocks * rows * cols != centre.numel():
        return None
    c = centre.reshape(blocks, rows, cols)
    dense_len, index_len = sum(t.length for t in dense), sum(t.length for t in index)
    gram = _gram_is_cheaper(dense_len, index_len, rows, cols, dots)
    length = dense_len + index_len
    per_example = blocks * max(length * length if gram else rows * cols, length * (rows + cols))
    step = max(1, max(budget or 0, MIN_BUDGET) // max(1, per_example))
    if chunk is not None:
        step = min(step, chunk)
    # the inputs of one term that splits them off are kept for the next cotangent, chunk by
    # chunk while what is kept stays within the budget
    split = memo is not None and len(dense) == 1 and not index
    split = split and dense[0].inputs is not None and dense[0].outputs is not None
    sq, dot = [], []
    for s in range(0, size, step):
        e = min(s + step, size)
        if split:
            b = memo.get(("inputs", s, e))
            if b is None:
                b = dense[0].inputs(s, e)
                kept = memo.get("kept", 0) + b.numel()
                if kept <= max(budget or 0, MIN_BUDGET):
                    memo[("inputs", s, e)], memo["kept"] = b, kept
            a = dense[0].outputs(s, e)
        else:
            a, b = _cat([t.make(s, e) for t in dense])
        ids, beta = _cat([t.make(s, e) for t in index])
        if gram:
            part = _gram(a, b, ids, beta, c, dots, memo, (s, e))
        else:
            part = _materialised(a, b, ids, beta, c, dots)
        sq.append(part[0])
        dot.append(part[1])
    return (sq[0], dot[0]) if len(sq) == 1 else (torch.cat(sq), torch.cat(dot))


def linear_sq_norms_and_dots(
    x: torch.Tensor,
    delta: torch.Tensor,
    local: str,
    centre: torch.Tensor,
    size: int,
    budget: int | None = None,
    chunk: int | None = None,
    dots: bool = True,
    memo: dict[Any, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`example_sq_norms_and_dots` of the ``local`` parameter ("weight" or "bias") of one
    ``Linear`` call without positions (input x (B, C), output gradient δ (B, R)), taken in
    one chunk: ‖g_i‖² = ‖δ_i‖²‖x_i‖², g_i·C = δ_iᵀ C x_i (weight), ‖δ_i‖², δ_i·c (bias).
    The very same operations on the same memory as the general path (the Gram form with
    T = 1 on views of x and δ; ``dots`` and ``memo`` as there), without building its terms;
    ``None`` where that path would differ (positions, non-contiguous tensors, several
    chunks): use it then."""
    if x.dim() != 2 or delta.dim() != 2 or x.shape[0] != size or delta.shape[0] != size:
        return None
    if not (x.is_contiguous() and delta.is_contiguous() and centre.is_contiguous()):
        return None
    if chunk is not None and chunk < size:
        return None
    if local == "bias":
        if centre.shape != delta.shape[1:]:
            return None
        sq = delta.square().sum(1)
        return sq, delta @ centre if dots else torch.zeros_like(sq)
    rows, cols = delta.shape[1], x.shape[1]
    if local != "weight" or centre.shape != (rows, cols):
        return None
    if max(budget or 0, MIN_BUDGET) // max(1, rows + cols) < size:  # chunked there
        return None
    sq = torch.linalg.vecdot(delta, delta) * _input_sq(x, memo, (0, size))
    return sq, torch.linalg.vecdot(delta @ centre, x) if dots else torch.zeros_like(sq)


def _gram_is_cheaper(dense: int, index: int, rows: int, cols: int, dots: bool = True) -> bool:
    """Compare the work per example and block, in multiply-adds, with a pass over memory
    counted as 4 (it runs about that much slower than a matrix product on a CPU): the
    Gram form costs T²(rows + cols) for the Gram matrices plus T·rows·cols for g_i·C;
    materialising costs T·rows·cols for g_i and three passes over its rows·cols entries.
    Index terms (embeddings) cost T·cols either way in their own products. Without the
    dots the Gram form saves its T·rows·cols."""
    t = dense + index
    gram = dense * dense * (rows + cols) + t * index * cols + 4 * t * t
    gram += dense * rows * cols if dots else 0
    materialised = dense * rows * cols + index * cols + 12 * rows * cols
    return gram <= materialised


def _rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ over all but the first dim of x ⊙ y."""
    n = x.shape[0]
    return torch.linalg.vecdot(x.reshape(n, -1), y.reshape(n, -1))


def _cat(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor | None, ...]:
    """Concatenate the calls along the positions: dim -2 of a and b, -1 of ids."""
    if not pairs:
        return None, None
    if len(pairs) == 1:
        return pairs[0]
    first = torch.cat([p[0] for p in pairs], dim=-2 if pairs[0][0].dim() == 4 else -1)
    return first, torch.cat([p[1] for p in pairs], dim=-2)


def _input_sq(b: torch.Tensor, memo: dict[Any, Any] | None, span: tuple[int, int]) -> torch.Tensor:
    """``_rowdot(b, b)``, kept in ``memo`` under the examples ``span`` it covers."""
    if memo is None:
        return _rowdot(b, b)
    found = memo.get(("input_sq", span))
    if found is None:
        found = memo[("input_sq", span)] = _rowdot(b, b)
    return found


def _gram(
    a, b, ids, beta, c, dots: bool = True, memo: dict[Any, Any] | None = None, span=(0, 0)
) -> tuple[torch.Tensor, torch.Tensor]:
    sq = dot = None
    if a is not None:  # a (n, K, T, R), b (n, K, T, C)
        n, k, t = a.shape[:3]
        if t == 1 and k == 1:  # no positions, one block: ‖a‖²‖b‖²
            sq = _rowdot(a, a) * _input_sq(b, memo, span)
        else:
            sq = _rowdot(a @ a.transpose(-1, -2), b @ b.transpose(-1, -2))
        if not dots:
            dot = torch.zeros_like(sq)
        elif k == 1:
            dot = _rowdot((a.reshape(n * t, -1) @ c[0]).reshape(n, -1), b)
        else:
            dot = _rowdot(torch.einsum("nktr,krc->nktc", a, c), b)
    if ids is not None:  # ids (n, S), beta (n, S, C)
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(beta.dtype)
        s_sq = _rowdot(same, beta @ beta.transpose(1, 2))
        s_dot = _rowdot(c[0][ids], beta) if dots else torch.zeros_like(s_sq)
        if a is not None:  # the cross terms of a tied weight: a_it[id_is] (b_it·β_is)
            picked = a[:, 0].gather(2, ids.unsqueeze(1).expand(-1, a.shape[2], -1))
            s_sq = s_sq + 2 * _rowdot(picked, b[:, 0] @ beta.transpose(1, 2))
        sq = s_sq if sq is None else sq + s_sq
        dot = s_dot if dot is None else dot + s_dot
    return sq, dot


def _materialised(a, b, ids, beta, c, dots: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    if a is not None:
        g = a.transpose(-1, -2) @ b  # (n, K, R, C)
    else:
        g = beta.new_zeros(beta.shape[0], 1, c.shape[1], c.shape[2])
    if ids is not None:
        index = ids.unsqueeze(2).expand(-1, -1, beta.shape[2])
        g[:, 0] = g[:, 0].scatter_add(1, index, beta)
    flat = g.reshape(g.shape[0], -1)
    sq = _rowdot(flat, flat)
    return sq, flat @ c.reshape(-1) if dots else torch.zeros_like(sq)
