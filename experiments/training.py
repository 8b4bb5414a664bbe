"""One run of an ablation: set up, train, evaluate, log, summarise.

:func:`execute` reads as a plain training loop:

1. :func:`_set_up` builds ``task.build_model(seed)``, its parameter groups and the task's
   optimizer recipe at the spec's base rate ``lr``, wrapped in
   :class:`layerwise.engine.LayerwiseOptimizer` (with the policy's controller, if any), and a
   :class:`layerwise.policies.LayerwiseLR` over it: the base rate of group ``g`` after ``t``
   optimizer steps is ``lr * factor_g * schedule(t)`` (the policy's static factors, 1
   without; the spec's schedule); the engine multiplies it by the controller's
   multiplier ``m_g`` for each step. The manifest is written.
2. :func:`_train` draws batches without replacement from a permutation of the training
   split reshuffled every epoch (a ``torch.Generator`` seeded with the run seed, so two
   runs with the same seed see the same batches in the same order); each step is
   ``zero_grad``, ``loss_fn(model, batch).backward()``, ``opt.step(batch)`` (the batch
   feeds a recalibration when one is due; a SAM policy passes a closure that evaluates the
   loss again, ``opt.step(batch, closure)``) and ``scheduler.step()``. At step 0, every
   ``eval_every`` steps and at the last step an :class:`~layerwise.experiments.evaluation.Evaluator`
   appends a row to ``metrics.csv``/``metrics.jsonl`` (validation loss and metric, per-group
   rates, multipliers, gradient norms and the optional sensitivity monitor; see
   :mod:`layerwise.experiments.evaluation`). A non-finite training or validation loss stops
   the run as "diverged", and so does the engine's
   :class:`layerwise.engine.NonFiniteGradientError` (too many steps in a row with non-finite
   gradients, each skipped), after one more evaluation row.
3. :func:`_write_logs` writes ``recalibrations.csv`` (the engine's history, when there is
   one) and ``events.csv``; :func:`_summary` returns the summary. The test split is
   evaluated once, after the last step, and only for final runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from layerwise.engine import NonFiniteGradientError
from layerwise.experiments.atomic import atomic_write
from layerwise.experiments.evaluation import Evaluator, MeanLoss, SensitivityMonitor
from layerwise.experiments.manifest import build_manifest, write_manifest
from layerwise.experiments.plan import RunSpec
from layerwise.experiments.policy_specs import uses_closure, wrap_optimizer
from layerwise.experiments.statistics import steps_to_target

__all__ = ["execute"]

_EVENT_COLUMNS = ["step", "event", "fallback", "skipped"]


def execute(
    spec: RunSpec,
    run_dir: str | Path,
    *,
    config_hash: str = "",
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run ``spec`` writing into ``run_dir`` (which must exist); return the summary."""
    if not isinstance(spec, RunSpec):
        raise TypeError(f"spec must be a RunSpec, got {type(spec).__name__}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir {str(run_dir)!r} does not exist")
    device = torch.device(spec.device)
    cuda = (
        []
        if device.type != "cuda"
        else [torch.cuda.current_device() if device.index is None else device.index]
    )
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(spec.seed)
        return _execute(spec, run_dir, config_hash, cache_dir, device)


def _execute(spec, run_dir, config_hash, cache_dir, device) -> dict[str, Any]:
    start = time.perf_counter()
    run = _set_up(spec, run_dir, config_hash, cache_dir, device)
    monitor = SensitivityMonitor(spec.monitor, *run.train, seed=spec.seed)
    evaluate = Evaluator(run.task, run.model, run.val, run.opt, run.groups, monitor, start=start)
    rows, status = _train(spec, run, evaluate, run_dir)
    history = run.opt.history
    _write_logs(run_dir, history, evaluate.events)
    summary = _summary(spec, run.task, rows, status, evaluate.events, history)
    if spec.evaluate_test:  # the one and only look at the test split
        test = tuple(t.to(device) for t in run.splits.test)
        test_loss, test_metric = run.task.evaluate(run.model, *test)
        summary["test_loss"], summary["test_metric"] = float(test_loss), float(test_metric)
    summary["wall_time"] = time.perf_counter() - start
    return summary


