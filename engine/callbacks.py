"""The recalibration callback: ``callback(decision, report, step)``, or a logger.

:func:`as_callback` accepts

- a callable ``callback(decision, report, step)``, called after every recalibration that
  reached the controller, with its :class:`layerwise.policies.Decision`, the
  :class:`layerwise.sensitivity.SensitivityReport` it was made from (``None`` for a fallback that
  ``observe_validation`` triggered), and the engine's step;
- any object with ``add_scalar(tag, value, step)`` (TensorBoard's ``SummaryWriter``, or a
  Weights & Biases/Aim adapter with that method), wrapped in :class:`ScalarLogger`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["ScalarLogger", "as_callback"]

#: Quantities of a report that :class:`ScalarLogger` writes, when measured.
LOGGED_QUANTITIES = ("grad_norm", "noise_to_signal", "hessian_trace", "curvature")


class ScalarLogger:
    """Write each recalibration as scalars to ``writer.add_scalar(tag, value, step)``.

    Tags: ``{prefix}/multiplier/{group}``, ``{prefix}/lr/{group}`` (the effective rate, when
    ``lrs`` gives one), ``{prefix}/{quantity}/{group}`` for the quantities of
    :data:`LOGGED_QUANTITIES` that were measured and are finite, and ``{prefix}/fallback``
    (1.0 when the controller fell back to uniform multipliers, else 0.0).
    """

    def __init__(
        self,
        writer: Any,
        *,
        prefix: str = "layerwise",
        lrs: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        if not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(
                f"writer must have an add_scalar(tag, value, step) method, got {writer!r}"
            )
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        self.writer, self.prefix, self.lrs = writer, prefix, lrs

    def __call__(self, decision: Any, report: Any, step: int) -> None:
        add, p = self.writer.add_scalar, self.prefix
        for group, m in decision.multipliers.items():
            add(f"{p}/multiplier/{group}", float(m), step)
        if self.lrs is not None:
            for group, lr in self.lrs().items():
                add(f"{p}/lr/{group}", float(lr), step)
        for estimate in report or ():
            for quantity in LOGGED_QUANTITIES:
                value = getattr(estimate, quantity)
                if value is not None and math.isfinite(value):
                    add(f"{p}/{quantity}/{estimate.group}", float(value), step)
        add(f"{p}/fallback", float(bool(decision.fallback)), step)


def as_callback(
    callback: Any, *, lrs: Callable[[], Mapping[str, Any]] | None = None
) -> Callable[[Any, Any, int], None] | None:
    """``None``, a callable, or an object with ``add_scalar`` (see the module docstring)."""
    if callback is None:
        return None
    if callable(callback):
        return callback
    if callable(getattr(callback, "add_scalar", None)):
        return ScalarLogger(callback, lrs=lrs)
    raise TypeError(
        "callback must be callable as callback(decision, report, step) or have an "
        f"add_scalar(tag, value, step) method (e.g. a TensorBoard SummaryWriter), got {callback!r}"
    )
