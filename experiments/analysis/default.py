"""The bundled default of ``layerwise analyze``: the digits MLP, briefly trained.

Task ``digits_mlp`` of :mod:`layerwise.experiments.tasks` (scikit-learn's handwritten digits,
shipped with scikit-learn, so nothing is downloaded; an MLP 64-128-64-10). The model is built from
``seed`` and trained with Adam (rate 3e-3) for :data:`TRAIN_STEPS` steps of the task's batch
size on the training split, in an order drawn from ``seed``: a few seconds on a CPU, and enough
to reach roughly 95% validation accuracy, so the measured curvature and noise are those of a
network that has learned something rather than of its random initialisation. The analysis
batches are then drawn from the training split (the loss as training sees it).
Same seed, same device and dtype: the same weights and batches.
"""

from __future__ import annotations

from typing import Any

import torch

from layerwise.experiments.analysis.loading import AnalysisInputs, move_batch

__all__ = ["ANALYSIS_BATCH_SIZE", "LEARNING_RATE", "TASK", "TRAIN_STEPS", "bundled_default"]

#: The bundled task, its brief training, and the size of each analysis batch.
TASK = "digits_mlp"
TRAIN_STEPS = 300
LEARNING_RATE = 3e-3
ANALYSIS_BATCH_SIZE = 128


def _task() -> Any:
    from layerwise.experiments.tasks import get_task

    return get_task(TASK)


def bundled_default(
    *,
    seed: int,
    batches: int,
    device: torch.device,
    dtype: torch.dtype,
    steps: int = TRAIN_STEPS,
    progress: Any = None,
) -> AnalysisInputs:
    """Build and train the default model, and draw ``batches`` analysis batches.

    ``progress``, if given, is called as ``progress(done, total)`` during training.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be a positive int, got {batches!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    task = _task()
    splits = task.data()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: extra threads only cost (badly, on a busy CPU)
    try:
        return _train_and_draw(task, splits, seed, batches, device, dtype, steps, progress)
    finally:
        torch.set_num_threads(threads)


def _train_and_draw(
    task: Any,
    splits: Any,
    seed: int,
    batches: int,
    device: torch.device,
    dtype: torch.dtype,
    steps: int,
    progress: Any,
) -> AnalysisInputs:
    x, y = move_batch(splits.train, device, dtype)
    model = task.build_model(seed).to(device=device, dtype=dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    order = torch.Generator().manual_seed(seed)
    size = task.budget.batch_size
    perm = torch.randperm(len(x), generator=order).to(device)
    cursor = 0
    for step in range(steps):
        if cursor + size > len(x):
            perm, cursor = torch.randperm(len(x), generator=order).to(device), 0
        idx = perm[cursor : cursor + size]
        cursor += size
        optimizer.zero_grad(set_to_none=True)
        task.loss_fn(model, (x[idx], y[idx])).backward()
        optimizer.step()
        if progress is not None:
            progress(step + 1, steps)
    optimizer.zero_grad(set_to_none=True)
    val_loss, val_acc = task.evaluate(model, *move_batch(splits.val, device, dtype))

    pick = torch.randperm(len(x), generator=order)[: batches * ANALYSIS_BATCH_SIZE].to(device)
    chosen = [pick[i : i + ANALYSIS_BATCH_SIZE] for i in range(0, len(pick), ANALYSIS_BATCH_SIZE)]
    data = [(x[i], y[i]) for i in chosen]
    manifest = {
        "model": {
            "source": f"bundled: experiments.tasks {TASK!r}",
            "description": task.description,
            "training": {
                "optimizer": "adam",
                "lr": LEARNING_RATE,
                "steps": steps,
                "batch_size": size,
                "seed": seed,
                "val_loss": float(val_loss),
                "val_accuracy": float(val_acc),
            },
        },
        "checkpoint": None,
        "data": {
            "source": f"bundled: {TASK} training split, batches of {ANALYSIS_BATCH_SIZE} drawn "
            "with the seed",
            "sha256": splits.sha256(),
        },
        "loss": "cross-entropy (mean over the batch)",
    }
    return AnalysisInputs(model=model, loss_fn=task.loss_fn, batches=data, manifest=manifest)
