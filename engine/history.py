"""The recalibration log: one row per group per recalibration, kept in memory and, when
asked, written incrementally to a CSV or Parquet file.

Columns (:data:`HISTORY_COLUMNS`): ``step`` (optimizer steps taken when the recalibration
ran), ``group``, ``multiplier`` (the new one), ``previous_multiplier``, ``base_lr`` (the
scheduler's rate at that moment), ``effective_lr`` (``base_lr * multiplier``, the rate of
the next step), ``reason`` (the controller's, or why the recalibration was skipped),
``fallback`` (whether the controller fell back to uniform), ``event`` (the controller's
event line, or ``None``), ``skipped`` (``True`` when the engine skipped the recalibration,
e.g. on non-finite gradients, and kept the multipliers), then the estimate of the group
(the columns of :meth:`layerwise.sensitivity.SensitivityReport.to_frame` after ``group``; ``NaN``
where not measured) and ``estimate_seconds``.

Files, so that nothing already written is lost:

- ``.csv``: each recalibration appends its rows with a single ``write`` and a flush. An
  existing file with the same header is continued (a resumed run); one with another
  header is refused. A partial last line left by a killed writer is cut off first.
- ``.parquet`` (needs ``pyarrow``): Parquet files cannot be appended to, so each
  recalibration rewrites the file atomically (temporary name in the same folder, then
  ``os.replace``); an existing file's rows are kept and continued.
"""

from __future__ import annotations

import importlib.util
import io
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerwise.sensitivity.report import COLUMNS as REPORT_COLUMNS

if TYPE_CHECKING:  # pandas is imported where a frame is made
    import pandas as pd

__all__ = ["HISTORY_COLUMNS", "History", "check_path", "open_writer"]

HISTORY_COLUMNS: tuple[str, ...] = (
    "step",
    "group",
    "multiplier",
    "previous_multiplier",
    "base_lr",
    "effective_lr",
    "reason",
    "fallback",
    "event",
    "skipped",
    *REPORT_COLUMNS[1:],
    "estimate_seconds",
)


def _frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame([{c: row.get(c) for c in HISTORY_COLUMNS} for row in rows])
    if frame.empty:
        frame = pd.DataFrame(columns=list(HISTORY_COLUMNS))
    for c in HISTORY_COLUMNS:
        if c in ("group", "reason", "event"):
            frame[c] = frame[c].astype(object)
        elif c in ("fallback", "skipped"):
            frame[c] = frame[c].astype(bool)
        else:
            frame[c] = pd.to_numeric(frame[c], errors="coerce")
    frame["step"] = frame["step"].astype("int64")
    return frame


def _atomic_replace(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _CSVWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._prepare()

    def _prepare(self) -> None:
        """Check an existing file's header and cut a partial last line (at construction)."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as handle:
            header = handle.readline().decode("utf-8").rstrip("\r\n").split(",")
            if header != list(HISTORY_COLUMNS):
                raise ValueError(
                    f"history: {str(self.path)!r} exists with other columns {header}; "
                    "give a new path (an existing file is only continued when its columns match)"
                )
            handle.seek(0)
            data = handle.read()
            if not data.endswith(b"\n"):
                handle.truncate(data.rfind(b"\n") + 1)

    def append(self, rows: list[dict[str, Any]]) -> None:

        new = not self.path.exists() or self.path.stat().st_size == 0
        text = _frame(rows).to_csv(index=False, header=new, lineterminator="\n")
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()


class _ParquetWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._frame: pd.DataFrame | None = None

    def append(self, rows: list[dict[str, Any]]) -> None:
        import pandas as pd

        if self._frame is None:
            self._frame = pd.read_parquet(self.path) if self.path.exists() else _frame([])
            if list(self._frame.columns) != list(HISTORY_COLUMNS):
                raise ValueError(
                    f"history: {str(self.path)!r} exists with other columns "
                    f"{list(self._frame.columns)}; give a new path"
                )
        new = _frame(rows)
        self._frame = new if self._frame.empty else pd.concat([self._frame, new], ignore_index=True)
        buffer = io.BytesIO()
        self._frame.to_parquet(buffer, index=False)
        _atomic_replace(self.path, lambda handle: handle.write(buffer.getvalue()))


def check_path(path: Any) -> Path:
    """``path`` as a ``Path`` if it ends in ``.csv`` or ``.parquet`` (with ``pyarrow``
    importable) and its folder exists; otherwise an error naming it."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"history must be a path ending in .csv or .parquet, got {path!r}")
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ValueError(f"history must be a path ending in .csv or .parquet, got {str(path)!r}")
    if not p.parent.is_dir():
        raise ValueError(f"history: folder {str(p.parent)!r} of {str(path)!r} does not exist")
    if suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise ValueError(
            f"history: writing Parquet ({str(path)!r}) needs pyarrow, which is not "
            "installed; install pyarrow or give a .csv path"
        )
    return p


def open_writer(path: Any) -> _CSVWriter | _ParquetWriter:
    """A writer for ``path`` (see :func:`check_path`), chosen by its suffix. A CSV file that
    exists is checked (same columns) and a partial last line is cut off at once."""
    p = check_path(path)
    return _ParquetWriter(p) if p.suffix.lower() == ".parquet" else _CSVWriter(p)


class History:
    """Recalibration rows in memory (:attr:`frame`) and, with ``path``, on disk (only where
    ``write`` is true: rank 0 under DDP, so that ranks do not write one file together).

    >>> h = History()
    >>> h.record([{"step": 100, "group": "fc1", "multiplier": 0.5, "fallback": False}])
    >>> h.frame[["step", "group", "multiplier"]].to_dict("records")
    [{'step': 100, 'group': 'fc1', 'multiplier': 0.5}]
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, write: bool = True) -> None:
        self.path = None if path is None else check_path(path)
        self._writer = None if path is None or not write else open_writer(path)
        self._rows: list[dict[str, Any]] = []

    def record(self, rows: list[dict[str, Any]]) -> None:
        """Add rows (dicts keyed by :data:`HISTORY_COLUMNS`; missing keys are ``None``)."""
        rows = [{c: _plain(row.get(c)) for c in HISTORY_COLUMNS} for row in rows]
        for row in rows:
            row["fallback"] = bool(row["fallback"])
            row["skipped"] = bool(row["skipped"])
        self._rows.extend(rows)
        if self._writer is not None and rows:
            self._writer.append(rows)

    @property
    def frame(self) -> pd.DataFrame:
        """All rows as a DataFrame with the columns of :data:`HISTORY_COLUMNS`."""
        return _frame(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def state(self) -> list[dict[str, Any]]:
        """Plain data for a checkpoint: the rows, as dicts."""
        return [dict(row) for row in self._rows]

    def load_state(self, rows: Any) -> None:
        """Replace the in-memory rows by a checkpoint's (the file is left as it is)."""
        if not isinstance(rows, list) or not all(isinstance(r, Mapping) for r in rows):
            raise ValueError(f"history state must be a list of row dicts, got {type(rows)}")
        unknown = sorted({k for r in rows for k in r} - set(HISTORY_COLUMNS))
        if unknown:
            raise ValueError(f"history state has unknown columns {unknown}")
        self._rows = [{c: r.get(c) for c in HISTORY_COLUMNS} for r in rows]


def _plain(value: Any) -> Any:
    """Python scalars for the row dicts (tensors and numpy scalars become floats)."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if hasattr(value, "item"):
        value = value.item()
    return float(value) if not isinstance(value, bool | int | str) else value
