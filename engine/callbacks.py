"""The recalibration callback: ``callback(record)``, or a scalar logger, or several.

:func:`as_callback` accepts

- a callable ``callback(record)``, called after every recalibration (skipped ones
  included), every fallback ``observe_validation`` applied and every step skipped on
  non-finite gradients, with a
  :class:`layerwise.engine.recalibration.Recalibration`: ``record.step``, ``record.rows``
  (the history rows it added), ``record.decision`` and ``record.report`` (``None`` where
  there is none); e.g. :class:`layerwise.experiments.history_file.HistoryFile`, which
  appends the rows to a CSV or Parquet file;
- any object with ``add_scalar(tag, value, step)`` (TensorBoard's ``SummaryWriter``, or a
  Weights & Biases/Aim adapter with that method), wrapped in :class:`ScalarLogger`;
- a list or tuple of those, called in order.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["ScalarLogger", "as_callback"]

#: Quantities of a report that :class:`ScalarLogger` writes, when measured.
LOGGED_QUANTITIES = (
    "grad_norm",
    "noise_to_signal",
    "hessian_trace",
    "curvature",
    "ggn_trace",
    "ggn_curvature",
)


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

    def __call__(self, record: Any) -> None:
        """Write ``record`` (a :class:`~layerwise.engine.recalibration.Recalibration`); a
        skipped recalibration (no decision) writes nothing."""
        decision, report, step = record.decision, record.report, record.step
        if decision is None:
            return
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
) -> Callable[[Any], None] | None:
    """``None``, a callable, an object with ``add_scalar``, or a list or tuple of those
    (see the module docstring), as one callable ``f(record)``."""
    if callback is None:
        return None
    if isinstance(callback, list | tuple):
        each = [_one(f"callback[{i}]", c, lrs) for i, c in enumerate(callback)]

        def every(record: Any) -> None:
            for one in each:
                one(record)

        return every
    return _one("callback", callback, lrs)


def _one(name: str, callback: Any, lrs: Callable[[], Mapping[str, Any]] | None) -> Any:
    if callable(callback):
        _check_one_argument(name, callback)
        return callback
    if callable(getattr(callback, "add_scalar", None)):
        return ScalarLogger(callback, lrs=lrs)
    raise TypeError(
        f"{name} must be callable as callback(record) or have an add_scalar(tag, value, step) "
        f"method (e.g. a TensorBoard SummaryWriter), got {callback!r}"
    )


def _check_one_argument(name: str, callback: Callable[..., Any]) -> None:
    """Refuse a callable that cannot be called with the one ``record`` argument (e.g. one
    written for the former ``callback(decision, report, step)``)."""
    try:
        signature = inspect.signature(callback)
    except (TypeError, ValueError):  # no introspectable signature (some builtins): trusted
        return
    try:
        signature.bind(None)
    except TypeError:
        raise TypeError(
            f"{name} must be callable with one argument, callback(record), where record has "
            f".step, .rows, .decision and .report; {callback!r} has the signature {signature}"
        ) from None
