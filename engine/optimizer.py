"""``LayerwiseOptimizer``: any torch optimizer, with per-group multipliers from a controller.

The engine wraps the optimizer the user already has and delegates to it (``param_groups``,
``state``, ``defaults``, ``zero_grad``, hooks are the base optimizer's own). Its logic sits
around the base step:

1. multiply ``group["lr"]`` by ``group["lr_multiplier"]`` (groups at exactly 1 skipped),
   run the base step, restore the base rate bit for bit (:mod:`layerwise.engine.multipliers`);
2. count the step; after the ``s``-th step with ``s >= warmup_steps``,
   ``(s - warmup_steps) % recalibrate_every == 0`` and ``s > 0``, recalibrate
   (:mod:`layerwise.engine.recalibration`) at the parameters just updated, on the batch given to
   ``step(batch)`` or the next one of ``batches``; the new multipliers apply from the next
   step on; each recalibration is logged in :attr:`history` and passed to ``callback``.

Outside ``step()``, ``group["lr"]`` is the base rate owned by the user's torch scheduler,
so any ``LRScheduler`` composes unchanged, built on the engine or on the base optimizer:
per-group schedules and static factors are :class:`layerwise.policies.LayerwiseLR`'s, and
the rate of a step is ``initial_lr * factor * schedule(t) * multiplier``. The engine is a
``torch.optim.Optimizer`` by type only, so that torch schedulers accept it.

Non-finite gradients never reach the parameters. Before every base step the gradients of
the wrapped groups are checked (one fused pass, one host synchronisation; see
:mod:`layerwise.engine.nonfinite`); a NaN or an inf skips the step as ``GradScaler`` does
(nothing changes, the step is not counted), counts it (:attr:`nonfinite_steps`), logs it in
:attr:`history`, and sends the controller to its uniform fallback; ``max_nonfinite_steps``
skips in a row raise :class:`layerwise.engine.NonFiniteGradientError`. With a closure the
gradients are checked as the closure returns them, and a non-finite one stops the base step
there (before any update, for the optimizers that evaluate the closure first, as SGD and Adam
do).

A step skipped by ``torch.amp.GradScaler`` (infinite gradients) never reaches ``step()``:
it is not counted, and a recalibration that falls due is made at the next step taken, on
finite gradients. For base optimizers that handle scaling themselves (fused Adam/AdamW,
``_step_supports_amp_scaling``), the scaler's ``found_inf`` is forwarded, the scaler (not
the engine) skips, and a due recalibration is skipped when it is set; such a skip keeps the
multipliers and is logged in :attr:`history`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from layerwise.engine.batches import BatchSource
from layerwise.engine.callbacks import as_callback
from layerwise.engine.checkpoint import ENGINE_KEY, load_state, pack_state
from layerwise.engine.history import History
from layerwise.engine.multipliers import (
    MULTIPLIER_KEY,
    apply_multipliers,
    check_multiplier,
    effective_lr,
    restore_multipliers,
)
from layerwise.engine.naming import name_groups
from layerwise.engine.nonfinite import (
    DEFAULT_MAX_NONFINITE_STEPS,
    FiniteCheck,
    NonFiniteInClosure,
    NonFiniteSteps,
    checked_closure,
)
from layerwise.engine.recalibration import Recalibration, Recalibrator, skip_rows
from layerwise.policies.schedule_base import check_int

if TYPE_CHECKING:
    from layerwise.sensitivity import EstimateOptions

__all__ = ["LayerwiseOptimizer"]

#: Former keyword arguments and where their job went.
_LAYERWISE_LR = (
    "per-group schedules and factors are a torch scheduler now: build "
    "layerwise.policies.LayerwiseLR(opt, schedule, factors) on the engine (or on the base "
    "optimizer) and call its step() after each opt.step()"
)
_REMOVED = {
    "schedule": _LAYERWISE_LR,
    "factors": _LAYERWISE_LR,
    "history": "the history file is a callback now: pass "
    "callback=layerwise.experiments.history_file.HistoryFile(path) (opt.history keeps the "
    "rows in memory)",
}


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer``; apply and refresh per-group learning-rate multipliers.

    Args:
        optimizer: the base ``torch.optim.Optimizer`` (groups named by ``group["name"]``,
            ``"group{i}"`` by default).
        model, loss_fn: the model (DDP/compiled wrappers are unwrapped) and
            ``loss_fn(model, batch) -> mean loss``; required with a ``controller``.
        controller: a :class:`layerwise.policies.SensitivityController` (or a rule name such as
            ``"curvature"``, which builds one with default settings); ``None`` keeps every
            multiplier at 1 (or at the groups' own ``lr_multiplier``).
        recalibrate_every, warmup_steps: the recalibration interval and the steps before the
            first one (see the module docstring).
        batches: an iterable of estimation batches, drawn one per recalibration when
            ``step()`` gets no batch.
        estimator: the estimate's settings, a :class:`layerwise.sensitivity.EstimateOptions`
            (used as it is) or a dict of its fields (e.g. ``probes``, ``quantities``) over the
            engine's defaults (4 probes, the quantities the controller's rule declares),
            checked here; the engine owns ``groups``, ``generator`` and ``seed``
            (:func:`layerwise.engine.options.estimator_options`).
        callback: ``callback(record)`` with a :class:`layerwise.engine.Recalibration`
            (``step``, ``rows``, ``decision``, ``report``) after each recalibration and each
            skipped step, a TensorBoard ``SummaryWriter``, or a list of those
            (:mod:`layerwise.engine.callbacks`).
        seed: seed of the probe generator (the same on every rank under DDP).
        max_nonfinite_steps: int >= 1, how many steps in a row may have non-finite
            gradients (each skipped) before :class:`layerwise.engine.NonFiniteGradientError`
            (default :data:`layerwise.engine.nonfinite.DEFAULT_MAX_NONFINITE_STEPS` = 10).
        preflight: with a controller, check on the first batch seen (the first
            ``step(batch)``'s or the first of ``batches=``), before the first base step,
            that the estimate works for this model and these options: one small estimate
            (one probe, a few examples; :mod:`layerwise.engine.preflight`). Failing, it
            raises :class:`layerwise.engine.PreflightError` naming the module and the fix.
            A model that cannot be estimated at all (meta or inference tensors, integer
            parameters in the groups) is refused at construction whatever this says.
        check_finite: check the gradients before every base step and skip a step with a
            NaN or an inf (the default; :mod:`layerwise.engine.nonfinite`). ``False`` leaves
            the check out: a non-finite gradient then reaches the base optimizer, as it
            would without the engine, and ``max_nonfinite_steps`` is unused. The check is
            one pass over the gradients and one host synchronisation per step: +1.4-3.5% of
            a training step of the small MLP of
            ``python -m layerwise.experiments.benchmarks.engine`` on one CPU thread (85k
            parameters, a 1.7 ms step; 0.997-1.002 of the bare optimizer without it),
            below the noise (about 0.5%) on its CNN, less on larger models; on an
            accelerator the synchronisation makes the host wait for the device once per
            step, which costs most where the host only just keeps ahead of it. Steps that
            ``torch.amp.GradScaler`` checks are not affected either way.

    Removed: ``schedule=`` and ``factors=`` (use :class:`layerwise.policies.LayerwiseLR`),
    ``history=`` (use ``callback=HistoryFile(path)`` from ``layerwise.experiments``); each
    raises a ``TypeError`` saying so.

    >>> net = nn.Linear(2, 1)
    >>> base = torch.optim.SGD([{"params": net.parameters(), "name": "fc"}], lr=0.1)
    >>> opt = LayerwiseOptimizer(base)
    >>> base.param_groups[0]["lr_multiplier"] = 0.5  # as a recalibration would set it
    >>> net(torch.ones(1, 2)).sum().backward()
    >>> opt.step()
    >>> base.param_groups[0]["lr"], opt.get_last_lr()
    (0.1, {'fc': 0.05})

    Typical use: ``LayerwiseOptimizer(base, model=net, loss_fn=loss_fn,
    controller=SensitivityController("curvature"))`` and ``opt.step(batch)`` in the loop.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        model: nn.Module | None = None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        controller: Any = None,
        recalibrate_every: int = 100,
        warmup_steps: int = 0,
        batches: Iterable[Any] | None = None,
        estimator: EstimateOptions | Mapping[str, Any] | None = None,
        callback: Any = None,
        seed: int = 0,
        max_nonfinite_steps: int = DEFAULT_MAX_NONFINITE_STEPS,
        preflight: bool = True,
        check_finite: bool = True,
        **removed: Any,
    ) -> None:
        for key in removed:
            if key in _REMOVED:
                raise TypeError(f"LayerwiseOptimizer: {key}= was removed; {_REMOVED[key]}")
            raise TypeError(f"LayerwiseOptimizer got an unexpected keyword argument {key!r}")
        if isinstance(optimizer, LayerwiseOptimizer):
            raise TypeError("optimizer is already a LayerwiseOptimizer; wrap the base optimizer")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {optimizer!r} "
                f"({type(optimizer).__name__})"
            )
        self.base = optimizer
        self.recalibrate_every = check_int("recalibrate_every", recalibrate_every, minimum=1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        check_int("seed", seed, minimum=0)
        if not isinstance(preflight, bool):
            raise TypeError(f"preflight must be a bool, got {preflight!r}")
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
        nonfinite = NonFiniteSteps(max_nonfinite_steps)
        # Everything is checked before anything is written into the user's optimizer.
        self._names = name_groups(optimizer.param_groups, assign=False)
        multipliers = [
            check_multiplier(f"param_groups[{i}]['{MULTIPLIER_KEY}']", g.get(MULTIPLIER_KEY, 1.0))
            for i, g in enumerate(optimizer.param_groups)
        ]
        self._recalibrator = (
            None
            if controller is None
            else Recalibrator(optimizer, model, loss_fn, controller, estimator, seed)
        )
        self._source = None if batches is None else BatchSource(batches)
        self._callback = as_callback(callback, lrs=self.get_last_lr)
        name_groups(optimizer.param_groups)
        for group, m in zip(optimizer.param_groups, multipliers, strict=True):
            group[MULTIPLIER_KEY] = m
        self._history = History()
        self._nonfinite = nonfinite
        self._check = FiniteCheck() if check_finite else None
        self._step = 0
        self._backups: dict[int, torch.Tensor] = {}
        self._preflight_pending = preflight and self._recalibrator is not None
        self._peek = True  # the first batch may be peeked from batches=

    # -- delegation -------------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.base.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.base.defaults

    @property
    def _step_supports_amp_scaling(self) -> bool:
        return bool(getattr(self.base, "_step_supports_amp_scaling", False))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def register_step_pre_hook(self, hook: Callable[..., Any]) -> Any:
        return self.base.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> Any:
        return self.base.register_step_post_hook(hook)

    def register_state_dict_pre_hook(self, hook: Callable[..., Any], prepend: bool = False) -> Any:
        return self.base.register_state_dict_pre_hook(hook, prepend)

    def register_state_dict_post_hook(self, hook: Callable[..., Any], prepend: bool = False) -> Any:
        return self.base.register_state_dict_post_hook(hook, prepend)

    def register_load_state_dict_pre_hook(
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> Any:
        return self.base.register_load_state_dict_pre_hook(hook, prepend)

    def register_load_state_dict_post_hook(
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> Any:
        return self.base.register_load_state_dict_post_hook(hook, prepend)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        every = self.recalibrate_every
        return f"LayerwiseOptimizer(recalibrate_every={every}, base={self.base!r})"

    # -- the step -----------------------------------------------------------------------
    def step(self, batch: Any = None, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One base step at the effective rates; then recalibrate when due.

        ``batch`` is the estimation batch for a recalibration due after this step (any
        other step ignores it; it takes precedence over ``batches=``). A callable passed
        positionally is taken as the closure, as ``optimizer.step(closure)`` is written for
        torch optimizers. Hooks registered on the base optimizer see the effective rates.
        """
        if closure is None and callable(batch):
            batch, closure = None, batch
        if self._preflight_pending:
            self._check_first_batch(batch)
        found_inf = self.__dict__.get("found_inf")
        nonfinite = None
        check = self._check
        if found_inf is None:  # else GradScaler checked the gradients and skips for us
            if check is None:  # check_finite=False: the base optimizer sees what it is given
                pass
            elif closure is None:
                nonfinite = check(self.base.param_groups)
                if nonfinite is not None:
                    return self._skip(nonfinite)
            else:
                closure = checked_closure(closure, self.base.param_groups, check)
        else:  # forwarded from GradScaler for fused base optimizers
            self.base.grad_scale = self.__dict__.get("grad_scale")  # type: ignore[attr-defined]
            self.base.found_inf = found_inf  # type: ignore[attr-defined]
        saved = apply_multipliers(self.base.param_groups, self._backups)
        try:
            loss = self.base.step() if closure is None else self.base.step(closure)
        except NonFiniteInClosure as stop:
            nonfinite = stop.groups
        finally:
            restore_multipliers(saved)
            if found_inf is not None:
                del self.base.grad_scale, self.base.found_inf  # type: ignore[attr-defined]
        if nonfinite is not None:
            return self._skip(nonfinite)
        if found_inf is None:
            self._nonfinite.taken()
        self._step += 1
        if self._recalibrator is not None and self._due(self._step):
            self._recalibrate(batch, found_inf)
        return loss

    def _skip(self, groups: list[int]) -> None:
        """Account for a step skipped on non-finite gradients in ``groups`` (indices; empty:
        on another rank): count, fall back, log; raise when too many came in a row."""
        counts = self._nonfinite
        counts.skipped()
        names = [self._names[i] for i in groups]
        why = counts.why(names, self._step)
        reason = f"skipped: {why}; base step skipped"
        if self._recalibrator is not None:
            record = self._recalibrator.fall_back(reason, why, self._step)
        else:
            rows = skip_rows(self.base.param_groups, self._step, reason,
                             event=f"{why}: base step skipped")  # fmt: skip
            record = Recalibration(self._step, rows, None, None)
        self._log(record)
        if counts.exhausted:
            raise counts.error(names, self._step, self.get_last_lr())

    def _check_first_batch(self, batch: Any) -> None:
        """The dry run on the first batch seen (:mod:`layerwise.engine.preflight`), before
        the base step; deferred while there is none (no ``batch``, no ``batches=``)."""
        assert self._recalibrator is not None
        if batch is None and self._source is not None and self._peek:
            try:
                batch = self._source.peek()
            except Exception:  # not yet (a trainer's current batch): wait for step(batch)
                self._peek = False
        if batch is None:
            return
        self._preflight_pending = False
        first = self.warmup_steps or self.recalibrate_every
        self._recalibrator.preflight(batch, self._step, first)

    def _due(self, s: int) -> bool:
        return s >= self.warmup_steps and (s - self.warmup_steps) % self.recalibrate_every == 0

    def _recalibrate(self, batch: Any, found_inf: torch.Tensor | None) -> None:
        assert self._recalibrator is not None
        if batch is None:
            if self._source is None:
                raise ValueError(
                    f"batch: a recalibration is due after step {self._step} but step() got no "
                    "batch and no batches= iterable was given; call step(batch)"
                )
            batch = self._source.next()
        self._log(self._recalibrator.run(batch, self._step, found_inf))

    def _log(self, record: Recalibration) -> None:
        """Add ``record``'s rows to the history, then pass it (rows as stored) to the callback."""
        record = record._replace(rows=self._history.record(record.rows))
        if self._callback is not None:
            self._callback(record)

    # -- groups ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer; it starts at multiplier 1 (or the one it
        carries) and joins the recalibrations under its name."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {param_group!r}")
        multiplier = check_multiplier(
            f"param_group['{MULTIPLIER_KEY}']", param_group.get(MULTIPLIER_KEY, 1.0)
        )
        groups = self.base.param_groups
        self.base.add_param_group(param_group)
        try:
            self._names = name_groups(groups, start=len(groups) - 1)
            groups[-1][MULTIPLIER_KEY] = multiplier
            if self._recalibrator is not None:
                self._recalibrator.refresh_mapping()
        except Exception:
            added = groups.pop()
            for p in added["params"]:
                self.base.state.pop(p, None)
            self._names = [g["name"] for g in groups]
            raise

    # -- read-outs ------------------------------------------------------------------------
    @property
    def group_names(self) -> list[str]:
        return list(self._names)

    @property
    def multipliers(self) -> dict[str, float]:
        """``{group name: multiplier}`` currently applied."""
        return {g["name"]: g[MULTIPLIER_KEY] for g in self.base.param_groups}

    def get_last_lr(self) -> dict[str, Any]:
        """``{group name: effective rate}`` = base rate x multiplier, the rate of the next
        step (a float, or a new tensor for a tensor rate)."""
        return {g["name"]: effective_lr(g) for g in self.base.param_groups}

    @property
    def history(self) -> Any:
        """Every recalibration as a ``pandas.DataFrame`` (see :mod:`layerwise.engine.history`)."""
        return self._history.frame

    @property
    def steps(self) -> int:
        """Optimizer steps taken through the engine (skipped ones not counted)."""
        return self._step

    @property
    def nonfinite_steps(self) -> int:
        """Steps skipped on non-finite gradients over the run (checkpointed)."""
        return self._nonfinite.total

    @property
    def controller(self) -> Any:
        return None if self._recalibrator is None else self._recalibrator.controller

    def observe_validation(self, value: Any) -> None:
        """Pass a validation metric to the controller (a no-op without a controller).

        Under DDP every rank must call it; the value is averaged over the ranks first. A
        fallback the controller returns (all multipliers 1) takes effect at once, is logged,
        and reaches the callback with ``report=None``.
        """
        if self._recalibrator is None:
            return
        record = self._recalibrator.observe_validation(value, self._step)
        if record is not None:
            self._log(record)

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (groups carry ``name`` and ``lr_multiplier``)
        plus the engine's state under the key ``"layerwise"``, composed from its
        components' state dicts (see :mod:`layerwise.engine.checkpoint`)."""
        state = self.base.state_dict()
        state[ENGINE_KEY] = pack_state(
            step=self._step, names=self._names, base=self.base, **self._parts()
        )
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Validate and load a :meth:`state_dict`; on error nothing is changed.

        Checked first: the engine's entries, and that the checkpoint fits the wrapped
        optimizer (its class, the groups, each parameter's shape, the per-parameter state
        keys; :mod:`layerwise.engine.base_state`). Each mismatch is a ``ValueError`` naming
        it. A checkpoint of an older format is refused with its version named
        (:mod:`layerwise.engine.checkpoint`)."""
        self._step = load_state(state_dict, base=self.base, names=self._names, **self._parts())
        if self._recalibrator is not None:
            self._recalibrator.refresh_mapping()

    def _parts(self) -> dict[str, Any]:
        settings = {
            "recalibrate_every": self.recalibrate_every,
            "warmup_steps": self.warmup_steps,
            "max_nonfinite_steps": self._nonfinite.limit,
        }
        return {
            "settings": settings,
            "recalibrator": self._recalibrator,
            "batches": self._source,
            "history": self._history,
            "nonfinite": self._nonfinite,
        }
