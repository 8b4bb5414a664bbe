"""Losses a model computes itself: Hugging Face ``ModelOutput.loss``, a dict's ``"loss"``.

Many models take the labels in the batch and return their own mean loss: a Hugging Face
model called as ``model(**batch)`` returns a ``ModelOutput`` whose ``.loss`` is the mean
cross-entropy (over the tokens whose label is not -100, for a language model), others a
dict with a ``"loss"`` entry. :func:`model_output_loss` is a ``loss_fn(model, batch)`` for
them, and :class:`ModelOutputLoss` the same for another key:

* the call: ``model(**batch)`` for a mapping (a ``dict``, a ``transformers.BatchEncoding``),
  ``model(*batch)`` for a tuple or list, ``model(batch)`` otherwise;
* the loss: the output's attribute or item ``key`` (``"loss"``), or the output itself when
  it is a scalar tensor; a missing or ``None`` loss (a Hugging Face model given no
  ``labels``) is a ``ValueError`` that says what the model returned.

The loss must be the **mean** over the batch (the contract of every ``loss_fn``), as the
Hugging Face models' losses are. Per-example statistics evaluate it on one example at a
time (for parameters the factorised norms do not cover); for a token mean over sequences
of unequal length that is the example's own token mean, not its share of the batch's (use
:class:`layerwise.sensitivity.CrossEntropy` for the exact convention, see
:mod:`layerwise.sensitivity.losses`). The Gauss-Newton trace needs the split between
outputs and loss, which a model's own loss does not give: use a loss object there.

>>> from torch import nn
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.fc = nn.Linear(2, 1)
...     def forward(self, x, labels=None):
...         out = self.fc(x)
...         return {"logits": out, "loss": None if labels is None else ((out - labels) ** 2).mean()}
>>> net, x, y = Net(), torch.ones(3, 2), torch.zeros(3, 1)
>>> bool(model_output_loss(net, {"x": x, "labels": y}) == ((net.fc(x) - y) ** 2).mean())
True
>>> model_output_loss(net, {"x": x})  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: model_output_loss: the model returned no loss (its 'loss' is None; ...
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ModelOutputLoss", "call_model", "model_output_loss"]


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple or list, else
    ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@dataclass(frozen=True)
class ModelOutputLoss:
    """``loss_fn(model, batch)``: the loss the model returns under ``key`` (module
    docstring); plain data, so it can be written to a manifest."""

    key: str = "loss"

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise TypeError(f"key must be a non-empty string, got {self.key!r}")

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.pick(call_model(model, batch))

    def pick(self, output: Any) -> torch.Tensor:
        """The loss in ``output`` (a scalar tensor, a mapping or an object with ``key``)."""
        where = "model_output_loss" if self.key == "loss" else f"ModelOutputLoss(key={self.key!r})"
        if isinstance(output, torch.Tensor):
            if output.dim() == 0:
                return output
            raise ValueError(
                f"{where}: the model returned a tensor of shape {tuple(output.shape)}, not a "
                f"scalar loss nor an output with {self.key!r}; pass a loss_fn that computes "
                "the loss from it (e.g. layerwise.sensitivity.CrossEntropy)"
            )
        if isinstance(output, Mapping):
            loss, keys = output.get(self.key), list(output)
            known = self.key in output
        else:
            loss = getattr(output, self.key, None)
            keys, known = None, hasattr(output, self.key)
        if loss is None:
            what = f"its {self.key!r} is None" if known else f"it has no {self.key!r}"
            shown = (
                f"the output's keys are {keys}"
                if keys is not None
                else (f"it returned a {type(output).__name__}")
            )
            raise ValueError(
                f"{where}: the model returned no loss ({what}; a Hugging Face model computes "
                f"one only when the batch holds its labels, e.g. batch['labels']); {shown}"
            )
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"{where}: the model's {self.key!r} must be a scalar tensor (the mean loss over "
                f"the batch), got {shape}"
            )
        return loss


_DEFAULT = ModelOutputLoss()


def model_output_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The mean loss the model returns itself: ``model(**batch).loss`` for a mapping batch
    (``model(*batch)`` for a tuple, ``model(batch)`` otherwise), an output's ``["loss"]``,
    or a scalar output as it is (module docstring)."""
    return _DEFAULT(model, batch)
