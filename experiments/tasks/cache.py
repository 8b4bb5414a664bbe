"""Caches for generated data and pre-trained weights: in-process, and optionally on disk.

Entries are keyed by a hash of everything that determines them (generator arguments,
seeds, budgets), so a changed argument can never return a stale entry. Disk entries are
written atomically (temporary file + ``os.replace``), so processes running in parallel
may race to fill the same entry safely: both write the same bytes. A file that cannot be
read back is recomputed and rewritten.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerwise.experiments.atomic import atomic_write

__all__ = ["cache_key", "cached_arrays", "cached_state_dict"]

_MEMORY: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()


def cache_key(spec: Mapping[str, Any]) -> str:
    """First 16 hex digits of the SHA-256 of ``spec`` as canonical JSON.

    >>> cache_key({"b": 1, "a": [2, 3]}) == cache_key({"a": [2, 3], "b": 1})
    True
    """
    if not isinstance(spec, Mapping):
        raise TypeError(f"spec must be a mapping, got {type(spec).__name__}")
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cached(
    stem: str,
    key: str,
    cache_dir: Path | None,
    suffix: str,
    compute: Callable[[], Any],
    save: Callable[[Any, io.BufferedIOBase], None],
    load: Callable[[Path], Any],
) -> Any:
    with _LOCK:
        if (stem, key) in _MEMORY:
            return _MEMORY[(stem, key)]
    value = None
    path = None if cache_dir is None else Path(cache_dir) / f"{stem}-{key}{suffix}"
    if path is not None and path.is_file():
        try:
            value = load(path)
        except Exception:  # unreadable (truncated by hand, other version): recompute
            value = None
    if value is None:
        value = compute()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda handle: save(value, handle))
    with _LOCK:
        _MEMORY[(stem, key)] = value
    return value


def cached_arrays(
    stem: str,
    spec: Mapping[str, Any],
    compute: Callable[[], dict[str, np.ndarray]],
    cache_dir: Path | None = None,
) -> dict[str, np.ndarray]:
    """The arrays ``compute()`` returns for ``spec``, from memory, ``cache_dir`` or fresh."""

    def load(path: Path) -> dict[str, np.ndarray]:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}

    return _cached(
        stem,
        cache_key(spec),
        cache_dir,
        ".npz",
        compute,
        lambda value, handle: np.savez(handle, **value),
        load,
    )


def cached_state_dict(
    stem: str,
    spec: Mapping[str, Any],
    compute: Callable[[], dict[str, torch.Tensor]],
    cache_dir: Path | None = None,
) -> dict[str, torch.Tensor]:
    """The ``state_dict`` ``compute()`` returns for ``spec``, from memory, disk or fresh.
    Callers must copy the tensors before modifying them (``load_state_dict`` does)."""
    return _cached(
        stem,
        cache_key(spec),
        cache_dir,
        ".pt",
        compute,
        lambda value, handle: torch.save(value, handle),
        lambda path: torch.load(path, map_location="cpu", weights_only=True),
    )
