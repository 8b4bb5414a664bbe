"""Where ``layerwise analyze`` writes, and how: the output-folder policy and the writers.

Policy: ``--out DIR`` may be new, or an existing folder; a folder that already holds any of
:data:`OUTPUT_FILES` (earlier results) is refused unless ``--force``. With ``--force`` only the
files of :data:`OUTPUT_FILES` are replaced; nothing else in the folder is touched or deleted.
Each file is written to a temporary name in the same folder and renamed into place with
:func:`os.replace` (:func:`layerwise.experiments.atomic.atomic_write`), so a reader never sees a
half-written file and an interrupted run leaves the earlier file intact.

JSON is strict (RFC 8259): a non-finite float is written as the string ``"NaN"``,
``"Infinity"`` or ``"-Infinity"`` (``float()`` reads each back), never as a bare ``NaN``.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from layerwise.experiments.atomic import atomic_write
from layerwise.experiments.errors import UsageError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "OUTPUT_FILES",
    "check_out_dir",
    "csv_text",
    "json_text",
    "jsonable",
    "write_outputs",
]

#: Every file ``layerwise analyze --out`` writes; the only files ``--force`` replaces.
OUTPUT_FILES = (
    "report.csv",
    "report.json",
    "hessian_trace.png",
    "grad_variance.png",
    "noise_to_signal.png",
    "multipliers.png",
)


def check_out_dir(path: str | os.PathLike[str], *, force: bool) -> Path:
    """Check ``--out`` before any work is done; returns it as a :class:`Path`.

    Refuses a path that exists and is not a folder, and a folder holding earlier results
    (any of :data:`OUTPUT_FILES`) unless ``force``. Creates nothing.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(path)!r} exists and is not a folder")
    if out.is_dir():
        earlier = [name for name in OUTPUT_FILES if (out / name).exists()]
        if earlier and not force:
            raise UsageError(
                f"--out {str(path)!r} already holds earlier results ({', '.join(earlier)}); "
                "pass --force to replace those files (nothing else in it is touched)"
            )
        if not os.access(out, os.W_OK):
            raise UsageError(f"--out {str(path)!r} is not writable")
    return out


def write_outputs(out: Path, files: Mapping[str, bytes]) -> list[Path]:
    """Create ``out`` (and parents) if needed and write each ``{name: bytes}`` atomically.

    Only names in :data:`OUTPUT_FILES` may be written, so ``--force`` can never replace a
    file it does not own.
    """
    foreign = sorted(set(files) - set(OUTPUT_FILES))
    if foreign:
        raise ValueError(f"files holds names outside OUTPUT_FILES: {foreign}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in files.items():
        atomic_write(out / name, lambda handle, data=data: handle.write(data))
        written.append(out / name)
    return written


def jsonable(value: Any) -> Any:
    """Plain JSON data from ``value``: mappings, sequences, numbers (non-finite floats as
    strings), numpy scalars, paths, torch dtypes and devices.

    >>> jsonable({"a": float("nan"), "b": (1, float("-inf"))})
    {'a': 'NaN', 'b': [1, '-Infinity']}
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [jsonable(v) for v in items]
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return jsonable(value.item())
    raise TypeError(f"value of type {type(value).__name__} is not JSON data: {value!r}")


def json_text(data: Any) -> str:
    """Strict, indented JSON text of :func:`jsonable` ``(data)``, ending in a newline."""
    return json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n"


def csv_text(frame: pd.DataFrame) -> str:
    """CSV text of ``frame`` without its index; missing values spelled ``nan``."""
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, na_rep="nan", lineterminator="\n")
    return buffer.getvalue()
