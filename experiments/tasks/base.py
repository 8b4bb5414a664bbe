"""What a task is: a model factory, the data, the loss, the metric and a default budget.

A :class:`Task` is plain, immutable data plus a few functions. The ablation runner only
ever calls

* ``task.build_model(seed)`` -> a fresh ``torch.nn.Module`` (same seed, same weights),
* ``task.data(cache_dir)`` -> :class:`Splits` (train / validation / test tensors),
* ``task.loss_fn(model, batch)`` -> the **mean** loss over the batch (the project's loss
  contract, see ``docs/design.md``); with the default criterion it is a
  :class:`layerwise.sensitivity.CrossEntropy` loss object, so the Gauss-Newton trace
  (``ggn_trace``, the ``curvature_ggn`` policy) is available on every bundled task,
* ``task.evaluate(model, inputs, targets)`` -> (mean loss, mean metric) over a split,

and reads ``task.budget`` (steps, batch size, evaluation interval, target validation
metric), ``task.recipe`` (optimizer and the learning-rate grid the tuning searches) and
``task.head`` (regular expressions searched in parameter names that pick out the
output layer, as :func:`layerwise.policies.group_parameters` takes its ``head=``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layerwise.sensitivity import CrossEntropy

__all__ = [
    "Budget",
    "Recipe",
    "Splits",
    "Task",
    "accuracy",
    "cross_entropy",
    "holdout",
]

Criterion = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy (nats per example) of logits ``outputs`` against class indices."""
    return F.cross_entropy(outputs, targets)


