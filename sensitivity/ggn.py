"""Per-group traces of the generalised Gauss-Newton matrix, sampled or exact.

For a loss object (:mod:`layerwise.sensitivity.losses`) with outputs z(θ) and mean loss
L = (1/M) Σ_t ℓ(z_t, y_t), the GGN is G = Jᵀ H_out J with J = ∂z/∂θ and H_out = ∇²_z L,
positive semi-definite (for cross-entropy and Gaussian likelihoods, the Fisher). Per group
g, ``ggn_trace`` = tr(G_gg) = tr(J_gᵀ H_out J_g), J_g the columns of J of g's parameters.

**Sampled (``ggn="mc"``).** Let h = ∇_z Σ_t ℓ(z_t, ŷ_t) at labels ŷ drawn from the model's
own predictive distribution (``sampler="predictive"``; by default importance-weighted
towards the classes that carry curvature, ``sampler="importance"``, the same expectation
with far less variance on a confident model: :mod:`layerwise.sensitivity.label_sampling`):
independent across tokens, E[h_t] = 0 and E[h_t h_tᵀ] = ∇²ℓ_t = M (H_out)_tt. Per example
(examples do not interact in the model): a_i = J_iᵀ h_i = ∇_θ Σ_{t∈i} ℓ(z_t, ŷ_t), the
gradient of example i's summed loss at the sampled labels, and

    E[ (1/M) Σ_i ‖a_i,g‖² ] = (1/M) Σ_i Σ_{t∈i} tr(J_t,gᵀ ∇²ℓ_t J_t,g) = tr(G_gg),

the tokens of one example (coupled, e.g. by attention) dropping out of the cross terms
because their h_t are independent with mean zero. Each of K samples per batch gives one
such term t_k; the estimate is their mean, its standard error s/√K (s the sample standard
deviation of the t_k). Unbiased, and a sum of squares: never negative.

**One label set** (K = 1, per example): the terms x_i = ‖a_i,g‖² of the B examples are
independent given the batch, so the standard error is that of their sum,
√(B s_x²)/M (s_x² their sample variance). Since E[s_x²] = mean_i Var(x_i) + (spread of the
examples' own traces E x_i), it never understates the label noise given the batch; it is
the standard error of the estimate of the GGN trace over the data's distribution (examples
drawn independently), calibrated there (``tests/sensitivity/test_ggn_stderr_calibration``).
With K >= 2 it is the label noise given the batch, as above. Under BatchNorm in training
mode one label set has one term per batch: no standard error (``nan``).

**BatchNorm in training mode** (examples interact: z_i depends on every example, and
per-example gradients are undefined). The batch function's own per-example contributions
J_iᵀ h_i, J_i the Jacobian of z_i *through the whole batch*, still satisfy the identity
above, and so does their sum, with one label vector sampled for the whole batch:
u = Σ_i J_iᵀ h_i = ∇_θ Σ_t ℓ(z_t(θ), ŷ_t) through the batch function, and
E‖u_g‖² = Σ_{i,j} E[h_iᵀ J_i,g J_j,gᵀ h_j] = Σ_i tr(J_i,gᵀ ∇²ℓ_i J_i,g) = M tr(G_gg)
(the cross terms i ≠ j vanish for independent zero-mean h). So t_k = ‖u_g‖²/M is exactly
unbiased; it is noisier than the per-example sum (the cross terms add variance), which the
standard error reports.

**Exact (``ggn="exact"``).** With columns c_k of a square root of M H_out
(``root_columns``), tr(G_gg) = (1/M) Σ_k ‖J_gᵀ c_k‖²: one backward pass per output entry
of an example (batched with ``vmap`` over examples), or of the whole batch under BatchNorm
in training mode. Refused with :class:`GGNSizeError` above :data:`EXACT_MAX_COLUMNS`
passes per batch.

Cost: one forward pass and K (or C) backward passes. Where every measured parameter is
used by covered layers alone, the squared norms are factorised over the layers' inputs and
output gradients (:mod:`layerwise.sensitivity.cotangent_norms`: each backward pass asks for
the layers' output gradients only, no parameter gradient), and with ``gradient=True``
(:meth:`GGNEstimator.batch`, what :func:`~layerwise.sensitivity.estimate` asks when
``grad_norm`` comes with ``ggn_trace`` and nothing else gives the gradient) the same
forward pass also gives the mean loss's gradient, by one more backward pass: ``grad_norm``
and ``ggn_trace`` at one label sample cost one forward and two backward passes. Elsewhere
they are batched with ``vmap`` (over examples and over samples); the per-example gradients
of a chunk of examples are reduced to squared norms per group at once
(:mod:`layerwise.sensitivity.output_vjp`). The labels' noise is
drawn from the estimator's generator (never the global RNG); dropout draws one mask per
example, as per-example gradients do.
Scaling: L is the mean loss, so traces are in loss units per squared parameter unit,
summed over the group, like ``hessian_trace``.

>>> from torch import nn
>>> from layerwise.sensitivity.losses import MeanSquaredError
>>> net = nn.Linear(2, 1, bias=False).double()
>>> mse = MeanSquaredError(lambda m, b: m(b[0]), lambda b: b[1])
>>> x = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
>>> est = GGNEstimator(mse, net, ["weight"], [0], 1, per_example=True)
>>> mean, stderr, *_ = est.batch({"weight": net.weight.detach()}, (x, torch.zeros(2, 1)), 2,
...                             exact=True)
>>> round(mean.item(), 10)  # G = (2/M) Σ_i x_i x_iᵀ, M = 2: tr = 1 + 4 + 9 + 0
14.0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from layerwise.sensitivity.attention import twice_differentiable_attention
from layerwise.sensitivity.label_sampling import SAMPLERS, draw_noise, sampled_cotangents
from layerwise.sensitivity.losses import OutputLoss
from layerwise.sensitivity.output_vjp import OutputVJP

if TYPE_CHECKING:
    from layerwise.sensitivity.structure import ModelStructure

__all__ = [
    "EXACT_MAX_COLUMNS",
    "GGN_MODES",
    "GGNBatch",
    "GGNEstimator",
    "GGNLossError",
    "GGNSizeError",
    "output_loss",
]

Params = dict[str, torch.Tensor]
#: The ways to measure ``ggn_trace``: sampled labels or one pass per output entry.
GGN_MODES = ("mc", "exact")
#: Most backward passes ``ggn="exact"`` takes per batch: output entries per example, or of
#: the whole batch under BatchNorm in training mode.
EXACT_MAX_COLUMNS = 1024


class GGNLossError(TypeError):
    """``ggn_trace`` was asked of a plain loss function: it needs a loss object."""


class GGNSizeError(ValueError):
    """``ggn="exact"`` would need more backward passes than :data:`EXACT_MAX_COLUMNS`."""


def output_loss(loss_fn: Any) -> OutputLoss:
    """``loss_fn`` if it is a loss object, else a :class:`GGNLossError` pointing to them."""
    if isinstance(loss_fn, OutputLoss):
        return loss_fn
    raise GGNLossError(
        "ggn_trace needs the split between the model's outputs and the loss: pass "
        "loss_fn=layerwise.sensitivity.CrossEntropy(forward, target) or "
        "MeanSquaredError(forward, target) (forward(model, batch) -> outputs, target(batch) "
        f"-> targets), got {loss_fn!r}"
    )


def _too_large(columns: int, where: str, shape: Sequence[int]) -> GGNSizeError:
    return GGNSizeError(
        f'ggn="exact" needs one backward pass per output entry {where}: {columns} for outputs '
        f"of shape {tuple(shape)}, above the limit of {EXACT_MAX_COLUMNS}; use ggn='mc'"
    )


class GGNBatch(NamedTuple):
    """One batch's GGN trace per group, its standard error, the backward passes behind
    it, and the mean loss's gradient when it came from the same forward pass."""

    mean: torch.Tensor
    stderr: torch.Tensor
    passes: int
    gradient: Params | None = None


