"""Argument checks shared by the public functions: each error names the argument and value."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from layerwise.sensitivity.errors import MetaTensorError

__all__ = [
    "KNOWN_QUANTITIES",
    "QUANTITIES",
    "check_call",
    "check_choice",
    "check_int",
    "check_materialized",
    "check_quantities",
]

#: What ``quantities="all"`` (and the default) means: the quantities any ``loss_fn`` gives.
QUANTITIES = ("grad_norm", "grad_variance", "hessian_trace")
#: Every quantity that may be asked for, in canonical order: ``ggn_trace`` needs a loss
#: object (:mod:`layerwise.sensitivity.losses`), so it is asked for by name, never by "all".
KNOWN_QUANTITIES = (*QUANTITIES, "ggn_trace")
VARIANCE_METHODS = ("auto", "per_example", "micro_batch", "two_batch")


def check_int(name: str, value: Any, minimum: int, *, optional: bool = False) -> int | None:
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_quantities(quantities: Any) -> tuple[str, ...]:
    """``"all"`` (:data:`QUANTITIES`), one quantity name, or an iterable of names of
    :data:`KNOWN_QUANTITIES` -> a tuple in canonical order."""
    if quantities == "all":
        return QUANTITIES
    if isinstance(quantities, str):
        quantities = [quantities]
    if not isinstance(quantities, Iterable):
        raise TypeError(f"quantities must be 'all' or an iterable of names, got {quantities!r}")
    chosen = list(quantities)
    unknown = [q for q in chosen if q not in KNOWN_QUANTITIES]
    if unknown:
        raise ValueError(f"quantities has unknown names {unknown}; known are {KNOWN_QUANTITIES}")
    if not chosen:
        raise ValueError(
            f"quantities is empty (got {chosen!r}); pass 'all' or some of {KNOWN_QUANTITIES}"
        )
    return tuple(q for q in KNOWN_QUANTITIES if q in chosen)


def check_call(*, model: Any, loss_fn: Any, generator: Any, progress: Any, batch_size: Any) -> None:
    """Validate the runtime arguments of :func:`layerwise.sensitivity.estimate` (those that
    are not settings; the settings are checked by
    :class:`layerwise.sensitivity.EstimateOptions`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")
    for name, value in (("progress", progress), ("batch_size", batch_size)):
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be callable, got {value!r}")


def check_materialized(model: nn.Module) -> None:
    """Refuse a model whose parameters or buffers are on the ``meta`` device (shapes without
    data) with :class:`~layerwise.sensitivity.errors.MetaTensorError` naming them."""
    named = [*model.named_parameters(), *model.named_buffers()]
    meta = [name for name, t in named if t.is_meta]
    if meta:
        shown = ", ".join(repr(n) for n in meta[:5]) + (", ..." if len(meta) > 5 else "")
        raise MetaTensorError(
            f"model {type(model).__name__} has {len(meta)} tensor(s) on the meta device, which "
            f"hold no data ({shown}); materialise it first, e.g. model.to_empty(device='cpu') "
            "and then load_state_dict(...)"
        )
