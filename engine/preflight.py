"""Fail at step 0, not at the first recalibration: the engine's checks of estimability.

A model the estimator cannot handle used to surface at the first recalibration (step 100 by
default), mid-training. The engine checks twice, each time raising
:class:`PreflightError` (a :class:`layerwise.sensitivity.NotMeasurableError`, so a
``ValueError``) that names the module at fault, the reason and the fix, with the
estimator's own error chained as ``__cause__``:

* **at construction**, what needs no batch (:func:`check_model`): tensors on the ``meta``
  device (shapes without data), inference tensors (made under ``torch.inference_mode()``,
  which autograd refuses);
* **on the first batch the engine sees** (the batch given to the first ``step(batch)``, or
  the first of ``batches=``, peeked without counting it and without touching the global
  random streams), before the first base step (:func:`dry_run`): one small estimate with
  the engine's own options but one probe (one label sample for the GGN) on at most
  :data:`DRY_RUN_EXAMPLES` examples (twice ``micro_batches`` under BatchNorm in training
  mode), with its own probe generator, so the engine's probe stream, the model and the
  global RNG are as before. It runs every code path a recalibration runs (the loss on this
  batch layout, the gradient path to the groups, Hessian or Gauss-Newton products,
  per-example gradients), at the cost of a few forward and backward passes on a few
  examples. Its report tells the engine what the estimator chose by itself, e.g. the
  micro-batch statistics ``variance="auto"`` fell back to
  (:mod:`layerwise.sensitivity.runner`), which the recalibrations then use from the start.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from layerwise.sensitivity import EstimateOptions, NotMeasurableError, estimate
from layerwise.sensitivity.batching import batch_size_of, slice_batch
from layerwise.sensitivity.errors import (
    DoubleBackwardError,
    PerExampleGradientError,
    module_raising,
)
from layerwise.sensitivity.functional import uses_batch_statistics

__all__ = ["DRY_RUN_EXAMPLES", "PreflightError", "check_model", "dry_run"]

#: Most examples the first batch's dry run estimates on (more under BatchNorm in training
#: mode, which needs two per micro-batch).
DRY_RUN_EXAMPLES = 4


class PreflightError(NotMeasurableError):
    """The engine cannot estimate this model with these options (module docstring)."""


def check_model(model: nn.Module) -> None:
    """Refuse, before any step, a model that cannot be estimated at all: meta tensors,
    inference tensors. (Parameters without gradients, integer ones included, never enter
    the mapping; an optimizer with none at all is refused by
    :func:`layerwise.engine.naming.parameter_mapping`.)"""
    owners = dict(model.named_modules())

    def module_of(name: str) -> str:
        qual = name.rpartition(".")[0]
        return f"{qual or '(root)'} ({type(owners.get(qual, model)).__name__})"

    tensors = [*model.named_parameters(), *model.named_buffers()]
    meta = [n for n, t in tensors if t.is_meta]
    if meta:
        raise PreflightError(
            f"LayerwiseOptimizer cannot estimate this model: module {module_of(meta[0])} holds "
            f"{meta[0]!r} on the meta device ({len(meta)} tensor(s) in all: shapes without "
            "data). Materialise the model first (model.to_empty(device=...) and load or "
            "initialise its weights)"
        )
    inference = [n for n, t in tensors if t.is_inference()]
    if inference:
        raise PreflightError(
            f"LayerwiseOptimizer cannot estimate this model: module {module_of(inference[0])} "
            f"holds {inference[0]!r} as an inference tensor (made under torch.inference_mode(); "
            f"{len(inference)} in all), which autograd refuses. Build or load the model "
            "outside inference_mode, or clone its tensors there (p.data = p.clone())"
        )


def dry_run_options(options: EstimateOptions) -> EstimateOptions:
    """``options`` at their cheapest: one probe, one label sample, shared probes."""
    return options.replace(
        probes=1, chunk_size=1, tolerance=None, max_probes=None, ggn_samples=1, isolated=False
    )


def dry_run(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batch: Any,
    mapping: Mapping[str, list[str]],
    options: EstimateOptions,
    runtime: Mapping[str, Any],
    step: int,
    first_recalibration: int,
) -> Any:
    """One small estimate on ``batch`` (module docstring); its report, or
    :class:`PreflightError` naming the module, the reason and the fix."""
    small = dry_run_options(options)
    part = batch
    if "batch_size" not in runtime:  # a batch of the usual layout: estimate a few examples
        try:
            size = batch_size_of(batch)
        except ValueError:
            size = None
        if size is not None:
            keep = DRY_RUN_EXAMPLES
            if uses_batch_statistics(model):
                keep = max(keep, 2 * options.micro_batches)
            part = slice_batch(batch, size, 0, min(size, keep))
    device = next(iter(model.parameters())).device
    generator = torch.Generator(device=device)
    generator.manual_seed(0)
    try:
        with torch.enable_grad():
            return estimate(
                model, loss_fn, [part], groups=mapping, options=small, generator=generator,
                **{k: v for k, v in runtime.items() if k != "progress"},
            )  # fmt: skip
    except Exception as exc:
        raise _explain(exc, model, loss_fn, part, step, first_recalibration) from exc


def _explain(
    exc: Exception,
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batch: Any,
    step: int,
    first: int,
) -> PreflightError:
    when = (
        f"checked on the first batch, at step {step}, before the first recalibration (after "
        f"step {first})"
    )
    text = f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, (DoubleBackwardError, PerExampleGradientError)):  # these name it
        where = module_raising(model, lambda: loss_fn(model, batch))
        if where is not None:
            text += f" (raised in module {where} by loss_fn(model, batch))"
    return PreflightError(
        f"LayerwiseOptimizer cannot estimate this model with these estimator options "
        f"({when}): {text}. Fix the cause, or change the options (estimator={{...}}) or the "
        "controller's rule so that its quantities can be measured"
    )
