"""Loss objects: the split between a model's outputs and the loss on them.

A loss object ``loss`` holds ``forward(model, batch) -> outputs`` and
``target(batch) -> targets``; ``loss(model, batch)`` is the **mean** loss of the outputs
against the targets, so it is a valid ``loss_fn`` wherever one is taken. The split is what
the generalised Gauss-Newton matrix G = Jᵀ H_out J needs (J the Jacobian of the outputs
with respect to the parameters, H_out the Hessian of the loss with respect to the outputs;
:mod:`layerwise.sensitivity.ggn`). Each object knows, for its loss written as
L = (1/M) Σ_t ℓ(z_t, y_t) (``normaliser`` M):

* ``root_columns``: columns c_k of a square root of M H_out (Σ_k c_k c_kᵀ = M H_out), one
  per output entry;
* ``check``, the shapes and dtypes of outputs and targets.

Sampled cotangents h with E[h hᵀ] = M H_out (labels drawn from the model's predictive
distribution) are in :mod:`layerwise.sensitivity.label_sampling`.

:class:`CrossEntropy` (classes along the **last** dimension: logits ``[N, V]`` against
targets ``[N]``, or the sequence layout ``[N, T, V]`` against ``[N, T]``; this differs from
``F.cross_entropy``'s ``[N, V, T]``): L is ``F.cross_entropy`` with mean reduction, the mean
over the tokens whose target is not ``ignore_index`` (M = their number). Per token,
ℓ = −Σ_c q_c log p_c with p = softmax(z) and q the one-hot target, smoothed to
(1 − ε) q + ε/V by ``label_smoothing`` ε. Its Hessian in the logits is
(Σ_c q_c)(diag(p) − p pᵀ) = diag(p) − p pᵀ for *every* target distribution q (Σ_c q_c = 1),
so label smoothing leaves the GGN unchanged: it is supported, and the GGN is the one of
the softmax, equal to the Fisher of the model's categorical distribution. The square
root: c_(t,c) = √p_c (e_c − p) at token t (0 at ignored tokens), since
Σ_c p_c (e_c − p)(e_c − p)ᵀ = diag(p) − p pᵀ.

:class:`MeanSquaredError`: ``F.mse_loss`` with mean reduction, L = (1/M) Σ_k (z_k − y_k)²
over all M = ``targets.numel()`` entries (outputs and targets of one shape). Σ (z − y)² is,
up to a constant, the negative log-likelihood of a Gaussian N(z, σ² I) with σ² = 1/2 (the
common ½‖z − y‖² scaling corresponds to σ² = 1; ``mse_loss`` has no ½, hence twice the
curvature): ∇²_z Σ (z − y)² = 2 I, whose square root's columns are √2 e_k.

>>> from torch import nn
>>> net = nn.Linear(3, 4)
>>> ce = CrossEntropy(lambda m, b: m(b[0]), lambda b: b[1])
>>> x, y = torch.randn(5, 3), torch.randint(0, 4, (5,))
>>> bool(torch.isclose(ce(net, (x, y)), nn.functional.cross_entropy(net(x), y)))
True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["CrossEntropy", "MeanSquaredError", "OutputLoss"]

Forward = Callable[[nn.Module, Any], torch.Tensor]
Target = Callable[[Any], torch.Tensor]


def _tensor(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must return a tensor, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class OutputLoss:
    """The common part of the loss objects: ``forward``, ``target`` and the mean loss."""

    forward: Forward
    target: Target

    def __post_init__(self) -> None:
        for name in ("forward", "target"):
            if not callable(getattr(self, name)):
                raise TypeError(
                    f"{name} must be callable as {name}"
                    f"{'(model, batch)' if name == 'forward' else '(batch)'}, "
                    f"got {getattr(self, name)!r}"
                )

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The mean loss of ``forward(model, batch)`` against ``target(batch)``."""
        outputs = _tensor("forward(model, batch)", self.forward(model, batch))
        return self.criterion(outputs, _tensor("target(batch)", self.target(batch)))

    def criterion(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def summed(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Σ_t ℓ(z_t, y_t), the loss summed instead of averaged (M times the mean)."""
        raise NotImplementedError

    def share(self, model: nn.Module, part: Any, size: int, normaliser: Any) -> torch.Tensor:
        """The loss of ``part``, a slice of b examples of a batch of ``size`` examples whose
        normaliser is M, on the batch's scale: (size / b) Σ_{t∈part} ℓ_t / M.

        Its gradient is what the statistics take as the slice's gradient sample: for one
        example, g_i = B × (example i's share of ∇L), so that the g_i average to ∇L exactly
        even when examples hold different numbers of counted tokens (``ignore_index``); an
        example whose tokens are all ignored has g_i = 0, not the 0/0 of its own mean. For
        a loss whose normaliser is proportional to the examples (``MeanSquaredError``) it is
        the slice's own mean loss."""
        outputs = _tensor("forward(model, batch)", self.forward(model, part))
        targets = _tensor("target(batch)", self.target(part))
        self.check(outputs, targets)
        b = targets.shape[0] if targets.dim() > 0 else 1
        return self.summed(outputs, targets) * (size / b) / normaliser

    def check(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The loss as plain data: its kind and its options (not the callables)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"loss": type(self).__name__} | {
            k: v for k, v in fields.items() if k not in ("forward", "target")
        }


@dataclass(frozen=True)
class CrossEntropy(OutputLoss):
    """Mean cross-entropy of logits ``[..., V]`` (classes last) against class indices
    ``[...]``, over the targets that are not ``ignore_index`` (module docstring)."""

    _: KW_ONLY
    ignore_index: int = -100
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        ls = self.label_smoothing
        if isinstance(ls, bool) or not isinstance(ls, int | float):
            raise TypeError(f"label_smoothing must be a number, got {ls!r}")
        if not (math.isfinite(ls) and 0.0 <= ls <= 1.0):
            raise ValueError(f"label_smoothing must be in [0, 1], got {ls!r}")

    def check(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Logits ``[..., V]`` with ``V >= 1`` and integer targets of shape ``[...]``."""
        if outputs.dim() < 2 or not outputs.is_floating_point():
            raise ValueError(
                f"CrossEntropy: forward must return floating logits [N, V] or [N, T, V], got "
                f"shape {tuple(outputs.shape)} and dtype {outputs.dtype}"
            )
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise TypeError(
                f"CrossEntropy: target must return class indices (an integer tensor), got "
                f"dtype {targets.dtype}; probabilities as targets are not supported"
            )
        if outputs.shape[:-1] != targets.shape:
            raise ValueError(
                f"CrossEntropy: outputs of shape {tuple(outputs.shape)} need targets of shape "
                f"{tuple(outputs.shape[:-1])} (classes along the last dimension), got "
                f"{tuple(targets.shape)}"
            )

    def criterion(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.check(outputs, targets)
        return self._flat(outputs, targets, "mean")

    def summed(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Σ_t ℓ_t over the tokens that are not ``ignore_index`` (0 when there is none)."""
        return self._flat(outputs, targets, "sum")

    def _flat(self, outputs: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        """``F.cross_entropy`` over every position, classes along the last dimension."""
        return F.cross_entropy(
            outputs.reshape(-1, outputs.shape[-1]),
            targets.reshape(-1),
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction=reduction,
        )

    def normaliser(self, targets: torch.Tensor) -> torch.Tensor:
        """M, the number of targets that are not ``ignore_index`` (a 0-d device tensor)."""
        return (targets != self.ignore_index).sum()

    def num_columns(self, outputs: torch.Tensor) -> int:
        """Columns of the square root of M H_out: one per (token, class), ``outputs.numel()``."""
        return outputs.numel()

    def root_columns(
        self, outputs: torch.Tensor, targets: torch.Tensor, start: int, stop: int
    ) -> torch.Tensor:
        """Columns ``start:stop`` of the square root, c_(t,c) = √p_c (e_c − p_t) at token t
        (0 for ignored tokens), column k = t V + c: ``[stop − start, *outputs.shape]``."""
        classes = outputs.shape[-1]
        p = outputs.detach().softmax(-1).reshape(-1, classes)
        tokens = p.shape[0]
        eye = torch.eye(classes, dtype=p.dtype, device=p.device)
        keep = (targets != self.ignore_index).reshape(-1).to(p.dtype)
        root = p.sqrt().unsqueeze(-1) * (eye - p.unsqueeze(-2)) * keep[:, None, None]
        k = torch.arange(start, stop, device=p.device)
        token, cls = k // classes, k % classes
        where = (token.unsqueeze(-1) == torch.arange(tokens, device=p.device)).to(p.dtype)
        columns = where.unsqueeze(-1) * root[token, cls].unsqueeze(-2)
        return columns.reshape(stop - start, *outputs.shape)


@dataclass(frozen=True)
class MeanSquaredError(OutputLoss):
    """``F.mse_loss`` (mean over every entry) of ``forward``'s outputs against targets of the
    same shape (module docstring)."""

    def check(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Floating outputs and targets of one shape (no broadcasting)."""
        if not (outputs.is_floating_point() and targets.is_floating_point()):
            raise TypeError(
                f"MeanSquaredError: outputs and targets must be floating tensors, got dtypes "
                f"{outputs.dtype} and {targets.dtype}"
            )
        if outputs.shape != targets.shape:
            raise ValueError(
                f"MeanSquaredError: outputs of shape {tuple(outputs.shape)} and targets of "
                f"shape {tuple(targets.shape)} differ (no broadcasting)"
            )

    def criterion(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.check(outputs, targets)
        return F.mse_loss(outputs, targets)

    def summed(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Σ_k (z_k − y_k)² over every entry."""
        return F.mse_loss(outputs, targets, reduction="sum")

    def normaliser(self, targets: torch.Tensor) -> int:
        """M, the number of entries ``targets.numel()``."""
        return targets.numel()

    def num_columns(self, outputs: torch.Tensor) -> int:
        """Columns of the square root of M H_out = 2 I: one per entry, ``outputs.numel()``."""
        return outputs.numel()

    def root_columns(
        self, outputs: torch.Tensor, targets: torch.Tensor, start: int, stop: int
    ) -> torch.Tensor:
        """Columns ``start:stop`` of √2 I, shaped ``[stop − start, *outputs.shape]``."""
        k = torch.arange(start, stop, device=outputs.device)
        entries = torch.arange(outputs.numel(), device=outputs.device)
        columns = (k.unsqueeze(-1) == entries).to(outputs.dtype) * math.sqrt(2.0)
        return columns.reshape(stop - start, *outputs.shape)
