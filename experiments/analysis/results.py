"""What ``layerwise analyze`` makes of a report: the policy's multipliers, the files it writes
and what it prints.

``--out DIR`` may be new or an existing folder; one that already holds any of
:data:`OUTPUT_FILES` (earlier results) is refused unless ``--force``, which replaces only those
files. Each file is written to a temporary name in the folder and renamed into place
(:mod:`layerwise.experiments.atomic`), so a reader never sees half a file. JSON is strict
(RFC 8259): a non-finite float is the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``
(``float()`` reads each back).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from layerwise.experiments.atomic import write_text
from layerwise.experiments.errors import UsageError
from layerwise.experiments.tables import print_table

__all__ = ["OUTPUT_FILES", "Analysis", "check_out_dir", "json_text", "suggest"]

#: The figures, and every file ``--out`` receives: the only files ``--force`` replaces.
FIGURES = ("hessian_trace.png", "grad_variance.png", "noise_to_signal.png", "multipliers.png")
OUTPUT_FILES = ("report.csv", "report.json", *FIGURES)

#: The table's columns: (header, right-aligned).
HEADERS = "group|params|‖θ‖|‖G‖|grad var|noise/signal|tr(H) ± se|curvature|GGN tr ± se|multiplier"
COLUMNS = [(header, header != "group") for header in HEADERS.split("|")]


def check_out_dir(path: str, *, force: bool) -> Path:
    """Refuse, before any work, an ``--out`` that is not a folder, is not writable, or holds
    earlier results (unless ``force``); creates nothing."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {path!r} exists and is not a folder")
    earlier = [name for name in OUTPUT_FILES if (out / name).exists()]
    if earlier and not force:
        raise UsageError(
            f"--out {path!r} already holds earlier results ({', '.join(earlier)}); "
            "pass --force to replace those files (nothing else in it is touched)"
        )
    if out.is_dir() and not os.access(out, os.W_OK):
        raise UsageError(f"--out {path!r} is not writable")
    return out


def suggest(report: Any, policy: str) -> dict[str, Any]:
    """The multipliers a fresh :class:`layerwise.policies.SensitivityController` with rule
    ``policy`` assigns at its first recalibration, with the reasons, the bounds it enforces
    (and the band ``band_low``..``band_high`` every multiplier ends in), whether it fell back
    to the uniform rate, and its settings."""
    from layerwise.policies import SensitivityController

    controller = SensitivityController(rule=policy)
    decision = controller.update(report, step=0)
    low, high = controller.bounds.interval()
    bounds = {**dataclasses.asdict(controller.bounds), "band_low": low, "band_high": high}
    outcome = {k: v for k, v in decision.to_dict().items() if k != "step"}
    return {"policy": policy, **outcome, "bounds": bounds, "settings": controller.settings}


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def json_text(data: Any) -> str:
    """Strict, indented JSON of ``data`` (non-finite floats as strings; paths, dtypes and
    devices by ``str``), ending in a newline."""
    return json.dumps(_strict(data), indent=2, allow_nan=False, default=str) + "\n"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


