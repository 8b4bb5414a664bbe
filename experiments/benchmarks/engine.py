"""Benchmark: what ``LayerwiseOptimizer`` costs at its defaults, as ratios to the bare optimizer.

``python -m layerwise.experiments.benchmarks.engine [--repeats N] [--threads T] [--quick]``

Per task (a small MLP and a small CNN, CPU, Adam), each figure measured side by side in one
run: the bare and the wrapped copies train in lockstep (step i of each in turn, the order
alternating), so all see the same machine load; medians over the repeats.

1. **Per step between recalibrations**, at the default ``check_finite=True`` and with
   ``check_finite=False``: a training step (``zero_grad``, forward, backward, ``step``)
   through the engine, whose multipliers are not 1 (so the multiply and restore really
   run) and whose next recalibration is far away, against the bare optimizer: the median
   over steps of the paired ratio wrapped step i / bare step i (the same batch, taken next
   to each other), so that load drifting over the run cancels. Target: ratio <= 1.01.
   Alongside, to explain the figures: the engine's own cost per ``step()`` (multiply,
   restore, step count, due check; timed around a base optimizer whose step does
   nothing), the finite check inside a step (paired: with it, without it) and on its own
   (:class:`layerwise.engine.nonfinite.FiniteCheck` on the task's gradients), and the floor
   of any exact check, one read of every gradient (``sum`` of one preallocated buffer
   holding them all: a single vectorised read-only pass, no Python per tensor), each in
   microseconds and as a fraction of the training step.
2. **Training with recalibration**: ``2 * recalibrate_every`` steps at the engine's
   defaults (the ``curvature`` rule, the default interval, probe and label-sample counts),
   the estimation batch being the training batch, against the same steps bare; once with
   the recommended loss object (``CrossEntropy``: the rule reads the Gauss-Newton trace,
   ``ggn_trace``) and once with a plain callable (the Hessian trace, ``hessian_trace``).
   The one-off warm-up of the first estimate (torch loads forward-mode decompositions) is
   excluded, and so is the first step, whose dry run of the estimate
   (:mod:`layerwise.engine.preflight`) is paid once per run: it is printed apart, in
   training steps. Target: ratio <= 1.03. Where it is missed, the line says what one
   recalibration costs inside the run (the paired excess of the steps that recalibrate
   over the other steps'), which can exceed its cost on its own (3., repeated on one batch).
3. **Where a recalibration's time goes**: one recalibration (``Recalibrator.run``: the
   estimate, the controller, the history rows) timed against a bare training step, in
   steps and in forward+backward units, with the training ratio it implies on its own,
   1 + cost / (``recalibrate_every`` × step); for both defaults and for other settings
   (label samples, probes, the gradient norm alone: the floor of any recalibration).

Where a target is missed, a line says why, from the figures of the same run.

Every ratio is ``wrapped time / bare time``; a task's absolute step time is printed
alongside so the ratios can be read against it. Time is this process's CPU time by default
(``--clock cpu``, with one thread), which other processes on a shared machine disturb far
less than elapsed time; ``--clock wall`` measures elapsed time.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from layerwise.engine import DEFAULT_GGN_SAMPLES, DEFAULT_PROBES, LayerwiseOptimizer
from layerwise.engine.nonfinite import FiniteCheck
from layerwise.policies import SensitivityController
from layerwise.sensitivity import CrossEntropy

__all__ = [
    "check_costs",
    "main",
    "per_step_ratios",
    "recalibration_cost",
    "step_call_overhead",
    "training_ratio",
]

DEFAULT_EVERY = 100  # LayerwiseOptimizer's default recalibrate_every
STEP_TARGET = 1.01
TRAINING_TARGET = 1.03
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
    """The plain callable: the engine's default rule reads the Hessian trace."""
    x, y = batch
    return F.cross_entropy(model(x), y)


#: The recommended loss object (the same loss): the default rule reads the GGN trace.
LOSS = CrossEntropy(lambda model, batch: model(batch[0]), lambda batch: batch[1])
#: The two defaults measured: ``(label, loss)``.
LOSSES = (("loss object (ggn_trace)", LOSS), ("plain callable (hessian_trace)", loss_fn))


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


@dataclass(frozen=True)
class Arm:
    """One copy in a lockstep run: bare, or wrapped with these engine settings."""

    wrapped: bool
    recalibrate: bool = False
    loss: Any = LOSS
    estimator: Any = None
    check_finite: bool = True


