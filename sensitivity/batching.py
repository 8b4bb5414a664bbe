"""Batches as the user's data loader yields them: size, slicing, dtype casting.

A *batch* is whatever ``loss_fn(model, batch)`` accepts: typically a tuple
``(inputs, targets)``, but any pytree of tensors (tuple, list, dict) or a single tensor
works. Its *size* B is ``len(batch[0])`` for a tuple or list, ``batch.shape[0]`` for a
tensor, the leading size of the first tensor leaf otherwise, or what a user-supplied
``batch_size(batch)`` returns.

Slicing a batch (per-example and micro-batch estimators) cuts every tensor leaf whose
leading dimension equals B; other leaves (scalars, class weights, strings) are passed
unchanged to every slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import pairwise
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

__all__ = [
    "as_batches",
    "batch_size_of",
    "cast_batch",
    "count_batches",
    "example_in_dims",
    "slice_batch",
    "split_batch",
]


def _is_single_batch(batches: Any) -> bool:
    if isinstance(batches, (torch.Tensor, Mapping)):
        return True
    if isinstance(batches, (tuple, list)):
        return len(batches) > 0 and isinstance(batches[0], torch.Tensor)
    return False


def as_batches(batches: Any) -> Iterator[Any]:
    """Iterate over ``batches``: one batch (a tensor, a mapping, or a tuple/list whose first
    element is a tensor) or an iterable of batches (a list of tuples, a DataLoader, ...).

    >>> x, y = torch.zeros(4, 2), torch.zeros(4)
    >>> len(list(as_batches((x, y)))), len(list(as_batches([(x, y), (x, y)])))
    (1, 2)
    """
    if batches is None:
        raise TypeError("batches must be a batch or an iterable of batches, got None")
    if _is_single_batch(batches):
        return iter([batches])
    if not isinstance(batches, Iterable) or isinstance(batches, (str, bytes)):
        raise TypeError(
            f"batches must be a batch or an iterable of batches, got {type(batches).__name__}"
        )
    return iter(batches)


def count_batches(batches: Any) -> int | None:
    """How many batches :func:`as_batches` will yield, or ``None`` if unknown."""
    if _is_single_batch(batches):
        return 1
    try:
        return len(batches)
    except TypeError:
        return None


def batch_size_of(batch: Any, batch_size: Callable[[Any], int] | None = None) -> int:
    """The number of examples B in ``batch`` (see the module docstring)."""
    if batch_size is not None:
        size = batch_size(batch)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"batch_size(batch) must return an int >= 1, got {size!r}")
        return size
    if isinstance(batch, torch.Tensor):
        first = batch
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        first = batch[0]
    else:
        leaves = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]
        if not leaves:
            raise ValueError(
                f"cannot tell the size of a batch of type {type(batch).__name__} without "
                "tensors; pass batch_size=callable"
            )
        first = leaves[0]
    if first.dim() == 0 or first.shape[0] < 1:
        raise ValueError(
            f"batch has no examples along dimension 0 (leading tensor shape "
            f"{tuple(first.shape)}); pass batch_size=callable if the layout differs"
        )
    return int(first.shape[0])


def _sliceable(t: Any, size: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == size


def slice_batch(batch: Any, size: int, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of a batch of ``size`` examples."""
    return tree_map(lambda t: t[start:stop] if _sliceable(t, size) else t, batch)


def split_batch(batch: Any, size: int, pieces: int) -> list[tuple[Any, int]]:
    """``pieces`` contiguous slices as equal as possible, with their sizes."""
    bounds = [round(i * size / pieces) for i in range(pieces + 1)]
    return [(slice_batch(batch, size, a, b), b - a) for a, b in pairwise(bounds) if b > a]


def example_in_dims(batch: Any, size: int) -> Any:
    """``vmap`` in_dims for a batch: 0 for tensors with B rows, ``None`` for the rest."""
    return tree_map(lambda t: 0 if _sliceable(t, size) else None, batch)


def cast_batch(batch: Any, dtype: torch.dtype | None) -> Any:
    """Cast the floating-point tensors of a batch to ``dtype`` (no-op when ``None``)."""
    if dtype is None:
        return batch
    return tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
        batch,
    )
