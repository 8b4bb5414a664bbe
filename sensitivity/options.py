"""The settings of one sensitivity estimate, as one validated, frozen value.

:class:`EstimateOptions` holds every *setting* of :func:`layerwise.sensitivity.estimate`
(what to measure and how), not the runtime objects of a call (the probe generator, the
progress callback, the ``batch_size`` callable, the groups). It is plain data:
:meth:`EstimateOptions.to_dict` and :meth:`EstimateOptions.from_dict` convert to and from
JSON/TOML-ready dicts (``dtype`` as a string such as ``"torch.float64"``).

>>> opts = EstimateOptions(probes=8, quantities="hessian_trace")
>>> opts.quantities, opts.replace(probes=16).probes
(('hessian_trace',), 16)
>>> EstimateOptions.from_dict(opts.to_dict()) == opts
True
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from layerwise.sensitivity.ggn import GGN_MODES
from layerwise.sensitivity.hvp import HVP_MODES
from layerwise.sensitivity.label_sampling import SAMPLERS
from layerwise.sensitivity.probes import DISTRIBUTIONS
from layerwise.sensitivity.validation import (
    QUANTITIES,
    VARIANCE_METHODS,
    check_choice,
    check_int,
    check_quantities,
)

__all__ = ["EstimateOptions"]


@dataclass(frozen=True)
class EstimateOptions:
    """Every setting of :func:`layerwise.sensitivity.estimate`, validated on construction.

    Fields (N examples, B_b those of batch b, P probes; quantities defined in
    :mod:`layerwise.sensitivity.report`):

    * ``quantities`` -- ``"all"``, one name, or some of ``"grad_norm"``, ``"grad_variance"``
      (brings ``noise_to_signal`` and the standard errors of the gradient statistics),
      ``"hessian_trace"`` and ``"ggn_trace"``; stored as a tuple in that canonical order.
      ``"all"`` (the default) is the first three, which any ``loss_fn`` gives; ``ggn_trace``
      needs a loss object (:mod:`layerwise.sensitivity.losses`) and is asked for by name.
    * ``probes`` -- P >= 1, Hutchinson probes per batch (per group when ``isolated``). The
      trace's standard error falls as 1/sqrt(P).
    * ``seed`` -- integer in [0, 2**64) seeding the probe generator (unused when the call
      passes its own ``generator``).
    * ``distribution`` -- ``"rademacher"`` (entries ±1, the minimum-variance choice) or
      ``"gaussian"`` (standard normal entries); both give E[vᵀHv] = tr(H).
    * ``isolated`` -- probe every group on its own (Var of tr(H_gg) without the off-diagonal
      blocks, one product per group and probe) instead of sharing the probes across groups.
    * ``chunk_size`` -- >= 1 probes per batched Hessian-vector product (memory: that many
      parameter-sized tangents at once).
    * ``hvp_mode`` -- ``"auto"``, ``"jvp"`` (forward over reverse) or ``"vjp"`` (reverse over
      reverse); see :func:`layerwise.sensitivity.estimate` for how ``"auto"`` resolves.
    * ``variance`` -- the gradient samples behind ``grad_variance``: ``"per_example"``,
      ``"micro_batch"``, ``"two_batch"`` or ``"auto"`` (micro-batches when a BatchNorm layer
      is in training mode, else per-example).
    * ``micro_batches`` -- >= 2 pieces per batch for the micro-batch and two-batch methods.
    * ``dtype`` -- ``None`` or a floating ``torch.dtype`` (or its name, ``"float64"`` or
      ``"torch.float64"``) that parameters, buffers and floating batch tensors are cast to.
    * ``tolerance`` -- ``None`` or a finite number > 0: a batch's probes stop once every
      group's relative standard error of its trace (stderr / |trace|, dimensionless) is at
      most this.
    * ``max_probes`` -- ``None`` or >= 2, the probe budget of the stopping rule (needs a
      ``tolerance``; default ``probes``).
    * ``example_chunk_size`` -- ``None`` or >= 1 examples handled at once by the per-example
      norms and per ``vmap`` call of per-example gradients (default: temporaries no larger
      than a layer's activations; at most 2**25 gradient entries per ``vmap`` call).
    * ``ggn`` -- how ``ggn_trace`` is measured: ``"mc"`` (labels sampled from the model's
      predictive distribution, unbiased, with a standard error) or ``"exact"`` (one backward
      pass per output entry, for small outputs); see :mod:`layerwise.sensitivity.ggn`.
    * ``ggn_samples`` -- K >= 1 sampled label sets per batch for ``ggn="mc"``; the standard
      error falls as 1/sqrt(K) (with K = 1 it comes from the spread of the per-example
      terms, and counts the spread of the examples' own traces too; under BatchNorm in
      training mode K >= 2 is needed for one: :mod:`layerwise.sensitivity.ggn`); batched
      ``chunk_size`` at a time under BatchNorm in training mode.
    * ``ggn_sampler`` -- how ``ggn="mc"`` draws labels: ``"importance"`` (weighted towards the
      classes that carry curvature, weighed back: the same expectation, far less variance on
      a confident classifier) or ``"predictive"`` (from the model's predictive distribution);
      see :mod:`layerwise.sensitivity.label_sampling`.

    Each invalid field raises ``TypeError``/``ValueError`` naming the field and the value.
    """

    quantities: tuple[str, ...] = QUANTITIES
    probes: int = 32
    seed: int = 0
    distribution: str = "rademacher"
    isolated: bool = False
    chunk_size: int = 8
    hvp_mode: str = "auto"
    variance: str = "auto"
    micro_batches: int = 4
    dtype: torch.dtype | None = None
    tolerance: float | None = None
    max_probes: int | None = None
    example_chunk_size: int | None = None
    ggn: str = "mc"
    ggn_samples: int = 4
    ggn_sampler: str = "importance"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "quantities", check_quantities(self.quantities))
        check_int("probes", self.probes, 1)
        check_int("seed", self.seed, 0)
        if self.seed >= 2**64:  # torch.Generator.manual_seed takes 64-bit seeds
            raise ValueError(f"seed must be an int in [0, 2**64), got {self.seed!r}")
        check_choice("distribution", self.distribution, DISTRIBUTIONS)
        if not isinstance(self.isolated, bool):
            raise TypeError(f"isolated must be a bool, got {self.isolated!r}")
        check_int("chunk_size", self.chunk_size, 1)
        check_choice("hvp_mode", self.hvp_mode, HVP_MODES)
        check_choice("variance", self.variance, VARIANCE_METHODS)
        check_int("micro_batches", self.micro_batches, 2)
        set_(self, "dtype", _check_dtype(self.dtype))
        set_(self, "tolerance", _check_tolerance(self.tolerance))
        check_int("max_probes", self.max_probes, 2, optional=True)
        if self.max_probes is not None and self.tolerance is None:
            raise ValueError(
                f"max_probes={self.max_probes!r} is a budget for the stopping rule and needs a "
                "tolerance; without one, set probes instead"
            )
        check_int("example_chunk_size", self.example_chunk_size, 1, optional=True)
        check_choice("ggn", self.ggn, GGN_MODES)
        check_int("ggn_samples", self.ggn_samples, 1)
        check_choice("ggn_sampler", self.ggn_sampler, SAMPLERS)

    @property
    def budget(self) -> int:
        """Probes per batch at most: ``max_probes`` when given, else ``probes``."""
        return self.max_probes if self.max_probes is not None else self.probes

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The field names, in order."""
        return _field_names(cls)

    def replace(self, **changes: Any) -> EstimateOptions:
        """A copy with ``changes`` applied and validated again; an unknown name is a
        ``TypeError`` that names it and lists the known ones."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise TypeError(f"unknown estimate option(s) {unknown}; known: {sorted(self.names())}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: ``quantities`` as a list, ``dtype`` as its string (or ``None``)."""
        out = {name: getattr(self, name) for name in self.names()}
        out["quantities"] = list(self.quantities)
        out["dtype"] = None if self.dtype is None else str(self.dtype)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EstimateOptions:
        """Inverse of :meth:`to_dict` (missing keys take their defaults); an unknown key is a
        ``ValueError`` that names it and lists the known ones."""
        if not isinstance(data, Mapping):
            raise TypeError(f"estimate options must be a mapping, got {data!r}")
        unknown = sorted(set(data) - set(cls.names()))
        if unknown:
            raise ValueError(f"unknown estimate option(s) {unknown}; known: {sorted(cls.names())}")
        return cls(**data)


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _check_dtype(dtype: Any) -> torch.dtype | None:
    """``None``, a floating ``torch.dtype``, or its name (``"float64"``, ``"torch.float64"``)."""
    if isinstance(dtype, str):
        found = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(found, torch.dtype):
            raise ValueError(f"dtype must name a torch dtype such as 'float64', got {dtype!r}")
        dtype = found
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
    return dtype


def _check_tolerance(tolerance: Any) -> float | None:
    """``None`` or a finite number > 0 (a relative standard error, dimensionless)."""
    if tolerance is None:
        return None
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float):
        raise TypeError(f"tolerance must be a number or None, got {tolerance!r}")
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be a finite number > 0, got {tolerance!r}")
    return float(tolerance)