class GGNEstimator:
    """Per-group GGN traces of one loss object's batches (module docstring).

    ``params`` are the parameter names measured, ``group_of[i]`` the group of the i-th;
    ``per_example`` is False when the examples interact (BatchNorm in training mode).
    """

    def __init__(
        self,
        loss: OutputLoss,
        model: nn.Module,
        params: Sequence[str],
        group_of: Sequence[int] | torch.Tensor,
        num_groups: int,
        *,
        per_example: bool,
        dtype: torch.dtype | None = None,
        example_chunk_size: int | None = None,
        chunk_size: int = 8,
        sampler: str = "importance",
        structure: ModelStructure | None = None,
    ) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.loss, self.sampler, self.per_example = output_loss(loss), sampler, per_example
        self.vjps = OutputVJP(
            loss.forward, model, params, group_of, num_groups, dtype=dtype,
            example_chunk_size=example_chunk_size, chunk_size=chunk_size, structure=structure,
        )  # fmt: skip

    def _targets(self, batch: Any, size: int) -> torch.Tensor:
        targets = self.loss.target(batch)
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"target(batch) must return a tensor, got {type(targets).__name__}")
        if self.per_example and (targets.dim() == 0 or targets.shape[0] != size):
            raise ValueError(
                f"target(batch) must have the batch's {size} examples along dimension 0, got "
                f"shape {tuple(targets.shape)}"
            )
        return targets

    def _first(self, values: Params, batch: Any, size: int, targets: torch.Tensor) -> Any:
        """The first example's outputs, the batch's shapes checked against ``targets``."""
        first = self.vjps.first_outputs(values, batch, size)
        self.loss.check(first.expand(size, *first.shape[1:]), targets)
        return first

    def batch(
        self,
        values: Params,
        batch: Any,
        size: int,
        *,
        samples: int = 1,
        generator: torch.Generator | None = None,
        exact: bool = False,
        gradient: bool = False,
    ) -> GGNBatch:
        """tr(G_gg) per group, its standard error and the backward passes for one batch of
        ``size`` examples: the mean of ``samples`` sampled terms, or exact (stderr 0).
        With ``gradient``, the sampled per-example terms also give the mean loss's gradient
        from their forward pass where they are factorised (``GGNBatch.gradient``, else
        ``None``). Attention runs on the math backend
        (:mod:`layerwise.sensitivity.attention`): the products are batched with ``vmap``."""
        with twice_differentiable_attention():
            return self._batch(values, batch, size, samples, generator, exact, gradient)

    def _batch(
        self,
        values: Params,
        batch: Any,
        size: int,
        samples: int,
        generator: torch.Generator | None,
        exact: bool,
        gradient: bool = False,
    ) -> GGNBatch:
        targets = self._targets(batch, size)
        count = self.loss.normaliser(targets)
        if exact:
            sums, passes = self._exact(values, batch, size, targets)
            return GGNBatch(sums / count, torch.zeros_like(sums), passes)
        if generator is None:
            raise ValueError("generator is needed to sample labels (exact=False)")
        dtype = next(iter(values.values())).dtype
        noise = draw_noise(self.loss, targets, samples, generator, dtype, self.sampler)
        sums, each, shared = self._sampled(values, batch, size, targets, noise, gradient)
        terms = sums / count  # (K, G)
        mean = terms.mean(0)
        if samples >= 2:
            stderr = terms.std(0, correction=1) / samples**0.5
        elif each is not None and size >= 2:  # one label set: the spread of the examples
            stderr = each[0].std(0, correction=1) * size**0.5 / count
        else:
            stderr = torch.full_like(mean, float("nan"))
        return GGNBatch(mean, stderr, samples, shared)

    def _sampled(
        self,
        values: Params,
        batch: Any,
        size: int,
        targets: torch.Tensor,
        noise: torch.Tensor,
        gradient: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Params | None]:
        """(K, G): Σ_i ‖a_i,g‖² per sample (per example), or ‖u_g‖² (batch function); the
        (K, B, G) per-example terms (``None`` for the batch function); the loss gradient
        when asked for and shared (:meth:`OutputVJP.factorised`)."""
        loss, sampler, samples = self.loss, self.sampler, noise.shape[0]
        if not self.per_example:

            def count(out: torch.Tensor) -> int:
                loss.check(out, targets)
                return samples

            def cotangents(out: torch.Tensor, a: int, b: int) -> torch.Tensor:
                return sampled_cotangents(loss, out, targets, noise[a:b], sampler)

            return self.vjps.batch_norms(values, batch, count, cotangents), None, None

        def per_example(out: torch.Tensor, target: torch.Tensor, eps: torch.Tensor) -> Any:
            return sampled_cotangents(loss, out, target.unsqueeze(0), eps.unsqueeze(1), sampler)

        def check(out: torch.Tensor) -> None:
            loss.check(out, targets)

        def criterion(out: torch.Tensor) -> torch.Tensor:
            return loss.criterion(out, targets)

        def batched(out: torch.Tensor) -> torch.Tensor:  # every token at once, no vmap
            return sampled_cotangents(loss, out, targets, noise, sampler)

        extra = [(targets, 0), (noise, 1)]
        found = self.vjps.factorised(
            values, batch, size, per_example, extra, check=check,
            criterion=criterion if gradient else None, batched=batched,
        )  # fmt: skip
        if found is None:  # the outputs' shapes checked on one example first
            self._first(values, batch, size, targets)
            found = self.vjps.vmapped(values, batch, size, samples, per_example, extra)
        return found.sums, found.per_example, found.gradient

    def _exact(
        self, values: Params, batch: Any, size: int, targets: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """(Σ_k ‖J_gᵀ c_k‖² per group, passes per batch)."""
        loss = self.loss
        if not self.per_example:
            passes = []

            def count(out: torch.Tensor) -> int:
                loss.check(out, targets)
                passes.append(loss.num_columns(out))
                if passes[0] > EXACT_MAX_COLUMNS:
                    where = "of the batch (BatchNorm in training mode)"
                    raise _too_large(passes[0], where, out.shape)
                return passes[0]

            def cotangents(out: torch.Tensor, a: int, b: int) -> torch.Tensor:
                return loss.root_columns(out, targets, a, b)

            return self.vjps.batch_norms(values, batch, count, cotangents).sum(0), passes[0]
        first = self._first(values, batch, size, targets)
        columns = loss.num_columns(first)
        if columns > EXACT_MAX_COLUMNS:
            raise _too_large(columns, "of an example", first.shape)

        def per_example(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return loss.root_columns(out, target.unsqueeze(0), 0, columns)

        norms = self.vjps.example_norms(values, batch, size, columns, per_example, [(targets, 0)])
        return norms.sum(0), columns
