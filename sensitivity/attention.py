"""Attention that can be differentiated twice: the math SDPA backend, no fused fast path.

``F.scaled_dot_product_attention`` dispatches to fused kernels (flash and memory-efficient
attention on CUDA, ``_scaled_dot_product_flash_attention_for_cpu`` on CPU) whose backward
passes have no derivative of their own and no forward-mode derivative, and no ``vmap``
batching rule (``vmap`` then loops over the examples). A Hessian-vector product (``jvp`` or
``vjp`` of ``grad``), a per-example gradient (``vmap`` of ``grad``) or a batch of
output-Jacobian products (``vmap`` of a ``vjp``) through them fails or crawls. The *math*
backend computes the same attention from matmuls and a softmax, which PyTorch
differentiates any number of times and batches under ``vmap``; its result equals the fused
kernels' up to rounding.

``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` take a fused fast path
(``torch._native_multi_head_attention``) when nothing requires a gradient (inference,
``torch.no_grad()``, eval mode); under ``torch.func``'s ``grad`` they do not take it (the
substituted parameters require a gradient), but a pass without gradients would. Inside
:func:`twice_differentiable_attention` it is switched off too
(``torch.backends.mha.set_fastpath_enabled``), so every pass of an estimate sees the same
implementation.

The library enters this context itself around every pass it differentiates twice or
batches with ``vmap`` (:mod:`layerwise.sensitivity.hvp`,
:mod:`layerwise.sensitivity.per_example`, :mod:`layerwise.sensitivity.output_vjp`), on CPU
and CUDA alike, and restores the caller's settings on exit (also on error); a report
records it as ``report.settings["attention_backend"] = "math"``. Plain first-order passes
(the gradient, the factorised per-example norms) keep the caller's backend.

>>> import torch.nn.functional as F
>>> q = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
>>> with twice_differentiable_attention():
...     (g,) = torch.autograd.grad(F.scaled_dot_product_attention(q, q, q).sum(), q,
...                                create_graph=True)
...     (h,) = torch.autograd.grad(g.sum(), q)  # a second derivative
>>> torch.backends.mha.get_fastpath_enabled()  # restored on exit
True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["ATTENTION_BACKEND", "twice_differentiable_attention"]

#: What ``report.settings["attention_backend"]`` reads for passes run in the context.
ATTENTION_BACKEND = "math"


@contextlib.contextmanager
def twice_differentiable_attention() -> Iterator[None]:
    """Run the body with ``scaled_dot_product_attention`` on the math backend and the
    ``nn.MultiheadAttention`` fast path off; the caller's settings are restored on exit."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath = torch.backends.mha.get_fastpath_enabled()
    with sdpa_kernel(SDPBackend.MATH):
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            yield
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
