"""Helpers of the ablation tests: the tiny config, a child `layerwise ablate` to kill, and
the result files of a folder with their wall-clock columns taken out."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[2]
TINY = ROOT / "experiments" / "configs" / "tiny.toml"
TINY_RUNS = 8  # 2 policies x (2 tuning rates x 1 tuning seed + 2 final seeds)


def finished_runs(out: Path) -> dict[str, tuple[bytes, int]]:
    """{run id: (done.json bytes, its mtime in ns)} of the finished runs."""
    return {
        p.parent.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in (out / "runs").glob("*/done.json")
    }


def _timing(name: str) -> bool:
    """Whether a column or key holds wall-clock seconds, which differ between runs."""
    return name.endswith("_time") or name.endswith("seconds")


def without_timings(done: bytes) -> dict:
    """A done marker without its timings."""
    return {k: v for k, v in json.loads(done).items() if not _timing(k)}


def _normalised(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        return {k: v for k, v in data.items() if not _timing(k)} if isinstance(data, dict) else data
    if path.suffix == ".jsonl":
        return [without_timings(line.encode()) for line in text.splitlines()]
    if path.suffix == ".csv":
        rows = list(csv.reader(io.StringIO(text)))
        keep = [i for i, name in enumerate(rows[0]) if not _timing(name)]
        return [[row[i] for i in keep] for row in rows]
    return text


def result_files(out: Path) -> dict[str, Any]:
    """Every file of every run (and tuning.json), wall-clock columns and keys removed, by
    path relative to ``out``: what an interrupted and resumed ablation must reproduce."""
    files = [out / "tuning.json", *sorted((out / "runs").glob("*/*"))]
    return {str(p.relative_to(out)): _normalised(p) for p in files}


def start_ablation(out: Path, *args: str) -> subprocess.Popen:
    """``layerwise ablate <tiny> --out out`` in a child process (no report, no progress)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "layerwise.experiments.cli",
            "ablate",
            str(TINY),
            "--out",
            str(out),
            "--no-report",
            "--no-progress",
            *args,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for(proc: subprocess.Popen, condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds; fail if ``proc`` exits first or 240 s pass."""
    deadline = time.monotonic() + 240
    while not condition():
        assert proc.poll() is None, f"exited before {what}: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
