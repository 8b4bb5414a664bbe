"""Hutchinson's estimator of the trace of each diagonal block of the Hessian.

For probes v_1..v_K with E[v vᵀ] = I (see :mod:`layerwise.sensitivity.probes`),

    tr(A) ≈ (1/K) Σ_k v_kᵀ A v_k,    stderr = s / √K,

where s is the sample standard deviation of the K terms (Hutchinson 1990; Avron and Toledo
2011; the estimator of PyHessian, Yao et al. 2020). Per group g, two ways:

* **shared probes** (default): one probe over *all* measured parameters and one product
  H v give every group's term z_g = v_gᵀ (H v)_g = v_gᵀ H_gg v_g + v_gᵀ H_g,¬g v_¬g. The
  cross term has mean zero (v_g and v_¬g are independent), so E[z_g] = tr(H_gg): K
  products give all G traces, at the price of extra variance ‖H_g,¬g‖_F² per term
  (Rademacher or Gaussian probes).
* **isolated probes** (``isolated=True``): the probe of group g is zero outside g and the
  product differentiates g's parameters only, so z_g = v_gᵀ H_gg v_g exactly: lower
  variance, G x K products.

Scaling: H is the Hessian of the *mean* loss over the batch, so traces are in loss units
per squared parameter unit, summed over the group.

Stopping rule: with a ``tolerance``, after each chunk of probes the relative standard
error s/(√K |tr|) of every group is checked and the loop stops when all are at most the
tolerance (a group whose terms are all equal, s = 0, counts as converged) or the probe
budget is spent. That check is the only host synchronisation in the loop, and there is
none without a tolerance: the terms stay on the device until the caller reads them.

>>> import torch
>>> from layerwise.sensitivity.probes import make_generator
>>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
>>> like = {"x": torch.zeros(3, dtype=torch.float64)}
>>> z = hutchinson_samples(lambda v: {"x": v["x"] @ A}, like, [0], 1, budget=1,
...                        chunk_size=1, generator=make_generator("cpu", 0))
>>> trace_estimate(z)[0].item()   # exact: a diagonal matrix, one Rademacher probe
6.0
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from layerwise.sensitivity.probes import draw_probes
from layerwise.sensitivity.validation import check_int

__all__ = ["hutchinson_samples", "trace_estimate"]

Params = dict[str, torch.Tensor]


def trace_estimate(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error over the probes (dim 0) of ``samples`` (K, G).

    The standard error is ``nan`` with a single probe (no spread to measure).
    """
    if samples.dim() != 2 or samples.shape[0] < 1:
        raise ValueError(
            f"samples must have shape (probes >= 1, groups), got {tuple(samples.shape)}"
        )
    k = samples.shape[0]
    mean = samples.mean(0)
    if k < 2:
        return mean, torch.full_like(mean, float("nan"))
    return mean, samples.std(0, correction=1) / k**0.5


def _converged(samples: torch.Tensor, tolerance: float) -> bool:
    mean, stderr = trace_estimate(samples)
    return bool((stderr <= tolerance * mean.abs()).all())  # the one host sync per chunk


def hutchinson_samples(
    product: Callable[[Params], Params],
    like: Mapping[str, torch.Tensor],
    group_of: Sequence[int] | torch.Tensor,
    num_groups: int,
    *,
    budget: int,
    chunk_size: int,
    generator: torch.Generator,
    distribution: str = "rademacher",
    tolerance: float | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The Hutchinson terms z (K, num_groups), K <= ``budget``, of ``product`` (v -> H v).

    ``like`` gives the parameters' shapes, dtypes and devices (in order), ``group_of[i]``
    the group of the i-th (a device tensor avoids a host-to-device copy). Probes are drawn
    ``chunk_size`` at a time and each chunk is one batched call of ``product``;
    ``on_chunk(n)`` is told how many products a chunk used.
    """
    check_int("budget", budget, 1)
    check_int("chunk_size", chunk_size, 1)
    check_int("num_groups", num_groups, 1)
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise ValueError(f"tolerance must be a number > 0 or None, got {tolerance!r}")
    names = list(like)
    if not names:
        raise ValueError("like is empty: no parameters to probe")
    if len(group_of) != len(names):
        raise ValueError(f"group_of has {len(group_of)} entries for {len(names)} parameters")
    first = like[names[0]]
    index = torch.as_tensor(group_of, dtype=torch.long, device=first.device)
    chunks: list[torch.Tensor] = []
    forms = getattr(product, "quadratic_forms", None)
    workspace: dict[str, torch.Tensor] = {}
    done = 0
    while done < budget:
        count = min(chunk_size, budget - done)
        probes = draw_probes(like, count, generator, distribution, workspace)
        if forms is not None:
            per_param = forms(probes).to(first.device)
        else:
            products = product(probes)
            per_param = torch.stack(
                [
                    torch.linalg.vecdot(
                        probes[n].reshape(count, -1), products[n].reshape(count, -1)
                    ).to(first.device)
                    for n in names
                ],
                dim=1,
            )  # (count, params)
        z = per_param.new_zeros(count, num_groups).index_add_(1, index, per_param)
        chunks.append(z)
        done += count
        if on_chunk is not None:
            on_chunk(count)
        if tolerance is not None and done >= 2 and _converged(torch.cat(chunks), tolerance):
            break
    return torch.cat(chunks)