def model_outputs(model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
    """The model's outputs on the inputs of ``batch = (inputs, targets)``."""
    inputs, _ = batch
    return model(inputs)


def batch_targets(batch: Sequence[Tensor]) -> Tensor:
    """The targets of ``batch = (inputs, targets)``."""
    _, targets = batch
    return targets


def accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Fraction (in [0, 1]) of examples whose arg-max logit is the target class."""
    return (outputs.argmax(dim=-1) == targets).to(outputs.dtype).mean()


@dataclass(frozen=True)
class Splits:
    """Train / validation / test tensors, each an ``(inputs, targets)`` pair on the CPU.

    The validation split is held out from the original training data; the test split is
    the data set's own test split, touched once per final run.
    """

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            pair = getattr(self, name)
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise TypeError(f"{name} must be an (inputs, targets) tuple, got {type(pair)}")
            x, y = pair
            if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
                raise TypeError(f"{name} must hold tensors, got {type(x)}, {type(y)}")
            if len(x) != len(y) or len(x) == 0:
                raise ValueError(f"{name} has {len(x)} inputs and {len(y)} targets")

    def sizes(self) -> dict[str, int]:
        """Number of examples per split."""
        return {name: len(getattr(self, name)[0]) for name in ("train", "val", "test")}

    def sha256(self) -> str:
        """SHA-256 over the dtype, shape and bytes of every tensor, splits in a fixed order."""
        digest = hashlib.sha256()
        for name in ("train", "val", "test"):
            for tensor in getattr(self, name):
                t = tensor.detach().cpu().contiguous()
                digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()


def holdout(
    inputs: Tensor, targets: Tensor, fraction: float, seed: int
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Split ``(inputs, targets)`` into (kept, held out) by a seeded permutation.

    ``round(fraction * n)`` examples go to the held-out part.

    >>> (a, _), (b, _) = holdout(torch.arange(10), torch.arange(10), 0.2, seed=0)
    >>> len(a), len(b)
    (8, 2)
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    n = len(inputs)
    n_out = round(fraction * n)
    if not 0 < n_out < n:
        raise ValueError(f"fraction={fraction!r} of {n} examples leaves an empty split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    keep, out = perm[n_out:], perm[:n_out]
    return (inputs[keep], targets[keep]), (inputs[out], targets[out])


@dataclass(frozen=True)
class Budget:
    """Default training budget: ``steps`` optimizer steps of ``batch_size`` examples, an
    evaluation on the validation split every ``eval_every`` steps, and the validation
    metric ``target`` whose first crossing defines "steps to target"."""

    steps: int
    batch_size: int
    eval_every: int
    target: float

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.target, int | float) and math.isfinite(self.target)):
            raise ValueError(f"target must be a finite number, got {self.target!r}")


def _criterion_loss(criterion: Criterion, model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
    inputs, targets = batch
    return criterion(model(inputs), targets)


OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass(frozen=True)
class Recipe:
    """The optimizer a task is trained with and the grid its base rate is tuned over."""

    optimizer: str = "adam"
    lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    weight_decay: float = 0.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        grid = tuple(float(v) for v in self.lr_grid)
        if not grid or any(not (math.isfinite(v) and v > 0) for v in grid):
            raise ValueError(f"lr_grid must be non-empty positive numbers, got {self.lr_grid!r}")
        object.__setattr__(self, "lr_grid", grid)
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")

    def build(self, param_groups: list[dict], lr: float) -> torch.optim.Optimizer:
        """The torch optimizer over ``param_groups`` (each may carry its own weight decay)."""
        if self.optimizer == "adam":
            return torch.optim.Adam(param_groups, lr=lr)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(param_groups, lr=lr)
        return torch.optim.SGD(param_groups, lr=lr, momentum=self.momentum)


@dataclass(frozen=True)
class Task:
    """One benchmark problem (see the module docstring)."""

    name: str
    description: str
    build_model: Callable[[int], nn.Module]
    load_data: Callable[[Path | None], Splits]
    budget: Budget
    recipe: Recipe = field(default_factory=Recipe)
    head: tuple[str, ...] = ()
    criterion: Criterion = cross_entropy
    metric: Criterion = accuracy
    metric_name: str = "accuracy"
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        for name in ("build_model", "load_data", "criterion", "metric"):
            if not callable(getattr(self, name)):
                raise TypeError(f"{name} must be callable, got {getattr(self, name)!r}")
        if not isinstance(self.budget, Budget):
            raise TypeError(f"budget must be a Budget, got {type(self.budget).__name__}")
        if not isinstance(self.recipe, Recipe):
            raise TypeError(f"recipe must be a Recipe, got {type(self.recipe).__name__}")
        object.__setattr__(self, "head", tuple(self.head))

    def data(self, cache_dir: str | Path | None = None) -> Splits:
        """The task's splits (the loader caches in-process and, given a folder, on disk)."""
        splits = self.load_data(None if cache_dir is None else Path(cache_dir))
        if not isinstance(splits, Splits):
            raise TypeError(f"task {self.name!r}: load_data returned {type(splits).__name__}")
        return splits

    @property
    def loss_fn(self) -> Callable[[nn.Module, Sequence[Tensor]], Tensor]:
        """``loss_fn(model, batch)``, the mean loss of ``model`` over ``batch = (inputs,
        targets)``: a :class:`layerwise.sensitivity.CrossEntropy` when the criterion is
        :func:`cross_entropy` (outputs and loss split, for the Gauss-Newton trace), else
        ``criterion(model(inputs), targets)``."""
        if self.criterion is cross_entropy:
            return CrossEntropy(model_outputs, batch_targets)
        return functools.partial(_criterion_loss, self.criterion)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, inputs: Tensor, targets: Tensor, chunk: int = 1024
    ) -> tuple[Tensor, Tensor]:
        """(mean loss, mean metric) of ``model`` in eval mode over a whole split.

        Computed in chunks of ``chunk`` examples, weighted by chunk size; returns 0-d
        tensors (no host synchronisation); the model's train/eval mode is restored.
        """
        was_training = model.training
        model.eval()
        try:
            loss = inputs.new_zeros((), dtype=torch.float64)
            metric = inputs.new_zeros((), dtype=torch.float64)
            for start in range(0, len(inputs), chunk):
                x, y = inputs[start : start + chunk], targets[start : start + chunk]
                out = model(x)
                loss = loss + self.criterion(out, y).double() * len(x)
                metric = metric + self.metric(out, y).double() * len(x)
            return loss / len(inputs), metric / len(inputs)
        finally:
            model.train(was_training)

    def with_overrides(self, **overrides) -> Task:
        """A copy with budget fields (steps, batch_size, eval_every, target) or recipe
        fields (optimizer, lr_grid, weight_decay, momentum) replaced."""
        budget_keys = {f.name for f in dataclasses.fields(Budget)}
        recipe_keys = {f.name for f in dataclasses.fields(Recipe)}
        unknown = set(overrides) - budget_keys - recipe_keys
        if unknown:
            raise ValueError(
                f"task {self.name!r}: unknown override(s) {sorted(unknown)}; "
                f"known: {sorted(budget_keys | recipe_keys)}"
            )
        budget = dataclasses.replace(
            self.budget, **{k: v for k, v in overrides.items() if k in budget_keys}
        )
        recipe = dataclasses.replace(
            self.recipe, **{k: v for k, v in overrides.items() if k in recipe_keys}
        )
        return dataclasses.replace(self, budget=budget, recipe=recipe)
