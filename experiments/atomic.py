"""Atomic file writes: write to a temporary name in the same folder, then ``os.replace``.

A reader (or a resumed ablation) therefore sees either the old file or the complete new
one, never a half-written file, even if the process is killed mid-write. The temporary
file is created the way ``open(path, "w")`` creates a file, with mode ``0o666`` less the
process umask (``0o644`` under the usual umask ``0o022``), so a result is as readable by
colleagues as any other file the user writes (``tempfile.mkstemp`` would make it
``0o600``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "read_json", "write_json", "write_text"]

# Exclusive creation, never through a symbolic link, not inherited by child processes.
_FLAGS = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new file ``.<name>.<random>.tmp`` next to ``path``, open for writing, with the
    mode ``open()`` would give it (``0o666`` less the umask, applied by the kernel)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 64 random bits collided: draw again
            continue


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(handle)`` on a temporary binary file next to ``path``, fsync it and
    rename it onto ``path``. The temporary file is removed if ``write`` raises."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path {str(path)!r}: folder {str(path.parent)!r} does not exist")
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return atomic_write(path, lambda h: h.write(text.encode("utf-8")))


def write_json(path: str | Path, data: Any) -> Path:
    """Atomically write ``data`` as indented JSON (non-finite floats spelled NaN/Infinity)."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file written by :func:`write_json`. A file that is not JSON (or not
    UTF-8) raises ``ValueError`` naming it.

    >>> import tempfile
    >>> bad = Path(tempfile.mkdtemp()) / "tuning.json"
    >>> _ = bad.write_text("garbage")
    >>> read_json(bad)
    Traceback (most recent call last):
    ...
    ValueError: .../tuning.json: not valid JSON (Expecting value: line 1 column 1 (char 0))
    """
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from exc
