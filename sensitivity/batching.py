"""Batches as the user's data loader yields them: size, slicing, dtype casting.

A *batch* is whatever ``loss_fn(model, batch)`` accepts: typically a tuple
``(inputs, targets)``, but any nesting of tensors in tuples (named ones included), lists,
mappings (``dict``, ``OrderedDict``, ``transformers.BatchEncoding`` or any other
``Mapping``, rebuilt as its own type) and dataclasses, or a single tensor. Its *size* B
is ``len(batch[0])`` for a tuple or list whose first element is a tensor, ``batch.shape[0]``
for a tensor, the leading size of the first tensor leaf with a dimension otherwise, or what
a user-supplied ``batch_size(batch)`` returns.

Slicing a batch (per-example and micro-batch estimators), casting it (``dtype``) and moving
it (:func:`move_batch`) act on every tensor leaf, wherever it is nested: slicing cuts every
tensor leaf whose leading dimension equals B; other leaves (scalars, class weights,
strings) are passed unchanged to every slice.

>>> batch = {"input_ids": torch.arange(6).reshape(3, 2), "meta": ("x", torch.ones(3))}
>>> batch_size_of(batch), slice_batch(batch, 3, 1, 2)
(3, {'input_ids': tensor([[2, 3]]), 'meta': ('x', tensor([1.]))})
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import pairwise
from typing import Any

import torch

__all__ = [
    "as_batches",
    "batch_size_of",
    "cast_batch",
    "count_batches",
    "example_in_dims",
    "flatten_batch",
    "map_batch",
    "move_batch",
    "slice_batch",
    "split_batch",
]

Rebuild = Callable[[list[Any]], Any]


def _rebuild_mapping(node: Mapping, keys: list[Any], values: list[Any]) -> Any:
    """``node``'s type with ``values`` under ``keys`` (a copy whose items are replaced, so a
    ``BatchEncoding`` or ``ModelOutput`` keeps its type and attributes), else a ``dict``."""
    if type(node) is dict:
        return dict(zip(keys, values, strict=True))
    try:
        new = copy.copy(node)
        for k, v in zip(keys, values, strict=True):
            new[k] = v  # type: ignore[index]
    except Exception:  # an immutable or unusual mapping: a plain dict of the same items
        return dict(zip(keys, values, strict=True))
    return new


def _children(node: Any) -> tuple[list[Any], Rebuild] | None:
    """The children of a container and how to rebuild it from new ones; ``None`` for a leaf."""
    if isinstance(node, torch.Tensor):
        return None
    if isinstance(node, Mapping):
        keys = list(node)
        return [node[k] for k in keys], lambda vals: _rebuild_mapping(node, keys, vals)
    if isinstance(node, tuple) and hasattr(node, "_fields"):  # a named tuple
        return list(node), lambda vals: type(node)(*vals)
    if isinstance(node, (tuple, list)):
        kind = type(node)
        if kind in (tuple, list):
            return list(node), kind
        return list(node), lambda vals: _rebuild_sequence(kind, vals)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        names = [f.name for f in dataclasses.fields(node) if f.init]
        values = [getattr(node, n) for n in names]
        return values, lambda vals: dataclasses.replace(node, **dict(zip(names, vals, strict=True)))
    return None


def _rebuild_sequence(kind: type, values: list[Any]) -> Any:
    try:
        return kind(values)
    except Exception:
        return list(values) if issubclass(kind, list) else tuple(values)


def flatten_batch(batch: Any) -> tuple[list[Any], Rebuild]:
    """The leaves of a batch (tensors and anything that is not a container), depth first,
    and a function that rebuilds the batch, with its container types, from new leaves.

    >>> leaves, rebuild = flatten_batch({"x": torch.zeros(2), "pair": (1, torch.ones(2))})
    >>> len(leaves), rebuild(["a", "b", "c"])
    (3, {'x': 'a', 'pair': ('b', 'c')})
    """
    leaves: list[Any] = []
    make = _builder(batch, leaves)
    return leaves, lambda new: make(iter(new))


def _builder(node: Any, leaves: list[Any]) -> Callable[[Iterator[Any]], Any]:
    """The rebuilder of ``node`` from an iterator of new leaves; its leaves into ``leaves``.
    (A module-level function: a closure that calls itself is a reference cycle, which
    would keep the batch alive until the garbage collector found it.)"""
    kids = _children(node)
    if kids is None:
        leaves.append(node)
        return next
    values, rebuild = kids
    parts = [_builder(v, leaves) for v in values]
    return lambda it: rebuild([part(it) for part in parts])


def map_batch(fn: Callable[[Any], Any], batch: Any) -> Any:
    """``batch`` with every leaf ``t`` replaced by ``fn(t)`` (containers kept)."""
    leaves, rebuild = flatten_batch(batch)
    return rebuild([fn(t) for t in leaves])


def move_batch(batch: Any, device: torch.device | str) -> Any:
    """Every tensor of ``batch`` on ``device`` (no copy for those already there).

    >>> move_batch({"x": torch.zeros(1)}, "cpu")["x"].device.type
    'cpu'
    """
    device = torch.device(device)
    return map_batch(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)


def _is_single_batch(batches: Any) -> bool:
    if isinstance(batches, (torch.Tensor, Mapping)):
        return True
    if dataclasses.is_dataclass(batches) and not isinstance(batches, type):
        return True
    if isinstance(batches, tuple) and hasattr(batches, "_fields"):  # a named tuple
        return True
    if isinstance(batches, (tuple, list)):  # (x, y), ((x, extras), y): a tensor among them
        return any(isinstance(b, torch.Tensor) for b in batches)
    return False


def as_batches(batches: Any) -> Iterator[Any]:
    """Iterate over ``batches``: one batch (a tensor, a mapping, a dataclass, a named tuple,
    or a tuple/list with a tensor among its elements, such as ``(x, y)`` or
    ``((x, extras), y)``) or an iterable of batches (a list of tuples, a DataLoader, ...;
    wrap a batch of another layout in a list: ``[batch]``).

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
        leaves = [t for t in flatten_batch(batch)[0] if isinstance(t, torch.Tensor)]
        if not leaves:
            raise ValueError(
                f"cannot tell the size of a batch of type {type(batch).__name__} without "
                "tensors; pass batch_size=callable"
            )
        first = next((t for t in leaves if t.dim() > 0), leaves[0])
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
    return map_batch(lambda t: t[start:stop] if _sliceable(t, size) else t, batch)


def split_batch(batch: Any, size: int, pieces: int) -> list[tuple[Any, int]]:
    """``pieces`` contiguous slices as equal as possible, with their sizes."""
    bounds = [round(i * size / pieces) for i in range(pieces + 1)]
    return [(slice_batch(batch, size, a, b), b - a) for a, b in pairwise(bounds) if b > a]


def example_in_dims(batch: Any, size: int) -> list[int | None]:
    """``vmap`` in_dims for the leaves of a batch (:func:`flatten_batch`'s order): 0 for
    tensors with B rows, ``None`` for the rest."""
    return [0 if _sliceable(t, size) else None for t in flatten_batch(batch)[0]]


def cast_batch(batch: Any, dtype: torch.dtype | None) -> Any:
    """Cast the floating-point tensors of a batch to ``dtype`` (no-op when ``None``)."""
    if dtype is None:
        return batch
    return map_batch(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
        batch,
    )