@dataclass(frozen=True)
class Analysis:
    """A report, the policy's suggestion (:func:`suggest`) and the manifest."""

    report: Any
    policy: dict[str, Any]
    manifest: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """``report.to_dict()`` plus ``policy`` and ``manifest`` (read back by
        :meth:`layerwise.sensitivity.SensitivityReport.from_dict`)."""
        return {**self.report.to_dict(), "policy": self.policy, "manifest": self.manifest}

    def csv_text(self) -> str:
        """The report's frame plus the policy's ``multiplier`` and ``reason`` per group."""
        frame = self.report.to_frame()
        frame["multiplier"] = [self.policy["multipliers"].get(g) for g in frame["group"]]
        frame["reason"] = [self.policy["reasons"].get(g, "") for g in frame["group"]]
        return frame.to_csv(index=False, na_rep="nan", lineterminator="\n")

    def footer(self) -> list[str]:
        """The policy's bounds, its fallback or event, and the reason for each multiplier."""
        p, b = self.policy, self.policy["bounds"]
        lines = [
            f"policy {p['policy']!r}: multipliers end in [{b['band_low']:.3g}, "
            f"{b['band_high']:.3g}] (min {b['min_multiplier']:g}, max {b['max_multiplier']:g}, "
            f"largest/smallest <= {b['max_spread']:g}); each recalibration changes them by at "
            f"most x{b['max_change']:g}, from 1 at the first (shown here)"
        ]
        if p["event"]:
            kind = "fallback to the uniform rate" if p["fallback"] else "event"
            lines.append(f"{kind}: {p['event']}")
        return lines + [f"  {group}: {reason}" for group, reason in p["reasons"].items()]

    def show(self, fmt: str, file: IO[str]) -> None:
        """Print as ``table``, ``csv`` or ``json`` to ``file``."""
        if fmt not in ("table", "csv", "json"):
            raise ValueError(f"fmt must be 'table', 'csv' or 'json', got {fmt!r}")
        if fmt != "table":
            file.write(self.csv_text() if fmt == "csv" else json_text(self.to_dict()))
            return
        m, c, multipliers = self.manifest, self.report.cost, self.policy["multipliers"]

        def row(g: Any) -> list[str]:
            numbers = map(_num, (g.param_norm, g.grad_norm, g.grad_variance, g.noise_to_signal))
            trace = f"{_num(g.hessian_trace)} ± {_num(g.hessian_trace_stderr, 2)}"
            ggn = f"{_num(g.ggn_trace)} ± {_num(g.ggn_trace_stderr, 2)}"
            ends = [_num(g.curvature), ggn, _num(multipliers.get(g.group))]
            return [g.group, str(g.num_params), *numbers, trace, *ends]

        title = (
            f"{m['model']['source']}: {len(self.report)} groups, {c.examples} examples in "
            f"{c.batches} batches, {c.probes} probes, {c.seconds:.2f} s on {m['device']} "
            f"({m['dtype']})"
        )
        print_table(title, COLUMNS, [row(g) for g in self.report], self.footer(), file=file)

    def figures(self) -> dict[str, tuple[list[dict[str, Any]], str]]:
        """The panels and title of each figure (:func:`layerwise.experiments.plots.plot_groups`)."""
        r, p = self.report, self.policy

        def panel(quantity: str, label: str, **more: Any) -> dict[str, Any]:
            values = [getattr(g, quantity) for g in r]
            errors = [getattr(g, f"{quantity}_stderr", None) for g in r]
            return {"values": values, "errors": errors, "label": label, **more}

        low, high = p["bounds"]["band_low"], p["bounds"]["band_high"]
        lines = {"uniform (1)": 1.0, f"band low {low:.3g}": low, f"band high {high:.3g}": high}
        signal = {"noise = signal": 1.0}
        multipliers = [p["multipliers"].get(n) for n in r.names]
        fallback = f" (fallback: {p['event']})" if p["fallback"] else ""
        curvature = [panel("hessian_trace", "tr(H_gg)"), panel("curvature", "tr(H_gg) / n_g")]
        title = f"Hessian trace and curvature per parameter ± stderr ({r.cost.probes} probes)"
        if any(g.ggn_trace is not None for g in r):  # the Gauss-Newton trace beside it
            curvature += [panel("ggn_trace", "tr(G_gg)"), panel("ggn_curvature", "tr(G_gg) / n_g")]
            title += "; Gauss-Newton (G) likewise"
        return {
            "hessian_trace.png": (curvature, title),
            "grad_variance.png": (
                [panel("grad_variance", "tr(Σ_g) / n_g", log=True)],
                "gradient variance per parameter ± stderr",
            ),
            "noise_to_signal.png": (
                [panel("noise_to_signal", "tr(Σ_g) / (B ‖G_g‖²)", log=True, lines=signal)],
                "noise-to-signal ratio of the batch gradient",
            ),
            "multipliers.png": (
                [{"values": multipliers, "label": "multiplier", "log": True, "lines": lines}],
                f"multipliers policy {p['policy']!r} would assign{fallback}",
            ),
        }

    def write(self, out: Path) -> list[Path]:
        """Write :data:`OUTPUT_FILES` into ``out`` (created if needed), each atomically."""
        from layerwise.experiments.plots import plot_groups  # matplotlib: only when writing

        out.mkdir(parents=True, exist_ok=True)
        written = [
            write_text(out / "report.csv", self.csv_text()),
            write_text(out / "report.json", json_text(self.to_dict())),
        ]
        for name, (panels, title) in self.figures().items():
            written.append(plot_groups(out / name, self.report.names, panels, title=title))
        return written
