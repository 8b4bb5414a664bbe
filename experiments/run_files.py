"""The files of a finished run folder, read and checked for ``layerwise report``.

Every problem raises ``ValueError`` whose message starts with the path of the file at
fault, so that a damaged results folder is reported file by file, never as a bare parser
message or a crash in a plot:

* ``done.json``: present (else the run did not finish), a JSON object with the summary
  keys the report reads, its spec hash equal to the manifest's and its run id equal to
  the folder's name;
* ``manifest.json``: valid (:func:`layerwise.experiments.manifest.read_manifest`), its
  groups named, and, when the ablation's config hash is known, written under that config;
* ``metrics.csv`` (final runs): at least one row, every row as many fields as the header
  and ended by a line end (a truncated last row is caught here), the columns the report
  reads present and numeric, and its last step the last step the done marker records;
* ``events.csv`` (final runs): the columns ``step, event, fallback, skipped``, the flags
  ``True``/``False``; a header alone means "no event".
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from layerwise.experiments.atomic import read_json
from layerwise.experiments.manifest import DONE, MANIFEST, read_manifest

__all__ = ["GROUP_QUANTITIES", "read_events", "read_metrics", "read_run"]

#: The per-group columns ``<quantity>/<group>`` of ``metrics.csv`` the report reads.
GROUP_QUANTITIES = ("lr", "multiplier", "grad_norm", "curvature", "noise")
#: The summary keys of ``done.json`` the report reads.
DONE_KEYS = ("spec_hash", "run_id", "kind", "task", "policy", "setting", "seed", "lr", "metric")
EVENT_COLUMNS = ("step", "event", "fallback", "skipped")


def read_run(run_dir: str | Path, config_hash: str | None = None) -> tuple[dict, dict]:
    """The done marker and the manifest of the finished run in ``run_dir`` (module
    docstring); ``config_hash``: the ablation's, which the manifest must carry."""
    run_dir = Path(run_dir)
    done_path = run_dir / DONE
    if not done_path.is_file():
        raise ValueError(f"{done_path}: missing (the run did not finish)")
    manifest = read_manifest(run_dir)
    done = read_json(done_path)
    if not isinstance(done, dict):
        raise ValueError(f"{done_path}: not a done marker (a JSON {type(done).__name__})")
    missing = [k for k in DONE_KEYS if k not in done]
    if missing:
        raise ValueError(f"{done_path}: missing key(s) {missing}")
    if done["spec_hash"] != manifest["spec_hash"]:
        raise ValueError(
            f"{done_path}: spec hash {str(done['spec_hash'])[:12]} differs from "
            f"{MANIFEST}'s {str(manifest['spec_hash'])[:12]} (the files of two runs)"
        )
    if done["run_id"] != run_dir.name:
        raise ValueError(f"{done_path}: run id {done['run_id']!r} in folder {run_dir.name!r}")
    groups = manifest["groups"].get("groups") if isinstance(manifest["groups"], dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "name" in g for g in groups):
        raise ValueError(f"{run_dir / MANIFEST}: 'groups' holds no list of named groups")
    if not isinstance(manifest["task"], dict):
        raise ValueError(f"{run_dir / MANIFEST}: 'task' is not a table")
    if config_hash is not None and manifest["config_hash"] != config_hash:
        raise ValueError(
            f"{run_dir / MANIFEST}: written under config {str(manifest['config_hash'])[:12]}, "
            f"the ablation's is {config_hash[:12]}"
        )
    return done, manifest


def _read_csv(path: Path, required: Sequence[str]) -> pd.DataFrame:
    """The table in ``path``: every row as wide as the header, ``required`` columns there."""
    if not path.is_file():
        raise ValueError(f"{path}: missing")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise ValueError(f"{path}: not a CSV table ({exc})") from exc
    if not rows:
        raise ValueError(f"{path}: empty (no header)")
    if not text.endswith("\n"):  # every writer ends its last row with a line end
        raise ValueError(f"{path}: the last row has no line end (truncated?)")
    header = rows[0]
    for number, row in enumerate(rows[1:], start=1):
        if len(row) != len(header):
            raise ValueError(
                f"{path}: row {number} has {len(row)} fields, the header {len(header)} (truncated?)"
            )
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    return pd.read_csv(io.StringIO(text))


def _check_numeric(path: Path, frame: pd.DataFrame, columns: Sequence[str]) -> None:
    for column in columns:
        if not pd.api.types.is_numeric_dtype(frame[column]):
            values = pd.to_numeric(frame[column], errors="coerce")
            row = int((values.isna() & frame[column].notna()).to_numpy().argmax())
            raise ValueError(
                f"{path}: column {column!r}, row {row + 1}: {frame[column].iloc[row]!r} is "
                "not a number"
            )


def read_metrics(path: str | Path, done: dict[str, Any], groups: Sequence[str]) -> pd.DataFrame:
    """``metrics.csv`` of the final run whose done marker is ``done`` (module docstring).
    Reads ``step``, ``train_loss``, ``val_loss``, ``val_<metric>`` and, per group, the
    :data:`GROUP_QUANTITIES` columns present."""
    path = Path(path)
    base = ["step", "train_loss", "val_loss", f"val_{done['metric']}"]
    frame = _read_csv(path, base)
    if frame.empty:
        raise ValueError(f"{path}: no rows under the header (truncated?)")
    per_group = [f"{q}/{g}" for g in groups for q in GROUP_QUANTITIES]
    _check_numeric(path, frame, [*base, *(c for c in per_group if c in frame)])
    last = frame["step"].iloc[-1]
    if "steps" in done and last != done["steps"]:
        raise ValueError(
            f"{path}: ends at step {float(last):g}, but {DONE} records the run's last step as "
            f"{done['steps']} (rows lost?)"
        )
    return frame


def read_events(path: str | Path) -> pd.DataFrame:
    """``events.csv`` of a final run: the controller's events (a header alone: none)."""
    path = Path(path)
    frame = _read_csv(path, EVENT_COLUMNS)
    if frame.empty:
        return frame
    _check_numeric(path, frame, ["step"])
    for column in ("fallback", "skipped"):
        if not pd.api.types.is_bool_dtype(frame[column]):
            raise ValueError(f"{path}: column {column!r} must hold True/False")
    return frame
