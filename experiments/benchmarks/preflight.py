"""Benchmark of the engine's first-batch dry run (:mod:`layerwise.engine.preflight`).

Run ``python -m layerwise.experiments.benchmarks.preflight`` (``--help`` for options). For
the MLP and the CNN of :mod:`layerwise.experiments.benchmarks.sensitivity` at ``--batch``
examples and each rule (``curvature``: Hessian traces; ``noise``: per-example gradient
variance; ``curvature_ggn``: the sampled GGN trace), prints the seconds of

* ``dry run``: :func:`layerwise.engine.preflight.dry_run` on the batch, as the engine runs it
  once, before its first step;
* ``recalibration``: the estimate of one recalibration at the engine's defaults
  (:func:`layerwise.engine.options.estimator_options`),

each divided by one plain forward + backward pass of the same model and batch, run
round-robin with it (median of ``--repeats``, one thread by default).
"""

from __future__ import annotations

import argparse

import torch

from layerwise.engine.options import estimator_options
from layerwise.engine.preflight import dry_run
from layerwise.experiments.benchmarks.sensitivity import (
    CROSS_ENTROPY,
    MODELS,
    cross_entropy,
    interleaved_medians,
    plain_pass,
)
from layerwise.policies import SensitivityController
from layerwise.sensitivity import default_groups, estimate

__all__ = ["preflight_cost"]

RULES = ("curvature", "noise", "curvature_ggn")


def preflight_cost(name: str, rule: str, batch_size: int, repeats: int) -> dict[str, float]:
    """``{"dry_run": units, "recalibration": units}`` for model ``name`` and ``rule``."""
    torch.manual_seed(0)
    model, make_inputs = MODELS[name]()
    batch = (make_inputs(batch_size), torch.randint(0, 10, (batch_size,)))
    loss = CROSS_ENTROPY if rule == "curvature_ggn" else cross_entropy
    options, runtime, _ = estimator_options(None, SensitivityController(rule))
    groups = default_groups(model)

    def recalibration() -> None:
        estimate(model, loss, batch, groups=groups, options=options)

    times = interleaved_medians(
        {
            "unit": lambda: plain_pass(model, batch),
            "dry_run": lambda: dry_run(model, loss, batch, groups, options, runtime, 0, 100),
            "recalibration": recalibration,
        },
        repeats,
    )
    return {k: times[k] / times["unit"] for k in ("dry_run", "recalibration")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="examples per batch")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"{'model':6s} {'rule':14s} {'dry run':>8s} {'recalibration':>14s}  (fwd+bwd units)")
    for name in ("mlp", "cnn"):
        for rule in RULES:
            cost = preflight_cost(name, rule, args.batch, args.repeats)
            print(f"{name:6s} {rule:14s} {cost['dry_run']:8.2f} {cost['recalibration']:14.2f}")


if __name__ == "__main__":
    main()
