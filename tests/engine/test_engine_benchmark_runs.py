"""The engine benchmark's pieces run on its MLP with tiny repeat counts (no timing is
asserted: the cost targets are the benchmark's, not the tests')."""

from __future__ import annotations

import math

import torch

from layerwise.experiments.benchmarks import engine as bench


def test_the_benchmark_pieces_run_and_report_what_they_measure(monkeypatch):
    monkeypatch.setattr(bench, "DEFAULT_EVERY", 4)  # 9 steps, recalibrating after 4 and 8
    torch.manual_seed(0)
    task = bench.TASKS[0]
    ratios, bare, in_step = bench.per_step_ratios(task, steps=4, repeats=1)
    assert set(ratios) == {"check", "no check"} and bare > 0 and math.isfinite(in_step)
    check, read = bench.check_costs(task, calls=2, repeats=1)
    assert check > 0 and read > 0
    added = bench.step_call_overhead(task, calls=5, repeats=1)
    lines = bench._step_report({"check": 2.0, "no check": 1.0}, bare, added, in_step, check, read)
    assert "missed with the check" in lines[-1]
    run = bench.training_ratio(task, bench.loss_fn, repeats=1)
    assert run.ratio > 0 and run.bare_step > 0 and math.isfinite(run.recalibration)
    recal, step, unit = bench.recalibration_cost(task, bench.LOSS, {"ggn_samples": 2}, repeats=1)
    assert recal > 0 and step > 0 and unit > 0
