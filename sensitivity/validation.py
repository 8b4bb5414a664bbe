"""Argument checks shared by the public functions: each error names the argument and value."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["check_choice", "check_int", "check_options"]

QUANTITIES = ("grad_norm", "grad_variance", "hessian_trace")
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
    """``"all"``, one quantity name, or an iterable of them -> a tuple in canonical order."""
    if quantities == "all":
        return QUANTITIES
    if isinstance(quantities, str):
        quantities = [quantities]
    if not isinstance(quantities, Iterable):
        raise TypeError(f"quantities must be 'all' or an iterable of names, got {quantities!r}")
    chosen = list(quantities)
    unknown = [q for q in chosen if q not in QUANTITIES]
    if unknown:
        raise ValueError(f"quantities has unknown names {unknown}; known are {QUANTITIES}")
    if not chosen:
        raise ValueError("quantities is empty; pass 'all' or some of " + str(QUANTITIES))
    return tuple(q for q in QUANTITIES if q in chosen)


def _check_callable(name: str, value: Any, optional: bool = True) -> None:
    if (value is not None or not optional) and not callable(value):
        raise TypeError(f"{name} must be callable, got {value!r}")


def check_options(
    *,
    model: Any,
    loss_fn: Any,
    probes: Any,
    chunk_size: Any,
    micro_batches: Any,
    isolated: Any,
    dtype: Any,
    tolerance: Any,
    max_probes: Any,
    progress: Any,
    batch_size: Any,
    example_chunk_size: Any,
    generator: Any,
    hvp_mode: Any,
    variance: Any,
    distribution: Any,
    seed: Any,
    distributions: Iterable[str],
    hvp_modes: Iterable[str],
) -> None:
    """Validate the options of :func:`layerwise.sensitivity.estimate` (see there)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_callable("loss_fn", loss_fn, optional=False)
    check_int("probes", probes, 1)
    check_int("chunk_size", chunk_size, 1)
    check_int("micro_batches", micro_batches, 2)
    check_int("example_chunk_size", example_chunk_size, 1, optional=True)
    check_int("seed", seed, 0)
    if seed >= 2**64:  # torch.Generator.manual_seed takes 64-bit seeds
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if not isinstance(isolated, bool):
        raise TypeError(f"isolated must be a bool, got {isolated!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
    if tolerance is not None:
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
            raise TypeError(f"tolerance must be a number or None, got {tolerance!r}")
        if not (math.isfinite(tolerance) and tolerance > 0):
            raise ValueError(f"tolerance must be a finite number > 0, got {tolerance!r}")
    check_int("max_probes", max_probes, 2, optional=True)
    if max_probes is not None and tolerance is None:
        raise ValueError(
            f"max_probes={max_probes!r} is a budget for the stopping rule and needs a "
            "tolerance; without one, set probes instead"
        )
    _check_callable("progress", progress)
    _check_callable("batch_size", batch_size)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")
    check_choice("hvp_mode", hvp_mode, hvp_modes)
    check_choice("variance", variance, VARIANCE_METHODS)
    check_choice("distribution", distribution, distributions)
