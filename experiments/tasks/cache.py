"""Caches for generated data and pre-trained weights: in-process, and optionally on disk.

Entries are keyed by a hash of everything that determines them (generator arguments,
seeds, budgets, versions), so a changed argument can never return a stale entry. Disk
entries are written atomically (temporary file + ``os.replace``), so a reader sees a
complete file or none, and they are computed once across processes: a process that finds
no entry takes an exclusive lock on ``<entry>.lock`` next to it (``fcntl.flock``, which
the kernel releases when its holder dies, so a killed process leaves no stale lock),
looks again, and only then computes and writes; the others wait on the lock and read what
it wrote. Where ``fcntl`` does not exist (Windows) processes do not wait for each other
and may each compute the entry, as they would write the same bytes. A file that cannot
be read back is recomputed and rewritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerwise.experiments.atomic import atomic_write

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["cache_key", "cached_arrays", "cached_state_dict", "entry_lock"]

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


@contextlib.contextmanager
def entry_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (created if needed) for the block; wait
    while another process holds it. The lock dies with its holder (``flock``); the lock
    file itself is left in place, empty, for the next one. Without ``fcntl``, no lock."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    lock_path = Path(f"{path}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close, or by the kernel on death
        yield
    finally:
        os.close(fd)


def _read(path: Path | None, load: Callable[[Path], Any]) -> Any:
    """The entry at ``path``, or ``None`` if there is none or it cannot be read back."""
    if path is None or not path.is_file():
        return None
    try:
        return load(path)
    except Exception:  # unreadable (truncated by hand, other version): recompute
        return None


def _cached(
    stem: str,
    key: str,
    cache_dir: Path | None,
    suffix: str,
    compute: Callable[[], Any],
    save: Callable[[Any, io.BufferedIOBase], None],
    load: Callable[[Path], Any],
) -> Any:
    path = None if cache_dir is None else Path(cache_dir) / f"{stem}-{key}{suffix}"
    with _LOCK:
        value = _MEMORY.get((stem, key))
    if value is not None:
        if path is not None and not path.is_file():  # known here, not yet in this folder
            path.parent.mkdir(parents=True, exist_ok=True)
            with entry_lock(path):
                if not path.is_file():
                    atomic_write(path, lambda handle: save(value, handle))
        return value
    value = _read(path, load)
    if value is None and path is None:
        value = compute()
    elif value is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with entry_lock(path):
            value = _read(path, load)  # written by another process while we waited
            if value is None:
                value = compute()
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
