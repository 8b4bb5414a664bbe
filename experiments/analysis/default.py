"""The bundled default of ``layerwise analyze``: the digits MLP, briefly trained.

Task ``digits_mlp`` of :mod:`layerwise.experiments.tasks` (scikit-learn's handwritten digits,
shipped with scikit-learn, so nothing is downloaded; an MLP 64-128-64-10), built from the seed
and trained with Adam (rate :data:`LEARNING_RATE`) for :data:`TRAIN_STEPS` steps of the task's
batch size, in epochs of a permutation drawn from the seed: a few seconds on a CPU and roughly
95% validation accuracy, so the measured curvature and noise are those of a network that has
learned something. The analysis batches (:data:`BATCH_SIZE` examples each) are then drawn
from the training split. Same seed, device and dtype: the same weights and batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from layerwise.experiments.analysis.inputs import DEFAULT_LOSS, Inputs

__all__ = ["BATCH_SIZE", "LEARNING_RATE", "TASK", "TRAIN_STEPS", "bundled_default"]

TASK, TRAIN_STEPS, LEARNING_RATE, BATCH_SIZE = "digits_mlp", 300, 3e-3, 128
Progress = Callable[[int, int], None] | None


def _train(
    model: torch.nn.Module, task: Any, train: tuple, order: torch.Generator, progress: Progress
) -> None:
    """:data:`TRAIN_STEPS` Adam steps on batches of ``train = (x, y)``, drawn without
    replacement from a permutation redrawn from ``order`` every epoch."""
    x, y = train
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    size = task.budget.batch_size
    per_epoch = len(x) // size
    for step in range(TRAIN_STEPS):
        if step % per_epoch == 0:
            perm = torch.randperm(len(x), generator=order).to(x.device)
        index = perm[(step % per_epoch) * size :][:size]
        optimizer.zero_grad(set_to_none=True)
        task.loss_fn(model, (x[index], y[index])).backward()
        optimizer.step()
        if progress is not None:
            progress(step + 1, TRAIN_STEPS)
    optimizer.zero_grad(set_to_none=True)


def bundled_default(
    *, seed: int, batches: int, device: torch.device, dtype: torch.dtype, progress: Progress = None
) -> Inputs:
    """Build and train the default model and draw ``batches`` analysis batches;
    ``progress(done, total)`` is called after each training step."""
    from layerwise.experiments.tasks import get_task

    for name, value, low in (("seed", seed, 0), ("batches", batches, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    task = get_task(TASK)
    splits = task.data()
    x, y = splits.train[0].to(device, dtype), splits.train[1].to(device)
    model = task.build_model(seed).to(device, dtype)
    order = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: extra threads only cost (badly, on a busy CPU)
    try:
        _train(model, task, (x, y), order, progress)
    finally:
        torch.set_num_threads(threads)
    val_loss, val_accuracy = task.evaluate(
        model, splits.val[0].to(device, dtype), splits.val[1].to(device)
    )
    pick = torch.randperm(len(x), generator=order)[: batches * BATCH_SIZE].to(device)
    training = {
        "optimizer": "adam",
        "lr": LEARNING_RATE,
        "steps": TRAIN_STEPS,
        "seed": seed,
        "batch_size": task.budget.batch_size,
        "val_loss": float(val_loss),
        "val_accuracy": float(val_accuracy),
    }
    source = f"bundled: {TASK} training split, batches of {BATCH_SIZE} drawn with the seed"
    manifest = {
        "model": {
            "source": f"bundled: experiments.tasks {TASK!r}",
            "description": task.description,
            "training": training,
        },
        "checkpoint": None,
        "data": {"source": source, "sha256": splits.sha256()},
        "loss": DEFAULT_LOSS,
    }
    data = [(x[i], y[i]) for i in pick.split(BATCH_SIZE)]
    return Inputs(model=model, loss_fn=task.loss_fn, batches=data, manifest=manifest)
