"""Per-group gradient noise from gradient samples: per-example or micro-batch gradients.

Let m_1..m_M be gradient samples of one batch of W examples with weights w_j (w_j = 1 for
per-example gradients, M = W; w_j = b_j, the size of micro-batch j, for micro-batches),
and m̄ = Σ w_j m_j / W their weighted mean. If Cov(m_j) = Σ / w_j (true for means of w_j
independent per-example gradients of covariance Σ), then (one-way ANOVA)

    E[ Σ_j w_j ‖m_j − m̄‖² ] = (M − 1) tr(Σ),   so   tr(Σ̂) = Σ_j w_j ‖m_j − m̄‖² / (M − 1)

is **unbiased** (Bessel's 1/(M−1) correction; for per-example gradients the usual sample
covariance). Restricted to a group g it gives tr(Σ_g), and ``grad_variance`` = tr(Σ̂_g)/n_g.

Numerics: sums are taken around the batch gradient c (known before the samples, and
equal to m̄ up to rounding for a mean loss without interaction between examples), using
Σ w_j ‖m_j − c‖² = Σ w_j ‖m_j − m̄‖² + W ‖m̄ − c‖², which has no cancellation.

Standard errors (asymptotic, M large): Var[tr(Σ̂)] ≈ (M/(M−1))² Var[d_j] / M with
d_j = w_j ‖m_j − c‖², estimated by the sample variance of the d_j; and for the delta-method
error of ‖Ĝ‖, uᵀ Σ u with u = c/‖c‖, estimated by Σ_j w_j ((m_j − m̄)·c)² / ((M−1) ‖c‖²).

Across batches b = 1..n (B_b examples, N = Σ B_b, weights ω_b = B_b / N): tr(Σ̂) = Σ ω_b
tr(Σ̂_b) (unbiased), Var = Σ ω_b² Var_b; Ĝ = Σ ω_b G_b is the mean gradient of the union,
Var[‖Ĝ‖] ≈ Σ ω_b² u_bᵀ Σ_b u_b / B_b (each batch projected on its own gradient direction).

``noise_to_signal`` = tr(Σ) / (B ‖G‖²) with both parts unbiased, B the (mean) batch size
N / n: the noise of one training step's gradient, which does not shrink when more batches
are passed to estimate it. Since E‖Ĝ‖² = ‖G‖² + tr(Σ)/N, the signal is estimated by
‖Ĝ‖² − tr(Σ̂)/N, so the ratio is (N / B) tr(Σ̂) / (N ‖Ĝ‖² − tr(Σ̂)). It is ``inf``
when noise swamps the signal (that denominator <= 0 while tr(Σ̂) > 0) and 0 when
tr(Σ̂) = 0 exactly (no noise: e.g. parameters the loss does not use); a non-finite input
stays non-finite.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["BatchGradStats", "GradientSamples", "combine_batches", "noise_to_signal"]

Params = dict[str, torch.Tensor]
METHODS = ("per_example", "micro_batch", "two_batch")


@dataclass(frozen=True)
class BatchGradStats:
    """Gradient noise of one batch, per group (tensors of shape (G,))."""

    examples: int
    samples: int
    trace_sigma: torch.Tensor
    trace_sigma_var: torch.Tensor
    projected_var: torch.Tensor
    #: ‖c_g‖² of the batch gradient c the samples were centred on, per group (the same
    #: fused norms and per-group sums as the estimator's own ``grad_norm``, so it can reuse
    #: them for a single batch)
    centre_sq: torch.Tensor | None = None


class GradientSamples:
    """Accumulates gradient samples of one batch around its gradient ``centre``."""

    def __init__(
        self, centre: Params, group_of: Sequence[int] | torch.Tensor, num_groups: int
    ) -> None:
        self.centre = centre
        self.names = list(centre)
        first = centre[self.names[0]]
        self.index = torch.as_tensor(group_of, dtype=torch.long, device=first.device)
        self.num_groups = num_groups
        self.sum_d, self.sum_d2, self.sum_wp2 = first.new_zeros(3, num_groups).unbind(0)
        self.sum_diff: Params = {}  # Σ_j w_j (m_j − c) per parameter; absent: zero
        self.count, self.weight = 0, 0
        self._centre_sq: torch.Tensor | None = None

    def _centre_sq_each(self) -> torch.Tensor:
        """‖c‖² per parameter, stacked (one fused pass over the centre, computed once)."""
        if self._centre_sq is None:
            norms = torch._foreach_norm([self.centre[n] for n in self.names])
            self._centre_sq = torch.stack(norms).square()
        return self._centre_sq

    def _per_group(self, per_param: list[torch.Tensor]) -> torch.Tensor:
        return self._per_group_columns(torch.stack(per_param, dim=-1))

    def _per_group_columns(self, stacked: torch.Tensor) -> torch.Tensor:
        """(..., params) -> (..., groups): the sum over each group's parameters."""
        out = stacked.new_zeros(*stacked.shape[:-1], self.num_groups)
        return out.index_add_(-1, self.index, stacked)

    def add(self, grads: Params, weights: Sequence[int] | None = None) -> None:
        """Add a chunk of samples ``{name: (c, *shape)}`` with integer weights (default 1).

        The sample tensors are overwritten (centred in place) to save memory traffic,
        except where one storage backs the samples of several parameters (autograd hands
        ``a`` and ``b`` the same gradient tensor in ``x @ (a + b)``): centring it in place
        for ``a`` would corrupt ``b``'s samples, so those are centred out of place."""
        count = grads[self.names[0]].shape[0]
        w = [1] * count if weights is None else [int(x) for x in weights]
        # weights stay host numbers unless they differ within the chunk (no device copy)
        wt = w[0] if len(set(w)) == 1 else self.sum_d.new_tensor(w)[:, None]
        sq, dot = [], []
        storages = Counter(grads[n].untyped_storage().data_ptr() for n in self.names)
        for n in self.names:  # in place where the storage is this sample's alone, 3 reads
            centre = self.centre[n].reshape(-1)
            flat = grads[n].reshape(count, -1)
            mine = flat.is_contiguous() and storages[grads[n].untyped_storage().data_ptr()] == 1
            diff = flat.sub_(centre) if mine else flat - centre
            total = diff.sum(0) if isinstance(wt, int) else (wt * diff).sum(0)
            total = (total * wt if isinstance(wt, int) else total).reshape(self.centre[n].shape)
            self.sum_diff[n] = self.sum_diff[n] + total if n in self.sum_diff else total
            sq.append(torch.linalg.vector_norm(diff, dim=1).square())
            dot.append(diff @ centre)
        d = wt * self._per_group(sq)  # (c, G): w_j ‖m_j − c‖²
        p = self._per_group(dot)  # (c, G): (m_j − c)·c
        self.sum_d += d.sum(0)
        self.sum_d2 += d.square().sum(0)
        self.sum_wp2 += (wt * p.square()).sum(0)
        self.count += count
        self.weight += sum(w)

    def add_norms(self, sq: Params, dot: Params, total: Params | None = None) -> None:
        """Add samples m_j (unit weights) given only their squared norms ‖m_j‖² and dots
        m_j·c with the centre, each a (count,) tensor per parameter: then
        d_j = ‖m_j‖² − 2 m_j·c + ‖c‖² and (m_j − c)·c = m_j·c − ‖c‖², the same sums as
        :meth:`add` without the samples (:mod:`layerwise.sensitivity.factorised`).
        ``total``: Σ_j m_j for the parameters it names; the others' samples average to the
        centre exactly."""
        count = sq[self.names[0]].shape[0]
        squares = torch.stack([sq[n] for n in self.names], dim=-1)  # (count, params)
        dots = torch.stack([dot[n] for n in self.names], dim=-1)
        projected = dots - self._centre_sq_each()  # (m_j − c)·c
        d = self._per_group_columns(squares - dots - projected)  # (count, G)
        p = self._per_group_columns(projected)
        self.sum_d += d.sum(0)
        self.sum_d2 += d.square().sum(0)
        self.sum_wp2 += p.square().sum(0)
        for n, t in (total or {}).items():
            diff = t - count * self.centre[n]
            self.sum_diff[n] = self.sum_diff[n] + diff if n in self.sum_diff else diff
        self.count += count
        self.weight += count

    def finish(self, method: str = "per_example") -> BatchGradStats:
        """Per-group estimates by ``method`` ("per_example", "micro_batch": the unbiased
        ANOVA estimate above; "two_batch": McCandlish et al. from the same samples)."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        m, w = self.count, self.weight
        if m < 2:
            raise ValueError(f"gradient noise needs at least 2 samples, got {m}")
        sq_centre = self._per_group_columns(self._centre_sq_each())
        if self.sum_diff:  # m̄ − c = Σ_j w_j (m_j − c) / W
            zero = sq_centre.new_zeros(())
            delta = {n: s / w for n, s in self.sum_diff.items()}
            sq_delta = self._per_group(
                [delta[n].square().sum() if n in delta else zero for n in self.names]
            )
            dot_delta = self._per_group(
                [(delta[n] * self.centre[n]).sum() if n in delta else zero for n in self.names]
            )
        else:  # the samples average to the centre exactly: m̄ − c = 0, no correction terms
            sq_delta = dot_delta = None  # (x − w·0 is x, bit for bit: the terms are skipped)
        if method == "two_batch":
            from layerwise.sensitivity.two_batch import two_batch_noise

            zero = torch.zeros_like(sq_centre) if dot_delta is None else dot_delta
            small = self.sum_d / w + 2 * zero + sq_centre  # Σ w_j ‖m_j‖² / W
            trace = two_batch_noise(small, sq_centre, w / m, w).trace_sigma
        elif sq_delta is None:
            trace = self.sum_d / (m - 1)
        else:
            trace = (self.sum_d - w * sq_delta) / (m - 1)
        var_d = (self.sum_d2 - self.sum_d.square() / m).clamp_min(0) / (m - 1)
        trace_var = (m / (m - 1)) ** 2 * var_d / m
        projected = self.sum_wp2 if dot_delta is None else self.sum_wp2 - w * dot_delta.square()
        projected = projected.clamp_min(0) / (m - 1)
        projected = torch.where(projected == 0, projected, projected / sq_centre)
        return BatchGradStats(w, m, trace, trace_var, projected, sq_centre)


def combine_batches(stats: Sequence[BatchGradStats]) -> tuple[torch.Tensor, ...]:
    """(tr(Σ̂), Var[tr(Σ̂)], Var[‖Ĝ‖]) over batches weighted by size (module docstring)."""
    total = sum(s.examples for s in stats)
    trace = sum(s.trace_sigma * (s.examples / total) for s in stats)
    trace_var = sum(s.trace_sigma_var * (s.examples / total) ** 2 for s in stats)
    norm_var = sum(s.projected_var * (s.examples / total) ** 2 / s.examples for s in stats)
    return trace, trace_var, norm_var


def noise_to_signal(
    trace_sigma: torch.Tensor,
    grad_sq_norm: torch.Tensor,
    examples: int,
    batch_size: float | None = None,
) -> torch.Tensor:
    """(N / B) tr(Σ̂) / (N ‖Ĝ‖² − tr(Σ̂)), the bias-corrected noise-to-signal ratio of a
    batch of ``batch_size`` B (default N = ``examples``) given ‖Ĝ‖² over N examples.

    >>> noise_to_signal(torch.tensor([2.0, 0.0, 5.0]), torch.tensor([1.0, 0.0, 1.0]), 4)
    tensor([1., 0., inf])
    >>> noise_to_signal(torch.tensor([2.0]), torch.tensor([1.0]), 4, batch_size=2)
    tensor([2.])
    """
    scale = 1.0 if batch_size is None else examples / batch_size
    denom = examples * grad_sq_norm - trace_sigma
    ratio = scale * trace_sigma / denom
    ratio = torch.where((denom <= 0) & (trace_sigma > 0), torch.inf, ratio)
    return torch.where(trace_sigma == 0, torch.zeros_like(ratio), ratio)
