"""What a run records at each evaluation (a row of ``metrics.csv``) and its event log.

:class:`Evaluator` is called by :mod:`layerwise.experiments.training` at step 0, every
``eval_every`` steps and at the last step. It evaluates the validation split (mean loss
and metric, :meth:`Task.evaluate`), passes the metric to the controller
(``observe_validation``; mode "max" in the policy presets) when the loss is finite, and
returns the row: ``step``, ``epoch``, ``train_loss`` (the mean training loss since the
previous evaluation, :class:`MeanLoss`), ``val_loss``, ``val_<metric>``, then per group
``g`` ``lr/g`` (the effective rate of the next step, base rate x multiplier),
``multiplier/g``, ``grad_norm/g`` (``‖∇_g L‖₂`` of the last training batch, in float64),
``curvature/g`` and ``noise/g`` (:class:`SensitivityMonitor`), ``fallback_events`` and
``events`` (the engine's fallbacks, events and skipped recalibrations since the previous
evaluation, and a monitor failure), ``wall_time`` (seconds since the run started) and
``train_time`` (seconds of training: since :class:`Evaluator` was built, less the time
spent in evaluations, monitoring included).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch

from layerwise.policies.schedule_base import check_int

__all__ = ["Evaluator", "MeanLoss", "SensitivityMonitor"]

_NaN = math.nan


class MeanLoss:
    """The mean of the training losses added since the last :meth:`reset`.

    The sum is kept in float64 on ``device``, so :meth:`add` never waits for the device;
    :meth:`mean` (one host sync) is NaN when nothing was added.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.total = torch.zeros((), device=torch.device(device), dtype=torch.float64)
        self.count = 0

    def add(self, loss: torch.Tensor) -> None:
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss must be a torch.Tensor, got {type(loss).__name__}")
        self.total += loss.detach().double()
        self.count += 1

    def mean(self) -> float:
        return float(self.total / self.count) if self.count else _NaN

    def reset(self) -> None:
        self.total.zero_()
        self.count = 0


class SensitivityMonitor:
    """Per-group sensitivity on a fixed monitoring batch, at every evaluation.

    ``settings``: ``probes`` (Hutchinson probes; 0 switches the monitor off),
    ``batch_size`` (the first examples of a fixed permutation of the training split,
    seed 0; default 128) and ``quantities`` (default ``["hessian_trace"]``). Each
    measurement (:func:`layerwise.sensitivity.estimate`, which leaves no trace) gives per
    group the curvature ``tr(H_gg)/n_g`` and the gradient noise-to-signal ratio, NaN where
    not measured; the probe generator is seeded with ``seed``. A failing measurement
    switches the monitor off for the rest of the run and is reported as an event.
    """

    def __init__(
        self, settings: Mapping[str, Any], inputs: torch.Tensor, targets: torch.Tensor, *, seed: int
    ) -> None:
        if not isinstance(settings, Mapping):
            raise TypeError(f"settings must be a mapping, got {settings!r}")
        if not (isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor)):
            raise TypeError(
                f"inputs and targets must be tensors, got {type(inputs).__name__} and "
                f"{type(targets).__name__}"
            )
        if len(inputs) != len(targets):
            raise ValueError(
                f"inputs ({len(inputs)}) and targets ({len(targets)}) differ in length"
            )
        self.probes = check_int("settings['probes']", int(settings.get("probes", 0)), minimum=0)
        self.quantities = settings.get("quantities", ["hessian_trace"])
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.probes:
            size = int(settings.get("batch_size", 128))
            check_int("settings['batch_size']", size, minimum=1)
            perm = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))
            index = perm[: min(size, len(perm))].to(inputs.device)
            self.batch = (inputs[index], targets[index])
            self.generator = torch.Generator(device=inputs.device).manual_seed(seed)

    def measure(self, model, loss_fn, groups, step: int) -> tuple[dict, dict, list[dict]]:
        """``({group: curvature}, {group: noise-to-signal}, events)`` at ``step``."""
        from layerwise import sensitivity

        check_int("step", step, minimum=0)
        names = [g.name for g in groups]
        curvature, noise = dict.fromkeys(names, _NaN), dict.fromkeys(names, _NaN)
        if self.batch is None:
            return curvature, noise, []
        try:
            report = sensitivity.estimate(
                model,
                loss_fn,
                [self.batch],
                groups=groups.mapping(),
                quantities=self.quantities,
                probes=self.probes,
                generator=self.generator,
            )
            for name in names:
                est = report[name]
                curvature[name] = _NaN if est.curvature is None else est.curvature
                noise[name] = _NaN if est.noise_to_signal is None else est.noise_to_signal
        except Exception as exc:  # the monitor must never stop training
            self.batch = None
            text = f"monitor disabled: {exc}"[:300]
            event = {"step": step, "event": text, "fallback": False, "skipped": True}
            return curvature, noise, [event]
        return curvature, noise, []


