"""The steps of ``layerwise analyze``, in order: load, group, estimate, suggest, describe,
write, show. Each takes the parsed arguments or the previous step's result, so the command
module only chains them."""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from layerwise.experiments.analysis.checkpoint import (
    apply_checkpoint,
    check_finite_weights,
    load_checkpoint,
)
from layerwise.experiments.analysis.default import bundled_default
from layerwise.experiments.analysis.groups import build_groups
from layerwise.experiments.analysis.loading import (
    AnalysisInputs,
    first_line,
    load_batches,
    load_loss,
    load_model,
    probe_loss,
)
from layerwise.experiments.analysis.outputs import csv_text, json_text, write_outputs
from layerwise.experiments.analysis.suggest import Suggestion, suggest
from layerwise.experiments.analysis.table import print_table, table_rows
from layerwise.experiments.errors import CLIError
from layerwise.experiments.manifest import versions

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "Result",
    "estimate",
    "load_inputs",
    "make_groups",
    "manifest",
    "show",
    "suggest",
    "write",
]

Progress = Callable[[int, int], None] | None


def load_inputs(
    args: argparse.Namespace, *, device: torch.device, dtype: torch.dtype, progress: Progress
) -> AnalysisInputs:
    """The bundled default (no ``--model``), or the user's model, checkpoint, data and loss,
    each checked (keys, finite weights, a finite scalar loss on the first batch)."""
    if args.model is None:
        return bundled_default(
            seed=args.seed, batches=args.batches, device=device, dtype=dtype, progress=progress
        )
    torch.manual_seed(args.seed)  # a factory that initialises randomly does so reproducibly
    model = load_model(args.model)
    ckpt = None
    if args.checkpoint is not None:
        ckpt = apply_checkpoint(model, load_checkpoint(args.checkpoint))
    source = f"--checkpoint {args.checkpoint!r}" if ckpt else f"--model {args.model!r}"
    check_finite_weights(model, source=source)
    model = model.to(device=device, dtype=dtype)
    batches, data_sha = load_batches(args.data, limit=args.batches, device=device, dtype=dtype)
    loss_fn = load_loss(args.loss)
    loss_name = "the default loss" if args.loss is None else f"--loss {args.loss!r}"
    first = probe_loss(model, loss_fn, batches[0], loss_name=loss_name)
    described = {
        "model": {"source": args.model, "class": type(model).__qualname__},
        "checkpoint": None if ckpt is None else ckpt.manifest(),
        "data": {"source": args.data, "batches": len(batches), "sha256": data_sha},
        "loss": args.loss or "cross-entropy (mean over the batch)",
        "first_batch_loss": first,
    }
    return AnalysisInputs(model=model, loss_fn=loss_fn, batches=batches, manifest=described)


def make_groups(model: torch.nn.Module, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """``(ParamGroups, how they were made)`` from ``--groups`` or ``--groups-file``."""
    return build_groups(model, strategy=args.groups, patterns_file=args.groups_file)


def estimate(
    inputs: AnalysisInputs,
    groups: Any,
    args: argparse.Namespace,
    *,
    dtype: torch.dtype,
    progress: Progress,
) -> Any:
    """:func:`layerwise.sensitivity.estimate` of every quantity on the inputs; a failure inside the
    user's model or loss becomes a one-line :class:`~layerwise.experiments.errors.CLIError`."""
    from layerwise import sensitivity

    try:
        return sensitivity.estimate(
            inputs.model,
            inputs.loss_fn,
            inputs.batches,
            groups=groups.mapping(),
            probes=args.probes,
            seed=args.seed,
            tolerance=args.tolerance,
            dtype=dtype,
            progress=progress,
        )
    except (ValueError, TypeError):
        raise
    except Exception as exc:
        raise CLIError(f"the estimate failed: {first_line(exc)}") from exc


def manifest(
    args: argparse.Namespace,
    inputs: AnalysisInputs,
    groups: Any,
    grouping: dict[str, Any],
    report: Any,
    suggestion: Suggestion,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """Everything needed to reproduce the analysis (see DESIGN.md, "Every run is
    reproducible")."""
    return {
        "command": "analyze",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **inputs.manifest,
        "groups": {**grouping, **groups.manifest()},
        "estimator": {
            "probes": args.probes,
            "batches": args.batches,
            "tolerance": args.tolerance,
            "seed": args.seed,
            "settings": dict(report.settings),
        },
        "policy": suggestion.settings,
        "seed": args.seed,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": versions(),
    }


@dataclass(frozen=True)
class Result:
    """What an analysis produced: the report, the policy's suggestion, the manifest."""

    report: Any
    suggestion: Suggestion
    manifest: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """``report.to_dict()`` (``groups``, ``cost``, ``settings``) plus ``policy`` and
        ``manifest``; :meth:`SensitivityReport.from_dict` reads it back."""
        return {
            **self.report.to_dict(),
            "policy": self.suggestion.to_dict(),
            "manifest": self.manifest,
        }

    def frame(self) -> pd.DataFrame:
        """The report's frame plus the policy's ``multiplier`` and ``reason`` per group."""
        frame = self.report.to_frame()
        frame["multiplier"] = [self.suggestion.multipliers.get(g) for g in frame["group"]]
        frame["reason"] = [self.suggestion.reasons.get(g, "") for g in frame["group"]]
        return frame


def _figures(result: Result) -> dict[str, bytes]:
    from layerwise.experiments.analysis import plots  # matplotlib: only when figures are written

    groups = result.report.groups
    names = [g.group for g in groups]
    s = result.suggestion
    note = f"fallback: {s.event}" if s.fallback else None
    figures = {
        "hessian_trace.png": plots.hessian_trace_figure(
            names,
            [g.hessian_trace for g in groups],
            [g.hessian_trace_stderr for g in groups],
            [g.num_params for g in groups],
            probes=result.report.cost.probes,
        ),
        "grad_variance.png": plots.grad_variance_figure(
            names, [g.grad_variance for g in groups], [g.grad_variance_stderr for g in groups]
        ),
        "noise_to_signal.png": plots.noise_to_signal_figure(
            names, [g.noise_to_signal for g in groups]
        ),
        "multipliers.png": plots.multipliers_figure(
            names, s.multipliers, policy=s.policy, bounds=s.bounds, note=note
        ),
    }
    return {name: plots.png_bytes(fig) for name, fig in figures.items()}


def write(result: Result, out: Path) -> list[Path]:
    """Write report.csv, report.json and the four plots into ``out`` (atomically each)."""
    files = {
        "report.csv": csv_text(result.frame()).encode(),
        "report.json": json_text(result.to_dict()).encode(),
        **_figures(result),
    }
    return write_outputs(out, files)


def show(result: Result, fmt: str, *, file: IO[str] = sys.stdout) -> None:
    """Print the result to ``file`` as ``table``, ``csv`` or ``json``."""
    if fmt == "csv":
        file.write(csv_text(result.frame()))
        return
    if fmt == "json":
        file.write(json_text(result.to_dict()))
        return
    if fmt != "table":
        raise ValueError(f"fmt must be 'table', 'csv' or 'json', got {fmt!r}")
    r, s, m = result.report, result.suggestion, result.manifest
    c = r.cost
    title = (
        f"{m['model'].get('source')}: {len(r)} groups, {c.examples} examples in {c.batches} "
        f"batches, {c.probes} probes, {c.seconds:.2f} s on {m['device']} ({m['dtype']})"
    )
    rows = table_rows([g.to_dict() for g in r.groups], s.multipliers)
    print_table(title, rows, s.footer(), file=file)