@dataclass(frozen=True)
class _Run:
    """What :func:`_set_up` builds: the task, its splits (train and val on the device), the
    model, its groups, the engine and the per-group schedule."""

    task: Any
    splits: Any
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    model: torch.nn.Module
    groups: Any
    opt: Any
    scheduler: Any
    device: torch.device


def _set_up(spec: RunSpec, run_dir: Path, config_hash, cache_dir, device) -> _Run:
    """Task, data, model, groups, optimizer, engine and schedule; writes the manifest."""
    from layerwise.experiments.policy_specs import build_policy
    from layerwise.experiments.tasks import get_task

    task = get_task(spec.task, **spec.task_options).with_overrides(**spec.overrides)
    splits = task.data(cache_dir)
    train = tuple(t.to(device) for t in splits.train)
    val = tuple(t.to(device) for t in splits.val)
    model = task.build_model(spec.seed).to(device)
    groups = _group_parameters(spec, task, model)
    built = build_policy(spec.policy_spec, groups)
    opt, scheduler = _optimizers(spec, task, model, groups, built)
    manifest = build_manifest(
        spec,
        config_hash=config_hash,
        task=task,
        splits=splits,
        groups=groups,
        factors=built["factors"],
        controller=built["controller"],
        device=str(device),
    )
    write_manifest(run_dir, manifest)
    return _Run(task, splits, train, val, model, groups, opt, scheduler, device)


def _group_parameters(spec: RunSpec, task, model: torch.nn.Module):
    """The spec's grouping (``strategy`` plus options), with the task's head patterns unless
    the spec names its own."""
    from layerwise import policies

    grouping = dict(spec.grouping)
    strategy = grouping.pop("strategy", "depth")
    if "head" not in grouping and task.head:
        grouping["head"] = list(task.head)
    return policies.group_parameters(model, strategy, **grouping)


def _optimizers(spec: RunSpec, task, model, groups, built: dict[str, Any]):
    """``(engine, scheduler)``: the task's optimizer at rate ``spec.lr`` in every group,
    wrapped for the policy's update keys (SAM, normalised gradients:
    :func:`layerwise.experiments.policy_specs.wrap_optimizer`), then in the engine
    (controller, recalibration and estimator settings of the policy),
    and a :class:`layerwise.policies.LayerwiseLR` giving group ``g`` the base rate
    ``spec.lr * factor_g * schedule(t)``, stepped after every optimizer step."""
    from layerwise import engine, policies

    param_groups = groups.to_optimizer_groups(lr=spec.lr, weight_decay=task.recipe.weight_decay)
    optimizer = wrap_optimizer(spec.policy_spec, task.recipe.build(param_groups, spec.lr))
    extra = {k: built[k] for k in ("recalibrate_every", "warmup_steps", "estimator") if k in built}
    opt = engine.LayerwiseOptimizer(
        optimizer,
        model=model,
        loss_fn=task.loss_fn,
        controller=built["controller"],
        seed=spec.seed,
        **extra,
    )
    schedule = policies.schedules.from_spec(spec.schedule)
    return opt, policies.LayerwiseLR(opt, schedule, built["factors"])


