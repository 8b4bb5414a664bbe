"""What the trainer callbacks share: settings, the wrapped optimizer, the current batch.

:class:`layerwise.engine.lightning.LayerwiseCallback` and
:class:`layerwise.engine.huggingface.LayerwiseCallback` do no step logic of their own. Each
takes the optimizer the trainer built (from the user's ``configure_optimizers``, the
Trainer's ``create_optimizer`` or ``optimizers=(opt, sched)``), wraps it in a
:class:`layerwise.engine.LayerwiseOptimizer` made from the callback's :class:`EngineSettings`,
and puts the wrapper where the trainer calls ``step()``. Everything the engine does (the
multipliers applied during the step only, the non-finite check, recalibration, DDP pooling,
history, checkpoint state) is then the engine's own. The user's scheduler keeps the base
optimizer, whose groups the wrapper shares, so each group's ``lr`` stays what it sets.

The batch a recalibration estimates on is the one the trainer is training on, kept by the
callback in a :class:`CurrentBatch` (handed to the engine as its ``batches=`` iterable).

>>> settings = EngineSettings("curvature", lambda model, batch: model(batch).sum())
>>> settings.recalibrate_every, settings.warmup_steps
(100, 0)
>>> current = CurrentBatch("the trainer")
>>> current.batch = [1, 2]
>>> next(iter(current))
[1, 2]
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import Any

import torch
from torch import nn

from layerwise.engine.multipliers import MULTIPLIER_KEY
from layerwise.engine.nonfinite import DEFAULT_MAX_NONFINITE_STEPS
from layerwise.engine.optimizer import LayerwiseOptimizer
from layerwise.engine.options import estimator_options, make_controller
from layerwise.policies.schedule_base import check_int

__all__ = [
    "LOG_PREFIX",
    "CurrentBatch",
    "EngineSettings",
    "MissingExtraError",
    "UnsupportedSetupError",
    "multiplier_logs",
    "require_extra",
]

#: Logged keys are ``f"{LOG_PREFIX}/{group name}"`` (as :class:`layerwise.engine.ScalarLogger`
#: names its multiplier tags).
LOG_PREFIX = "layerwise/multiplier"


class MissingExtraError(ImportError):
    """An optional dependency of a trainer integration is not installed; the message is one
    line naming the extra."""


class UnsupportedSetupError(ValueError):
    """A trainer set-up the callback cannot steer (several optimizers, DeepSpeed...); the
    message names it and what to do instead."""


def require_extra(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``extra``.

    >>> require_extra("no_such_module_xyz", "lightning")
    Traceback (most recent call last):
    ...
    layerwise.engine.trainer_support.MissingExtraError: no_such_module_xyz is not installed \
(extra 'lightning'): pip install 'layerwise-lr[lightning]'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if getattr(exc, "name", None) and exc.name.split(".")[0] != module.split(".")[0]:
            raise  # the package is there; something inside it failed to import
        top = module.split(".")[0]
        raise MissingExtraError(
            f"{top} is not installed (extra {extra!r}): pip install 'layerwise-lr[{extra}]'",
            name=top,
        ) from exc


class CurrentBatch:
    """A re-iterable that yields the trainer's current batch, forever.

    The callback sets :attr:`batch` from the trainer's hooks; the engine, given this object
    as ``batches=``, draws from it when a recalibration falls due (its draw count, saved in
    the engine's checkpoint, is replayed harmlessly after a resume).
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.batch: Any = None

    def __iter__(self) -> Iterator[Any]:
        while True:
            if self.batch is None:
                raise ValueError(
                    f"batch: a recalibration is due but {self.where} has not given the callback "
                    "a training batch yet"
                )
            yield self.batch


class EngineSettings:
    """The engine's arguments a trainer callback takes, checked at construction.

    ``controller`` a :class:`layerwise.policies.SensitivityController` or a rule name;
    ``loss_fn(model, batch)`` or ``None`` (the callback's default loss); the rest as in
    :class:`layerwise.engine.LayerwiseOptimizer`.
    """

    def __init__(
        self,
        controller: Any,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        *,
        recalibrate_every: int = 100,
        warmup_steps: int = 0,
        estimator: Any = None,
        callback: Any = None,
        seed: int = 0,
        max_nonfinite_steps: int = DEFAULT_MAX_NONFINITE_STEPS,
        check_finite: bool = True,
    ) -> None:
        if controller is None:
            raise ValueError(
                "controller must be a SensitivityController or a rule name such as "
                "'curvature', got None (without one the callback would change nothing)"
            )
        self.controller = make_controller(controller)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
        self.loss_fn = loss_fn
        self.recalibrate_every = check_int("recalibrate_every", recalibrate_every, minimum=1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        # refused now, not when the fit starts
        estimator_options(estimator, self.controller, loss_fn)
        self.estimator = estimator
        self.callback = callback
        self.seed = check_int("seed", seed, minimum=0)
        self.max_nonfinite_steps = check_int("max_nonfinite_steps", max_nonfinite_steps, minimum=1)
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
        self.check_finite = check_finite

    def wrap(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        batches: CurrentBatch,
    ) -> LayerwiseOptimizer:
        """A :class:`LayerwiseOptimizer` around ``optimizer`` with these settings."""
        return LayerwiseOptimizer(
            optimizer,
            model=model,
            loss_fn=loss_fn,
            controller=self.controller,
            recalibrate_every=self.recalibrate_every,
            warmup_steps=self.warmup_steps,
            batches=batches,
            estimator=self.estimator,
            callback=self.callback,
            seed=self.seed,
            max_nonfinite_steps=self.max_nonfinite_steps,
            check_finite=self.check_finite,
        )


def multiplier_logs(engine: LayerwiseOptimizer) -> dict[str, float]:
    """``{"layerwise/multiplier/<group>": multiplier}`` for a trainer's logger.

    >>> net = nn.Linear(2, 1)
    >>> opt = LayerwiseOptimizer(torch.optim.SGD([{"params": net.parameters(), "name": "fc"}]))
    >>> multiplier_logs(opt)
    {'layerwise/multiplier/fc': 1.0}
    """
    return {f"{LOG_PREFIX}/{g['name']}": float(g[MULTIPLIER_KEY]) for g in engine.param_groups}


def loss_of(output: Any, where: str) -> torch.Tensor:
    """The loss in a model's or a training step's output: a tensor as it is, else the
    ``"loss"`` entry of a mapping or the ``.loss`` attribute (Hugging Face outputs).

    >>> float(loss_of({"loss": torch.tensor(2.0)}, "training_step"))
    2.0
    """
    if isinstance(output, torch.Tensor):
        loss = output
    elif isinstance(output, Mapping):
        loss = output.get("loss")
    else:
        loss = getattr(output, "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(
            f"loss_fn: {where} gave no scalar loss (got {type(output).__name__}, loss "
            f"{loss!r:.60}); pass loss_fn=lambda model, batch: ... to the callback"
        )
    return loss.reshape(())
