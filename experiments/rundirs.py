"""The results folder on disk: run folders, temporary folders, the lock, superseded results.

Layout of an ablation's ``--out`` folder::

    ablation.json          the config (parsed), its hash, versions; written first
    config.toml            a copy of the config file as given
    tuning.json            the rates the tuning chose, with every rate's scores
    runs/<run id>/         finished runs (manifest, metrics, done marker)
    runs/.tmp-<id>-<x>/    runs in progress; promoted by an atomic rename when done
    superseded/<hash>-<n>/ results of an older config, moved aside by --force
    report.md, figures/    the report

A run is executed in a fresh temporary folder and renamed onto ``runs/<run id>`` only
after its done marker is written, so a finished run folder is always complete and a
killed run leaves only a temporary folder. Any half-written ``runs/<id>`` (no done
marker) is replaced when the run is redone. Finished runs are never deleted: a temporary
folder that holds a done marker (killed between the marker and the rename) is promoted,
and results of another config are moved, not removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from layerwise.experiments.errors import UsageError
from layerwise.experiments.manifest import is_finished, read_manifest

__all__ = ["RESULTS", "RUNS", "lock", "new_temp_dir", "promote", "recover", "supersede"]

RUNS = "runs"
#: What an ablation writes into its folder (besides .lock and .cache); --force moves these.
RESULTS = (RUNS, "ablation.json", "config.toml", "tuning.json", "report.md", "figures", "errors")
_TMP = ".tmp-"
_TRASH = ".trash-"


def new_temp_dir(runs_dir: Path, run_id: str) -> Path:
    """A fresh, empty temporary folder for ``run_id`` inside ``runs_dir``."""
    path = runs_dir / f"{_TMP}{run_id}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def promote(temp: Path, final: Path) -> None:
    """Rename the finished ``temp`` onto ``final``. A half-written ``final`` is moved aside
    and removed; a finished one is an error (nothing finished is overwritten)."""
    if final.exists():
        if is_finished(final):
            raise FileExistsError(f"{final} already holds a finished run; not overwritten")
        trash = final.parent / f"{_TRASH}{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, trash)
        os.replace(temp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(temp, final)


def recover(runs_dir: Path) -> dict[str, int]:
    """Clean up after an interrupted ablation: promote temporary folders that finished,
    remove the ones that did not and any leftover trash. Returns counts."""
    counts = {"promoted": 0, "removed": 0}
    if not runs_dir.is_dir():
        return counts
    for path in sorted(runs_dir.iterdir()):
        if path.name.startswith(_TRASH):
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(_TMP) and path.is_dir():
            if is_finished(path):
                run_id = read_manifest(path)["run_id"]
                final = runs_dir / run_id
                if final.exists() and is_finished(final):
                    counts["removed"] += 1  # the same run finished twice: keep the first
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    promote(path, final)
                    counts["promoted"] += 1
            else:
                shutil.rmtree(path, ignore_errors=True)
                counts["removed"] += 1
    return counts


def supersede(out: Path, old_hash: str) -> Path:
    """Move the results of another config (:data:`RESULTS`: runs, tuning, report, errors...) into
    ``superseded/<old hash[:12]>-<n>/``; nothing is deleted. Returns that folder."""
    base = out / "superseded"
    base.mkdir(exist_ok=True)
    n = 0
    while (base / f"{old_hash[:12]}-{n}").exists():
        n += 1
    target = base / f"{old_hash[:12]}-{n}"
    target.mkdir()
    for name in RESULTS:
        if (out / name).exists():
            os.replace(out / name, target / name)
    return target


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(path: Path, patience: float = 2.0) -> tuple[str, str] | None:
    """``(host, pid)`` written in the lock file ``path`` (``None``: it is gone). Its creator
    writes them just after creating it, so an empty file is waited on for up to
    ``patience`` seconds before it counts as abandoned (``("", "0")``)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            host, pid = path.read_text().split()
            return host, pid
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                return "", "0"
            time.sleep(0.01)


@contextlib.contextmanager
def lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` while writing; refuse if a live process on this host holds it
    (also one that has created the file and not yet written its pid into it)."""
    path = out / ".lock"
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # as open()
        except FileExistsError:
            holder = _holder(path)
            if holder is None:  # released meanwhile: try again
                continue
            host, pid = holder
            if host == socket.gethostname() and pid.isdigit() and _alive(int(pid)):
                raise UsageError(
                    f"{out} is in use by another layerwise process (pid {pid}); wait for it "
                    f"or remove {path} if it is gone"
                ) from None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(me)
        break
    else:  # pragma: no cover - a race with another process taking the stale lock
        raise UsageError(f"could not take the lock {path}")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text() == me:
                path.unlink()
