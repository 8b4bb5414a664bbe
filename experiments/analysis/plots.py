"""The figures of ``layerwise analyze``: one PNG per quantity, one entry per parameter group
(a bar on a linear axis; a point with error bars on a log axis, where bar lengths mean nothing).

- ``hessian_trace.png``: tr(H_gg) ± its Hutchinson standard error, and beside it the
  curvature tr(H_gg)/n_g ± stderr/n_g, which is comparable across groups of different sizes;
- ``grad_variance.png``: tr(Σ_g)/n_g ± its standard error (log scale when all positive);
- ``noise_to_signal.png``: tr(Σ_g)/(B‖G_g‖²) (log scale when all positive), with the line 1
  where noise equals signal;
- ``multipliers.png``: the multipliers a policy would assign, with its bounds drawn.

Figures are drawn on the Agg canvas directly (no pyplot, no global backend state). A value
that is missing or non-finite is marked ``n/a`` at the baseline rather than dropped silently.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "grad_variance_figure",
    "hessian_trace_figure",
    "multipliers_figure",
    "noise_to_signal_figure",
    "png_bytes",
]

Values = Sequence[float | None]


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _figure(groups: Sequence[str], panels: int = 1) -> tuple[Figure, list[Axes]]:
    width = min(4.0 + 0.55 * len(groups), 16.0) * (1.0 if panels == 1 else 0.8)
    fig = Figure(figsize=(width * panels, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def _bars(
    ax: Axes,
    groups: Sequence[str],
    values: Values,
    errors: Values | None = None,
    *,
    ylabel: str,
    title: str,
    color: str = "tab:blue",
    log: bool = False,
) -> None:
    x = range(len(groups))
    heights = [v if _finite(v) else 0.0 for v in values]
    err = None
    if errors is not None:
        err = [e if _finite(e) and _finite(v) else 0.0 for v, e in zip(values, errors, strict=True)]
    use_log = log and all(_finite(v) and v > 0 for v in values) and len(values) > 0
    if use_log:  # bar lengths mean nothing on a log axis: points with error bars instead
        ax.errorbar(x, heights, yerr=err, fmt="o", capsize=4, color=color, markersize=7)
        ax.set_xlim(-0.5, len(groups) - 0.5)
    else:
        ax.bar(x, heights, yerr=err, capsize=4 if err is not None else 0, color=color, alpha=0.85)
    for i, v in enumerate(values):
        if not _finite(v):
            ax.annotate(
                "n/a" if v is None else str(v),
                (i, 0),
                ha="center",
                va="bottom",
                fontsize=8,
                color="tab:red",
            )
    if use_log:
        ax.set_yscale("log")
    else:
        ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(
        list(x),
        list(groups),
        rotation=45 if len(groups) > 4 else 0,
        ha="right" if len(groups) > 4 else "center",
        fontsize=8,
    )
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def hessian_trace_figure(
    groups: Sequence[str],
    trace: Values,
    stderr: Values,
    num_params: Sequence[int],
    *,
    probes: int | None = None,
) -> Figure:
    """Two panels: tr(H_gg) ± stderr, and curvature = tr(H_gg)/n_g ± stderr/n_g."""
    fig, (left, right) = _figure(groups, panels=2)
    per = [None if t is None or n == 0 else t / n for t, n in zip(trace, num_params, strict=True)]
    per_err = [
        None if s is None or n == 0 else s / n for s, n in zip(stderr, num_params, strict=True)
    ]
    note = f" ({probes} probes)" if probes else ""
    _bars(left, groups, trace, stderr, ylabel="tr(H_gg)", title=f"Hessian trace ± stderr{note}")
    _bars(
        right,
        groups,
        per,
        per_err,
        ylabel="tr(H_gg) / n_g",
        color="tab:purple",
        title="curvature per parameter ± stderr",
    )
    return fig


def grad_variance_figure(groups: Sequence[str], variance: Values, stderr: Values) -> Figure:
    """tr(Σ_g)/n_g ± stderr, the mean per-parameter variance of per-example gradients."""
    fig, (ax,) = _figure(groups)
    _bars(
        ax,
        groups,
        variance,
        stderr,
        ylabel="tr(Σ_g) / n_g",
        color="tab:orange",
        log=True,
        title="gradient variance (per parameter) ± stderr",
    )
    return fig


def noise_to_signal_figure(groups: Sequence[str], ratio: Values) -> Figure:
    """tr(Σ_g)/(B‖G_g‖²) per group; above 1 the batch gradient is mostly noise."""
    fig, (ax,) = _figure(groups)
    _bars(
        ax,
        groups,
        ratio,
        ylabel="tr(Σ_g) / (B ‖G_g‖²)",
        color="tab:green",
        log=True,
        title="noise-to-signal ratio of the batch gradient",
    )
    ax.axhline(1.0, color="tab:red", linestyle="--", linewidth=1, label="noise = signal")
    ax.legend(fontsize=8)
    return fig


def multipliers_figure(
    groups: Sequence[str],
    multipliers: Mapping[str, float],
    *,
    policy: str,
    bounds: Mapping[str, float],
    note: str | None = None,
) -> Figure:
    """The multiplier per group the policy would assign, as a bar up or down from 1 (the
    uniform rate) on a log scale, with the bounds: ``min_multiplier``/``max_multiplier``
    (dashed), the band every multiplier ends in (``band_low``..``band_high``, shaded) and the
    first recalibration's change limit ``1/max_change``..``max_change`` (dotted)."""
    fig, (ax,) = _figure(groups)
    values = [multipliers.get(g) for g in groups]
    x = range(len(groups))
    ok = [_finite(v) and v > 0 for v in values]
    ax.bar(
        x,
        [v - 1.0 if good else 0.0 for v, good in zip(values, ok, strict=True)],
        bottom=1.0,
        color="tab:cyan",
        alpha=0.9,
        edgecolor="tab:blue",
    )
    for i, (v, good) in enumerate(zip(values, ok, strict=True)):
        text, y = (f"{v:.3g}", v) if good else ("n/a", 1.0)
        ax.annotate(
            text,
            (i, y),
            ha="center",
            va="bottom" if not good or v >= 1 else "top",
            fontsize=8,
            color="black" if good else "tab:red",
        )
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=1, label="uniform (1)")
    lo, hi = bounds.get("band_low"), bounds.get("band_high")
    if _finite(lo) and _finite(hi):
        ax.axhspan(lo, hi, color="tab:green", alpha=0.08, label=f"allowed [{lo:.3g}, {hi:.3g}]")
    change = bounds.get("max_change")
    if _finite(change) and change > 1:
        for edge in (1.0 / change, change):
            ax.axhline(edge, color="tab:orange", linestyle=":", linewidth=1)
        ax.plot([], [], color="tab:orange", linestyle=":", label=f"first change ×{change:g}")
    for key, style in (("min_multiplier", "--"), ("max_multiplier", "--")):
        v = bounds.get(key)
        if _finite(v) and v > 0:
            ax.axhline(v, color="tab:red", linestyle=style, linewidth=1)
    ax.plot([], [], color="tab:red", linestyle="--", label="min / max multiplier")
    ax.set_xticks(
        list(x),
        list(groups),
        rotation=45 if len(groups) > 4 else 0,
        ha="right" if len(groups) > 4 else "center",
        fontsize=8,
    )
    ax.set_ylabel("learning-rate multiplier")
    title = f"multipliers policy {policy!r} would assign"
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=10)
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    return fig
