"""Recalibration under ``torch.distributed``: one report, identical on every rank.

Each rank r estimates on its own batch of b_r examples with the *same* probe seed (the
probe generators advance in step), computes its local mean gradient G_r on that batch
(one extra forward and backward pass), and the ranks exchange

- ``Σ_r b_r G_r`` by one ``all_reduce`` (float64), giving the gradient of the concatenated
  batch ``Ḡ = Σ_r b_r G_r / B`` with ``B = Σ_r b_r``;
- their reports, local squared norms ``‖G_r‖²`` and sizes by one ``all_gather_object``.

Every rank then pools the same gathered list in the same order (:func:`pool_reports`), so
the pooled report, and the controller's multipliers, are bit-identical on all ranks.
Pooled per group (w_r = b_r / B):

=========================  ================================================================
``hessian_trace``          Σ w_r t_r: the Hutchinson estimate of tr(H) of the concatenated
                           batch's mean loss, exactly (H = Σ w_r H_r and the probes are shared)
``hessian_trace_stderr``   Σ w_r se_r, an upper bound (Minkowski) on the stderr over the
                           shared probes, whose per-rank values are correlated
``ggn_trace``              Σ w_r t_r, the GGN trace of the concatenated batch's mean loss
                           (exact ones exactly; sampled ones unbiased)
``ggn_trace_stderr``       Σ w_r se_r, an upper bound (Minkowski): the ranks draw their labels'
                           noise from the same seed, so their errors may be correlated
``grad_norm``              ‖Ḡ‖, exactly the concatenated batch's
``grad_variance``          tr(Σ̂)/n_g with tr(Σ̂) = [Σ_r (M_r − 1) tr_r + S_between] / (Σ_r M_r − 1),
                           where tr_r is rank r's unbiased estimate from M_r gradient samples
                           and S_between = Σ_r b_r ‖G_r‖² − B ‖Ḡ‖² the between-rank sum of
                           squares (E S_between = (R − 1) tr Σ): the one-way ANOVA pooling,
                           which for per-example samples equals the per-example estimate on the
                           concatenated batch exactly. Without per-rank variances (M_r = 1,
                           tr_r = 0) it is the two-batch estimator of McCandlish et al. (2018,
                           App. A) with each rank's local gradient as a small batch and the
                           all-reduced one as the big batch (=
                           :func:`layerwise.sensitivity.two_batch_noise`
                           for equal b_r), generalised to unequal b_r
``noise_to_signal``        tr(Σ̂) / (B ‖Ḡ‖² − tr(Σ̂)), the estimator's bias-corrected convention
``grad_variance_stderr``   sqrt(Σ_r ((M_r − 1)/(M − 1))² se_r²), the within-rank part only
                           (approximate: the between-rank part's noise is not included)
``grad_norm_stderr``       sqrt(Σ_r w_r² se_r²), the per-rank delta-method errors propagated
                           to Ḡ as independent (approximate)
``param_norm``, ``num_params``, ``hessian_probes``, ``ggn_samples``: rank 0's (identical on
every rank)
=========================  ================================================================

Cost: probes and HVPs as one rank's, examples and batches summed, seconds the slowest rank's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from layerwise.sensitivity import EstimateCost, GroupEstimate, SensitivityReport

__all__ = [
    "all_finite",
    "comm_device",
    "is_distributed",
    "local_gradient_sq_norms",
    "local_mean_gradient",
    "pool_reports",
    "sync_report",
]


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def comm_device() -> torch.device:
    """Where collective tensors live: the current CUDA device for NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_finite(flag: bool) -> bool:
    """``flag`` and-ed over the ranks (so every rank takes the same branch)."""
    t = torch.tensor([0.0 if flag else 1.0], dtype=torch.float64, device=comm_device())
    torch.distributed.all_reduce(t)
    return bool(t.item() == 0.0)