BARE = Arm(wrapped=False)


def _build(task: Task, arm: Arm) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = task.make()
    groups = _groups(model)
    if not arm.wrapped:
        for g in groups:
            del g["lr_multiplier"]
    base = torch.optim.Adam(groups, lr=1e-3)
    if not arm.wrapped:
        return model, base
    every = DEFAULT_EVERY if arm.recalibrate else 10**9
    opt = LayerwiseOptimizer(
        base, model=model, loss_fn=arm.loss, controller=SensitivityController(),
        recalibrate_every=every, estimator=arm.estimator, check_finite=arm.check_finite,
    )  # fmt: skip
    return model, opt


def _one_step(model: nn.Module, opt: Any, batch: Any, wrapped: bool) -> float:
    start = _clock()
    opt.zero_grad()
    loss_fn(model, batch).backward()
    opt.step(batch) if wrapped else opt.step()
    return _clock() - start


def _lockstep(task: Task, steps: int, arms: Mapping[str, Arm]) -> dict[str, list[float]]:
    """Per-step seconds of each arm trained in lockstep: step i of every arm in turn (the
    order reversed every other step), so all see the same machine load."""
    g = torch.Generator().manual_seed(1)
    batches = [task.batch(g) for _ in range(steps)]
    runs = {key: _build(task, arm) for key, arm in arms.items()}
    times: dict[str, list[float]] = {key: [] for key in arms}
    keys = list(arms)
    for i, batch in enumerate(batches):
        for key in keys if i % 2 == 0 else keys[::-1]:
            times[key].append(_one_step(*runs[key], batch, arms[key].wrapped))
    return times


def _warm_up(task: Task) -> None:
    """First-call costs (allocator, torch's one-off load of forward-mode decompositions)."""
    _lockstep(task, 3, {"bare": BARE, "ours": Arm(wrapped=True)})
    g = torch.Generator().manual_seed(1)
    for _, loss in LOSSES:
        _build(task, Arm(wrapped=True, loss=loss))[1]._recalibrator.run(task.batch(g), 1, None)


class _NoOpOptimizer(torch.optim.Optimizer):
    """An optimizer whose step does nothing: wrapping it isolates the engine's own cost."""

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        super().__init__(groups, {"lr": 1e-3})

    def step(self, closure: Any = None) -> None:
        return None


