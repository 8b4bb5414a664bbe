"""The ablation runner: tune every policy's base rate, then run every seed, in parallel.

:func:`ablate` plans the runs of a config (:mod:`layerwise.experiments.plan`), skips the finished
ones, and executes the rest on an execution backend (:mod:`layerwise.experiments.backends`):
``local`` worker processes (the *spawn* start method; with ``workers=1`` runs execute in
this process) or ``ray`` tasks, one torch thread per run, so results depend neither on
``workers`` nor on the backend. A cell's final runs are submitted as soon as all of its
tuning runs are in, so workers stay busy. Every run goes to a temporary folder
that is renamed into place after its done marker (:mod:`layerwise.experiments.rundirs`); a run that
raises is recorded (``errors/<run id>.txt``) and the others go on.

A results folder belongs to one config (``ablation.json`` holds its hash). Another config
is refused unless ``force``, which moves the old results to ``superseded/`` (nothing is
deleted). Resuming with the same config skips finished runs (done marker and matching
spec hash) and redoes half-written ones.

SIGTERM and SIGINT raise :class:`layerwise.experiments.signals.Interrupted` (a
``KeyboardInterrupt``) in :func:`ablate`, at any phase: every worker is stopped before it
propagates, the lock is released, and the folder resumes with the same command.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import socket
import sys
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerwise.experiments.atomic import read_json, write_json, write_text
from layerwise.experiments.backends import check_backend, open_executor
from layerwise.experiments.config import AblationConfig
from layerwise.experiments.errors import UsageError
from layerwise.experiments.manifest import is_finished, read_done, versions, write_done
from layerwise.experiments.plan import RunSpec, final_specs, lr_grid, tuning_specs
from layerwise.experiments.rundirs import (
    RESULTS,
    RUNS,
    lock,
    new_temp_dir,
    promote,
    recover,
    supersede,
)
from layerwise.experiments.signals import acknowledge, acknowledging, stop_on_signals
from layerwise.experiments.tuning import Tuner

__all__ = ["AblationResult", "ablate", "run_one"]


@dataclass
class AblationResult:
    """What :func:`ablate` did: counts, failures (run id, first line), chosen rates, report."""

    out: Path
    total: int = 0
    ran: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    chosen: dict[str, Any] = field(default_factory=dict)
    report: Path | None = None
    superseded: Path | None = None


def run_one(
    spec_data: dict[str, Any],
    runs_dir: str,
    cache_dir: str | None,
    config_hash: str,
    backend: str = "local",
) -> dict[str, Any]:
    """Execute one run unless it is finished; never raises (errors come back as data).
    The done marker records ``backend`` and the ``host`` that ran it."""
    from layerwise.experiments.training import execute

    spec = RunSpec.from_dict(spec_data)
    runs = Path(runs_dir)
    if not runs.is_dir():  # a cluster node that does not see the results folder
        message = (
            f"RuntimeError: the runs folder {runs_dir} does not exist on host "
            f"{socket.gethostname()}; every worker must see --out at the same path "
            "(shared storage)"
        )
        return {"error": message, "traceback": message + "\n"}
    final = runs / spec.run_id
    if is_finished(final, spec.hash):
        return {"skipped": True, **read_done(final)}
    if is_finished(final):  # finished under another spec: keep it, aside
        stale = runs.parent / "superseded" / "stale-runs"
        stale.mkdir(parents=True, exist_ok=True)
        os.replace(final, stale / f"{spec.run_id}-{uuid.uuid4().hex[:8]}")
    temp = new_temp_dir(runs, spec.run_id)
    try:
        summary = execute(spec, temp, config_hash=config_hash, cache_dir=cache_dir)
        summary.update(backend=backend, host=socket.gethostname())
        write_done(temp, spec.hash, summary)
        promote(temp, final)
    except Exception as exc:
        shutil.rmtree(temp, ignore_errors=True)
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    return {"skipped": False, **summary}


def _claim(
    out: Path, config: AblationConfig, force: bool, config_text: str | None, result: AblationResult
) -> None:
    marker = out / "ablation.json"
    runs = out / RUNS
    old_hash = None
    if marker.is_file():
        old_hash = read_json(marker).get("config_hash", "unknown")
    elif (runs.is_dir() and any(runs.iterdir())) or any(
        (out / name).exists() for name in RESULTS if name != RUNS
    ):
        old_hash = "unknown"  # not ours, or written by hand: never overwrite it
    if old_hash is not None and old_hash != config.hash:
        if not force:
            raise UsageError(
                f"{out} holds results of another config (hash {old_hash[:12]}, this one "
                f"{config.hash[:12]}); use another --out, or --force to move them to "
                f"{out / 'superseded'}"
            )
        result.superseded = supersede(out, old_hash)
    if not marker.is_file():
        write_json(
            marker,
            {
                "name": config.name,
                "config_hash": config.hash,
                "config": config.raw,
                "versions": versions(),
            },
        )
        if config_text is not None:
            write_text(out / "config.toml", config_text)


def _check_device(device: str) -> None:
    """Refuse a config device this machine lacks before the results folder is claimed."""
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (index and (not index.isdigit() or int(index) >= count)):
            raise UsageError(f"config device {device!r}: this machine has {count} CUDA device(s)")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"config device {device!r}: MPS is not available on this machine")


def ablate(
    config: AblationConfig,
    out: str | Path,
    *,
    workers: int = 1,
    force: bool = False,
    progress: bool = True,
    report: bool = True,
    config_text: str | None = None,
    cache_dir: str | Path | None = None,
    backend: str = "local",
    address: str | None = None,
) -> AblationResult:
    """Run (or resume) the ablation ``config`` into the folder ``out`` (module docstring)
    on ``backend`` (``"local"`` or ``"ray"``, with the cluster ``address`` or a local Ray
    of ``workers`` CPUs; :mod:`layerwise.experiments.backends`)."""
    if not isinstance(config, AblationConfig):
        raise TypeError(f"config must be an AblationConfig, got {type(config).__name__}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    check_backend(backend, address)
    _check_device(config.device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = AblationResult(out=out)
    with stop_on_signals(), lock(out), acknowledging():
        _claim(out, config, force, config_text, result)
        runs = out / RUNS
        runs.mkdir(exist_ok=True)
        recover(runs)
        cache = Path(cache_dir) if cache_dir is not None else out / ".cache"
        cache.mkdir(parents=True, exist_ok=True)
        executor = open_executor(backend, workers, address)
        try:
            _execute(config, out, runs, cache, executor, progress, result)
        except BaseException as exc:  # an interrupt included: no worker may outlive us
            if isinstance(exc, KeyboardInterrupt):
                acknowledge()  # in hand: no more repeats, a second Ctrl-C cannot cut this
            executor.terminate()
            raise
        executor.shutdown()
    if report:
        from layerwise.experiments.reporting import write_report

        # failed runs are listed in the report (and make the command exit 1); anything
        # else missing or unreadable is an error
        result.report = write_report(out, allow_incomplete=bool(result.failed))
    return result


def _execute(config, out, runs, cache, executor, progress, result) -> None:
    grids = lr_grid(config)
    tuner = Tuner(grids, config.tuning)  # the tuning rule: layerwise.experiments.tuning
    specs = {(s.group_key, s.lr, s.seed): s for s in tuning_specs(config)}
    tunes = [specs[run] for run in tuner.start()]
    ready = [s for key, g in grids.items() if len(g) < 2 for s in final_specs(config, {}, key)]
    result.total = len(tunes) + len(config.seeds) * len(grids)
    tuning_path = out / "tuning.json"

    bar = _Progress(result.total, enabled=progress)
    futures: dict[cf.Future, RunSpec] = {}

    def submit(spec: RunSpec) -> None:
        future = executor.submit(  # absolute paths: a Ray worker has its own folder
            run_one,
            spec.to_dict(),
            str(runs.absolute()),
            str(cache.absolute()),
            config.hash,
            executor.name,
        )
        futures[future] = spec

    try:
        for spec in [*tunes, *ready]:
            submit(spec)
        while futures:
            done, _ = cf.wait(list(futures), return_when=cf.FIRST_COMPLETED)
            for future in done:
                spec = futures.pop(future)
                outcome = future.result()
                if "error" in outcome:
                    result.failed.append((spec.run_id, outcome["error"].splitlines()[0]))
                    errors = out / "errors"
                    errors.mkdir(exist_ok=True)
                    write_text(errors / f"{spec.run_id}.txt", outcome["traceback"])
                elif outcome.get("skipped"):
                    result.skipped += 1
                else:
                    result.ran += 1
                bar.advance(spec, outcome)
                if spec.kind != "tune":
                    continue
                key = spec.group_key
                more, lr = tuner.record(
                    key, spec.lr, spec.seed, None if "error" in outcome else outcome
                )
                write_json(tuning_path, tuner.to_json())
                extra = tuning_specs(config, {key: sorted({r for _, r, _ in more})}, key)
                result.total += len(extra)
                bar.grow(len(extra))
                for new in extra:
                    submit(new)
                if lr is not None:
                    for final in final_specs(config, {key: lr}, key):
                        submit(final)
                elif tuner.cells[key].status == "failed" and not tuner.cells[key].waiting:
                    bar.skip(len(config.seeds))
    finally:
        bar.close()
    write_json(tuning_path, tuner.to_json())
    result.chosen = tuner.to_json()["cells"]


class _Progress:
    """A rich progress bar on stderr (nothing when disabled or not a terminal)."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.total, self.count = total, 0
        self.lines = enabled and not sys.stderr.isatty()  # logs: one line per run
        if enabled and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("[bold]ablate[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
                transient=False,
            )
            self.task = self.bar.add_task("", total=total)
            self.bar.start()

    def advance(self, spec: RunSpec, outcome: dict[str, Any]) -> None:
        self.count += 1
        what = "failed" if "error" in outcome else "skip" if outcome.get("skipped") else "done"
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=f"{what}: {spec.run_id}")
        elif self.lines:
            seconds = outcome.get("wall_time")
            took = f" ({seconds:.1f} s)" if isinstance(seconds, float) and what == "done" else ""
            print(
                f"[{self.count}/{self.total}] {what} {spec.run_id}{took}",
                file=sys.stderr,
                flush=True,
            )

    def grow(self, n: int) -> None:
        """``n`` more runs than planned (a tuning grid extended)."""
        self.total += n
        if self.bar is not None and n:
            self.bar.update(self.task, total=self.total)

    def skip(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(self.task, advance=n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
