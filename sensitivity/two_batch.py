"""The two-batch-size gradient noise estimator (McCandlish et al. 2018, Appendix A).

For a gradient G_b averaged over b independent examples (per-example covariance Σ),

    E[‖G_b‖²] = ‖G‖² + tr(Σ) / b.

Measuring ‖G_b‖² at two batch sizes b_small < b_big and solving the two equations gives

    ‖G‖²  ≈ (b_big ‖G_big‖² − b_small ‖G_small‖²) / (b_big − b_small)
    tr(Σ) ≈ (‖G_small‖² − ‖G_big‖²) / (1/b_small − 1/b_big)

both unbiased (linear in unbiased quantities); their ratio is the "simple noise scale"
B_simple = tr(Σ)/‖G‖². No per-example gradient is needed, and restricted to a group of
parameters each squared norm gives that group's estimates. Under data parallelism the
local gradient of each rank is a small batch and the all-reduced gradient a big one;
averaging the small-batch squared norms over ranks (b_small = per-rank batch,
b_big = world size x b_small) keeps it unbiased and lowers its variance.

``estimate(..., variance="two_batch")`` uses the micro-batches of a batch as the small
batches (b_small = B/M) and the whole batch as the big one. When the batch gradient is
the mean of the micro-batch gradients (a mean loss, no BatchNorm), this equals the
micro-batch estimator exactly; the two differ only where examples interact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

__all__ = ["NoiseEstimate", "two_batch_noise"]


class NoiseEstimate(NamedTuple):
    """Unbiased estimates of tr(Σ) (per-example gradient covariance) and ‖G‖²."""

    trace_sigma: Any
    grad_sq_norm: Any


def _check_size(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of examples, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _solve(small: Any, big: Any, b_small: float, b_big: float) -> NoiseEstimate:
    trace_sigma = (small - big) / (1.0 / b_small - 1.0 / b_big)
    grad_sq_norm = (b_big * big - b_small * small) / (b_big - b_small)
    return NoiseEstimate(trace_sigma, grad_sq_norm)


def two_batch_noise(
    small_sq_norms: Mapping[str, Any] | torch.Tensor | float,
    big_sq_norms: Mapping[str, Any] | torch.Tensor | float,
    b_small: float,
    b_big: float,
) -> dict[str, NoiseEstimate] | NoiseEstimate:
    """Per-group (tr(Σ), ‖G‖²) from squared gradient norms at two batch sizes.

    ``small_sq_norms`` / ``big_sq_norms``: ‖G_small‖² and ‖G_big‖² per group, either as
    mappings ``{group: value}`` (same keys; values floats or tensors) or as tensors /
    floats (one entry per group). Returns ``{group: NoiseEstimate}`` for mappings, else one
    :class:`NoiseEstimate` of tensors (floats). Pure: no state, no communication.

    >>> est = two_batch_noise({"fc": 3.0}, {"fc": 1.5}, b_small=2, b_big=8)
    >>> est["fc"].trace_sigma, est["fc"].grad_sq_norm
    (4.0, 1.0)
    """
    b_small = _check_size("b_small", b_small)
    b_big = _check_size("b_big", b_big)
    if not b_small < b_big:
        raise ValueError(
            f"b_small must be smaller than b_big, got b_small={b_small}, b_big={b_big}"
        )
    small_is_map, big_is_map = (
        isinstance(small_sq_norms, Mapping),
        isinstance(big_sq_norms, Mapping),
    )
    if small_is_map != big_is_map:
        raise TypeError(
            "small_sq_norms and big_sq_norms must both be mappings or both tensors/floats, got "
            f"{type(small_sq_norms).__name__} and {type(big_sq_norms).__name__}"
        )
    if small_is_map:
        if set(small_sq_norms) != set(big_sq_norms):
            raise ValueError(
                "small_sq_norms and big_sq_norms must name the same groups, got "
                f"{sorted(small_sq_norms)} and {sorted(big_sq_norms)}"
            )
        return {
            g: _solve(small_sq_norms[g], big_sq_norms[g], b_small, b_big) for g in small_sq_norms
        }
    for name, value in (("small_sq_norms", small_sq_norms), ("big_sq_norms", big_sq_norms)):
        if isinstance(value, bool) or not isinstance(value, (torch.Tensor, int, float)):
            raise TypeError(f"{name} must be a mapping, a tensor or a float, got {value!r}")
    return _solve(small_sq_norms, big_sq_norms, b_small, b_big)
