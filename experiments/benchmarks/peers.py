"""The peers of the sensitivity benchmark, each behind one adapter: PyHessian, BackPACK
and curvlinops, measured on the same model and batch as ours.

They are not dependencies of the project. Install them in the benchmark's environment
only (with the torch already there, so pip does not replace it)::

    pip install torch==2.13.0 pyhessian backpack-for-pytorch curvlinops-for-pytorch

An adapter returns ``None`` when its package is missing, and :func:`missing` says how to
install it. Every adapter returns a callable that does the peer's whole job once (its
set-up pass included) and returns its answer, so the benchmark times it as it is:

* :func:`pyhessian_trace` -- PyHessian's Hutchinson estimate of the whole-model trace
  tr(H) (it has no per-group traces), ``probes`` Rademacher probes, never stopping early;
* :func:`backpack_diag_hessian` -- BackPACK's exact Hessian diagonal (``DiagHessian``),
  summed per group: exact per-group traces, for the sequential models it supports;
* :func:`backpack_variance` -- BackPACK's ``Variance``, summed per group and converted to
  our unbiased tr(Σ̂_g) = B² · B/(B−1) · Σ variance (BackPACK's is the biased variance of
  the per-example gradients of the mean loss, i.e. of ∇ℓ_i / B);
* :func:`curvlinops_traces` -- Hutchinson per group on curvlinops' block-diagonal
  ``HessianLinearOperator`` (one block per group: isolated probes), ``probes`` products.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "INSTALL",
    "backpack_diag_hessian",
    "backpack_variance",
    "curvlinops_traces",
    "missing",
    "pyhessian_trace",
]

#: package to import -> the pip name to install
INSTALL = {
    "pyhessian": "pyhessian",
    "backpack": "backpack-for-pytorch",
    "curvlinops": "curvlinops-for-pytorch",
}

Batch = tuple[torch.Tensor, torch.Tensor]
Groups = Mapping[str, list[str]]


def missing() -> list[str]:
    """One line per peer that is not importable, saying how to install it."""
    return [
        f"{module} not installed: skipped (pip install torch=={torch.__version__.split('+')[0]} "
        f"{pip})"
        for module, pip in INSTALL.items()
        if importlib.util.find_spec(module) is None
    ]


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def pyhessian_trace(
    model: nn.Module, batch: Batch, probes: int, seed: int | None = None
) -> Callable[[], float] | None:
    """PyHessian's whole-model trace (cross-entropy), the mean over ``probes`` probes
    (drawn from the global RNG, seeded with ``seed`` when given, restored after)."""
    if not _available("pyhessian"):
        return None
    from pyhessian import hessian

    def run() -> float:
        copy_ = copy.deepcopy(model)  # PyHessian switches to eval and writes .grad
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore", UserWarning)  # backward(create_graph=True) warns
            if seed is not None:
                torch.manual_seed(seed)
            h = hessian(copy_, nn.functional.cross_entropy, data=batch, cuda=False)
            terms = h.trace(maxIter=probes, tol=-math.inf)  # never "converged"
        if len(terms) != probes:
            raise RuntimeError(f"PyHessian stopped after {len(terms)} of {probes} probes")
        return sum(terms) / len(terms)

    return run


def _extended(model: nn.Module) -> tuple[nn.Module, nn.Module, Any] | None:
    if not _available("backpack"):
        return None
    import backpack

    copy_ = backpack.extend(copy.deepcopy(model))  # hooks that functorch must not see
    return copy_, backpack.extend(nn.CrossEntropyLoss()), backpack


def _per_group(model: nn.Module, groups: Groups, attr: str) -> dict[str, float]:
    params = dict(model.named_parameters())
    return {
        g: sum(float(getattr(params[n], attr).sum()) for n in names) for g, names in groups.items()
    }


def backpack_diag_hessian(
    model: nn.Module, batch: Batch, groups: Groups
) -> Callable[[], dict[str, float]] | None:
    """Exact per-group traces from BackPACK's ``DiagHessian`` (one extended backward)."""
    ready = _extended(model)
    if ready is None:
        return None
    copy_, loss, backpack = ready
    from backpack.extensions import DiagHessian

    def run() -> dict[str, float]:
        copy_.zero_grad(set_to_none=True)
        with warnings.catch_warnings(), backpack.backpack(DiagHessian()):
            warnings.simplefilter("ignore", UserWarning)
            loss(copy_(batch[0]), batch[1]).backward()
        return _per_group(copy_, groups, "diag_h")

    return run


def backpack_variance(
    model: nn.Module, batch: Batch, groups: Groups
) -> Callable[[], dict[str, float]] | None:
    """Per-group unbiased tr(Σ̂_g) from BackPACK's ``Variance`` (module docstring)."""
    ready = _extended(model)
    if ready is None:
        return None
    copy_, loss, backpack = ready
    from backpack.extensions import Variance

    b = batch[0].shape[0]

    def run() -> dict[str, float]:
        copy_.zero_grad(set_to_none=True)
        with warnings.catch_warnings(), backpack.backpack(Variance()):
            warnings.simplefilter("ignore", UserWarning)
            loss(copy_(batch[0]), batch[1]).backward()
        biased = _per_group(copy_, groups, "variance")
        return {g: v * b * b * b / (b - 1) for g, v in biased.items()}

    return run


def curvlinops_traces(
    model: nn.Module, batch: Batch, groups: Groups, probes: int, seed: int = 0
) -> Callable[[], dict[str, float]] | None:
    """Per-group Hutchinson traces on curvlinops' block-diagonal Hessian operator."""
    if not _available("curvlinops"):
        return None
    from curvlinops import HessianLinearOperator

    params = dict(model.named_parameters())
    order = [n for names in groups.values() for n in names]
    sizes = [len(names) for names in groups.values()]

    def run() -> dict[str, float]:
        op = HessianLinearOperator(
            model, nn.CrossEntropyLoss(), [params[n] for n in order], [batch],
            check_deterministic=False, num_data=batch[0].shape[0], block_sizes=sizes,
        )  # fmt: skip
        gen = torch.Generator().manual_seed(seed)
        dim = sum(params[n].numel() for n in order)
        first = params[order[0]]
        v = torch.randint(0, 2, (dim, probes), generator=gen).to(first.dtype) * 2 - 1
        terms = (v * (op @ v)).sum(1) / probes  # (P,): v_i (Hv)_i averaged over probes
        out, start = {}, 0
        for g, names in groups.items():
            stop = start + sum(params[n].numel() for n in names)
            out[g] = float(terms[start:stop].sum())
            start = stop
        return out

    return run
