"""Benchmark: what ``LayerwiseOptimizer`` costs, as ratios to the bare optimizer.

``python -m layerwise.experiments.benchmarks.engine [--repeats N] [--threads T] [--quick]``

Two figures per task (a small MLP and a small CNN, CPU, Adam), each measured side by side
in one run: a bare and a wrapped copy train in lockstep (step i of one, then of the other,
the order alternating), so both see the same machine load; medians over the repeats.

1. **Per step between recalibrations**: a training step (``zero_grad``, forward, backward,
   ``step``) through the engine, whose multipliers are not 1 (so the multiply and restore
   really run) and whose next recalibration is far away, against the bare optimizer.
   Target: ratio <= 1.01.
   Alongside, the engine's own cost per ``step()`` (multiply, restore, step count, due
   check) in microseconds, timed around a base optimizer whose step does nothing, and
   that cost as a fraction of the bare training step: the overhead without the noise of
   timing two full training loops.
2. **Training with recalibration**: ``2 * recalibrate_every`` steps with the default
   controller (curvature rule), the default interval and the default probe count, the
   estimation batch being the training batch, against the same steps bare. The one-off
   warm-up of the first estimate (torch loads forward-mode decompositions) is excluded.
   Target: ratio <= 1.03.
3. **Where a recalibration's time goes**: one recalibration (``Recalibrator.run``: the
   estimate, the controller, the history rows) timed against a bare training step, in
   steps and in forward+backward units, with the training ratio it implies,
   1 + cost / (``recalibrate_every`` × step); and the same for other estimator settings
   (2 probes; the gradient norm alone), to show what the default's cost is made of.

Every printed figure is ``wrapped time / bare time``; a task's absolute step time is
printed alongside so the ratios can be read against it. Time is this process's CPU time by
default (``--clock cpu``, with one thread), which other processes on a shared machine
disturb far less than elapsed time; ``--clock wall`` measures elapsed time.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from layerwise.engine import DEFAULT_PROBES, LayerwiseOptimizer
from layerwise.policies import SensitivityController

__all__ = [
    "main",
    "per_step_ratio",
    "recalibration_cost",
    "step_call_overhead",
    "training_ratio",
]

DEFAULT_EVERY = 100  # LayerwiseOptimizer's default recalibrate_every
_CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
_clock = time.process_time


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


TASKS = (
    Task(
        "mlp",
        _mlp,
        lambda g: (torch.randn(128, 64, generator=g), torch.randint(0, 10, (128,), generator=g)),
    ),
    Task(
        "cnn",
        _cnn,
        lambda g: (
            torch.randn(64, 1, 28, 28, generator=g),
            torch.randint(0, 10, (64,), generator=g),
        ),
    ),
)


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _groups(model: nn.Module) -> list[dict[str, Any]]:
    """One named group per module with parameters (multipliers alternate 0.5 / 2)."""
    out = []
    for i, (name, m) in enumerate(
        (n, m) for n, m in model.named_modules() if list(m.parameters(recurse=False))
    ):
        out.append(
            {
                "params": list(m.parameters(recurse=False)),
                "name": name,
                "lr_multiplier": (0.5, 2.0)[i % 2],
            }
        )
    return out


def _build(
    task: Task, wrapped: bool, recalibrate: bool, estimator: Any = None
) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = task.make()
    groups = _groups(model)
    if not wrapped:
        for g in groups:
            del g["lr_multiplier"]
    base = torch.optim.Adam(groups, lr=1e-3)
    if not wrapped:
        return model, base
    every = DEFAULT_EVERY if recalibrate else 10**9
    opt = LayerwiseOptimizer(base, model=model, loss_fn=loss_fn, controller=SensitivityController(),
                             recalibrate_every=every, estimator=estimator)  # fmt: skip
    return model, opt


def _one_step(model: nn.Module, opt: Any, batch: Any, wrapped: bool) -> float:
    start = _clock()
    opt.zero_grad()
    loss_fn(model, batch).backward()
    opt.step(batch) if wrapped else opt.step()
    return _clock() - start


def _lockstep(task: Task, steps: int, recalibrate: bool) -> tuple[list[float], list[float]]:
    """Per-step seconds of a bare and a wrapped run trained in lockstep: step i of one,
    then step i of the other (the order alternating), so both see the same machine load."""
    g = torch.Generator().manual_seed(1)
    batches = [task.batch(g) for _ in range(steps)]
    runs = {False: _build(task, False, recalibrate), True: _build(task, True, recalibrate)}
    times: dict[bool, list[float]] = {False: [], True: []}
    for i, batch in enumerate(batches):
        for wrapped in (False, True) if i % 2 == 0 else (True, False):
            times[wrapped].append(_one_step(*runs[wrapped], batch, wrapped))
    return times[False], times[True]


def _warm_up(task: Task) -> None:
    """First-call costs (allocator, torch's one-off load of forward-mode decompositions)."""
    _lockstep(task, 3, recalibrate=False)
    g = torch.Generator().manual_seed(1)
    _build(task, True, False)[1]._recalibrator.run(task.batch(g), 1, None)


class _NoOpOptimizer(torch.optim.Optimizer):
    """An optimizer whose step does nothing: wrapping it isolates the engine's own cost."""

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        super().__init__(groups, {"lr": 1e-3})

    def step(self, closure: Any = None) -> None:
        return None


def step_call_overhead(task: Task, calls: int = 2000, repeats: int = 21) -> float:
    """Median seconds that ``LayerwiseOptimizer.step()`` adds to a base step between
    recalibrations (multiply, restore, step count, due check), timed around a base
    optimizer whose step does nothing, bare and wrapped blocks interleaved."""
    torch.manual_seed(0)
    model = task.make()
    bare = _NoOpOptimizer(_groups(model))
    ours = LayerwiseOptimizer(
        _NoOpOptimizer(_groups(model)), model=model, loss_fn=loss_fn,
        controller=SensitivityController(), recalibrate_every=10**9,
    )  # fmt: skip
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(repeats):
        for wrapped in (False, True) if r % 2 == 0 else (True, False):
            opt = ours if wrapped else bare
            start = _clock()
            for _ in range(calls):
                opt.step()
            times[wrapped].append((_clock() - start) / calls)
    return statistics.median(times[True]) - statistics.median(times[False])


def per_step_ratio(task: Task, steps: int = 60, repeats: int = 11) -> tuple[float, float]:
    """(median wrapped step / median bare step, median bare seconds per step) between
    recalibrations, over ``repeats`` lockstep runs of ``steps`` steps."""
    bare, ours = [], []
    for _ in range(repeats):
        b, w = _lockstep(task, steps, recalibrate=False)
        bare += b[1:]
        ours += w[1:]
    return statistics.median(ours) / statistics.median(bare), statistics.median(bare)


def training_ratio(task: Task, repeats: int = 5) -> tuple[float, float]:
    """(median over repeats of total wrapped time / total bare time, bare seconds per step)
    over ``2 * recalibrate_every`` lockstep steps, so two recalibrations per run."""
    ratios, per_step = [], []
    for _ in range(repeats):
        b, w = _lockstep(task, 2 * DEFAULT_EVERY, recalibrate=True)
        ratios.append(math.fsum(w) / math.fsum(b))
        per_step.append(math.fsum(b) / len(b))
    return statistics.median(ratios), statistics.median(per_step)


#: Estimator settings whose recalibration cost is broken down (None: the default).
SETTINGS = {
    "default": None,
    "probes=2": {"probes": 2},
    "grad_norm only": {"quantities": ["grad_norm"]},
}


def recalibration_cost(task: Task, estimator: Any = None, repeats: int = 11) -> tuple[float, ...]:
    """(seconds of one recalibration, of a bare training step, of a plain forward+backward),
    medians of interleaved repeats on one training batch."""
    _, opt = _build(task, True, True, estimator)
    bare_model, bare = _build(task, False, True)
    batch = task.batch(torch.Generator().manual_seed(1))
    rec = opt._recalibrator
    rec.run(batch, 1, None)  # first-call costs

    def unit() -> None:
        bare_model.zero_grad(set_to_none=True)
        loss_fn(bare_model, batch).backward()

    jobs = {
        "recal": lambda: rec.run(batch, 1, None),
        "step": lambda: _one_step(bare_model, bare, batch, False),
        "unit": unit,
    }
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(repeats):
        for key, job in jobs.items():
            start = _clock()
            job()
            times[key].append(_clock() - start)
    return tuple(statistics.median(times[k]) for k in jobs)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(
        prog="python -m layerwise.experiments.benchmarks.engine", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--repeats", type=int, default=None, help="repeats (default 11 / 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, for a smoke run")
    parser.add_argument(
        "--clock",
        choices=sorted(_CLOCKS),
        default="cpu",
        help="cpu: this process's CPU time (robust on a shared machine; default), wall: elapsed",
    )
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    global _clock
    _clock = _CLOCKS[args.clock]
    step_repeats = args.repeats or (3 if args.quick else 11)
    train_repeats = args.repeats or (1 if args.quick else 5)
    print(
        f"LayerwiseOptimizer overhead (CPU, {args.threads} thread(s), Adam, {args.clock} time; "
        "ratio = engine / bare, medians of interleaved repeats)"
    )
    print(f"defaults: recalibrate_every={DEFAULT_EVERY}, probes={DEFAULT_PROBES}, rule=curvature")
    results = {}
    for task in TASKS:
        _warm_up(task)
        step, bare_step = per_step_ratio(task, repeats=step_repeats)
        added = step_call_overhead(task, repeats=step_repeats)
        train, _ = training_ratio(task, repeats=train_repeats)
        results[task.name] = {
            "per_step": step,
            "step_call_added_us": 1e6 * added,
            "training": train,
            "bare_step_ms": 1e3 * bare_step,
        }
        print(
            f"  {task.name}: bare training step {1e3 * bare_step:.3f} ms\n"
            f"    between recalibrations {step:.4f} (target <= 1.01); step() alone adds "
            f"{1e6 * added:+.1f} us, i.e. {1 + added / bare_step:.4f} of a training step\n"
            f"    with recalibration     {train:.4f} (target <= 1.03)"
        )
        for label, estimator in SETTINGS.items():
            recal, step_s, unit = recalibration_cost(task, estimator, repeats=step_repeats)
            implied = 1 + recal / (DEFAULT_EVERY * step_s)
            results[task.name][f"recalibration_units[{label}]"] = recal / unit
            print(
                f"    one recalibration, {label:<15} {recal / step_s:5.1f} steps = "
                f"{recal / unit:5.1f} forward+backward units; implies {implied:.4f}"
            )
    return results


if __name__ == "__main__":
    main()
