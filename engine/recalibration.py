"""One recalibration: estimate on a batch, ask the controller, store the multipliers.

Order of a recalibration after step ``s`` (:meth:`Recalibrator.run`):

1. **Gradient check.** A forwarded ``GradScaler`` ``found_inf`` must be zero; otherwise the
   recalibration is skipped, the multipliers are kept, and the skip is logged. Under DDP
   the verdict is and-ed over ranks. (Without a scaler, a step with non-finite gradients
   never gets here: the engine skips it before the base step, see
   :mod:`layerwise.engine.nonfinite`, and :meth:`Recalibrator.fall_back` records it.)
2. **Estimate.** :func:`layerwise.sensitivity.estimate` on the model (unwrapped from DDP or
   ``torch.compile``) with the groups ``{group name: [parameter names]}``, the engine's
   probe generator (seeded with ``seed``, advanced by each estimate, checkpointed) and the
   ``estimator`` settings (an :class:`layerwise.sensitivity.EstimateOptions`, see
   :mod:`layerwise.engine.options`). The estimator recomputes its own
   gradients from ``loss_fn(model, batch)``, so it sees *unscaled* gradients whatever
   ``GradScaler`` does, and full precision unless ``loss_fn`` enters ``torch.autocast``.
3. **Pool** across ranks under DDP (:mod:`layerwise.engine.distributed`).
4. **Decide and apply.** ``controller.update(report, step=s)``; each multiplier is checked
   (finite, > 0, a known group) and written to ``group["lr_multiplier"]``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from layerwise.engine.multipliers import MULTIPLIER_KEY, check_multiplier, effective_lr
from layerwise.engine.naming import parameter_mapping, unwrap_model
from layerwise.engine.options import (
    estimator_options,
    ggn_samples_for,
    make_controller,
    samples_behind,
)
from layerwise.engine.preflight import check_model, dry_run
from layerwise.policies.schedule_base import check_int
from layerwise.sensitivity.functional import uses_batch_statistics
from layerwise.sensitivity.ggn import output_loss

__all__ = ["Recalibration", "Recalibrator", "skip_rows"]


class _OneBatch:
    """A re-iterable of one batch (never mistaken for a batch itself)."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch

    def __iter__(self) -> Any:
        yield self.batch


class Recalibration(NamedTuple):
    """One recalibration, as the engine's ``callback`` receives it.

    ``step``: the engine's step count when it ran; ``rows``: its history rows, one per
    group (:data:`layerwise.engine.history.HISTORY_COLUMNS`); ``decision``: the controller's
    :class:`layerwise.policies.Decision` (``None`` when the engine skipped the
    recalibration); ``report``: the :class:`layerwise.sensitivity.SensitivityReport` it was
    made from (``None`` when skipped, and for a fallback ``observe_validation`` triggered).
    """

    step: int
    rows: list[dict[str, Any]]
    decision: Any
    report: Any


