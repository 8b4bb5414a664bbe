"""Data regimes of a task's training split: fewer examples, noisy labels.

Both act on the training split only, after the validation split was held out of the full
training data, so that the validation and test splits (and what they measure: accuracy
on clean labels) are the same in every regime of a task:

* :func:`subsample` keeps ``size`` training examples, a seeded random subset;
* :func:`flip_labels` replaces exactly ``round(fraction * n)`` of ``n`` labels, chosen by
  a seeded permutation, each by a class drawn uniformly from the *other* classes
  (symmetric label noise, Zhang et al. 2017 "Understanding deep learning requires
  rethinking generalization"; a flipped label is never its own class, so the noise
  fraction is exact).

Everything is deterministic in the seeds and returns new tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["check_regime", "flip_labels", "subsample"]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def check_regime(train_size: int | None, label_noise: float, noise_seed: int) -> None:
    """Raise ``ValueError`` naming the argument when a regime option is out of range:
    ``train_size`` ``None`` or an integer >= 1, ``label_noise`` in [0, 1), ``noise_seed`` an
    integer >= 0."""
    if train_size is not None and (
        isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1
    ):
        raise ValueError(f"train_size must be None or an integer >= 1, got {train_size!r}")
    if (
        isinstance(label_noise, bool)
        or not isinstance(label_noise, int | float)
        or not (math.isfinite(label_noise) and 0.0 <= label_noise < 1.0)
    ):
        raise ValueError(f"label_noise must be a fraction in [0, 1), got {label_noise!r}")
    if isinstance(noise_seed, bool) or not isinstance(noise_seed, int) or noise_seed < 0:
        raise ValueError(f"noise_seed must be an integer >= 0, got {noise_seed!r}")


def subsample(inputs: Tensor, targets: Tensor, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """``size`` of the ``(inputs, targets)`` pairs, a random subset drawn with ``seed``.

    >>> x, y = subsample(torch.arange(10), torch.arange(10), 4, seed=0)
    >>> len(x), bool((x == y).all())
    (4, True)
    """
    n = len(inputs)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= n:
        raise ValueError(f"train_size must be an integer in [1, {n}], got {size!r}")
    keep = torch.randperm(n, generator=_generator(seed))[:size]
    return inputs[keep], targets[keep]


def flip_labels(targets: Tensor, fraction: float, num_classes: int, seed: int) -> Tensor:
    """A copy of the class indices ``targets`` with exactly ``round(fraction * n)`` of them
    replaced by another class, drawn uniformly from the ``num_classes - 1`` others.

    >>> y = torch.zeros(10, dtype=torch.long)
    >>> noisy = flip_labels(y, 0.3, num_classes=10, seed=0)
    >>> int((noisy != y).sum())
    3
    """
    check_regime(None, fraction, int(seed))
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if targets.dtype != torch.long or targets.dim() != 1:
        raise ValueError(
            f"targets must be a 1-d long tensor, got {targets.dtype} {tuple(targets.shape)}"
        )
    if len(targets) and not (int(targets.min()) >= 0 and int(targets.max()) < num_classes):
        raise ValueError(
            f"targets must lie in [0, {num_classes}), got {targets.min()}..{targets.max()}"
        )
    generator = _generator(seed)
    count = round(fraction * len(targets))
    chosen = torch.randperm(len(targets), generator=generator)[:count]
    shift = torch.randint(1, num_classes, (count,), generator=generator)
    noisy = targets.clone()
    noisy[chosen] = (targets[chosen] + shift) % num_classes
    return noisy
