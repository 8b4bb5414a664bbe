"""The engine's recalibration log, appended to a CSV or Parquet file as training runs.

:class:`HistoryFile` is a callback for :class:`layerwise.engine.LayerwiseOptimizer`
(``callback=HistoryFile("history.csv")``): each recalibration's rows (the columns of
:data:`layerwise.engine.HISTORY_COLUMNS`) are added to the file as soon as they exist, so
nothing already written is lost when a run is killed.

- ``.csv``: each recalibration appends its rows with a single ``write`` and a flush. An
  existing file with the same header is continued (a resumed run); one with another
  header is refused. A partial last line left by a killed writer is cut off first (when
  the :class:`HistoryFile` is made).
- ``.parquet`` (needs ``pyarrow``, from the ``experiments`` extra; without it,
  :class:`layerwise.experiments.extras.MissingExtraError` says so): Parquet files cannot
  be appended to, so each recalibration rewrites the file atomically (temporary name in
  the same folder, then ``os.replace``); an existing file's rows are kept and continued.

Under ``torch.distributed`` only rank 0 touches the file (every rank holds the same
rows), so the ranks do not write one file together.
"""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path
from typing import Any

from layerwise.engine.history import HISTORY_COLUMNS, history_frame
from layerwise.experiments.atomic import atomic_write
from layerwise.experiments.extras import MissingExtraError, missing_extra

__all__ = ["HistoryFile"]


class HistoryFile:
    """Append each recalibration's rows to ``path`` (``.csv`` or ``.parquet``).

    >>> import tempfile
    >>> from layerwise.engine import Recalibration
    >>> path = Path(tempfile.mkdtemp()) / "history.csv"
    >>> log = HistoryFile(path)
    >>> log(Recalibration(10, [{"step": 10, "group": "fc", "multiplier": 0.5}], None, None))
    >>> path.read_text().splitlines()[1][:12]
    '10,fc,0.5,,,'
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"path must be a path ending in .csv or .parquet, got {path!r}")
        p = Path(path)
        self.format = p.suffix.lower().lstrip(".")
        if self.format not in ("csv", "parquet"):
            raise ValueError(f"path must end in .csv or .parquet, got {str(path)!r}")
        if not p.parent.is_dir():
            raise ValueError(f"path: folder {str(p.parent)!r} of {str(path)!r} does not exist")
        if self.format == "parquet" and importlib.util.find_spec("pyarrow") is None:
            exc = ModuleNotFoundError("No module named 'pyarrow'", name="pyarrow")
            raise MissingExtraError(
                f"path {str(path)!r}: writing Parquet needs pyarrow; {missing_extra(exc)} "
                "(or give a .csv path)"
            )
        self.path = p
        self._frame: Any = None  # Parquet: the rows so far, read from the file once
        if _is_writer_rank() and self.format == "csv":
            self._repair_csv()

    def __repr__(self) -> str:
        return f"HistoryFile({str(self.path)!r})"

    def __call__(self, record: Any) -> None:
        """Add ``record.rows`` (a :class:`layerwise.engine.Recalibration`'s) to the file."""
        rows = getattr(record, "rows", None)
        if not isinstance(rows, list):
            raise TypeError(f"record must be a layerwise.engine.Recalibration, got {record!r:.80}")
        if not rows or not _is_writer_rank():
            return
        if self.format == "csv":
            self._append_csv(rows)
        else:
            self._append_parquet(rows)

    # -- CSV ----------------------------------------------------------------------------
    def _repair_csv(self) -> None:
        """Check an existing file's header; cut a partial last line."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as handle:
            header = handle.readline().decode("utf-8").rstrip("\r\n").split(",")
            if header != list(HISTORY_COLUMNS):
                raise ValueError(
                    f"path {str(self.path)!r} exists with other columns {header}; give a new "
                    "path (an existing file is only continued when its columns match)"
                )
            handle.seek(0)
            data = handle.read()
            if not data.endswith(b"\n"):
                handle.truncate(data.rfind(b"\n") + 1)

    def _append_csv(self, rows: list[dict[str, Any]]) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        text = history_frame(rows).to_csv(index=False, header=new, lineterminator="\n")
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()

    # -- Parquet ------------------------------------------------------------------------
    def _append_parquet(self, rows: list[dict[str, Any]]) -> None:
        import pandas as pd

        if self._frame is None:
            self._frame = pd.read_parquet(self.path) if self.path.exists() else history_frame([])
            if list(self._frame.columns) != list(HISTORY_COLUMNS):
                raise ValueError(
                    f"path {str(self.path)!r} exists with other columns "
                    f"{list(self._frame.columns)}; give a new path"
                )
        new = history_frame(rows)
        self._frame = new if self._frame.empty else pd.concat([self._frame, new], ignore_index=True)
        buffer = io.BytesIO()
        self._frame.to_parquet(buffer, index=False)
        atomic_write(self.path, lambda handle: handle.write(buffer.getvalue()))


def _is_writer_rank() -> bool:
    """Whether this process writes the file (rank 0, or not distributed)."""
    import torch

    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