def _train(spec: RunSpec, run: _Run, evaluate: Evaluator, run_dir: Path):
    """The training loop; returns ``(metrics rows, status)`` with status "ok" or "diverged".
    ``metrics.csv``/``metrics.jsonl`` are rewritten after every evaluation."""
    budget = run.task.budget
    batches = _Batches(*run.train, budget.batch_size, spec.seed)
    losses = MeanLoss(run.device)
    rows = [evaluate(0, batches.epoch, losses)]
    _write_metrics(run_dir, rows)
    sam = uses_closure(spec.policy_spec)
    run.model.train()
    for step in range(1, budget.steps + 1):
        batch = batches.next()
        run.opt.zero_grad(set_to_none=True)
        loss = run.task.loss_fn(run.model, batch)
        loss.backward()
        try:
            run.opt.step(batch, _Closure(run, batch) if sam else None)
        except NonFiniteGradientError:
            losses.add(loss)
            rows.append(evaluate(step, batches.epoch, losses))
            _write_metrics(run_dir, rows)
            return rows, "diverged"
        run.scheduler.step()
        losses.add(loss)
        if step % budget.eval_every == 0 or step == budget.steps:
            rows.append(evaluate(step, batches.epoch, losses))
            _write_metrics(run_dir, rows)
            losses.reset()
            if not (math.isfinite(rows[-1]["train_loss"]) and math.isfinite(rows[-1]["val_loss"])):
                return rows, "diverged"
    return rows, "ok"


class _Closure:
    """The loss of ``batch`` with its gradients, again: what SAM evaluates at the perturbed
    parameters (it zeroes the gradients first)."""

    def __init__(self, run: _Run, batch):
        self.run, self.batch = run, batch

    def __call__(self) -> torch.Tensor:
        loss = self.run.task.loss_fn(self.run.model, self.batch)
        loss.backward()
        return loss


class _Batches:
    """Epoch-wise shuffled mini-batches of a split (the last partial batch is dropped)."""

    def __init__(self, inputs, targets, batch_size: int, seed: int):
        if batch_size > len(inputs):
            raise ValueError(f"batch_size={batch_size} exceeds the {len(inputs)} training examples")
        self.inputs, self.targets, self.batch_size = inputs, targets, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.cursor = 0, 0
        self.perm = torch.randperm(len(inputs), generator=self.generator)

    def next(self):
        if self.cursor + self.batch_size > len(self.perm):
            self.perm = torch.randperm(len(self.inputs), generator=self.generator)
            self.epoch, self.cursor = self.epoch + 1, 0
        index = self.perm[self.cursor : self.cursor + self.batch_size].to(self.inputs.device)
        self.cursor += self.batch_size
        return self.inputs[index], self.targets[index]


def _write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    frame = pd.DataFrame(rows)
    atomic_write(run_dir / "metrics.csv", lambda h: h.write(frame.to_csv(index=False).encode()))
    text = frame.to_json(orient="records", lines=True)
    atomic_write(run_dir / "metrics.jsonl", lambda h: h.write(text.encode()))


def _write_logs(run_dir: Path, history: pd.DataFrame | None, events: list[dict]) -> None:
    """``recalibrations.csv`` (the engine's history, if any) and ``events.csv``."""
    if history is not None and not history.empty:
        text = history.to_csv(index=False)
        atomic_write(run_dir / "recalibrations.csv", lambda h: h.write(text.encode()))
    events_text = pd.DataFrame(events, columns=_EVENT_COLUMNS).to_csv(index=False)
    atomic_write(run_dir / "events.csv", lambda h: h.write(events_text.encode()))


def _summary(spec: RunSpec, task, rows, status: str, events, history) -> dict[str, Any]:
    """The run's summary from its metrics rows: the last and the best validation metric,
    steps to the task's target, fallbacks, recalibrations and training seconds."""
    metric = [r[f"val_{task.metric_name}"] for r in rows]
    last = rows[-1]
    return {
        "run_id": spec.run_id,
        "kind": spec.kind,
        "task": spec.task_label,
        "policy": spec.policy,
        "setting": spec.setting,
        "seed": spec.seed,
        "lr": spec.lr,
        "status": status,
        "steps": last["step"],
        "budget_steps": task.budget.steps,
        "metric": task.metric_name,
        "target": task.budget.target,
        "val_loss": last["val_loss"],
        "val_metric": metric[-1],
        "best_val_metric": max((m for m in metric if math.isfinite(m)), default=math.nan),
        "steps_to_target": steps_to_target([r["step"] for r in rows], metric, task.budget.target),
        "fallback_events": sum(1 for e in events if e["fallback"]),
        "recalibrations": 0 if history is None or history.empty else int(history["step"].nunique()),
        "train_time": last["train_time"],
    }
