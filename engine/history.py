"""The recalibration log: one row per group per recalibration (and per skipped step).

Columns (:data:`HISTORY_COLUMNS`): ``step`` (optimizer steps taken when the recalibration
ran, or when a step was skipped), ``group``, ``multiplier`` (the new one),
``previous_multiplier``, ``base_lr`` (the scheduler's rate at that moment), ``effective_lr``
(``base_lr * multiplier``, the rate of the next step), ``reason`` (the controller's, or why
something was skipped), ``fallback`` (whether the controller fell back to uniform),
``event`` (the controller's event line, or ``None``), ``skipped`` (``True`` when the engine
skipped something: a base step on non-finite gradients, whose rows carry the reason, the
event and the fallback; or a recalibration, e.g. after ``GradScaler`` found non-finite
gradients, which keeps the multipliers), then the estimate of the group (the columns of
:meth:`layerwise.sensitivity.SensitivityReport.to_frame` after ``group``; ``NaN`` where not
measured) and ``estimate_seconds``.

Rows are plain dicts of Python scalars, so they go into a checkpoint as they are
(:meth:`History.state_dict`). Writing them to a file is a callback's job (the engine's
``callback=``, e.g. :class:`layerwise.experiments.history_file.HistoryFile`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from layerwise.sensitivity.report import COLUMNS as REPORT_COLUMNS

if TYPE_CHECKING:  # pandas is imported where a frame is made
    import pandas as pd

__all__ = ["HISTORY_COLUMNS", "History", "history_frame"]

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
_TEXT = ("group", "reason", "event")
_FLAGS = ("fallback", "skipped")


def history_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """``rows`` as a DataFrame with exactly the columns of :data:`HISTORY_COLUMNS`: ``step``
    int64, ``group``/``reason``/``event`` object, ``fallback``/``skipped`` bool, the rest
    float (``NaN`` where missing)."""
    import pandas as pd

    frame = pd.DataFrame([{c: row.get(c) for c in HISTORY_COLUMNS} for row in rows])
    if frame.empty:
        frame = pd.DataFrame(columns=list(HISTORY_COLUMNS))
    for c in HISTORY_COLUMNS:
        if c in _TEXT:
            frame[c] = frame[c].astype(object)
        elif c in _FLAGS:
            frame[c] = frame[c].astype(bool)
        else:
            frame[c] = pd.to_numeric(frame[c], errors="coerce")
    frame["step"] = frame["step"].astype("int64")
    return frame


class History:
    """Recalibration rows in memory; :attr:`frame` is their DataFrame view.

    >>> h = History()
    >>> rows = h.record([{"step": 100, "group": "fc1", "multiplier": 0.5, "fallback": False}])
    >>> h.frame[["step", "group", "multiplier"]].to_dict("records")
    [{'step': 100, 'group': 'fc1', 'multiplier': 0.5}]
    >>> History().load_state_dict(h.state_dict())
    """

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] = []

    def record(self, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Add rows (mappings keyed by :data:`HISTORY_COLUMNS`; missing keys are ``None``,
        tensors and numpy scalars become Python scalars); return them as stored."""
        plain = [_plain_row(row) for row in rows]
        self._rows.extend(plain)
        return [dict(row) for row in plain]

    @property
    def frame(self) -> pd.DataFrame:
        """All rows as a DataFrame (:func:`history_frame`)."""
        return history_frame(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint: ``{"rows": [row dict, ...]}``."""
        return {"rows": [dict(row) for row in self._rows]}

    def load_state_dict(self, state: Any) -> None:
        """Replace the rows by a :meth:`state_dict`'s; checked first, so a bad one changes
        nothing (``ValueError`` naming what is wrong)."""
        self._rows = self.check_state_dict(state)

    @staticmethod
    def check_state_dict(state: Any) -> list[dict[str, Any]]:
        """The rows of a :meth:`state_dict`, validated, or ``ValueError``."""
        where = "history state"
        if not isinstance(state, Mapping) or set(state) != {"rows"}:
            raise ValueError(
                f"{where} must be a mapping with the one key 'rows', got {state!r:.80}"
            )
        rows = state["rows"]
        if not isinstance(rows, list | tuple):
            raise ValueError(f"{where}['rows'] must be a list of row dicts, got {rows!r:.80}")
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ValueError(f"{where}['rows'][{i}] must be a mapping, got {row!r:.80}")
            unknown = sorted(map(str, set(row) - set(HISTORY_COLUMNS)))
            if unknown:
                raise ValueError(f"{where}['rows'][{i}] has unknown columns {unknown}")
        return [_plain_row(row) for row in rows]


def _plain_row(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {c: _plain(row.get(c)) for c in HISTORY_COLUMNS}
    for c in _FLAGS:
        out[c] = bool(out[c])
    return out


def _plain(value: Any) -> Any:
    """Python scalars for the row dicts (tensors and numpy scalars become floats)."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if hasattr(value, "item"):
        value = value.item()
    return value if isinstance(value, bool | int | str) else float(value)
