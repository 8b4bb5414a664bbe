"""The result of a sensitivity estimate: one row of measured quantities per group.

Definitions (N = examples in the estimate, B = the batch size, N / (number of batches) when
several batches are given, n_g = parameters in group g, G_g = the mean
gradient restricted to g, g_i = the gradient of example i, H = the Hessian of the mean
loss):

=========================  ===========================================================
``num_params``             n_g
``param_norm``             ‖θ_g‖, the Euclidean norm of the group's parameters
``grad_norm``              ‖G_g‖
``grad_norm_stderr``       standard error of ‖G_g‖ from the sampling noise (delta method)
``grad_variance``          tr(Σ_g) / n_g, Σ_g the covariance of the g_i restricted to g
``grad_variance_stderr``   standard error of that estimate
``noise_to_signal``        tr(Σ_g) / (B ‖G_g‖²)
``hessian_trace``          tr(H_gg), trace of the diagonal block of the Hessian
``hessian_trace_stderr``   standard error of the Hutchinson estimate over its probes
``hessian_probes``         number of probes behind the trace
``curvature``              hessian_trace / n_g (derived)
``ggn_trace``              tr(G_gg), trace of the diagonal block of the generalised
                           Gauss-Newton matrix G = Jᵀ H_out J (J the Jacobian of the
                           outputs, H_out the Hessian of the loss in the outputs; PSD)
``ggn_trace_stderr``       standard error over the sampled labels (0 when exact; one label
                           set: from the per-example spread, :mod:`~layerwise.sensitivity.ggn`)
``ggn_samples``            label samples behind the sampled ``ggn_trace`` (None if exact)
``ggn_curvature``          ggn_trace / n_g (derived)
=========================  ===========================================================

A quantity that was not asked for is ``None`` (``NaN`` in :meth:`SensitivityReport.to_frame`).
A quantity that was computed but came out non-finite is kept as it is (``nan``/``inf``):
a non-finite estimate is reported, never hidden.

Units: losses are in the loss function's units (the mean over the batch), so
``grad_norm`` is loss per unit parameter, ``hessian_trace`` and ``ggn_trace`` are loss per
unit parameter squared summed over the group, and ``curvature`` and ``ggn_curvature`` their
per-parameter means.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pandas is imported where a frame is made
    import pandas as pd

__all__ = ["COLUMNS", "EstimateCost", "GroupEstimate", "SensitivityReport"]

#: The columns of :meth:`SensitivityReport.to_frame`, in order.
COLUMNS = (
    "group",
    "num_params",
    "param_norm",
    "grad_norm",
    "grad_norm_stderr",
    "grad_variance",
    "grad_variance_stderr",
    "noise_to_signal",
    "hessian_trace",
    "hessian_trace_stderr",
    "hessian_probes",
    "curvature",
    "ggn_trace",
    "ggn_trace_stderr",
    "ggn_samples",
    "ggn_curvature",
)
#: Integer columns (counts) of a group's row.
_COUNTS = ("num_params", "hessian_probes", "ggn_samples")


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class GroupEstimate:
    """The measured quantities of one parameter group (see the module docstring)."""

    group: str
    num_params: int
    param_norm: float | None = None
    grad_norm: float | None = None
    grad_norm_stderr: float | None = None
    grad_variance: float | None = None
    grad_variance_stderr: float | None = None
    noise_to_signal: float | None = None
    hessian_trace: float | None = None
    hessian_trace_stderr: float | None = None
    hessian_probes: int | None = None
    ggn_trace: float | None = None
    ggn_trace_stderr: float | None = None
    ggn_samples: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.group, str) or not self.group:
            raise ValueError(f"group must be a non-empty string, got {self.group!r}")
        if int(self.num_params) < 0:
            raise ValueError(f"num_params must be >= 0, got {self.num_params!r}")
        object.__setattr__(self, "num_params", int(self.num_params))
        for name in _FLOAT_FIELDS:
            object.__setattr__(self, name, _optional_float(getattr(self, name)))
        for name in _COUNTS[1:]:
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))

    @property
    def curvature(self) -> float | None:
        """Mean per-parameter Hessian diagonal of the group, ``hessian_trace / num_params``."""
        if self.hessian_trace is None or self.num_params == 0:
            return None
        return self.hessian_trace / self.num_params

    @property
    def curvature_stderr(self) -> float | None:
        """Standard error of :attr:`curvature`."""
        if self.hessian_trace_stderr is None or self.num_params == 0:
            return None
        return self.hessian_trace_stderr / self.num_params

    @property
    def ggn_curvature(self) -> float | None:
        """Mean per-parameter GGN diagonal of the group, ``ggn_trace / num_params``."""
        if self.ggn_trace is None or self.num_params == 0:
            return None
        return self.ggn_trace / self.num_params

    @property
    def ggn_curvature_stderr(self) -> float | None:
        """Standard error of :attr:`ggn_curvature`."""
        if self.ggn_trace_stderr is None or self.num_params == 0:
            return None
        return self.ggn_trace_stderr / self.num_params

    def to_dict(self) -> dict[str, Any]:
        """Plain data; non-finite floats are kept as floats (JSON writers spell them NaN)."""
        return dataclasses.asdict(self)

    def is_finite(self) -> bool:
        """Whether every computed quantity is finite (``None`` counts as finite)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                return False
        return True


