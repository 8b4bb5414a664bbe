"""Lightning: ``LayerwiseCallback``, layer-wise multipliers on the optimizer of
``configure_optimizers``, with no glue.

``Trainer(callbacks=[LayerwiseCallback("curvature")])`` is all it takes. When the fit
starts (``on_fit_start``, after Lightning has built the optimizer and the schedulers and
before it restores a checkpoint), the callback wraps the one optimizer
``configure_optimizers`` returned in a :class:`layerwise.engine.LayerwiseOptimizer` and hands
the wrapper to the strategy, so every ``optimizer.step(closure)`` Lightning makes runs the
engine's step: the multipliers applied during the base step only, the non-finite check,
the recalibration when due. The user's schedulers stay bound to their optimizer, whose
groups the wrapper shares: outside the step each group's ``lr`` is what the scheduler set.
Checkpoints hold the engine's state (the wrapper's ``state_dict``), and
``fit(ckpt_path=...)`` restores it into the wrapper.

**The loss.** ``loss_fn(model, batch)`` as everywhere in the library, with ``model`` the
LightningModule. The default (``loss_fn=None``) is the module's own ``training_step(batch,
batch_idx)``: its tensor, or the ``"loss"`` entry of its dict, with ``self.log`` and
``self.log_dict`` silenced while the estimator evaluates it. That is the loss training
minimises, so it is what users expect; pass ``loss_fn`` when ``training_step`` does more
than compute a loss (metrics with ``.item()``, side effects) or cannot be differentiated
twice.

**The batch** of a recalibration is the training batch of the step it follows (as
``on_train_batch_start`` received it, on the device).

**Set-ups.** Steps count optimizer steps (``trainer.global_step``), recalibrations after
``warmup_steps`` and every ``recalibrate_every`` of them.

- Gradient accumulation (``accumulate_grad_batches=k``): supported; the optimizer steps
  every k batches and a recalibration estimates on the last micro-batch of the window.
- Manual optimisation (``automatic_optimization = False``): supported with an explicit
  ``loss_fn`` (``training_step`` then steps the optimizer itself and is no loss);
  ``self.optimizers()`` returns the wrapper, and each ``opt.step()`` is one engine step.
- Several optimizers: refused (:class:`UnsupportedSetupError`); one controller steers one
  optimizer.
- DDP (``strategy="ddp"``, ``"ddp_spawn"``): the engine pools the ranks' estimates, so the
  multipliers are identical on every rank. Under ``"ddp_spawn"`` the engine lives in the
  spawned processes: read :attr:`LayerwiseCallback.history` there (e.g. in ``on_fit_end``),
  not in the launching process. DeepSpeed and FSDP shard the parameters and are refused.

**Logging.** After each optimizer step the multipliers go to the module's logger as
``layerwise/multiplier/<group>`` (``pl_module.log_dict``, per step).

>>> from layerwise.engine.lightning import LayerwiseCallback
>>> LayerwiseCallback("curvature", recalibrate_every=50)
LayerwiseCallback(recalibrate_every=50, warmup_steps=0)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from layerwise.engine.history import History
from layerwise.engine.nonfinite import DEFAULT_MAX_NONFINITE_STEPS
from layerwise.engine.optimizer import LayerwiseOptimizer
from layerwise.engine.trainer_support import (
    CurrentBatch,
    EngineSettings,
    UnsupportedSetupError,
    loss_of,
    multiplier_logs,
    require_extra,
)

pl = require_extra("lightning.pytorch", "lightning")

__all__ = ["LayerwiseCallback", "UnsupportedSetupError"]

#: Strategies whose optimizer or parameters the engine cannot steer (class-name fragments).
_REFUSED_STRATEGIES = ("DeepSpeed", "FSDP", "ModelParallel", "XLA")


class LayerwiseCallback(pl.Callback):
    """Steer the optimizer of ``configure_optimizers`` with per-group multipliers.

    Args:
        controller: a :class:`layerwise.policies.SensitivityController` or a rule name
            (``"curvature"``, ...).
        loss_fn: ``loss_fn(model, batch) -> mean loss`` for the estimates; ``None``: the
            module's ``training_step`` loss (see the module docstring).
        recalibrate_every, warmup_steps, estimator, callback, seed, max_nonfinite_steps,
        check_finite: as for :class:`layerwise.engine.LayerwiseOptimizer`.

    After (or during) the fit: :attr:`history` (the engine's decisions),
    :attr:`multipliers`, :attr:`engine` (the wrapper).
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
        super().__init__()
        self.settings = EngineSettings(
            controller,
            loss_fn,
            recalibrate_every=recalibrate_every,
            warmup_steps=warmup_steps,
            estimator=estimator,
            callback=callback,
            seed=seed,
            max_nonfinite_steps=max_nonfinite_steps,
            check_finite=check_finite,
        )
        self.engine: LayerwiseOptimizer | None = None
        self._current = CurrentBatch("the Lightning Trainer")
        self._batch_idx = 0
        self._logged_step = -1

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"LayerwiseCallback(recalibrate_every={s.recalibrate_every}, "
            f"warmup_steps={s.warmup_steps})"
        )

    # -- read-outs --------------------------------------------------------------------------
    @property
    def history(self) -> Any:
        """The engine's decisions as a ``pandas.DataFrame`` (empty before the fit)."""
        return History().frame if self.engine is None else self.engine.history

    @property
    def multipliers(self) -> dict[str, float]:
        """``{group name: multiplier}`` now (empty before the fit)."""
        return {} if self.engine is None else self.engine.multipliers

    # -- hooks ------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        strategy = type(trainer.strategy).__name__
        if any(part in strategy for part in _REFUSED_STRATEGIES):
            raise UnsupportedSetupError(
                f"strategy: LayerwiseCallback cannot steer {strategy}, which shards the "
                "parameters or owns the optimizer step; use a single device or DDP"
            )
        optimizers = list(trainer.strategy.optimizers)
        if len(optimizers) != 1:
            raise UnsupportedSetupError(
                f"configure_optimizers: LayerwiseCallback steers exactly one optimizer, got "
                f"{len(optimizers)} ({', '.join(type(o).__name__ for o in optimizers) or 'none'});"
                " put every parameter group in one optimizer, or wrap one of them yourself "
                "with layerwise.engine.LayerwiseOptimizer"
            )
        loss_fn = self.settings.loss_fn
        if loss_fn is None:
            if not pl_module.automatic_optimization:
                raise UnsupportedSetupError(
                    "loss_fn: under manual optimisation (automatic_optimization = False) "
                    "training_step steps the optimizer itself and is no loss; pass "
                    "LayerwiseCallback(..., loss_fn=lambda model, batch: ...)"
                )
            loss_fn = self._training_step_loss
        (base,) = optimizers
        if isinstance(base, LayerwiseOptimizer):
            raise UnsupportedSetupError(
                "configure_optimizers: the optimizer is already a LayerwiseOptimizer; return "
                "the base optimizer and let LayerwiseCallback wrap it (or drop the callback)"
            )
        self.engine = self.settings.wrap(base, pl_module, loss_fn, self._current)
        trainer.strategy.optimizers = [self.engine]
        self._logged_step = -1

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self._current.batch = batch
        self._batch_idx = batch_idx

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        engine = self.engine
        if engine is None or engine.steps == self._logged_step:
            return
        self._logged_step = engine.steps
        pl_module.log_dict(multiplier_logs(engine), on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._current.batch = None  # hold no tensors of the run beyond it

    # -- the default loss -------------------------------------------------------------------
    def _training_step_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        with _silenced_logging(model):
            output = model.training_step(batch, self._batch_idx)
        return loss_of(output, "training_step")


@contextlib.contextmanager
def _silenced_logging(module: nn.Module) -> Iterator[None]:
    """``module.log`` and ``module.log_dict`` do nothing inside (instance attributes
    shadowing the methods, removed after)."""

    def _nothing(*args: Any, **kwargs: Any) -> None:
        return None

    had = {k: k in module.__dict__ for k in ("log", "log_dict")}
    saved = {k: module.__dict__[k] for k, present in had.items() if present}
    object.__setattr__(module, "log", _nothing)
    object.__setattr__(module, "log_dict", _nothing)
    try:
        yield
    finally:
        for key, present in had.items():
            if present:
                object.__setattr__(module, key, saved[key])
            else:
                del module.__dict__[key]