class Evaluator:
    """``evaluator(step, epoch, losses)`` returns the ``metrics.csv`` row of ``step``.

    Holds the state an evaluation needs between calls: the previous evaluation's step (the
    events are those after it), every event so far (:attr:`events`, the rows of
    ``events.csv``: ``step``, ``event``, ``fallback``, ``skipped``) and the seconds spent
    evaluating (subtracted from ``train_time``). ``start`` is the run's
    ``time.perf_counter()`` origin for ``wall_time``.
    """

    def __init__(self, task, model, val, opt, groups, monitor, *, start: float) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(start, bool) or not isinstance(start, int | float):
            raise TypeError(f"start must be a time.perf_counter() value, got {start!r}")
        if not isinstance(monitor, SensitivityMonitor):
            raise TypeError(f"monitor must be a SensitivityMonitor, got {type(monitor).__name__}")
        self.task, self.model, self.val, self.opt = task, model, val, opt
        self.groups, self.monitor, self.start = groups, monitor, start
        self.names = [g.name for g in groups]
        self.named = dict(model.named_parameters())
        self.events: list[dict[str, Any]] = []
        self.last_eval, self.eval_seconds = 0, 0.0
        self.train_start = time.perf_counter()

    def __call__(self, step: int, epoch: int, losses: MeanLoss) -> dict[str, Any]:
        check_int("step", step, minimum=0)
        if not isinstance(losses, MeanLoss):
            raise TypeError(f"losses must be a MeanLoss, got {type(losses).__name__}")
        t0 = time.perf_counter()
        row = self._validation(step, epoch, losses)
        lrs, mults = self.opt.get_last_lr(), self.opt.multipliers
        nan = dict.fromkeys(self.names, _NaN)
        norms = _grad_norms(self.groups, self.named) if step > 0 else nan
        events = _events(self.opt.history, self.last_eval) if step > 0 else []
        curvature, noise, failed = self.monitor.measure(
            self.model, self.task.loss_fn, self.groups, step
        )
        events += failed
        for name in self.names:
            row[f"lr/{name}"] = float(lrs[name])
            row[f"multiplier/{name}"] = float(mults[name])
            row[f"grad_norm/{name}"] = norms[name]
            row[f"curvature/{name}"] = curvature[name]
            row[f"noise/{name}"] = noise[name]
        row["fallback_events"] = sum(1 for e in events if e["fallback"])
        row["events"] = "; ".join(f"{e['step']}: {e['event']}" for e in events)
        self.events.extend(events)
        self.last_eval = step
        self.eval_seconds += time.perf_counter() - t0
        row["wall_time"] = time.perf_counter() - self.start
        row["train_time"] = time.perf_counter() - self.train_start - self.eval_seconds
        return row

    def _validation(self, step: int, epoch: int, losses: MeanLoss) -> dict[str, Any]:
        val_loss, val_metric = self.task.evaluate(self.model, *self.val)
        if math.isfinite(float(val_loss)):  # a diverged run stops; nothing to watch
            self.opt.observe_validation(float(val_metric))  # the controller's mode is "max"
        return {
            "step": step,
            "epoch": epoch,
            "train_loss": losses.mean(),
            "val_loss": float(val_loss),
            f"val_{self.task.metric_name}": float(val_metric),
        }


def _grad_norms(groups, named: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{group: ‖∇_g L‖₂}`` over the parameters that have a gradient (NaN when none do)."""
    out = {}
    for g in groups:
        grads = [named[n].grad for n in g.param_names if named[n].grad is not None]
        if grads:
            out[g.name] = float(
                torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(t.detach().double()) for t in grads])
                )
            )
        else:
            out[g.name] = _NaN
    return out


def _events(history: pd.DataFrame | None, since: int) -> list[dict[str, Any]]:
    """The engine's fallbacks, events and skips after step ``since``, one per (step, text)."""
    if history is None or history.empty:
        return []
    rows = history[history["step"] > since]
    rows = rows[
        rows["fallback"].astype(bool) | rows["event"].notna() | rows["skipped"].astype(bool)
    ]
    seen, out = set(), []
    for row in rows.itertuples():
        text = (
            row.event
            if isinstance(row.event, str)
            else (row.reason if isinstance(row.reason, str) else "fallback")
        )
        if (row.step, text) not in seen:
            seen.add((row.step, text))
            out.append(
                {
                    "step": int(row.step),
                    "event": text,
                    "fallback": bool(row.fallback),
                    "skipped": bool(row.skipped),
                }
            )
    return out