#: The float fields of :class:`GroupEstimate` (every field but the name and the counts).
_FLOAT_FIELDS = tuple(
    f.name for f in dataclasses.fields(GroupEstimate) if f.name not in ("group", *_COUNTS)
)


@dataclass(frozen=True)
class EstimateCost:
    """What an estimate cost: Hutchinson probes per group (max), Hessian-vector products
    evaluated (each a batched product over all parameters counts once per probe), examples
    and batches seen, wall-clock seconds, and the GGN's backward passes (label samples, or
    output entries per example when exact, summed over batches)."""

    probes: int = 0
    hvps: int = 0
    examples: int = 0
    batches: int = 0
    seconds: float = 0.0
    ggn_passes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SensitivityReport:
    """Per-group estimates, what they cost, and the settings that produced them.

    >>> r = SensitivityReport([GroupEstimate("fc1", 6, grad_norm=0.5, hessian_trace=3.0)])
    >>> r["fc1"].curvature
    0.5
    >>> SensitivityReport.from_dict(r.to_dict()) == r
    True
    """

    groups: tuple[GroupEstimate, ...]
    cost: EstimateCost = field(default_factory=EstimateCost)
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        groups = tuple(self.groups)
        for g in groups:
            if not isinstance(g, GroupEstimate):
                raise TypeError(f"groups must hold GroupEstimate objects, got {type(g).__name__}")
        names = [g.group for g in groups]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"groups holds duplicate group names: {dupes}")
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "settings", dict(self.settings))

    # -- access -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Group names in order."""
        return [g.group for g in self.groups]

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[GroupEstimate]:
        return iter(self.groups)

    def __getitem__(self, name: str) -> GroupEstimate:
        for g in self.groups:
            if g.group == name:
                return g
        raise KeyError(f"no group named {name!r}; groups are {self.names}")

    def __contains__(self, name: object) -> bool:
        return any(g.group == name for g in self.groups)

    def is_finite(self) -> bool:
        """Whether every computed quantity of every group is finite."""
        return all(g.is_finite() for g in self.groups)

    # -- conversion ---------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        """One row per group, the columns of :data:`COLUMNS` (``None`` becomes ``NaN``)."""
        import pandas as pd

        rows = []
        for g in self.groups:
            row = g.to_dict()
            row["curvature"] = g.curvature
            row["ggn_curvature"] = g.ggn_curvature
            rows.append({c: row[c] for c in COLUMNS})
        frame = pd.DataFrame(rows, columns=list(COLUMNS))
        for c in COLUMNS[1:]:
            frame[c] = pd.to_numeric(frame[c], errors="coerce")
        return frame

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: ``{"groups": [...], "cost": {...}, "settings": {...}}``."""
        return {
            "groups": [g.to_dict() for g in self.groups],
            "cost": self.cost.to_dict(),
            "settings": dict(self.settings),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityReport:
        """Inverse of :meth:`to_dict`; unknown keys are an error that names them."""
        if not isinstance(data, Mapping) or "groups" not in data:
            raise ValueError("data must be a mapping with a 'groups' entry (from to_dict())")
        known = {f.name for f in dataclasses.fields(GroupEstimate)}
        groups = []
        for row in data["groups"]:
            unknown = sorted(set(row) - known)
            if unknown:
                raise ValueError(f"group entry {row.get('group')!r} has unknown keys {unknown}")
            groups.append(GroupEstimate(**row))
        cost = EstimateCost(**data.get("cost", {}))
        return cls(tuple(groups), cost, dict(data.get("settings", {})))

    def __str__(self) -> str:
        frame = self.to_frame().set_index("group")
        c = self.cost
        head = (
            f"SensitivityReport: {len(self)} groups, {c.examples} examples in {c.batches} "
            f"batches, {c.probes} probes, {c.hvps} HVPs, {c.seconds:.3g} s"
        )
        import pandas as pd

        with pd.option_context("display.width", 200, "display.max_columns", 20):
            return head + "\n" + frame.to_string(float_format=lambda v: f"{v:.4g}")