class Recalibrator:
    """Holds the model, loss, controller, estimator options and probe generator."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
        controller: Any,
        estimator: Any,
        seed: int,
    ) -> None:
        if model is None or loss_fn is None:
            raise ValueError(
                f"model and loss_fn are required with a controller, got model={model!r}, "
                f"loss_fn={loss_fn!r}"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {model!r}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
        self.controller = make_controller(controller)
        self.optimizer, self.model, self.loss_fn = optimizer, model, loss_fn
        self.module = unwrap_model(model)
        self.mapping = parameter_mapping(model, optimizer.param_groups)
        check_model(self.module)  # what can be refused without a batch
        self.options, self.runtime, self._ggn_default = estimator_options(
            estimator, self.controller, loss_fn
        )
        self._ggn_per_example = True  # until the estimator falls back to the batch function
        self.variance_fallback: str | None = None
        if "ggn_trace" in self.options.quantities:  # refused now, not at the first recalibration
            output_loss(loss_fn)
        self.seed = check_int("seed", seed, minimum=0)
        device = next(iter(self.module.parameters())).device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)

    def refresh_mapping(self) -> None:
        """Rebuild ``{group: [parameter names]}`` after groups changed."""
        self.mapping = parameter_mapping(self.model, self.optimizer.param_groups)

    def preflight(self, batch: Any, step: int, first: int) -> None:
        """The first batch's dry run (:mod:`layerwise.engine.preflight`); what the estimator
        chose by itself there, the recalibrations use from the start."""
        report = dry_run(
            self.module, self.loss_fn, batch, self.mapping, self._options(), self.runtime,
            step, first,
        )  # fmt: skip
        self._adopt(report)

    def _options(self) -> Any:
        """The options of this recalibration: the engine's default label samples follow the
        model (:func:`layerwise.engine.options.ggn_samples_for`): two where the sampled GGN
        terms are not per example (BatchNorm in training mode now, or an earlier fallback
        to the batch function), one elsewhere."""
        if not self._ggn_default:
            return self.options
        per_example = self._ggn_per_example and not uses_batch_statistics(self.module)
        return ggn_samples_for(self.options, per_example)

    def _adopt(self, report: Any) -> None:
        """Keep micro-batch statistics once ``variance="auto"`` fell back to them (the
        per-example attempt would fail again at every recalibration), and the batch
        function's label-sample count once the GGN fell back to it."""
        why = report.settings.get("variance_fallback")
        if why and self.options.variance == "auto":
            self.options = self.options.replace(variance="micro_batch")
            self.variance_fallback = why
        if report.settings.get("ggn_fallback"):
            self._ggn_per_example = False

    # -- the recalibration ------------------------------------------------------------------
    def run(self, batch: Any, step: int, found_inf: torch.Tensor | None) -> Recalibration:
        from layerwise.engine import distributed as ddp

        finite, why = self._gradients_finite(found_inf)
        if ddp.is_distributed():
            finite = ddp.all_finite(finite)
            why = why or "non-finite gradients on another rank"
        if not finite:
            rows = self._skip_rows(step, f"skipped: {why}; multipliers kept")
            return Recalibration(step, rows, None, None)
        report = self._estimate(batch, ddp)
        decision = self.controller.update(report, step=step)
        return Recalibration(step, self.apply(decision, report, step), decision, report)

    @staticmethod
    def _gradients_finite(found_inf: torch.Tensor | None) -> tuple[bool, str]:
        if found_inf is not None and bool(found_inf.ne(0).any()):
            return False, "GradScaler found non-finite gradients"
        return True, ""

    def _estimate(self, batch: Any, ddp: Any) -> Any:
        from layerwise.sensitivity import estimate

        options = self._options()
        distributed = ddp.is_distributed()
        two_batch = distributed and options.variance == "two_batch"
        wants_variance = "grad_variance" in options.quantities
        if two_batch and wants_variance:  # the ranks' gradients are the two-batch samples
            rest = tuple(q for q in options.quantities if q != "grad_variance")
            options = options.replace(quantities=rest or ("grad_norm",))
        with torch.enable_grad():
            report = estimate(
                self.module,
                self.loss_fn,
                _OneBatch(batch),
                groups=self.mapping,
                options=options,
                generator=self.generator,
                **self.runtime,
            )
        self._adopt(report)
        if not distributed:
            return report
        size = int(report.cost.examples)
        local_sq: dict[str, float] = {}
        global_sq: dict[str, float] = {}
        if wants_variance or "grad_norm" in options.quantities:
            names = [n for names in self.mapping.values() for n in names]
            grads = ddp.local_mean_gradient(self.module, self.loss_fn, batch, names, options.dtype)
            local_sq, global_sq = ddp.local_gradient_sq_norms(grads, self.mapping, size)
        samples = 1 if two_batch else samples_behind(report, size, options)
        return ddp.sync_report(report, local_sq, global_sq, size, samples, noise=wants_variance)

    # -- applying decisions -----------------------------------------------------------------
    def apply(self, decision: Any, report: Any, step: int) -> list[dict[str, Any]]:
        """Write ``decision.multipliers`` onto the groups; return the history rows."""
        groups = {g["name"]: g for g in self.optimizer.param_groups}
        multipliers = getattr(decision, "multipliers", None)
        if not isinstance(multipliers, Mapping):
            raise TypeError(
                f"controller returned {decision!r}; expected a Decision with multipliers"
            )
        checked = {}
        for name, m in multipliers.items():
            if name not in groups:
                raise ValueError(
                    f"controller returned a multiplier for group {name!r}, which the optimizer "
                    f"does not have (groups: {list(groups)})"
                )
            checked[name] = check_multiplier(f"multiplier of group {name!r}", m)
        rows = []
        reasons = getattr(decision, "reasons", {}) or {}
        for name, m in checked.items():
            group = groups[name]
            previous = group[MULTIPLIER_KEY]
            group[MULTIPLIER_KEY] = m
            row = _lr_row(group, step, previous)
            row.update(
                reason=reasons.get(name),
                fallback=bool(getattr(decision, "fallback", False)),
                event=getattr(decision, "event", None),
                skipped=False,
            )
            if report is not None and name in report:
                row.update(_estimate_row(report, name))
            rows.append(row)
        return rows

    def _skip_rows(self, step: int, reason: str) -> list[dict[str, Any]]:
        groups = [g for g in self.optimizer.param_groups if g["name"] in self.mapping]
        return skip_rows(groups, step, reason)

    def fall_back(self, reason: str, why: str, step: int) -> Recalibration:
        """The controller falls back to the uniform rate for ``why`` (its
        ``fall_back(why, step=...)``, where it has one) and every group of the mapping goes
        to multiplier 1 now; the rows are ``skipped`` with ``reason``, for a base step the
        engine skipped (:mod:`layerwise.engine.nonfinite`)."""
        decision = None
        fall_back = getattr(self.controller, "fall_back", None)
        if callable(fall_back):
            decision = fall_back(why, step=step)
        event = getattr(decision, "event", None) or f"fallback: {why}"
        groups = [g for g in self.optimizer.param_groups if g["name"] in self.mapping]
        previous = [g[MULTIPLIER_KEY] for g in groups]
        for group in groups:
            group[MULTIPLIER_KEY] = 1.0
        rows = skip_rows(groups, step, reason, event=event, fallback=True, previous=previous)
        return Recalibration(step, rows, decision, None)

    def observe_validation(self, value: Any, step: int) -> Recalibration | None:
        """Pass ``value`` (averaged over ranks under DDP) to the controller; a fallback it
        returns is applied at once."""
        from layerwise.engine import distributed as ddp

        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"value must be a scalar, got a tensor of shape {tuple(value.shape)}"
                )
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"value must be a real number, got {value!r}")
        value = float(value)
        if ddp.is_distributed():
            t = torch.tensor([value], dtype=torch.float64, device=ddp.comm_device())
            torch.distributed.all_reduce(t)
            value = float(t.item()) / torch.distributed.get_world_size()
        observe = getattr(self.controller, "observe_validation", None)
        if observe is None:
            raise TypeError(f"controller {self.controller!r} has no observe_validation method")
        decision = observe(value, step=step)
        if decision is None:
            return None
        return Recalibration(step, self.apply(decision, None, step), decision, None)

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data: ``{"controller": controller.state_dict(), "generator": the probe
        generator's state (uint8 tensor), "seed": int}``."""
        return {
            "controller": self.controller.state_dict(),
            "generator": self.generator.get_state(),
            "seed": self.seed,
        }

    def check_state_dict(self, state: Any) -> None:
        """``ValueError`` naming what in ``state`` does not fit this recalibrator (the
        controller's entry is checked by the controller's own ``load_state_dict``)."""
        where = "recalibrator state"
        if not isinstance(state, Mapping) or set(state) != {"controller", "generator", "seed"}:
            raise ValueError(
                f"{where} must have keys controller, generator, seed; got {state!r:.200}"
            )
        rng = state["generator"]
        current = self.generator.get_state()
        if (
            not isinstance(rng, torch.Tensor)
            or rng.dtype != torch.uint8
            or rng.shape != current.shape
        ):
            raise ValueError(
                f"{where}['generator'] must be a uint8 tensor of shape {tuple(current.shape)} "
                f"(torch.Generator.get_state()), got {rng!r:.80}"
            )
        try:
            check_int(f"{where}['seed']", state["seed"], minimum=0)
        except TypeError as err:
            raise ValueError(str(err)) from err

    def load_state_dict(self, state: Any) -> None:
        """Check ``state``, then load the controller (which checks its own entry first) and
        the generator; a bad state changes nothing."""
        self.check_state_dict(state)
        self.controller.load_state_dict(state["controller"])
        self.generator.set_state(state["generator"].clone())
        self.seed = int(state["seed"])


def skip_rows(
    groups: list[dict[str, Any]],
    step: int,
    reason: str,
    *,
    event: str | None = None,
    fallback: bool = False,
    previous: list[float] | None = None,
) -> list[dict[str, Any]]:
    """History rows for something the engine skipped, one per group of ``groups``, at their
    current multipliers (``previous``: the multipliers before, default the same)."""
    rows = []
    for i, group in enumerate(groups):
        row = _lr_row(group, step, group[MULTIPLIER_KEY] if previous is None else previous[i])
        row.update(reason=reason, fallback=fallback, event=event, skipped=True)
        rows.append(row)
    return rows


def _lr_row(group: Mapping[str, Any], step: int, previous: float) -> dict[str, Any]:
    lr = group["lr"]
    return {
        "step": step,
        "group": group["name"],
        "multiplier": group[MULTIPLIER_KEY],
        "previous_multiplier": previous,
        "base_lr": float(lr),
        "effective_lr": float(effective_lr(group)),
    }


def _estimate_row(report: Any, name: str) -> dict[str, Any]:
    est = report[name]
    row = {k: v for k, v in est.to_dict().items() if k != "group"}
    row["curvature"] = est.curvature
    row["ggn_curvature"] = est.ggn_curvature
    row["estimate_seconds"] = report.cost.seconds
    return row
