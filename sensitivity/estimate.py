"""The public entry point: every per-group quantity of one or several batches.

Inner pieces, one per file: :mod:`~layerwise.sensitivity.functional` (the model as a pure function),
:mod:`~layerwise.sensitivity.hvp`, :mod:`~layerwise.sensitivity.probes`,
:mod:`~layerwise.sensitivity.hutchinson`,
:mod:`~layerwise.sensitivity.per_example`, :mod:`~layerwise.sensitivity.microbatch`,
:mod:`~layerwise.sensitivity.two_batch`, :mod:`~layerwise.sensitivity.gradient_stats`,
:mod:`~layerwise.sensitivity.ggn` (with the loss objects of
:mod:`~layerwise.sensitivity.losses`), and the per-batch accumulation in
:mod:`~layerwise.sensitivity.runner`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from layerwise.sensitivity.batching import as_batches, batch_size_of, cast_batch, count_batches
from layerwise.sensitivity.functional import FunctionalLoss, leaves_no_trace
from layerwise.sensitivity.ggn import GGNEstimator, output_loss
from layerwise.sensitivity.hvp import choose_hvp_mode
from layerwise.sensitivity.losses import OutputLoss
from layerwise.sensitivity.options import EstimateOptions
from layerwise.sensitivity.probes import make_generator
from layerwise.sensitivity.report import SensitivityReport
from layerwise.sensitivity.runner import Plan, Run
from layerwise.sensitivity.structure import model_structure
from layerwise.sensitivity.validation import check_call, check_materialized

__all__ = ["estimate"]


def estimate(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Any,
    *,
    groups: Mapping[str, Iterable[str]] | None = None,
    options: EstimateOptions | None = None,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], Any] | None = None,
    batch_size: Callable[[Any], int] | None = None,
    **settings: Any,
) -> SensitivityReport:
    """Per-group gradient norm, gradient noise, Hessian and Gauss-Newton traces of ``loss_fn``.

    **Settings** are the fields of :class:`layerwise.sensitivity.EstimateOptions`
    (``quantities``, ``probes``, ``seed``, ``distribution``, ``isolated``, ``chunk_size``,
    ``hvp_mode``, ``variance``, ``micro_batches``, ``dtype``, ``tolerance``, ``max_probes``,
    ``example_chunk_size``, ``ggn``, ``ggn_samples``, ``ggn_sampler``), given as
    ``options=EstimateOptions(...)``, as keyword shortcuts
    (``estimate(model, loss_fn, batches, probes=8)``), or both: shortcuts **override** the
    fields of ``options`` (``options.replace(**shortcuts)``, validated again). An unknown
    keyword is a ``TypeError`` that names it and lists the known ones. The settings used are
    recorded in ``report.settings`` (:meth:`EstimateOptions.to_dict` keys, with ``hvp_mode``
    and ``variance`` as resolved and the requested ones under ``hvp_mode_requested`` and
    ``variance_requested``; ``seed`` is ``None`` when a ``generator`` was passed; ``groups``
    the resolved groups; ``loss`` the kind and options of a loss object). The other keyword
    arguments are runtime objects, not settings: ``groups``, ``generator``, ``progress``
    and ``batch_size``.

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
      ``variance`` picks the samples: ``"per_example"`` gradients (their squared norms
      and dots with Ĝ factorised over the layers' inputs and output gradients, at the cost
      of one backward pass; ``vmap`` of ``grad`` for parameters no covered layer owns
      alone: :mod:`layerwise.sensitivity.factorised`; ``report.settings["per_example"]``
      says which), ``"micro_batch"`` gradients of ``micro_batches`` pieces of each batch,
      ``"two_batch"`` (McCandlish et al. on the same pieces), or ``"auto"``:
      micro-batches when a BatchNorm layer is in training mode (examples interact,
      per-example gradients are undefined; each batch then needs >= 2 x
      ``micro_batches`` examples), else per-example, falling back to micro-batches where
      ``vmap`` meets data-dependent code (recorded in ``variance_fallback``, warned once;
      an explicit ``"per_example"`` raises
      :class:`~layerwise.sensitivity.errors.PerExampleGradientError`:
      :mod:`layerwise.sensitivity.runner`);
    * ``"hessian_trace"``: tr(H_gg) by Hutchinson's estimator with ``probes`` probes per
      batch (``distribution`` "rademacher" or "gaussian", drawn ``chunk_size`` at a time
      from ``generator``, or from a new one seeded with ``seed``), shared across groups
      or ``isolated`` per group, with its standard error. With a ``tolerance`` the probes
      of a batch stop once every group's relative standard error is at most the
      tolerance, or after ``max_probes`` (default ``probes``);
    * ``"ggn_trace"`` (asked for by name, not part of ``"all"``): tr(G_gg) of the
      generalised Gauss-Newton matrix G = Jᵀ H_out J, with its standard error
      (:mod:`layerwise.sensitivity.ggn`). It needs ``loss_fn`` to be a loss object,
      :class:`layerwise.sensitivity.CrossEntropy` or
      :class:`layerwise.sensitivity.MeanSquaredError` (else
      :class:`layerwise.sensitivity.ggn.GGNLossError`). ``ggn="mc"``: ``ggn_samples``
      label sets per batch drawn from the model's predictive distribution (importance-
      weighted by default, ``ggn_sampler``; from the probe generator, after the batch's
      probes), per example, or through the batch function under BatchNorm in training
      mode; with one label set per batch, the standard error comes from the spread of the
      per-example terms; with ``grad_norm`` and neither a Hessian trace nor per-example
      variance, the gradient comes from the sampled terms' forward pass (one forward and
      1 + K backward passes in all, where the per-example norms are factorised);
      ``ggn="exact"``: one backward pass per output entry
      (:class:`layerwise.sensitivity.ggn.GGNSizeError` above
      :data:`layerwise.sensitivity.ggn.EXACT_MAX_COLUMNS`).

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
    chunk (on the CPU above 12 MFLOP a pass, one per probe: ``hvp.batch_probes``).
    ``"auto"`` resolves to ``"vjp"`` on CPU, where the benchmark
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

    Attention: every pass differentiated twice or batched with ``vmap`` runs
    ``scaled_dot_product_attention`` on the math backend and without
    ``nn.MultiheadAttention``'s fast path, the caller's settings restored afterwards
    (:mod:`layerwise.sensitivity.attention`; ``report.settings["attention_backend"]``).

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
    ``example_chunk_size`` bounds the examples handled at once by the per-example norms
    (default: temporaries no larger than the layer's activations, at least 2**20 elements)
    and per ``vmap`` call of per-example gradients (default: at most 2**25 gradient entries
    at once).

    Cost: ``report.cost`` holds probes per group (max over groups), Hessian-vector
    products, examples, batches and seconds; host and device synchronise once, at the end
    (and once per chunk when a tolerance is given). Errors: ``ValueError``/``TypeError``
    naming the argument; :class:`layerwise.sensitivity.errors.DoubleBackwardError` naming a module
    that cannot be differentiated twice; what cannot be measured raises a
    :class:`layerwise.sensitivity.errors.NotMeasurableError` (a ``ValueError``):
    :class:`~layerwise.sensitivity.errors.NoGradientPathError` when the loss of a batch does
    not depend on any parameter of the groups (detached, computed under ``no_grad``, or from
    other parameters only; checked from the evaluations the estimate makes anyway, no extra
    pass), :class:`~layerwise.sensitivity.errors.MetaTensorError` for a model on the
    ``meta`` device, :class:`~layerwise.sensitivity.errors.NonFloatingParameterError` for an
    integer parameter named in ``groups``. Non-finite losses give non-finite estimates.

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
    >>> mse = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])
    >>> report = estimate(net, mse, (x, y), probes=8)
    >>> report.names, report["0"].hessian_probes
    (['0', '2'], 8)
    """
    started = time.perf_counter()
    check_call(
        model=model, loss_fn=loss_fn, generator=generator, progress=progress,
        batch_size=batch_size,
    )  # fmt: skip
    if options is not None and not isinstance(options, EstimateOptions):
        raise TypeError(f"options must be an EstimateOptions or None, got {options!r}")
    unknown = sorted(set(settings) - set(EstimateOptions.names()))
    if unknown:
        raise TypeError(
            f"estimate() got unknown keyword argument(s) {unknown}; the settings are "
            f"{sorted(EstimateOptions.names())}, the other keywords groups, options, "
            "generator, progress, batch_size"
        )
    options = _resolve_options(options, settings)
    wanted = options.quantities
    target = output_loss(loss_fn) if "ggn_trace" in wanted else None  # before any work
    structure = model_structure(model)  # one walk of the tree; the rest is cached
    index = structure.groups(model, groups)
    named = structure.named_parameters
    devices = list(dict.fromkeys(named[n].device for n in index.params))
    _check_generator(generator, devices)
    if structure.meta:
        check_materialized(model)  # raises, naming them
    batch_statistics = structure.batch_statistics
    plan = Plan(
        index=index,
        trace="hessian_trace" in wanted,
        noise="grad_variance" in wanted,
        gradient="grad_norm" in wanted or "grad_variance" in wanted,
        budget=options.budget,
        chunk_size=options.chunk_size,
        mode=choose_hvp_mode(
            options.hvp_mode,
            math.ceil(options.budget / options.chunk_size),
            named[index.params[0]].device,
        ),
        fallback=options.hvp_mode == "auto",
        method=options.variance
        if options.variance != "auto"
        else ("micro_batch" if batch_statistics else "per_example"),
        micro_batches=options.micro_batches,
        distribution=options.distribution,
        isolated=options.isolated,
        tolerance=options.tolerance,
        example_chunk_size=options.example_chunk_size,
        batch_statistics=batch_statistics,
        ggn=options.ggn if target is not None else None,
        ggn_samples=options.ggn_samples,
        variance_auto=options.variance == "auto",
    )
    if plan.noise and plan.method == "per_example" and batch_statistics:
        raise ValueError(
            "variance='per_example' is undefined for a model with BatchNorm in training mode "
            "(its examples interact); use variance='micro_batch' or 'auto'"
        )
    expected = count_batches(batches)
    dtype = options.dtype
    with leaves_no_trace(model, structure=structure):
        loss = FunctionalLoss(model, loss_fn, index.params, dtype, structure=structure)
        gen = generator if generator is not None else make_generator(devices[0], options.seed)
        ggn = None
        if target is not None:
            ggn = GGNEstimator(
                target, model, index.params, index.param_group, len(index),
                per_example=not batch_statistics, dtype=dtype,
                example_chunk_size=options.example_chunk_size, chunk_size=options.chunk_size,
                sampler=options.ggn_sampler, structure=structure,
            )  # fmt: skip
        run = Run(plan, loss, gen, list(structure.devices), progress, expected, ggn)
        for batch in as_batches(batches):
            size = batch_size_of(batch, batch_size)
            run.batch(cast_batch(batch, dtype), size)
        if run.batches == 0:
            raise ValueError("batches yielded no batch")
        report = run.report(wanted)
    seconds = time.perf_counter() - started
    recorded = {
        **options.to_dict(),
        "seed": None if generator is not None else options.seed,
        "hvp_mode_requested": options.hvp_mode,
        "variance_requested": options.variance,
        **report.settings,  # hvp_mode and variance as used, hvp_fallback
        "groups": index.mapping(),
    }
    if isinstance(loss_fn, OutputLoss):
        recorded["loss"] = loss_fn.settings()
    cost = dataclasses.replace(report.cost, seconds=seconds)
    return SensitivityReport(report.groups, cost, recorded)


#: Options validated lately, per (options, settings): equal inputs validate alike, so an
#: engine asking again with the same settings is not validated again (at most this many kept).
RESOLVED_KEPT = 32
_RESOLVED: dict[Hashable, EstimateOptions] = {}
_PLAIN = (str, int, float, bool, type(None), torch.dtype)


def _resolve_options(options: EstimateOptions | None, settings: dict[str, Any]) -> EstimateOptions:
    """``options`` (default ``EstimateOptions()``) with ``settings`` applied and validated
    (:meth:`EstimateOptions.replace`), from :data:`_RESOLVED` when the same inputs were seen
    (the key holds each value's type, so ``1`` and ``True`` are told apart; values of other
    types are not cached)."""
    try:
        key: Hashable | None = (
            type(options),
            options,
            tuple(sorted((k, _frozen(v)) for k, v in settings.items())),
        )
        found = _RESOLVED.get(key)  # hashing may fail: not cached then
    except TypeError:
        key = found = None
    if found is not None:
        return found
    resolved = EstimateOptions() if options is None else options
    if settings:
        resolved = resolved.replace(**settings)
    if key is not None:
        if len(_RESOLVED) >= RESOLVED_KEPT:
            _RESOLVED.pop(next(iter(_RESOLVED)))
        _RESOLVED[key] = resolved
    return resolved


def _frozen(value: Any) -> Hashable:
    if type(value) in (list, tuple):
        return (type(value), tuple(_frozen(v) for v in value))
    if type(value) not in _PLAIN:
        raise TypeError("not cached")
    return (type(value), value)


def _check_generator(generator: torch.Generator | None, devices: list[torch.device]) -> None:
    """A given generator must be on the device of the parameters it draws probes for."""
    if generator is not None and generator.device not in devices:
        raise ValueError(
            f"generator is on device {generator.device}, but the parameters are on "
            f"{[str(d) for d in devices]}; create it with torch.Generator(device=...)"
        )
