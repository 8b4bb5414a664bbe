"""One run of an ablation: build, train through the engine, evaluate, log, summarise.

:func:`execute` trains ``task.build_model(seed)`` with the task's optimizer recipe at the
spec's base rate, wrapped in :class:`layerwise.engine.LayerwiseOptimizer` with the policy's static
factors or controller and the base schedule. Batches are drawn without replacement from
a permutation of the training split reshuffled every epoch (a ``torch.Generator`` seeded
with the run seed), so two runs with the same seed see the same batches in the same order.

At step 0, every ``eval_every`` steps and at the last step it evaluates the validation
split (mean loss and metric, model in eval mode), passes the validation metric to the
controller (``observe_validation``; mode "max" in the policy presets), optionally measures
every group's sensitivity on a fixed monitoring batch (Hutchinson curvature ``tr(H_gg)/n_g`` and the
gradient noise-to-signal ratio, :func:`layerwise.sensitivity.estimate`, which leaves no trace), and
appends a row to ``metrics.csv``/``metrics.jsonl``: step, epoch, train loss (mean over the
steps since the previous evaluation), validation loss and metric, wall time and training
time (seconds; training time excludes evaluation and monitoring), and per group ``lr/g``
(effective rate of the next step), ``multiplier/g``, ``grad_norm/g`` (‖∇_g L‖ of the last
training batch), ``curvature/g``, ``noise/g``, plus the fallback events since the
previous evaluation. The test split is evaluated once, after the last step, and only for
final runs. A non-finite training or validation loss stops the run as "diverged".
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from layerwise.experiments.atomic import atomic_write
from layerwise.experiments.manifest import build_manifest, write_manifest
from layerwise.experiments.plan import RunSpec
from layerwise.experiments.statistics import steps_to_target

__all__ = ["execute"]


def _write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    frame = pd.DataFrame(rows)
    atomic_write(run_dir / "metrics.csv", lambda h: h.write(frame.to_csv(index=False).encode()))
    text = frame.to_json(orient="records", lines=True)
    atomic_write(run_dir / "metrics.jsonl", lambda h: h.write(text.encode()))


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


def _grad_norms(groups, named: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for g in groups:
        grads = [named[n].grad for n in g.param_names if named[n].grad is not None]
        if grads:
            out[g.name] = float(
                torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(t.detach().double()) for t in grads])
                )
            )
        else:
            out[g.name] = math.nan
    return out


def _events(history: pd.DataFrame, since: int) -> list[dict[str, Any]]:
    if history is None or history.empty:
        return []
    rows = history[history["step"] > since]
    rows = rows[
        rows["fallback"].astype(bool) | rows["event"].notna() | rows["skipped"].astype(bool)
    ]
    seen, out = set(), []
    for row in rows.itertuples():
        text = (
            row.event
            if isinstance(row.event, str)
            else (row.reason if isinstance(row.reason, str) else "fallback")
        )
        if (row.step, text) not in seen:
            seen.add((row.step, text))
            out.append(
                {
                    "step": int(row.step),
                    "event": text,
                    "fallback": bool(row.fallback),
                    "skipped": bool(row.skipped),
                }
            )
    return out


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
    from layerwise import engine, policies, sensitivity
    from layerwise.experiments.policy_specs import build_policy
    from layerwise.experiments.tasks import get_task

    start = time.perf_counter()
    task = get_task(spec.task, **spec.task_options).with_overrides(**spec.overrides)
    splits = task.data(cache_dir)
    budget = task.budget
    train = tuple(t.to(device) for t in splits.train)
    val = tuple(t.to(device) for t in splits.val)
    model = task.build_model(spec.seed).to(device)
    grouping = dict(spec.grouping)
    strategy = grouping.pop("strategy", "depth")
    if "head" not in grouping and task.head:
        grouping["head"] = list(task.head)
    groups = policies.group_parameters(model, strategy, **grouping)
    built = build_policy(spec.policy_spec, groups)
    optimizer = task.recipe.build(
        groups.to_optimizer_groups(lr=spec.lr, weight_decay=task.recipe.weight_decay), spec.lr
    )
    extra = {k: built[k] for k in ("recalibrate_every", "warmup_steps", "estimator") if k in built}
    opt = engine.LayerwiseOptimizer(
        optimizer,
        model=model,
        loss_fn=task.loss_fn,
        controller=built["controller"],
        seed=spec.seed,
        **extra,
    )
    scheduler = policies.LayerwiseLR(
        opt, policies.schedules.from_spec(spec.schedule), built["factors"]
    )
    write_manifest(
        run_dir,
        build_manifest(
            spec,
            config_hash=config_hash,
            task=task,
            splits=splits,
            groups=groups,
            factors=built["factors"],
            controller=built["controller"],
            device=str(device),
        ),
    )

    named = dict(model.named_parameters())
    batches = _Batches(*train, budget.batch_size, spec.seed)
    monitor = dict(spec.monitor)
    probes = int(monitor.get("probes", 0))
    monitor_batch = None
    if probes:
        perm = torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(0))
        index = perm[: min(int(monitor.get("batch_size", 128)), len(perm))].to(device)
        monitor_batch = (train[0][index], train[1][index])
        monitor_gen = torch.Generator(device=device).manual_seed(spec.seed)
    sizes = {g.name: g.size for g in groups}

    rows: list[dict[str, Any]] = []
    all_events: list[dict[str, Any]] = []
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    loss_count, last_eval, status = 0, 0, "ok"
    eval_seconds = 0.0
    train_start = time.perf_counter()

    def evaluate(step: int) -> dict[str, Any]:
        nonlocal monitor_batch, eval_seconds
        t0 = time.perf_counter()
        val_loss, val_metric = task.evaluate(model, *val)
        if math.isfinite(float(val_loss)):  # a diverged run stops below; nothing to watch
            opt.observe_validation(float(val_metric))  # the controller's mode is "max"
        row: dict[str, Any] = {
            "step": step,
            "epoch": batches.epoch,
            "train_loss": float(loss_sum / loss_count) if loss_count else math.nan,
            "val_loss": float(val_loss),
            f"val_{task.metric_name}": float(val_metric),
        }
        lrs, mults = opt.get_last_lr(), opt.multipliers
        norms = _grad_norms(groups, named) if step > 0 else dict.fromkeys(sizes, math.nan)
        curvature = dict.fromkeys(sizes, math.nan)
        noise = dict.fromkeys(sizes, math.nan)
        new_events = _events(opt.history, last_eval) if step > 0 else []
        if monitor_batch is not None:
            try:
                report = sensitivity.estimate(
                    model,
                    task.loss_fn,
                    [monitor_batch],
                    groups=groups.mapping(),
                    quantities=monitor.get("quantities", ["hessian_trace"]),
                    probes=probes,
                    generator=monitor_gen,
                )
                for name in sizes:
                    est = report[name]
                    curvature[name] = math.nan if est.curvature is None else est.curvature
                    noise[name] = math.nan if est.noise_to_signal is None else est.noise_to_signal
            except Exception as exc:  # the monitor must never stop training
                new_events.append(
                    {
                        "step": step,
                        "event": f"monitor disabled: {exc}"[:300],
                        "fallback": False,
                        "skipped": True,
                    }
                )
                monitor_batch = None
        for name in sizes:
            row[f"lr/{name}"] = float(lrs[name])
            row[f"multiplier/{name}"] = float(mults[name])
            row[f"grad_norm/{name}"] = norms[name]
            row[f"curvature/{name}"] = curvature[name]
            row[f"noise/{name}"] = noise[name]
        row["fallback_events"] = sum(1 for e in new_events if e["fallback"])
        row["events"] = "; ".join(f"{e['step']}: {e['event']}" for e in new_events)
        all_events.extend(new_events)
        eval_seconds += time.perf_counter() - t0
        row["wall_time"] = time.perf_counter() - start
        row["train_time"] = time.perf_counter() - train_start - eval_seconds
        return row

    rows.append(evaluate(0))
    _write_metrics(run_dir, rows)
    model.train()
    for step in range(1, budget.steps + 1):
        batch = batches.next()
        opt.zero_grad(set_to_none=True)
        loss = task.loss_fn(model, batch)
        loss.backward()
        opt.step(batch)
        scheduler.step()
        loss_sum += loss.detach().double()
        loss_count += 1
        if step % budget.eval_every == 0 or step == budget.steps:
            row = evaluate(step)
            rows.append(row)
            _write_metrics(run_dir, rows)
            loss_sum.zero_()
            loss_count, last_eval = 0, step
            if not (math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])):
                status = "diverged"
                break

    metric_key = f"val_{task.metric_name}"
    history = opt.history
    if history is not None and not history.empty:
        text = history.to_csv(index=False)
        atomic_write(run_dir / "recalibrations.csv", lambda h: h.write(text.encode()))
    events_text = pd.DataFrame(all_events, columns=["step", "event", "fallback", "skipped"]).to_csv(
        index=False
    )
    atomic_write(run_dir / "events.csv", lambda h: h.write(events_text.encode()))
    last = rows[-1]
    summary: dict[str, Any] = {
        "run_id": spec.run_id,
        "kind": spec.kind,
        "task": spec.task_label,
        "policy": spec.policy,
        "setting": spec.setting,
        "seed": spec.seed,
        "lr": spec.lr,
        "status": status,
        "steps": last["step"],
        "budget_steps": budget.steps,
        "metric": task.metric_name,
        "target": budget.target,
        "val_loss": last["val_loss"],
        "val_metric": last[metric_key],
        "best_val_metric": max(
            (r[metric_key] for r in rows if math.isfinite(r[metric_key])), default=math.nan
        ),
        "steps_to_target": steps_to_target(
            [r["step"] for r in rows], [r[metric_key] for r in rows], budget.target
        ),
        "fallback_events": sum(1 for e in all_events if e["fallback"]),
        "recalibrations": 0 if history is None or history.empty else int(history["step"].nunique()),
        "train_time": last["train_time"],
    }
    if spec.evaluate_test:  # the one and only look at the test split
        test = tuple(t.to(device) for t in splits.test)
        test_loss, test_metric = task.evaluate(model, *test)
        summary["test_loss"], summary["test_metric"] = float(test_loss), float(test_metric)
    summary["wall_time"] = time.perf_counter() - start
    return summary
