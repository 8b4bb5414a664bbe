"""Apply each group's ``lr_multiplier`` for the duration of one base step, then restore.

Convention (one owner per value): outside a step, ``group["lr"]`` is the *base* rate that
the user's scheduler owns and ``group["lr_multiplier"]`` is the engine's multiplier ``m_g``.
For the base step only, the rate is the effective one::

    lr_eff_g = group["lr"] * m_g

and afterwards ``group["lr"]`` is put back *exactly*: a float rate by restoring the very
object that was there (not ``lr * m / m``, which can differ in the last bit), a tensor rate
(``capturable``/fused optimisers, CUDA graphs) in place, by ``mul_`` and then ``copy_`` from
a saved copy, so the tensor keeps its identity and its storage. Groups whose multiplier is
exactly ``1.0`` are skipped, which makes a multiplier of 1 everywhere bit-identical to the
bare optimizer at no cost.

Cost between recalibrations: a Python loop over the groups; no host synchronisation
(multipliers are Python floats) and no allocation per parameter. A tensor rate allocates
one scalar backup per group, once, and reuses it.

>>> g = {"lr": 0.1, "lr_multiplier": 3.0}
>>> saved = apply_multipliers([g], {})
>>> g["lr"] == 0.1 * 3.0
True
>>> restore_multipliers(saved)
>>> g["lr"]
0.1
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from numbers import Real
from typing import Any

import torch

__all__ = [
    "MULTIPLIER_KEY",
    "apply_multipliers",
    "check_multiplier",
    "effective_lr",
    "restore_multipliers",
]

#: The key of a group's multiplier.
MULTIPLIER_KEY = "lr_multiplier"


def check_multiplier(name: str, value: Any) -> float:
    """Return ``value`` as a Python float if it is a finite real number > 0, else raise.

    >>> check_multiplier("m", 2)
    2.0
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def apply_multipliers(
    param_groups: Sequence[MutableMapping[str, Any]],
    backups: MutableMapping[int, torch.Tensor],
) -> list[tuple[MutableMapping[str, Any], Any, torch.Tensor | None]]:
    """Scale ``group["lr"]`` by ``group["lr_multiplier"]`` in every group whose multiplier is
    not exactly 1; return what :func:`restore_multipliers` needs to undo it.

    A multiplier that is not a finite float > 0 (e.g. set by hand) is checked by
    :func:`check_multiplier`, which names the group; on any error the groups already scaled
    are restored before it propagates.

    ``backups`` caches, per group index, the scalar tensor that saves a tensor rate; it is
    (re)allocated only when missing or of another dtype/device/shape.
    """
    saved: list[tuple[MutableMapping[str, Any], Any, torch.Tensor | None]] = []
    try:
        for i, group in enumerate(param_groups):
            m = group.get(MULTIPLIER_KEY, 1.0)
            if type(m) is not float or not 0.0 < m < math.inf:  # set by hand: check (no sync)
                m = check_multiplier(f"param_groups[{i}]['{MULTIPLIER_KEY}']", m)
            if m == 1.0:
                continue
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                backup = backups.get(i)
                if (
                    backup is None
                    or backup.dtype != lr.dtype
                    or backup.device != lr.device
                    or backup.shape != lr.shape
                ):
                    backup = backups[i] = torch.empty_like(lr)
                backup.copy_(lr)
                saved.append((group, lr, backup))
                lr.mul_(m)
            else:
                saved.append((group, lr, None))
                group["lr"] = lr * m
    except BaseException:
        restore_multipliers(saved)  # no group is left at a scaled rate
        raise
    return saved


def restore_multipliers(
    saved: Sequence[tuple[MutableMapping[str, Any], Any, torch.Tensor | None]],
) -> None:
    """Put back the base rates saved by :func:`apply_multipliers`, bit for bit."""
    for group, lr, backup in saved:
        if backup is None:
            group["lr"] = lr
        else:
            lr.copy_(backup)
            group["lr"] = lr


def effective_lr(group: Mapping[str, Any]) -> Any:
    """``group["lr"] * group["lr_multiplier"]`` without touching the group (a float for a
    float rate, a new tensor for a tensor rate)."""
    m = group.get(MULTIPLIER_KEY, 1.0)
    lr = group["lr"]
    if m == 1.0:
        return lr.clone() if isinstance(lr, torch.Tensor) else lr
    return lr * m
