"""The public entry point: every per-group quantity of one or several batches.

Inner pieces, one per file: :mod:`~layerwise.sensitivity.functional` (the model as a pure function),
:mod:`~layerwise.sensitivity.hvp`, :mod:`~layerwise.sensitivity.probes`,
:mod:`~layerwise.sensitivity.hutchinson`,
:mod:`~layerwise.sensitivity.per_example`, :mod:`~layerwise.sensitivity.microbatch`,
:mod:`~layerwise.sensitivity.two_batch`, :mod:`~layerwise.sensitivity.gradient_stats`, and the
per-batch accumulation in :mod:`~layerwise.sensitivity.runner`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from layerwise.sensitivity.batching import as_batches, batch_size_of, cast_batch, count_batches
from layerwise.sensitivity.functional import (
    FunctionalLoss,
    leaves_no_trace,
    model_devices,
    uses_batch_statistics,
)
from layerwise.sensitivity.groups import resolve_groups
from layerwise.sensitivity.hvp import HVP_MODES, choose_hvp_mode
from layerwise.sensitivity.probes import DISTRIBUTIONS, make_generator
from layerwise.sensitivity.report import EstimateCost, SensitivityReport
from layerwise.sensitivity.runner import Plan, Run
from layerwise.sensitivity.validation import check_options, check_quantities

__all__ = ["estimate"]

Params = dict[str, torch.Tensor]


def estimate(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Any,
    *,
    groups: Mapping[str, Iterable[str]] | None = None,
    quantities: str | Iterable[str] = "all",
    probes: int = 32,
    seed: int = 0,
    generator: torch.Generator | None = None,
    distribution: str = "rademacher",
    isolated: bool = False,
    chunk_size: int = 8,
    hvp_mode: str = "auto",
    variance: str = "auto",
    micro_batches: int = 4,
    dtype: torch.dtype | None = None,
    tolerance: float | None = None,
    max_probes: int | None = None,
    progress: Callable[[int, int], Any] | None = None,
    batch_size: Callable[[Any], int] | None = None,
    example_chunk_size: int | None = None,
) -> SensitivityReport:
    """Per-group gradient norm, gradient noise and Hessian trace of ``loss_fn``.

    ``loss_fn(model, batch)`` returns the **mean** loss over ``batch``; ``batches`` is one
    batch or an iterable of batches (see :func:`layerwise.sensitivity.batching.as_batches`);
    ``groups`` maps group names to parameter names (default: one group per module that
    owns trainable parameters). Tied parameters count once (any alias may be named);
    frozen parameters are left out of the default groups but measured when named (the
    quantities describe the loss, not the optimizer); parameters in no group are held
    constant; unused parameters get zero gradient, noise and trace
    (:mod:`layerwise.sensitivity.groups`). The quantities, per group g, are defined in
    :mod:`layerwise.sensitivity.report`:

    * ``"grad_norm"``: ‖Ĝ_g‖, Ĝ the mean gradient over all examples seen (with
      ``"grad_variance"`` also its delta-method standard error);
    * ``"grad_variance"``: tr(Σ̂_g)/n_g, unbiased (1/(M−1) correction), with
      ``noise_to_signal`` = (N/B) tr(Σ̂_g)/(N‖Ĝ_g‖² − tr(Σ̂_g)), B = N / (number of
      batches) the mean batch size, where N‖Ĝ_g‖² − tr(Σ̂_g) is N times the unbiased
      estimate of ‖G_g‖² (:mod:`layerwise.sensitivity.gradient_stats`;
      ``inf`` when that estimate is <= 0, i.e. the noise swamps the signal);
      ``variance`` picks the samples: ``"per_example"`` gradients, ``"micro_batch"``
      gradients of ``micro_batches`` pieces of each batch, ``"two_batch"`` (McCandlish
      et al. on the same pieces), or ``"auto"``: micro-batches when a BatchNorm layer is
      in training mode (examples interact, per-example gradients are undefined; each
      batch then needs >= 2 x ``micro_batches`` examples), else per-example;
    * ``"hessian_trace"``: tr(H_gg) by Hutchinson's estimator with ``probes`` probes per
      batch (``distribution`` "rademacher" or "gaussian", drawn ``chunk_size`` at a time
      from ``generator``, or from a new one seeded with ``seed``), shared across groups
      or ``isolated`` per group, with its standard error. With a ``tolerance`` the probes
      of a batch stop once every group's relative standard error is at most the
      tolerance, or after ``max_probes`` (default ``probes``).

    Several batches: a batch of B_b examples weighs B_b/N. Traces and gradient statistics
    are the weighted means (for a mean loss, the Hessian trace and mean gradient of the
    union of the batches); variances of the estimates combine as Σ (B_b/N)² Var_b (the
    batches are independent). The trace's standard error measures the probe noise given
    the batches, not the sampling of the data.

    **How the Hessian-vector product mode is chosen** (``hvp_mode``). ``"jvp"``
    (forward over reverse) re-evaluates the loss and its gradient for every chunk of
    probes and carries the chunk's tangents alongside, so its memory is that of one
    chunk. ``"vjp"`` (reverse over reverse) runs the forward and the first backward pass
    once per batch, keeps their graph, and pays one batched second backward pass per
    chunk. ``"auto"`` resolves to ``"vjp"`` on CPU, where the benchmark
    (``python -m layerwise.experiments.benchmarks.sensitivity``) measured it faster for every model
    and batch size; on an accelerator to ``"jvp"`` when a batch needs a single chunk
    (``probes <= chunk_size``: both then do the same passes and forward mode holds less
    memory) and to ``"vjp"`` when it needs several (the shared passes are then saved
    ``ceil(probes/chunk_size) − 1`` times). Under ``"auto"``, when forward mode fails on
    the first product (an operator without a forward-mode derivative, or a PyTorch bug
    such as ``F.mse_loss`` under ``jvp`` of ``grad``, pytorch#123996) it falls back to
    ``"vjp"``. The mode used is recorded in ``report.settings["hvp_mode"]`` and the
    reason for a fallback in ``report.settings["hvp_fallback"]``. Pass ``"jvp"`` to bound
    memory when the graph of a backward pass is large, ``"vjp"`` to always share the
    passes.

    Randomness: every evaluation on one batch (the gradient and each Hessian product)
    replays the same global RNG state, so dropout masks agree between them and between
    modes; per-example gradients draw one mask per example. Probes never use the global
    RNG. On return, parameters, buffers (BatchNorm running statistics included), ``.grad``,
    train/eval modes and the global RNG state are as they were.

    Other options: ``dtype`` casts parameters, buffers and floating batch tensors (e.g.
    float64); ``progress(done, total)`` is called after each chunk (steps: one gradient
    pass per batch plus one per Hessian-vector product; ``total`` counts the batches seen
    so far when their number is unknown; a last call has ``done == total``);
    ``batch_size(batch)`` gives the number of examples of a batch of unusual layout;
    ``example_chunk_size`` bounds the examples per ``vmap`` call of per-example gradients
    (default: at most 2**25 gradient entries at once).

    Cost: ``report.cost`` holds probes per group (max over groups), Hessian-vector
    products, examples, batches and seconds; host and device synchronise once, at the end
    (and once per chunk when a tolerance is given). Errors: ``ValueError``/``TypeError``
    naming the argument; :class:`layerwise.sensitivity.errors.DoubleBackwardError` naming a module
    that cannot be differentiated twice. Non-finite losses give non-finite estimates.

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
    >>> mse = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])
    >>> report = estimate(net, mse, (x, y), probes=8)
    >>> report.names, report["0"].hessian_probes
    (['0', '2'], 8)
    """
    started = time.perf_counter()
    check_options(
        model=model, loss_fn=loss_fn, probes=probes, chunk_size=chunk_size,
        micro_batches=micro_batches, isolated=isolated, dtype=dtype, tolerance=tolerance,
        max_probes=max_probes, progress=progress, batch_size=batch_size,
        example_chunk_size=example_chunk_size, generator=generator, hvp_mode=hvp_mode,
        variance=variance, distribution=distribution, seed=seed,
        distributions=DISTRIBUTIONS, hvp_modes=HVP_MODES,
    )  # fmt: skip
    wanted = check_quantities(quantities)
    index = resolve_groups(model, groups)
    budget = max_probes if max_probes is not None else probes
    plan = Plan(
        index=index,
        trace="hessian_trace" in wanted,
        noise="grad_variance" in wanted,
        gradient="grad_norm" in wanted or "grad_variance" in wanted,
        budget=budget,
        chunk_size=chunk_size,
        mode=choose_hvp_mode(
            hvp_mode, math.ceil(budget / chunk_size), model.get_parameter(index.params[0]).device
        ),
        fallback=hvp_mode == "auto",
        method=variance
        if variance != "auto"
        else ("micro_batch" if uses_batch_statistics(model) else "per_example"),
        micro_batches=micro_batches,
        distribution=distribution,
        isolated=isolated,
        tolerance=tolerance,
        example_chunk_size=example_chunk_size,
        batch_statistics=uses_batch_statistics(model),
    )
    if plan.noise and plan.method == "per_example" and uses_batch_statistics(model):
        raise ValueError(
            "variance='per_example' is undefined for a model with BatchNorm in training mode "
            "(its examples interact); use variance='micro_batch' or 'auto'"
        )
    expected = count_batches(batches)
    with leaves_no_trace(model):
        loss = FunctionalLoss(model, loss_fn, index.params, dtype)
        gen = _generator(generator, seed, loss.values)
        run = Run(plan, loss, gen, model_devices(model), progress, expected)
        for batch in as_batches(batches):
            size = batch_size_of(batch, batch_size)
            run.batch(cast_batch(batch, dtype), size)
        if run.batches == 0:
            raise ValueError("batches yielded no batch")
        report = run.report(wanted)
    seconds = time.perf_counter() - started
    settings = dict(report.settings)
    settings.update(
        quantities=list(wanted), probes=probes, max_probes=max_probes, tolerance=tolerance,
        seed=None if generator is not None else seed, distribution=distribution,
        isolated=isolated, chunk_size=chunk_size, hvp_mode_requested=hvp_mode,
        micro_batches=micro_batches, dtype=None if dtype is None else str(dtype),
        groups=index.mapping(),
    )  # fmt: skip
    cost = EstimateCost(**{**report.cost.to_dict(), "seconds": seconds})
    return SensitivityReport(report.groups, cost, settings)


def _generator(generator: torch.Generator | None, seed: int, values: Params) -> torch.Generator:
    devices = list(dict.fromkeys(v.device for v in values.values()))
    if generator is None:
        return make_generator(devices[0], seed)
    if generator.device not in devices:
        raise ValueError(
            f"generator is on device {generator.device}, but the parameters are on "
            f"{[str(d) for d in devices]}; create it with torch.Generator(device=...)"
        )
    return generator
