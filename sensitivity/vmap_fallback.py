"""What the estimate does when ``vmap`` cannot batch the model: fall back, say why, once.

Per-example gradients of the parameters the factorised norms do not cover, and the
per-example Gauss-Newton products, run the model under ``vmap``
(:mod:`layerwise.sensitivity.factorised`, :mod:`layerwise.sensitivity.output_vjp`). ``vmap``
refuses code that depends on the data: a ``.item()`` or a tensor in Python control flow
(Hugging Face's attention-mask helpers check whether a mask is all ones), an operator whose
output shape depends on the data. :func:`per_example_failure` turns such an error into

* under ``variance="auto"``: the reason for falling back to micro-batch statistics
  (:mod:`layerwise.sensitivity.microbatch`), recorded by the estimate in
  ``report.settings["variance_fallback"]`` and warned once per model class and cause
  (:class:`PerExampleFallbackWarning`, :func:`warn_once`);
* under ``variance="per_example"``: a
  :class:`~layerwise.sensitivity.errors.PerExampleGradientError` naming the module that was
  running (found by running two examples again with forward hooks) and the cause, with
  ``vmap``'s own error chained.

Any other error is not this module's business: :func:`per_example_failure` re-raises it.

>>> from layerwise.sensitivity.functional import FunctionalLoss
>>> class Gate(nn.Module):
...     def forward(self, x):
...         return x if bool((x > 0).all()) else x.abs()  # a branch on the data
>>> net = nn.Sequential(nn.Linear(2, 2), Gate())
>>> loss, x = FunctionalLoss(net, lambda m, b: m(b).sum(), ["0.weight"]), torch.randn(3, 2)
>>> try:
...     per_example_gradients(loss, loss.values, x, 3)
... except RuntimeError as exc:
...     failed = exc
>>> with warnings.catch_warnings(record=True) as caught:
...     per_example_failure(failed, loss, loss.values, net, x, 3, auto=True, micro_batches=2)
'per-example gradients (vmap) fail in module 1 (Gate): .item() or data-dependent control flow'
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from layerwise.sensitivity.batching import slice_batch
from layerwise.sensitivity.errors import PerExampleGradientError, module_raising, vmap_cause
from layerwise.sensitivity.per_example import per_example_gradients

__all__ = ["PerExampleFallbackWarning", "per_example_failure", "warn_once"]

Params = dict[str, torch.Tensor]
#: The (model class, cause) pairs already warned about in this process.
_WARNED: set[tuple[str, str]] = set()


class PerExampleFallbackWarning(UserWarning):
    """Per-example statistics could not be had (``vmap``); a fallback was used."""


def warn_once(model: nn.Module, cause: str, message: str, stacklevel: int = 2) -> None:
    """Warn ``message`` unless this model class has been warned about ``cause`` already."""
    key = (type(model).__name__, cause)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, PerExampleFallbackWarning, stacklevel=stacklevel + 1)


def per_example_failure(
    exc: Exception,
    loss: Callable[[Params, Any], torch.Tensor],
    values: Params,
    model: nn.Module,
    batch: Any,
    size: int,
    *,
    auto: bool,
    micro_batches: int,
) -> str:
    """The reason to fall back to micro-batches after ``exc`` (warned once), or raise: ``exc``
    itself when ``vmap`` did not cause it, :class:`PerExampleGradientError` when not
    ``auto`` (module docstring)."""
    cause = vmap_cause(exc)
    if cause is None:
        raise exc
    k = min(2, size)
    part = slice_batch(batch, size, 0, k)
    module = module_raising(model, lambda: per_example_gradients(loss, values, part, k))
    where = f"in module {module}" if module else "in the model or loss_fn"
    if not auto:
        raise PerExampleGradientError(
            f"variance='per_example': per-example gradients (vmap of grad) fail {where}: "
            f"{cause}, which vmap cannot batch. Use variance='micro_batch' (or 'auto', which "
            "falls back to it by itself), or make that code free of .item() and data-dependent "
            "branches"
        ) from exc
    reason = f"per-example gradients (vmap) fail {where}: {cause}"
    warn_once(
        model,
        cause,
        f"variance='auto': {reason}; using micro-batch statistics (micro_batches="
        f"{micro_batches}) instead. Pass variance='micro_batch' to choose them and silence "
        "this warning.",
        stacklevel=5,
    )
    return reason
