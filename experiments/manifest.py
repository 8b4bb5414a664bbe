"""Run folders: the manifest (what was run), the done marker (that it finished).

A run folder holds, written atomically in this order:

1. ``manifest.json`` (:func:`build_manifest`): the run spec and its hash, the config hash,
   the task (name, options, budget, recipe, data sizes, SHA-256 of the data tensors), the
   parameter groups (names, parameter names, sizes, depths, roles), the schedule spec, the
   static factors, the controller settings, the estimator and monitor settings, the seed,
   the versions of Python, torch, numpy and the project, and the device;
2. ``metrics.csv`` / ``metrics.jsonl``, rewritten at every evaluation;
3. ``events.csv`` and ``recalibrations.csv`` (the engine's history), at the end;
4. ``done.json`` (:func:`write_done`), last: the summary (final validation and test
   metrics, steps to target, wall time, status) and the spec hash again.

A folder is *finished* for a spec when ``done.json`` exists and both files carry that
spec's hash (:func:`is_finished`); anything else is half-written and is redone.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from layerwise.experiments.atomic import read_json, write_json

__all__ = [
    "DONE",
    "MANIFEST",
    "build_manifest",
    "is_finished",
    "read_done",
    "read_manifest",
    "versions",
    "write_done",
    "write_manifest",
]

MANIFEST = "manifest.json"
DONE = "done.json"
FORMAT = 1
_REQUIRED = (
    "format",
    "run_id",
    "spec",
    "spec_hash",
    "config_hash",
    "task",
    "groups",
    "schedule",
    "factors",
    "controller",
    "estimator",
    "seed",
    "versions",
    "device",
)


def versions() -> dict[str, str]:
    """Versions of the project, torch, numpy and Python."""
    import numpy
    import torch

    from layerwise.experiments import __version__

    return {
        "layerwise-lr": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def build_manifest(
    spec: Any,
    *,
    config_hash: str,
    task: Any,
    splits: Any,
    groups: Any,
    factors: dict[str, float] | None,
    controller: Any,
    device: str,
) -> dict[str, Any]:
    """The manifest of a run (module docstring) for ``spec``, a
    :class:`~layerwise.experiments.plan.RunSpec`."""
    policy = spec.policy_spec
    return {
        "format": FORMAT,
        "run_id": spec.run_id,
        "spec": spec.to_dict(),
        "spec_hash": spec.hash,
        "config_hash": config_hash,
        "task": {
            "name": task.name,
            "source": spec.task,
            "description": task.description,
            "options": dict(task.options),
            "budget": vars(task.budget).copy(),
            "recipe": {**vars(task.recipe), "lr_grid": list(task.recipe.lr_grid)},
            "head": list(task.head),
            "metric": task.metric_name,
            "data": {"sizes": splits.sizes(), "sha256": splits.sha256()},
        },
        "groups": groups.manifest(),
        "lr": spec.lr,
        "schedule": spec.schedule,
        "factors": factors,
        "policy": {"name": spec.policy, **policy},
        "controller": None if controller is None else dict(controller.settings),
        "estimator": (
            None
            if policy["kind"] != "controller"
            else {
                "recalibrate_every": policy["recalibrate_every"],
                "warmup_steps": policy["warmup_steps"],
                **policy["estimator"],
            }
        ),
        "monitor": spec.monitor,
        "seed": spec.seed,
        "versions": versions(),
        "device": device,
    }


def write_manifest(run_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Atomically write ``manifest.json`` into ``run_dir``."""
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise ValueError(f"manifest: missing key(s) {missing}")
    return write_json(Path(run_dir) / MANIFEST, manifest)


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """Read and check ``manifest.json`` of ``run_dir``."""
    path = Path(run_dir) / MANIFEST
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a manifest (a {type(data).__name__})")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}")
    if data["format"] != FORMAT:
        raise ValueError(f"{path}: manifest format {data['format']!r}, expected {FORMAT}")
    return data


def write_done(run_dir: str | Path, spec_hash: str, summary: dict[str, Any]) -> Path:
    """Write the done marker, the last file of a finished run."""
    return write_json(Path(run_dir) / DONE, {"spec_hash": spec_hash, **summary})


def read_done(run_dir: str | Path) -> dict[str, Any]:
    """The done marker's content (the run summary)."""
    return read_json(Path(run_dir) / DONE)


def is_finished(run_dir: str | Path, spec_hash: str | None = None) -> bool:
    """Whether ``run_dir`` holds a finished run (of the spec with ``spec_hash``, if given)."""
    run_dir = Path(run_dir)
    if not (run_dir / DONE).is_file() or not (run_dir / MANIFEST).is_file():
        return False
    try:
        done, manifest = read_done(run_dir), read_manifest(run_dir)
    except (OSError, ValueError):
        return False
    if done.get("spec_hash") != manifest["spec_hash"]:
        return False
    return spec_hash is None or manifest["spec_hash"] == spec_hash
