"""Hugging Face ``Trainer``: ``LayerwiseCallback``, layer-wise multipliers on the Trainer's
optimizer, with no subclass and no glue.

``Trainer(..., callbacks=[LayerwiseCallback("curvature")])`` is all it takes, whether the
Trainer builds its optimizer and scheduler itself or takes ``optimizers=(opt, sched)``. At
``on_train_begin`` the Trainer has built both and wrapped the optimizer in accelerate's
``AcceleratedOptimizer``; the callback wraps the optimizer inside it in a
:class:`layerwise.engine.LayerwiseOptimizer`, so the Trainer's ``optimizer.step()`` runs the
engine's step (the multipliers applied during the base step only, the non-finite check,
the recalibration when due). The scheduler stays bound to the optimizer whose groups the
wrapper shares: outside the step each group's ``lr`` is what it set, and the Trainer logs
that rate as ``learning_rate``.

**Groups.** The multipliers are per optimizer group. The Trainer's own optimizer has two
groups (with and without weight decay), so for layer-wise rates pass your own:
``optimizers=(torch.optim.AdamW(groups.to_optimizer_groups(lr=...)), scheduler)`` with
``groups = layerwise.policies.group_parameters(model, "depth")``.

**The loss** is ``loss_fn(model, batch)``; the default is ``model(**batch).loss`` (a
``ModelOutput``'s ``loss``, or a dict's ``"loss"``), the loss the Trainer's default
``compute_loss`` trains on. Pass ``loss_fn`` with a custom ``compute_loss``,
``compute_loss_func`` or label smoothing.

**The batch.** Callbacks are not given the batch, so the callback keeps the keyword inputs
of the model's last forward call in training mode between ``on_step_begin`` and
``on_pre_optimizer_step`` (a forward pre-hook on the model, removed at ``on_train_end``;
``num_items_in_batch``, the Trainer's token count over the whole accumulation window, is
left out so that the loss is the batch's mean). A recalibration
estimates on that batch: with ``gradient_accumulation_steps=k`` (supported), the last
micro-batch of the window. Steps count optimizer steps (``state.global_step``).

**Logging.** At each log event the multipliers are added to the logs as
``layerwise/multiplier/<group>``: they reach ``state.log_history`` and the callbacks after
this one (reporting integrations come first in the Trainer's list; to have them receive the
multipliers, also pass ``callback=`` a TensorBoard ``SummaryWriter``, which gets every
recalibration as scalars).

**Resuming** (``train(resume_from_checkpoint=...)``): the Trainer loads the optimizer's
state before any callback runs, into the base optimizer, so the multipliers come back with
its groups (``lr_multiplier``) while the engine's step count, history and the controller's
state start afresh. At ``on_train_end`` the optimizer is unwrapped again (a later
``train()`` wraps it anew); :attr:`engine` stays readable.

**Refused** (:class:`UnsupportedSetupError`): DeepSpeed (its engine owns the optimizer step)
and an optimizer the Trainer did not pass through accelerate. Under DDP (``torchrun``), the
engine pools the ranks' estimates and the multipliers are identical on every rank.

>>> from layerwise.engine.huggingface import LayerwiseCallback
>>> LayerwiseCallback("curvature", recalibrate_every=50)
LayerwiseCallback(recalibrate_every=50, warmup_steps=0)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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

transformers = require_extra("transformers", "huggingface")

__all__ = ["LayerwiseCallback", "UnsupportedSetupError"]

#: Keyword inputs the Trainer adds for its own loss scaling, left out of the kept batch.
_TRAINER_KWARGS = ("num_items_in_batch",)


def _output_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch).loss`` (or the ``"loss"`` of a dict output)."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"loss_fn: the default loss calls model(**batch) and needs a dict batch, got "
            f"{type(batch).__name__}; pass loss_fn=lambda model, batch: ..."
        )
    return loss_of(model(**batch), "model(**batch)")


class LayerwiseCallback(transformers.TrainerCallback):
    """Steer the Trainer's optimizer with per-group multipliers.

    Args:
        controller: a :class:`layerwise.policies.SensitivityController` or a rule name.
        recalibrate_every, warmup_steps: as for :class:`layerwise.engine.LayerwiseOptimizer`,
            in optimizer steps.
        loss_fn: ``loss_fn(model, batch) -> mean loss``; ``None``: ``model(**batch).loss``.
        estimator, callback, seed, max_nonfinite_steps, check_finite: as for the engine.

    During and after training: :attr:`history`, :attr:`multipliers`, :attr:`engine`.
    """

    def __init__(
        self,
        controller: Any,
        recalibrate_every: int = 100,
        warmup_steps: int = 0,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        *,
        estimator: Any = None,
        callback: Any = None,
        seed: int = 0,
        max_nonfinite_steps: int = DEFAULT_MAX_NONFINITE_STEPS,
        check_finite: bool = True,
    ) -> None:
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
        self._current = CurrentBatch("the model (called as model(**inputs) in training mode)")
        self._recording = False
        self._hook: Any = None
        self._accelerated: Any = None

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"LayerwiseCallback(recalibrate_every={s.recalibrate_every}, "
            f"warmup_steps={s.warmup_steps})"
        )

    # -- read-outs --------------------------------------------------------------------------
    @property
    def history(self) -> Any:
        """The engine's decisions as a ``pandas.DataFrame`` (empty before training)."""
        return History().frame if self.engine is None else self.engine.history

    @property
    def multipliers(self) -> dict[str, float]:
        """``{group name: multiplier}`` now (empty before training)."""
        return {} if self.engine is None else self.engine.multipliers

    # -- hooks ------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, accelerated = kwargs.get("model"), kwargs.get("optimizer")
        if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None):
            raise UnsupportedSetupError(
                "args.deepspeed: LayerwiseCallback cannot steer DeepSpeed, whose engine owns "
                "the optimizer step; train without DeepSpeed (DDP works)"
            )
        base = getattr(accelerated, "optimizer", None)
        if not isinstance(model, nn.Module) or not isinstance(base, torch.optim.Optimizer):
            raise UnsupportedSetupError(
                "optimizer: LayerwiseCallback needs the Trainer's accelerate-wrapped torch "
                f"optimizer and its model, got optimizer={accelerated!r:.80} and model of type "
                f"{type(model).__name__}"
            )
        if isinstance(base, LayerwiseOptimizer):
            raise UnsupportedSetupError(
                "optimizers: the optimizer is already a LayerwiseOptimizer; pass the base "
                "optimizer and let LayerwiseCallback wrap it (or drop the callback)"
            )
        loss_fn = self.settings.loss_fn or _output_loss
        self.engine = self.settings.wrap(base, model, loss_fn, self._current)
        # __setstate__ swaps the inner optimizer and re-patches accelerate's GradScaler hooks.
        accelerated.__setstate__({"optimizer": self.engine})
        self._accelerated = accelerated
        self._hook = model.register_forward_pre_hook(self._keep_batch, with_kwargs=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Leave the Trainer as found: its optimizer unwrapped (so a later ``train()``
        wraps it afresh), the hook removed, no batch held; :attr:`engine` stays readable."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._accelerated is not None and self.engine is not None:
            self._accelerated.__setstate__({"optimizer": self.engine.base})
            self._accelerated = None
        self._current.batch = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._recording = True  # the window's training forwards are the batches

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._recording = False  # the estimator's own forwards (in the step) are not

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if self.engine is None or logs is None:
            return
        values = multiplier_logs(self.engine)
        logs.update(values)
        history = state.log_history
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(values)

    # -- the batch and the loss -------------------------------------------------------------
    def _keep_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._recording or not module.training or not torch.is_grad_enabled() or args:
            return
        self._current.batch = {k: v for k, v in kwargs.items() if k not in _TRAINER_KWARGS}
