"""Benchmark of the Gauss-Newton trace: its cost in forward + backward units, and its error.

Run ``python -m layerwise.experiments.benchmarks.ggn`` (``--help`` for options). For the MLP
and the CNN of :mod:`layerwise.experiments.benchmarks.sensitivity`, at ``--batch`` examples:

* ``cost``: :func:`ggn_cost`, the whole ``estimate(..., quantities=["ggn_trace"])`` call with
  ``ggn="mc"`` at ``--samples`` label samples (and ``ggn="exact"``), divided by one plain
  forward + backward pass of the same batch, run round-robin with it (median of
  ``--repeats``), threads 1 by default (a shared machine's load then drifts over both);
* ``error``: :func:`ggn_errors`, the median over ``--seeds`` seeds and over groups of
  |estimate / exact − 1|, exact from ``ggn="exact"`` in float64, for both label samplers,
  on the random-init models and on the bundled digits MLP trained to ~95% (its confident
  predictions are where the samplers differ).

Target (issue: "Curvature a rate can follow"): ``ggn_trace`` (mc) <= 4 units at batch 128.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from layerwise.experiments.benchmarks.sensitivity import MODELS, interleaved_medians
from layerwise.sensitivity import CrossEntropy, estimate

__all__ = ["ggn_cost", "ggn_errors"]

#: Cross-entropy of ``model(inputs)`` against ``targets`` on a batch ``(inputs, targets)``.
LOSS = CrossEntropy(lambda model, batch: model(batch[0]), lambda batch: batch[1])


def ggn_cost(
    model: nn.Module, loss: Any, batch: Any, *, samples: int = 4, repeats: int = 9
) -> dict[str, float]:
    """Seconds of one plain forward + backward pass (``unit_ms``, in ms) and of the
    ``ggn_trace`` estimate, sampled (``mc``) and exact (``exact``), in those units."""

    def unit() -> None:
        model.zero_grad(set_to_none=True)
        loss(model, batch).backward()
        model.zero_grad(set_to_none=True)

    def ggn(**kw: Any) -> Callable[[], object]:
        return lambda: estimate(model, loss, batch, quantities=["ggn_trace"], **kw)

    fns = {"unit": unit, "mc": ggn(ggn_samples=samples), "exact": ggn(ggn="exact")}
    seconds = interleaved_medians(fns, repeats)
    base = seconds.pop("unit")
    return {"unit_ms": base * 1e3, **{k: v / base for k, v in seconds.items()}}


def ggn_errors(
    model: nn.Module, loss: Any, batch: Any, *, samples: int = 4, seeds: int = 20
) -> dict[str, float]:
    """Median over seeds and groups of |estimate / exact − 1| per label sampler (float64)."""
    kw = {"quantities": ["ggn_trace"], "dtype": torch.float64}
    exact = estimate(model, loss, batch, ggn="exact", **kw)
    out = {}
    for sampler in ("importance", "predictive"):
        errors = []
        for seed in range(seeds):
            r = estimate(model, loss, batch, ggn_samples=samples, ggn_sampler=sampler, seed=seed,
                         **kw)  # fmt: skip
            errors += [abs(r[g.group].ggn_trace / g.ggn_trace - 1) for g in exact if g.ggn_trace]
        out[sampler] = statistics.median(errors)
    return out


def _trained_digits(batch: int) -> tuple[nn.Module, Any, Any]:
    from layerwise.experiments.analysis import bundled_default

    inputs = bundled_default(seed=0, batches=1, device=torch.device("cpu"), dtype=torch.float32)
    x, y = inputs.batches[0]
    return inputs.model, inputs.loss_fn, (x[:batch], y[:batch])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--samples", type=int, default=4, help="label samples per batch (4)")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--seeds", type=int, default=20, help="seeds behind each error (20)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, {args.samples} label samples, threads {args.threads}")
    heads = ("model", "params", "unit_ms", "mc", "exact", "err_imp", "err_pred")
    print(" ".join(f"{h:>8}" for h in heads))
    cases = []
    for name, make in MODELS.items():
        torch.manual_seed(0)
        model, inputs = make()
        cases.append((name, model, LOSS, (inputs(args.batch), torch.randint(0, 10, (args.batch,)))))
    cases.append(("digits", *_trained_digits(args.batch)))
    for name, model, loss, batch in cases:
        cost = ggn_cost(model, loss, batch, samples=args.samples, repeats=args.repeats)
        err = ggn_errors(model, loss, batch, samples=args.samples, seeds=args.seeds)
        params = sum(p.numel() for p in model.parameters())
        figures = (cost["unit_ms"], cost["mc"], cost["exact"], err["importance"], err["predictive"])
        print(f"{name:>8} {params:>8} " + " ".join(f"{v:>8.3g}" for v in figures))


if __name__ == "__main__":
    main()
