"""Named errors for what the estimators cannot measure.

:class:`NotMeasurableError` (a ``ValueError``) and its kinds are raised before or during
:func:`layerwise.sensitivity.estimate` instead of returning numbers that mean nothing or
letting a bare PyTorch message through:

* :class:`NoGradientPathError`: the loss does not depend on any parameter of the groups
  (computed under ``torch.no_grad()``, detached, or from parameters outside the groups),
  so its gradient, noise and Hessian trace would all be zeros that measure nothing. A
  parameter that is merely unused by a loss that does depend on other parameters of the
  groups is not an error: its quantities are zero, correctly.
* :class:`MetaTensorError`: the model holds tensors on the ``meta`` device (shapes
  without data, e.g. a model built under ``torch.device("meta")``).
* :class:`NonFloatingParameterError`: a parameter named in ``groups`` is not a
  floating-point tensor (an integer index table, say), which has no gradient.

:class:`DoubleBackwardError` names a layer that cannot be differentiated twice.
Hessian-vector products need either forward-mode derivatives of the backward pass
(``jvp`` of ``grad``) or the derivative of the backward pass itself (``vjp`` of
``grad``, "double backward"). Some fused kernels have neither, e.g. the flash and
memory-efficient ``scaled_dot_product_attention`` kernels used by
``nn.MultiheadAttention(need_weights=False)`` and ``nn.TransformerEncoderLayer``. PyTorch
then names an aten operator, which is hard to map back to a layer; this module records
which module of the model runs which operator during one forward pass and names the
culprit.

:class:`PerExampleGradientError` (a :class:`NotMeasurableError`) names a module whose
per-example gradients (``vmap`` of ``grad``) hit code that ``vmap`` cannot batch: a
``.item()`` or a tensor in Python control flow (Hugging Face attention-mask helpers check
whether a mask is all ones), an operator whose output shape depends on the data
(``nonzero``, boolean indexing). ``variance="auto"`` falls back to micro-batch statistics
instead (:mod:`layerwise.sensitivity.runner`); ``variance="per_example"`` raises it.
:func:`vmap_cause` tells such an error from others and names its cause in a few words.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = [
    "DoubleBackwardError",
    "MetaTensorError",
    "NoGradientPathError",
    "NonFloatingParameterError",
    "NotMeasurableError",
    "PerExampleGradientError",
    "failing_operators",
    "is_double_backward_error",
    "module_raising",
    "vmap_cause",
]

#: Messages of errors ``vmap`` raises on code it cannot batch, and their causes in words.
_VMAP_CAUSES = (
    ("calling .item() on a Tensor", ".item() or data-dependent control flow"),
    ("data-dependent control flow", ".item() or data-dependent control flow"),
    ("dynamic shape", "an operator with a data-dependent output shape"),
    ("vmap: inplace arithmetic", "an in-place write into a tensor vmap does not batch"),
    ("Batching rule not implemented", "an operator without a vmap batching rule"),
)

_PATTERNS = (
    re.compile(r"derivative for (?:aten::)?([\w.]+) is not implemented"),
    re.compile(r"forward AD with (?:aten::)?([\w.]+) that does not support it"),
    re.compile(r"(?:aten::)?([\w.]+) does not support (?:double backward|forward AD)"),
)

ADVICE = (
    "switch such layers to a twice-differentiable implementation for the estimate (the "
    "library already runs torch's scaled_dot_product_attention on its math backend and turns "
    "nn.MultiheadAttention's fast path off; a custom autograd.Function needs a backward that "
    "is itself differentiable, a fused kernel from another package its plain PyTorch "
    "equivalent, selected from inside loss_fn)"
)


class DoubleBackwardError(RuntimeError):
    """A layer of the model has no second derivative (see the module docstring)."""


class NotMeasurableError(ValueError):
    """The estimators cannot measure what they were given (see the module docstring)."""


class NoGradientPathError(NotMeasurableError):
    """The loss does not depend on any parameter of the groups."""


class MetaTensorError(NotMeasurableError):
    """The model holds tensors on the ``meta`` device, which have no data."""


class NonFloatingParameterError(NotMeasurableError):
    """A parameter named in the groups is not a floating-point tensor."""


class PerExampleGradientError(NotMeasurableError):
    """Per-example gradients (``vmap``) hit code ``vmap`` cannot batch (module docstring)."""


def vmap_cause(exc: BaseException) -> str | None:
    """The cause, in a few words, of an error ``vmap`` raised on code it cannot batch;
    ``None`` for any other error."""
    if not isinstance(exc, (RuntimeError, NotImplementedError, ValueError)):
        return None
    text = str(exc)
    for needle, cause in _VMAP_CAUSES:
        if needle in text:
            return cause
    return None


def module_raising(model: nn.Module, run: Callable[[], Any]) -> str | None:
    """The innermost module of ``model`` whose forward pass was running when ``run()``
    raised (``"name (Type)"``), ``None`` when it did not raise or raised outside any."""
    stack: list[str] = []
    handles = []

    def enter(label: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            stack.append(label)

        return hook

    def leave(*_: Any) -> None:
        if stack:
            stack.pop()

    for qual, module in model.named_modules():
        label = f"{qual or '(root)'} ({type(module).__name__})"
        handles.append(module.register_forward_pre_hook(enter(label)))
        handles.append(module.register_forward_hook(leave))
    try:
        run()
    except Exception:
        return stack[-1] if stack else None
    finally:
        for h in handles:
            h.remove()
    return None


def failing_operators(exc: BaseException) -> list[str]:
    """The operator names a PyTorch error blames for a missing (second) derivative."""
    names = []
    for pattern in _PATTERNS:
        for m in pattern.finditer(str(exc)):
            op = m.group(1).split(".")[0]
            names.append(op.removesuffix("_backward"))
    return list(dict.fromkeys(names))


def is_double_backward_error(exc: BaseException) -> bool:
    """Whether ``exc`` says an operator lacks a derivative needed by a Hessian product."""
    return isinstance(exc, (RuntimeError, NotImplementedError)) and bool(failing_operators(exc))


def _modules_running(model: nn.Module, run: Callable[[], Any], ops: set[str]) -> list[str]:
    """Names (and types) of the innermost modules that call any of ``ops`` during ``run``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    stack: list[str] = []
    found: dict[str, None] = {}

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if name in ops and stack:
                found.setdefault(stack[-1], None)
            return func(*args, **(kwargs or {}))

    def enter(label: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            stack.append(label)

        return hook

    def leave(*_: Any) -> None:  # a forward hook must return None (else it replaces outputs)
        stack.pop()

    handles = []
    for qual, module in model.named_modules():
        label = f"{qual or '(root)'} ({type(module).__name__})"
        handles.append(module.register_forward_pre_hook(enter(label)))
        handles.append(module.register_forward_hook(leave))
    try:
        with Recorder():
            run()
    finally:
        for h in handles:
            h.remove()
    return list(found)


def explain(exc: BaseException, model: nn.Module, run: Callable[[], Any]) -> DoubleBackwardError:
    """A :class:`DoubleBackwardError` naming the modules that run the failing operators.

    ``run`` evaluates the loss once (with gradients enabled, as in training); it is used
    only to record which module calls which operator.
    """
    ops = failing_operators(exc)
    try:
        modules = _modules_running(model, run, set(ops))
    except Exception:  # the diagnosis is best effort; the original error is chained
        modules = []
    where = f"module(s) {', '.join(modules)}" if modules else "a module of the model"
    return DoubleBackwardError(
        f"cannot compute Hessian-vector products: {where} calls operator(s) {ops}, which "
        f"PyTorch cannot differentiate twice. To estimate the Hessian trace, {ADVICE}. "
        "Gradient statistics alone (quantities=['grad_norm', 'grad_variance']) need no "
        "second derivative."
    )