def _interleaved(jobs: Mapping[str, Callable[[], Any]], calls: int, repeats: int) -> dict:
    """Median seconds per call of each job, blocks of ``calls`` calls interleaved."""
    times: dict[str, list[float]] = {k: [] for k in jobs}
    keys = list(jobs)
    for r in range(repeats):
        for key in keys if r % 2 == 0 else keys[::-1]:
            job = jobs[key]
            start = _clock()
            for _ in range(calls):
                job()
            times[key].append((_clock() - start) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def step_call_overhead(task: Task, calls: int = 2000, repeats: int = 21) -> float:
    """Median seconds that ``LayerwiseOptimizer.step()`` adds to a base step between
    recalibrations (multiply, restore, step count, due check), timed around a base
    optimizer whose step does nothing (and without gradients, so no finite check), bare
    and wrapped blocks interleaved."""
    torch.manual_seed(0)
    model = task.make()
    bare = _NoOpOptimizer(_groups(model))
    ours = LayerwiseOptimizer(
        _NoOpOptimizer(_groups(model)), model=model, loss_fn=loss_fn,
        controller=SensitivityController(), recalibrate_every=10**9,
    )  # fmt: skip
    med = _interleaved({"bare": bare.step, "ours": ours.step}, calls, repeats)
    return med["ours"] - med["bare"]


def check_costs(task: Task, calls: int = 500, repeats: int = 21) -> tuple[float, float]:
    """(seconds of one :class:`FiniteCheck` call on the task's gradients, seconds of one
    read of every gradient: ``sum`` of a preallocated buffer holding them all, the floor
    of any exact check), medians of interleaved blocks."""
    torch.manual_seed(0)
    model = task.make()
    loss_fn(model, task.batch(torch.Generator().manual_seed(1))).backward()
    groups = _groups(model)
    flat = torch.cat([p.grad.reshape(-1) for g in groups for p in g["params"]])
    check = FiniteCheck()
    med = _interleaved({"check": lambda: check(groups), "read": flat.sum}, calls, repeats)
    return med["check"], med["read"]


def per_step_ratios(
    task: Task, steps: int = 60, repeats: int = 11
) -> tuple[dict[str, float], float, float]:
    """({"check": ratio, "no check": ratio}, median bare seconds per step, median seconds
    the check adds inside a step) between recalibrations, over ``repeats`` lockstep runs of
    ``steps`` steps of the bare optimizer and the engine with ``check_finite`` True and
    False. Paired: a ratio is the median over steps of wrapped step i / bare step i (the
    same batch, taken next to each other), the check's cost the median of check step i -
    no-check step i, so that load drifting over the run cancels."""
    arms = {
        "bare": BARE,
        "check": Arm(wrapped=True),
        "no check": Arm(wrapped=True, check_finite=False),
    }
    pooled: dict[str, list[float]] = {key: [] for key in arms}
    for _ in range(repeats):
        for key, t in _lockstep(task, steps, arms).items():
            pooled[key] += t[1:]
    bare = pooled["bare"]
    ratios = {
        k: statistics.median(w / b for w, b in zip(v, bare, strict=True))
        for k, v in pooled.items()
        if k != "bare"
    }
    pairs = zip(pooled["check"], pooled["no check"], strict=True)
    check = statistics.median(c - n for c, n in pairs)
    return ratios, statistics.median(bare), check


class TrainingRun(NamedTuple):
    """:func:`training_ratio`'s figures, medians over the repeats."""

    ratio: float  # total wrapped time / total bare time over the steady steps
    bare_step: float  # bare seconds per step
    first: float  # seconds the first step adds (its dry run), once per run
    recalibration: float  # seconds one recalibration adds inside the run


def training_ratio(task: Task, loss: Any = LOSS, repeats: int = 5) -> TrainingRun:
    """The engine at its defaults with ``loss`` against the bare optimizer, in lockstep.

    Each run takes ``2 * recalibrate_every + 1`` steps; the ratio is over the last
    ``2 * recalibrate_every`` (two recalibrations, at the steady rate of a long run). The
    first step is left out of it and reported apart: the wrapped one runs the first batch's
    dry run (:mod:`layerwise.engine.preflight`), paid once per run, which a run of 200 steps
    would weigh as if it came every 200 steps. A recalibration's cost inside the run is the
    paired excess (wrapped - bare) of the steps that recalibrate, less the median excess
    of the others (the per-step overhead)."""
    runs = []
    arms = {"bare": BARE, "ours": Arm(wrapped=True, recalibrate=True, loss=loss)}
    due = {DEFAULT_EVERY, 2 * DEFAULT_EVERY}  # the engine's step counts that recalibrate
    for _ in range(repeats):
        times = _lockstep(task, 2 * DEFAULT_EVERY + 1, arms)
        b, w = times["bare"], times["ours"]
        excess = [w[i] - b[i] for i in range(1, len(b))]
        steady = statistics.median(e for i, e in enumerate(excess, 2) if i not in due)
        recal = statistics.mean(e - steady for i, e in enumerate(excess, 2) if i in due)
        runs.append(
            TrainingRun(
                math.fsum(w[1:]) / math.fsum(b[1:]),
                math.fsum(b[1:]) / len(b[1:]),
                w[0] - b[0],
                recal,
            )
        )
    return TrainingRun(*(statistics.median(field) for field in zip(*runs, strict=True)))


#: Settings whose recalibration cost is broken down: ``label: (loss, estimator)``, the
#: defaults first (None: the engine's defaults).
SETTINGS: dict[str, tuple[Any, Any]] = {
    "default, loss object": (LOSS, None),
    "default, callable": (loss_fn, None),
    "ggn_samples=2": (LOSS, {"ggn_samples": 2}),
    "ggn_samples=4": (LOSS, {"ggn_samples": 4}),
    "callable, probes=2": (loss_fn, {"probes": 2}),
    "grad_norm only": (loss_fn, {"quantities": ["grad_norm"]}),
}


def recalibration_cost(
    task: Task, loss: Any = LOSS, estimator: Any = None, repeats: int = 11
) -> tuple[float, ...]:
    """(seconds of one recalibration, of a bare training step, of a plain forward+backward),
    medians of interleaved repeats on one training batch."""
    _, opt = _build(task, Arm(wrapped=True, recalibrate=True, loss=loss, estimator=estimator))
    bare_model, bare = _build(task, BARE)
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
    med = _interleaved(jobs, 1, repeats)
    return tuple(med[k] for k in jobs)


def _step_report(ratios: dict[str, float], bare: float, added: float, in_step: float,
                 check: float, read: float) -> list[str]:  # fmt: skip
    """The per-step lines, and why the target is missed where it is."""
    us, frac = 1e6, 1 / bare
    lines = [
        f"    between recalibrations, check_finite=True (default) {ratios['check']:.4f}, "
        f"check_finite=False {ratios['no check']:.4f} (target <= {STEP_TARGET})",
        f"      step() alone {us * added:+.1f} us ({frac * added:.2%} of a step); the finite "
        f"check inside a step {us * in_step:.1f} us ({frac * in_step:.2%}), on its own "
        f"{us * check:.1f} us; one read of every gradient (the "
        f"floor of an exact check) {us * read:.1f} us ({frac * read:.2%})",
    ]
    if ratios["check"] > STEP_TARGET:
        budget = (STEP_TARGET - 1) * bare
        floor = 1 + (added + read) / bare
        lines.append(
            f"      missed with the check: the target leaves {us * budget:.1f} us a step; the "
            f"check's pass costs {us * in_step:.1f} us inside it, {in_step / read:.1f}x one "
            f"read of the gradients on their own (step() plus that read: a floor of "
            f"{floor:.4f})"
        )
    return lines


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
    print(
        f"defaults: recalibrate_every={DEFAULT_EVERY}, rule=curvature: with a loss object "
        f"ggn_trace ({DEFAULT_GGN_SAMPLES} label samples), with a plain callable "
        f"hessian_trace ({DEFAULT_PROBES} probes); check_finite=True"
    )
    results: dict[str, dict[str, float]] = {}
    for task in TASKS:
        _warm_up(task)
        ratios, bare_step, in_step = per_step_ratios(task, repeats=step_repeats)
        added = step_call_overhead(task, repeats=step_repeats)
        check, read = check_costs(task, repeats=step_repeats)
        out = results[task.name] = {
            "per_step": ratios["check"],
            "per_step_no_check": ratios["no check"],
            "step_call_added_us": 1e6 * added,
            "check_us": 1e6 * check,
            "check_in_step_us": 1e6 * in_step,
            "read_us": 1e6 * read,
            "bare_step_ms": 1e3 * bare_step,
        }
        print(f"  {task.name}: bare training step {1e3 * bare_step:.3f} ms")
        print("\n".join(_step_report(ratios, bare_step, added, in_step, check, read)))
        costs = {}
        for label, (loss, estimator) in SETTINGS.items():
            costs[label] = recalibration_cost(task, loss, estimator, repeats=step_repeats)
        for label, loss in LOSSES:
            run = training_ratio(task, loss, repeats=train_repeats)
            key = "default, loss object" if loss is LOSS else "default, callable"
            recal, recal_step, _ = costs[key]
            in_run = run.recalibration / run.bare_step
            out[f"training[{key}]"] = run.ratio
            out[f"preflight_steps[{key}]"] = run.first / run.bare_step
            print(
                f"    with recalibration, {label:<31} {run.ratio:.4f} (target <= "
                f"{TRAINING_TARGET}); once per run, the first batch's dry run: "
                f"{run.first / run.bare_step:.1f} steps"
            )
            if run.ratio > TRAINING_TARGET:
                floor = costs["grad_norm only"][0] / (DEFAULT_EVERY * costs["grad_norm only"][1])
                print(
                    f"      missed: one recalibration costs {in_run:.1f} training steps inside "
                    f"the run ({recal / recal_step:.1f} on its own, below), "
                    f"{in_run / DEFAULT_EVERY:.2%} of the {DEFAULT_EVERY} steps between two, "
                    f"on top of the per-step "
                    f"{ratios['check'] - 1:.2%}; the gradient norm alone (one forward+backward, "
                    f"the floor of any recalibration) costs {floor:.2%}"
                )
        for label, (recal, step_s, unit) in costs.items():
            implied = 1 + recal / (DEFAULT_EVERY * step_s)
            out[f"recalibration_units[{label}]"] = recal / unit
            print(
                f"    one recalibration, {label:<21} {recal / step_s:5.1f} steps = "
                f"{recal / unit:5.1f} forward+backward units; implies {implied:.4f}"
            )
    return results


if __name__ == "__main__":
    main()
