"""Non-finite gradients never reach the parameters: the check before every base step.

Before each base step (:meth:`layerwise.engine.LayerwiseOptimizer.step`) the engine checks
the gradients of every parameter of the wrapped groups. Any NaN or infinity, and the step is
skipped as ``torch.amp.GradScaler`` skips one: the base optimizer is not called, so the
parameters and its state (moments, step counts) stay as they were, and the engine's step
count does not advance (a recalibration that falls due is made after the next step taken).
The engine counts the skip (:class:`NonFiniteSteps`, checkpointed), records it in its
history (one row per group, ``skipped`` true, with the reason and an event), and lets the
controller fall back to the uniform rate; after ``limit`` consecutive skips it raises
:class:`NonFiniteGradientError`, since skipping cannot help a run whose parameters make
every batch's gradient non-finite.

**The check** (:class:`FiniteCheck`, one per engine; :func:`nonfinite_groups` makes a
fresh one) is ``GradScaler``'s own: ``torch._amp_foreach_non_finite_check_and_unscale_`` at
scale 1, one fused call over every gradient of a device, which sets a one-element
``found_inf`` tensor when any element is a NaN or an inf (exactly: no sum that could
overflow on large finite values) and writes every value back unchanged (``x * 1 == x`` bit
for bit, signed zeros and subnormals included). The flags of the devices are summed on the
device, and the step reads one value on the host (``bool(found_inf)``), its one
synchronisation; which groups hold the culprit is read parameter by parameter only when a
step is skipped. Under DDP the flag is summed over the ranks by one ``all_reduce`` before
that read, so every rank skips the same steps.

**Cost**: one pass over the gradients and one host synchronisation per step, and no fixed
cost beyond them: :class:`FiniteCheck` reuses its flag tensors, hands the fused op one flat
list (no per-parameter bucketing in Python, no ``torch.no_grad()`` context; about 20 us on
the 85k gradients of the benchmark's MLP, where the former per-step version took about 33
us and the bare op about 15 us). On CPU this op is the fastest exact single pass found:
``torch._foreach_norm(..., 1 or 2)`` runs there as one unfused norm per tensor (about 120
us), per-tensor ``sum`` (an exact screen: a non-finite element makes the sum non-finite)
pays one dispatch per tensor and measured slower inside a step, ``isfinite().all()``
allocates a mask per tensor. Inside a training step the pass costs more than on its own,
and more the more the machine is loaded: 24-37 us on that MLP with Adam in quiet runs,
up to 73 us under load (+1.4-3.5% of a 1.7-2.1 ms step; one read of every gradient, the
floor of any exact check, takes about 7 us); on the benchmark's CNN (an 18 ms step) it is
below the run-to-run noise of about 0.5%;
``python -m layerwise.experiments.benchmarks.engine`` prints these figures. A model so small
that this shows can turn the check off: ``LayerwiseOptimizer(..., check_finite=False)``.

A step that ``torch.amp.GradScaler`` forwards its ``found_inf`` to (fused base optimizers) is
the scaler's to skip: it is not checked here (no extra synchronisation) and not counted.
Without a scaler the engine does not hand its own flag to a fused base optimizer (which
would skip on the device with no synchronisation): the step count, the due recalibration,
the skip's history row, the controller's fallback and ``max_nonfinite_steps`` all need the
verdict on the host at that step, and reading it a step later would count and schedule
steps that did not happen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from layerwise.engine import distributed as ddp
from layerwise.policies.schedule_base import check_int

__all__ = [
    "DEFAULT_MAX_NONFINITE_STEPS",
    "FiniteCheck",
    "NonFiniteGradientError",
    "NonFiniteInClosure",
    "NonFiniteSteps",
    "checked_closure",
    "nonfinite_groups",
]

#: Consecutive skipped steps before :class:`NonFiniteGradientError`: enough to ride out a
#: few bad batches, few enough that a run whose parameters produce non-finite gradients on
#: every batch stops within seconds instead of idling to its end.
DEFAULT_MAX_NONFINITE_STEPS = 10


class NonFiniteGradientError(RuntimeError):
    """Raised after ``max_nonfinite_steps`` consecutive steps with non-finite gradients."""


class NonFiniteInClosure(Exception):
    """Stops a base step whose closure produced non-finite gradients (the engine catches it)."""

    def __init__(self, groups: list[int]) -> None:
        super().__init__(groups)
        self.groups = groups


def checked_closure(
    closure: Callable[[], Any], param_groups: Sequence[Mapping[str, Any]], check: FiniteCheck
) -> Callable[[], Any]:
    """``closure``, whose gradients are checked by ``check`` each time it returns: non-finite
    ones raise :class:`NonFiniteInClosure` with the groups' indices, which stops the base
    step."""

    def checked() -> Any:
        loss = closure()
        bad = check(param_groups)
        if bad is not None:
            raise NonFiniteInClosure(bad)
        return loss

    return checked


class FiniteCheck:
    """The check of :func:`nonfinite_groups` with its fixed per-step cost cut (module
    docstring, **Cost**): the flag and scale tensors are made once per device and reused
    (a flag is only ever set by the check, so it is zeroed only after a step it flagged);
    the gradients go to the fused op as one flat list (the op takes mixed dtypes, on one
    device), with no per-parameter bucketing in Python and no ``torch.no_grad()`` context
    (grad mode is switched off directly, and only when on). Where the one list is refused
    (parameters on several devices, a sparse gradient), that step and every later one go
    the general way, one call per device and dtype with sparse gradients checked by their
    values, as :func:`nonfinite_groups` always did; the op at scale 1 is idempotent, so the
    repeat changes no value. The verdict is exactly :func:`nonfinite_groups`'s.
    """

    def __init__(self) -> None:
        self._flags: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._general = False

    def _flag(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        flags = self._flags.get(device)
        if flags is None:  # (found_inf, scale 1), made once per device
            flags = (
                torch.zeros(1, dtype=torch.float32, device=device),
                torch.ones(1, dtype=torch.float32, device=device),
            )
            self._flags[device] = flags
        return flags

    def _run(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """GradScaler's own check at scale 1 over ``grads`` (every value written back
        unchanged); the found-inf flags it wrote to."""
        if not self._general:
            flags = self._flag(grads[0].device)
            try:
                torch._amp_foreach_non_finite_check_and_unscale_(grads, *flags)
                return [flags[0]]
            except (RuntimeError, NotImplementedError):  # several devices, a sparse gradient
                self._general = True
        buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for g in grads:
            g = g._values() if g.is_sparse else g
            buckets.setdefault((g.device, g.dtype), []).append(g)
        used: dict[torch.device, torch.Tensor] = {}
        for (device, _), bucket in buckets.items():
            flags = self._flag(device)
            torch._amp_foreach_non_finite_check_and_unscale_(bucket, *flags)
            used[device] = flags[0]
        return list(used.values())

    def __call__(self, param_groups: Sequence[Mapping[str, Any]]) -> list[int] | None:
        """``None`` when every gradient is finite; else the indices of the groups holding a
        parameter whose gradient has a NaN or an inf (``[]`` when only another DDP rank's
        do). One fused check (per device) and one host synchronisation (module docstring);
        a sparse gradient is checked by its values."""
        grads = [p.grad for group in param_groups for p in group["params"] if p.grad is not None]
        distributed = ddp.is_distributed()
        if not grads and not distributed:
            return None
        flags = []
        if grads:
            grad_mode = torch.is_grad_enabled()
            if grad_mode:  # so that a create_graph=True gradient does not record the check
                torch._C._set_grad_enabled(False)
            try:
                flags = self._run(grads)
            finally:
                if grad_mode:
                    torch._C._set_grad_enabled(True)
        if distributed:
            comm = ddp.comm_device()
            flags = [f.to(comm) for f in flags] or [torch.zeros(1, device=comm)]
        total = flags[0] if len(flags) == 1 else sum(f.to(flags[0].device) for f in flags)
        if distributed:
            torch.distributed.all_reduce(total)
        if not bool(total):  # the one host synchronisation
            return None
        for found, _ in self._flags.values():  # set only now: cleared for the next step
            found.zero_()
        return [
            i
            for i, group in enumerate(param_groups)
            if any(p.grad is not None and not _finite(p.grad) for p in group["params"])
        ]


def nonfinite_groups(param_groups: Sequence[Mapping[str, Any]]) -> list[int] | None:
    """``None`` when every gradient is finite; else the indices of the groups holding a
    parameter whose gradient has a NaN or an inf (``[]`` when only another DDP rank's do).
    One fused check per device and one host synchronisation (module docstring); a sparse
    gradient is checked by its values. The engine keeps a :class:`FiniteCheck`, which
    reuses its flag tensors across steps; this makes a fresh one."""
    return FiniteCheck()(param_groups)


def _finite(grad: torch.Tensor) -> bool:
    values = grad._values() if grad.is_sparse else grad
    return bool(values.isfinite().all())


@dataclass
class NonFiniteSteps:
    """The count of skipped steps: ``total`` over the run and ``consecutive`` (reset by a
    step taken); ``limit`` consecutive ones raise :class:`NonFiniteGradientError`."""

    limit: int
    total: int = 0
    consecutive: int = 0

    def __post_init__(self) -> None:
        self.limit = check_int("max_nonfinite_steps", self.limit, minimum=1)

    def skipped(self) -> None:
        self.total += 1
        self.consecutive += 1

    def taken(self) -> None:
        self.consecutive = 0

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.limit

    def why(self, groups: list[str], step: int) -> str:
        """The reason of the latest skip: where (``groups``' names, none: another rank),
        after which step, and the counts."""
        return (
            f"non-finite gradients in {_where(groups)} after step {step} "
            f"({self.consecutive} in a row, {self.total} in all)"
        )

    def error(
        self, groups: list[str], step: int, rates: Mapping[str, Any]
    ) -> NonFiniteGradientError:
        """The error once :attr:`exhausted`, saying what happened (the latest skip in
        ``groups``, after ``step``) and what to check (``rates``: the groups' effective
        learning rates)."""
        shown = {k: f"{float(v):.3g}" for k, v in rates.items()}
        return NonFiniteGradientError(
            f"{self.consecutive} steps in a row had non-finite gradients (the last in "
            f"{_where(groups)}); each was skipped, so the parameters are still those after step "
            f"{step}. Check the learning rates (now "
            f"{shown}), the loss (a log of 0, a division by 0), the data (NaN or inf in a "
            "batch) and float16 training without torch.amp.GradScaler; max_nonfinite_steps="
            f"{self.limit} is how many skips in a row are tolerated"
        )

    def state_dict(self) -> dict[str, int]:
        """Plain data: ``{"total": int, "consecutive": int}``."""
        return {"total": self.total, "consecutive": self.consecutive}

    @staticmethod
    def check_state_dict(state: Any) -> dict[str, int]:
        """The counts of a :meth:`state_dict`, or a ``ValueError`` naming what is wrong."""
        where = "nonfinite state"
        if not isinstance(state, Mapping) or set(state) != {"total", "consecutive"}:
            raise ValueError(f"{where} must have the keys total, consecutive; got {state!r:.80}")
        out = {}
        for key in ("total", "consecutive"):
            try:
                out[key] = check_int(f"{where}[{key!r}]", state[key], minimum=0)
            except TypeError as err:
                raise ValueError(str(err)) from err
        if out["consecutive"] > out["total"]:
            raise ValueError(f"{where}: consecutive {out['consecutive']} > total {out['total']}")
        return out

    def load_state_dict(self, state: Any) -> None:
        counts = self.check_state_dict(state)
        self.total, self.consecutive = counts["total"], counts["consecutive"]


def _where(groups: list[str]) -> str:
    return f"group(s) {', '.join(groups)}" if groups else "another rank"