def local_mean_gradient(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batch: Any,
    names: Sequence[str],
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The mean-loss gradient on ``batch`` for the parameters ``names``, computed on detached
    copies (:class:`layerwise.sensitivity.functional.FunctionalLoss`, in ``dtype`` if given, as the
    estimator computes), leaving no trace."""
    from layerwise.sensitivity.batching import cast_batch
    from layerwise.sensitivity.functional import FunctionalLoss, leaves_no_trace

    with leaves_no_trace(model), torch.enable_grad():
        loss = FunctionalLoss(model, loss_fn, names, dtype)
        return torch.func.grad(loss)(dict(loss.values), cast_batch(batch, dtype))


def local_gradient_sq_norms(
    grads: Mapping[str, torch.Tensor], mapping: Mapping[str, Sequence[str]], size: int
) -> tuple[dict[str, float], dict[str, float]]:
    """All-reduce ``size * grads`` and return per group (‖G_r‖², ‖Ḡ‖²) as floats, with
    Ḡ the size-weighted mean gradient over the ranks (sizes all-reduced alongside)."""
    dist = torch.distributed
    order = [n for names in mapping.values() for n in names]
    device = comm_device()
    flat = torch.cat([grads[n].detach().reshape(-1).to(device, torch.float64) for n in order])
    total = torch.tensor([float(size)], dtype=torch.float64, device=device)
    summed = torch.cat([flat * size, total])
    dist.all_reduce(summed)
    mean = summed[:-1] / summed[-1]
    local_sq, global_sq, start = {}, {}, 0
    sq_local, sq_mean = flat.square(), mean.square()
    bounds = []
    for group, names in mapping.items():
        stop = start + sum(grads[n].numel() for n in names)
        bounds.append((group, start, stop))
        start = stop
    sums = torch.stack(
        [torch.stack([sq_local[a:b].sum(), sq_mean[a:b].sum()]) for _, a, b in bounds]
    ).tolist()
    for (group, _, _), (loc, glob) in zip(bounds, sums, strict=True):
        local_sq[group], global_sq[group] = loc, glob
    return local_sq, global_sq


def sync_report(
    report: SensitivityReport,
    local_sq: Mapping[str, float],
    global_sq: Mapping[str, float],
    size: int,
    samples: int | None,
    *,
    noise: bool = True,
) -> SensitivityReport:
    """Gather every rank's report and pool them (:func:`pool_reports`), identically on all."""
    mine = {
        "report": report.to_dict(),
        "local_sq": dict(local_sq),
        "size": size,
        "samples": samples,
    }
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    return pool_reports(
        [SensitivityReport.from_dict(g["report"]) for g in gathered],
        [g["local_sq"] for g in gathered],
        dict(global_sq),
        [g["size"] for g in gathered],
        [g["samples"] for g in gathered],
        noise=noise,
    )


def _get(report: SensitivityReport, group: str, field: str) -> float | None:
    return getattr(report[group], field)


def pool_reports(
    reports: Sequence[SensitivityReport],
    local_sq: Sequence[Mapping[str, float]],
    global_sq: Mapping[str, float],
    sizes: Sequence[int],
    samples: Sequence[int | None],
    *,
    noise: bool = True,
) -> SensitivityReport:
    """Pool per-rank reports into the concatenated batch's (module docstring). Pure.

    ``local_sq[r][g]`` = ‖G_r‖², ``global_sq[g]`` = ‖Ḡ‖², ``sizes[r]`` = b_r, ``samples[r]``
    = M_r, the gradient samples behind rank r's ``grad_variance`` (``None``: b_r).
    ``noise``: whether to report ``grad_variance`` and ``noise_to_signal`` (pooled from the
    ranks' variances when they have them, else the between-rank two-batch estimate).
    """
    R = len(reports)
    if not (R >= 2 and len(local_sq) == len(sizes) == len(samples) == R):
        raise ValueError(f"pool_reports needs >= 2 ranks with one entry each, got {R} reports")
    B = float(sum(sizes))
    w = [b / B for b in sizes]
    first = reports[0]
    groups = []
    for g in first.names:
        est = first[g]
        fields: dict[str, Any] = {
            "group": g,
            "num_params": est.num_params,
            "param_norm": est.param_norm,
            "hessian_probes": est.hessian_probes,
            "ggn_samples": est.ggn_samples,
        }
        traces = [_get(r, g, "hessian_trace") for r in reports]
        if est.hessian_trace is not None:
            fields["hessian_trace"] = math.fsum(wr * t for wr, t in zip(w, traces, strict=True))
            ses = [_get(r, g, "hessian_trace_stderr") for r in reports]
            if all(s is not None for s in ses):
                fields["hessian_trace_stderr"] = math.fsum(
                    wr * s for wr, s in zip(w, ses, strict=True)
                )
        fields.update(_pooled_ggn(reports, g, w))
        big = global_sq.get(g, math.nan)
        if g in global_sq and est.grad_norm is not None:
            fields["grad_norm"] = math.sqrt(big) if big >= 0 else math.nan
            ses = [_get(r, g, "grad_norm_stderr") for r in reports]
            if all(s is not None for s in ses):
                fields["grad_norm_stderr"] = math.sqrt(
                    math.fsum((wr * s) ** 2 for wr, s in zip(w, ses, strict=True))
                )
        if g in global_sq and noise:
            between = math.fsum(b * sq[g] for b, sq in zip(sizes, local_sq, strict=True)) - B * big
            variances = [_get(r, g, "grad_variance") for r in reports]
            n = est.num_params
            if all(v is not None for v in variances) and n > 0:
                m = [b if s is None else s for b, s in zip(sizes, samples, strict=True)]
                within = math.fsum((mr - 1) * v * n for mr, v in zip(m, variances, strict=True))
                trace = (within + between) / (sum(m) - 1)
                ses = [_get(r, g, "grad_variance_stderr") for r in reports]
                if all(s is not None for s in ses):
                    fields["grad_variance_stderr"] = math.sqrt(
                        math.fsum(
                            ((mr - 1) / (sum(m) - 1) * s) ** 2 for mr, s in zip(m, ses, strict=True)
                        )
                    )
            else:
                trace = between / (R - 1)
            if n > 0:
                fields["grad_variance"] = trace / n
            fields["noise_to_signal"] = _noise_to_signal(trace, big, B)
        groups.append(GroupEstimate(**fields))
    costs = [r.cost for r in reports]
    cost = EstimateCost(
        probes=max(c.probes for c in costs),
        hvps=max(c.hvps for c in costs),
        ggn_passes=max(c.ggn_passes for c in costs),
        examples=sum(c.examples for c in costs),
        batches=sum(c.batches for c in costs),
        seconds=max(c.seconds for c in costs),
    )
    settings = {**first.settings, "distributed": {"world_size": R, "sizes": list(sizes)}}
    return SensitivityReport(tuple(groups), cost, settings)


def _pooled_ggn(reports: Sequence[SensitivityReport], g: str, w: Sequence[float]) -> dict:
    """``ggn_trace`` and its standard error of the concatenated batch (module docstring)."""
    traces = [_get(r, g, "ggn_trace") for r in reports]
    if any(t is None for t in traces):
        return {}
    out = {"ggn_trace": math.fsum(wr * t for wr, t in zip(w, traces, strict=True))}
    ses = [_get(r, g, "ggn_trace_stderr") for r in reports]
    if all(s is not None for s in ses):
        out["ggn_trace_stderr"] = math.fsum(wr * s for wr, s in zip(w, ses, strict=True))
    return out


def _noise_to_signal(trace: float, grad_sq: float, examples: float) -> float:
    """tr(Σ̂) / (N ‖Ĝ‖² − tr(Σ̂)), as :func:`layerwise.sensitivity.gradient_stats.noise_to_signal`:
    ``inf`` when the denominator is <= 0 while tr(Σ̂) > 0, 0 when tr(Σ̂) == 0, NaN stays NaN."""
    if trace == 0:
        return 0.0
    denom = examples * grad_sq - trace
    if math.isnan(denom) or math.isnan(trace):
        return math.nan
    if denom <= 0 and trace > 0:
        return math.inf
    if denom == 0:
        return -math.inf
    return trace / denom
