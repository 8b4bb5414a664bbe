"""Figures of an ablation (matplotlib, Agg backend, PNG files).

* :func:`plot_curves`: training loss, validation loss and validation metric against the
  step, one line per policy (mean over seeds) with its 95% t-interval band; the losses,
  on a log scale, as the geometric mean with the t-interval of their logarithm;
* :func:`plot_rates`: each group's effective learning rate over training (mean over
  seeds, log scale), one panel per policy;
* :func:`plot_heatmap`: a group x evaluation-step heat map of a per-group quantity
  (log10 of the Hutchinson curvature ``tr(H_gg)/n_g`` by default), mean over seeds, one
  panel per policy, on one colour scale;
* :func:`plot_summary`: the difference of mean test metric to ``uniform`` with its
  bootstrap interval, per task and policy (a forest plot), significant ones filled;
* :func:`plot_groups`: one value per parameter group, one panel per quantity (the figures of
  ``layerwise analyze``).

Every function writes ``path`` atomically and returns it.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from layerwise.experiments.atomic import atomic_write
from layerwise.experiments.statistics import t_band

__all__ = ["plot_curves", "plot_groups", "plot_heatmap", "plot_rates", "plot_summary"]


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write(path, lambda h: h.write(buffer.getvalue()))


def _colors(policies: list[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {
        p: ("black" if p == "uniform" else cycle[i % len(cycle)]) for i, p in enumerate(policies)
    }


def _by_seed(frame: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    wide = frame.pivot_table(
        index="seed", columns="step", values=column, aggfunc="mean", dropna=False
    )
    return wide.columns.to_numpy(dtype=float), wide.to_numpy(dtype=float)


def plot_curves(
    curves: pd.DataFrame, policies: list[str], path: Path, *, title: str, metric: str = "accuracy"
) -> Path:
    """Loss and metric curves per policy with confidence bands over seeds."""
    panels = [
        ("train_loss", "training loss", True),
        ("val_loss", "validation loss", True),
        ("val_metric", f"validation {metric}", False),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    fig.subplots_adjust(wspace=0.3)
    colors = _colors(policies)
    for ax, (column, label, log) in zip(axes, panels, strict=True):
        for policy in policies:
            part = curves[curves["policy"] == policy]
            if part.empty:
                continue
            steps, values = _by_seed(part, column)
            keep = ~np.all(np.isnan(values), axis=0)
            if not keep.any():
                continue
            kept = values[:, keep]
            if log:  # losses: geometric mean and the band of the log, never below zero
                with np.errstate(divide="ignore", invalid="ignore"):
                    mean, half = t_band(np.log10(np.where(kept > 0, kept, np.nan)))
                low, mid, high = 10 ** (mean - half), 10**mean, 10 ** (mean + half)
            else:
                mid, half = t_band(kept)
                low, high = mid - half, mid + half
            n = values.shape[0]
            ax.plot(steps[keep], mid, color=colors[policy], label=f"{policy} (n={n})", lw=1.6)
            ax.fill_between(steps[keep], low, high, color=colors[policy], alpha=0.18, lw=0)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{title}: mean over seeds (losses: geometric mean), 95% t-interval bands")
    return _save(fig, path)


def plot_rates(
    groups: pd.DataFrame, policies: list[str], order: list[str], path: Path, *, title: str
) -> Path:
    """Per-group effective learning rate over training, one panel per policy."""
    fig, axes = plt.subplots(
        1, len(policies), figsize=(3.6 * len(policies), 3.4), sharey=True, squeeze=False
    )
    cmap = plt.get_cmap("viridis")
    for ax, policy in zip(axes[0], policies, strict=True):
        part = groups[groups["policy"] == policy]
        for i, group in enumerate(order):
            g = part[part["group"] == group].groupby("step")["lr"].mean()
            if not g.empty:
                ax.plot(
                    g.index,
                    g.to_numpy(),
                    color=cmap(i / max(1, len(order) - 1)),
                    label=group,
                    lw=1.4,
                )
        ax.set_yscale("log")
        ax.set_title(policy, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("effective learning rate")
    axes[0][-1].legend(fontsize=7, loc="best", title="group (input → head)", title_fontsize=7)
    fig.suptitle(f"{title}: per-group effective rate (mean over seeds)")
    return _save(fig, path)


def plot_heatmap(
    groups: pd.DataFrame,
    policies: list[str],
    order: list[str],
    path: Path,
    *,
    title: str,
    quantity: str = "curvature",
) -> Path | None:
    """log10 of a per-group quantity over training (mean over seeds), one panel per policy.
    Returns ``None`` (no file) when the quantity was never measured."""
    data = groups[np.isfinite(groups[quantity].astype(float)) & (groups[quantity] > 0)]
    if data.empty:
        return None
    grids = {}
    for policy in policies:
        part = data[data["policy"] == policy]
        if part.empty:
            continue
        wide = part.pivot_table(index="group", columns="step", values=quantity, aggfunc="mean")
        grids[policy] = np.log10(wide.reindex([g for g in order if g in wide.index]))
    if not grids:
        return None
    lo = min(float(np.nanmin(g.to_numpy())) for g in grids.values())
    hi = max(float(np.nanmax(g.to_numpy())) for g in grids.values())
    fig, axes = plt.subplots(
        1, len(grids), figsize=(3.8 * len(grids), 0.45 * len(order) + 2.2), squeeze=False
    )
    image = None
    for ax, (policy, grid) in zip(axes[0], grids.items(), strict=True):
        image = ax.imshow(
            grid.to_numpy(), aspect="auto", cmap="magma", vmin=lo, vmax=hi, interpolation="nearest"
        )
        steps = grid.columns.to_numpy()
        ticks = np.unique(np.linspace(0, len(steps) - 1, min(5, len(steps))).astype(int))
        ax.set_xticks(ticks, [f"{int(steps[t])}" for t in ticks], fontsize=7)
        first = ax is axes[0][0]
        ax.set_yticks(range(len(grid.index)), list(grid.index) if first else [], fontsize=7)
        ax.set_title(policy, fontsize=10)
        ax.set_xlabel("step")
    label = {"curvature": "log10 tr(H_gg)/n_g", "noise": "log10 noise-to-signal"}.get(
        quantity, f"log10 {quantity}"
    )
    fig.colorbar(image, ax=axes[0].tolist(), label=label, shrink=0.9)
    fig.suptitle(f"{title}: per-group {quantity} on a fixed batch (mean over seeds)")
    return _save(fig, path)


def plot_summary(table: pd.DataFrame, path: Path) -> Path | None:
    """Forest plot of ``delta`` (policy minus uniform, percentage points) with intervals."""
    rows = table[(table["policy"] != "uniform") & table["delta"].notna()]
    if rows.empty:
        return None
    labels = [
        f"{r.task}{'' if r.setting == 'default' else f' ({r.setting})'} · {r.policy}"
        for r in rows.itertuples()
    ]
    fig, ax = plt.subplots(figsize=(7.5, 0.34 * len(rows) + 1.4))
    y = np.arange(len(rows))[::-1]
    for yi, r in zip(y, rows.itertuples(), strict=True):
        color = {"better": "tab:green", "worse": "tab:red"}.get(r.verdict, "tab:gray")
        lo = 100 * (r.delta - r.delta_low) if math.isfinite(r.delta_low) else 0.0
        hi = 100 * (r.delta_high - r.delta) if math.isfinite(r.delta_high) else 0.0
        filled = r.verdict in ("better", "worse")
        ax.errorbar(
            100 * r.delta,
            yi,
            xerr=[[lo], [hi]],
            fmt="o",
            color=color,
            mfc=color if filled else "white",
            capsize=3,
        )
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("test metric minus uniform (percentage points), 95% bootstrap CI")
    ax.grid(alpha=0.3, axis="x")
    ax.set_title("Which policy helped? (filled: significant after Holm)", fontsize=10)
    return _save(fig, path)


def _floats(values: list) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _group_panel(ax, panel: dict) -> None:
    """Draw one panel of :func:`plot_groups` on ``ax``."""
    values = _floats(panel["values"])
    ok = np.isfinite(values)
    errors = panel.get("errors")
    if errors is not None:
        errors = _floats(errors)
        errors = np.where(ok & np.isfinite(errors), errors, 0.0)
    x = np.arange(len(values))
    if panel.get("log") and ok.all() and (values > 0).all():
        ax.errorbar(x, values, yerr=errors, fmt="o", capsize=4, markersize=7)
        ax.set_yscale("log")
    else:
        ax.bar(x, np.where(ok, values, 0.0), yerr=errors, capsize=4, alpha=0.85)
        ax.axhline(0.0, color="black", lw=0.6)
    for i in np.flatnonzero(~ok):
        text = "n/a" if panel["values"][i] is None else str(panel["values"][i])
        ax.annotate(text, (i, 0), ha="center", color="tab:red", fontsize=8)
    for j, (label, y) in enumerate(panel.get("lines", {}).items()):
        ax.axhline(y, color=f"C{j + 1}", linestyle="--", lw=1, label=label)
    if panel.get("lines"):
        ax.legend(fontsize=7)
    ax.set_ylabel(panel["label"])
    ax.grid(axis="y", alpha=0.3, which="both")


def plot_groups(path: Path, names: list[str], panels: list[dict], *, title: str) -> Path:
    """One value per parameter group, a panel per quantity: a bar on a linear axis, or a
    point on a log axis (where bar lengths mean nothing), with its error bar.

    A panel is ``{"values": [...], "label": str}`` with optional ``"errors"`` (standard
    errors, same units as the values), ``"log"`` (used when every value is finite and
    positive) and ``"lines"`` (``{label: y}``, dashed reference lines). A missing or
    non-finite value is marked at the baseline, never dropped silently.
    """
    if not panels or any(len(p["values"]) != len(names) for p in panels):
        raise ValueError(f"panels must each hold one value per name ({len(names)}), got {panels}")
    width = min(4.0 + 0.55 * len(names), 16.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        _group_panel(ax, panel)
        ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 4 else 0, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
