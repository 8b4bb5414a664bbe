"""Results files respect the umask: every file the project writes gets the mode a plain
``open(path, "w")`` gives (0o666 less the umask), under the usual umask 0o022 (readable by
colleagues) and under a private 0o077 alike."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from layerwise.engine import Recalibration
from layerwise.experiments.atomic import atomic_write, write_json, write_text
from layerwise.experiments.history_file import HistoryFile
from layerwise.experiments.rundirs import lock
from layerwise.experiments.tasks.cache import cached_arrays

UMASKS = [0o022, 0o077, 0o002]


@pytest.fixture(params=UMASKS, ids=[f"umask{m:03o}" for m in UMASKS])
def umask(request):
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _plain_open_mode(folder: Path) -> int:
    """The mode ``open()`` gives a new file here, under the current umask."""
    reference = folder / "reference.txt"
    with open(reference, "w") as handle:
        handle.write("x")
    return _mode(reference)


def test_atomic_writes_get_the_mode_open_gives(umask, tmp_path):
    expected = 0o666 & ~umask
    assert _plain_open_mode(tmp_path) == expected
    written = [
        write_json(tmp_path / "ablation.json", {"a": 1}),
        write_text(tmp_path / "report.md", "# report\n"),
        atomic_write(tmp_path / "figure.png", lambda h: h.write(b"\x89PNG")),
    ]
    for path in written:
        assert _mode(path) == expected, f"{path.name}: {oct(_mode(path))}"
    # rewriting an existing file keeps the umask's mode too (a fresh temporary file each time)
    write_json(tmp_path / "ablation.json", {"a": 2})
    assert _mode(tmp_path / "ablation.json") == expected
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_history_cache_and_lock_files_get_the_mode_open_gives(umask, tmp_path):
    expected = 0o666 & ~umask
    row = {"step": 10, "group": "fc", "multiplier": 0.5}
    for name in ("history.csv", "history.parquet"):
        HistoryFile(tmp_path / name)(Recalibration(10, [row], None, None))
        assert _mode(tmp_path / name) == expected, name
    arrays = {"x": np.arange(3.0)}
    cached_arrays(f"modes-{umask:o}", {"umask": umask}, lambda: arrays, cache_dir=tmp_path)
    (entry,) = tmp_path.glob(f"modes-{umask:o}-*.npz")
    assert _mode(entry) == expected
    with lock(tmp_path):
        assert _mode(tmp_path / ".lock") == expected  # not executable, not world-writable


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    def boom(handle):
        handle.write(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(tmp_path / "x.json", boom)
    assert list(tmp_path.iterdir()) == []
